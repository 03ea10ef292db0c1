"""MVPTR: multi-stage vision-language pre-training via multi-level semantic alignment
(Li et al., 2022).

Three encoders (§3.1-3.3), built from the shared blocks:

* a textual encoder over {w, c}: the caption's tokens, then its phrase concepts (segment 1,
  positions after the words). Phrase concepts have their own embedding rows, each initialised as
  the mean of its tokens' word embeddings (§3.1);
* a visual encoder over {t_cls, t, r}: a learnt [CLS], the detector's tags embedded as tokens of
  the tag vocabulary (the official reading: as word pieces, by the word embeddings; see
  ``MVPTRConfig.tag_vocab``), and the position-aware region features linearly mapped to the
  hidden size;
* a multi-modal encoder over {w̃, c̃, r̃}, the uni-modal outputs concatenated. Tags are left out
  so that MLM has no shortcut through them (§3.3).

Five objectives, each its own loss (eq. 5 sums them; the platform applies the weights):
MCR on the visual encoder's masked tags, VSC on the uni-modal [CLS] outputs, WPG, MLM and ITM on
the multi-modal encoder. All masking (MLM with chain masking, MCR) is done by the Ray Data CPU
stage (``platform/ingest.py``, as ``input_spec`` asks: the official reading's word-piece tags
and random phrase masking too); this module only computes.

Table 4's ablations (``model.mvptr.ablation``) remove a component entirely: its parameters, its
inputs (the data stage does not even prepare them, see ``input_spec``) and its loss.

Initialisation (§4.1): the textual and visual encoders from BERT layers 0-5, the multi-modal
encoder from layers 6-11, through ``bert_layer_plan``. A 6-layer checkpoint (MiniLM) has no
layers 6-11: the plan then gives the multi-modal encoder the same layers 0-5, so all three
encoders start pretrained. BERT's embeddings initialise the word, position and segment
embeddings of the textual encoder; the tag embeddings, region projection and heads start from
BERT's random initialisation.

Additions that are not the paper's, off by default (``MVPTRConfig``; issue #13): a
relative-geometry term in the visual encoder's attention, the tags placed at their regions' boxes
in it, and the shard set's negative captions as extra ITM negatives. On the synthetic set the
paper's objectives never learn which of two objects is left of the other (README, "Relation
swaps"); these are what the probes found it takes.

Readings where the paper leaves a choice:

* ITM (eq. 4) is over "n matched and n hard negative pairs", the negatives "sampled from p_v2s,
  p_s2v". We take n negatives in all: the first ⌈n/2⌉ texts each get a negative image drawn from
  p_s2v, the remaining images each a negative text drawn from p_v2s (ALBEF would take 2n).
  ``objectives.itm_negatives = hardest`` takes the most similar candidate instead. A candidate
  showing the row's image (its positive or another caption of it) is never drawn; a row without
  any candidate is dropped from the negatives.
* WPG (eq. 2, text-to-image only) reuses those image negatives and the positive pass, so it adds
  no multi-modal forward; its mean runs over the ⌈n/2⌉ texts that got a negative image and have
  at least one phrase. The hinge is clamped at zero from below (see ``objectives.wpg_hinge``).
* VSC (the paper reading; READINGS lists the official code's) uses the [CLS] outputs themselves,
  L2-normalised, without a projection ("we take the
  L2-normalized output representations of [CLS]"); τ is learnable (``model.temperature`` its
  initial value). A text checkpoint pre-trained on mean-pooled sentences reads its caption as
  that mean instead (``MVPTRConfig.vsc_text_pooling``, the Flickr8k presets with MiniLM); a visual
  encoder started from such a checkpoint's layers may read its sequence's mean as well
  (``vsc_image_pooling``).
* One visual pass on the MCR-masked tags feeds MCR, VSC and the multi-modal encoder: tags never
  enter the multi-modal encoder, so their masking cannot leak into MLM or ITM. The paper does not
  say which tags VSC reads; the official code's single pass reads the masked ones, and so do we
  by default. ``MVPTRConfig.tag_pass = separate`` gives MCR a visual pass of its own on the masked
  tags, and VSC and the multi-modal encoder the unmasked ones that evaluation sees. The MLM pass
  re-runs the textual encoder on the masked caption and chain-masked phrases, then the
  multi-modal encoder, batched with the ITM/WPG pairs into one multi-modal call (the paper
  reading of ``text_pass``; the official code's single masked pass has no MLM pass of its own).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from alignlab.models.base import (CONCEPT_MASK, CONCEPT_OFFSET, IGNORE, Ablation, ConfigError, InputSpec, ModelOutput,
                                  ModelSpec, PretrainingModel, Readings, Vocab)
from alignlab.models.blocks import (BertCheckpoint, GeometryBias, PredictionHead, RegionEmbeddings, TextEmbeddings,
                                    TransformerEncoder, TransformerSize, bert_layer_plan, init_weights,
                                    sentence_embedding)
from alignlab.models.config import ObjectivesConfig
from alignlab.models.objectives import (clamp_logit_scale, contrastive_logits, contrastive_loss, gather_no_grad,
                                        gather_rows, global_hard_negatives, global_view, itm_loss,
                                        masked_token_loss, wpg_hinge, wpg_similarity)


@dataclass(frozen=True)
class Components:
    """Which optional parts a Table-4 row keeps."""

    tags: bool  # tag input to the visual encoder
    mcr: bool  # masked concept recovering (needs tags)
    phrases: bool  # phrase-concept input to the textual encoder
    wpg: bool  # weakly-supervised phrase grounding (needs phrases)


# Table 4's rows: the full model, without masked concept recovering, without MCR and the tag input,
# without weakly-supervised phrase grounding, without WPG and the phrase input. A removed
# component contributes no parameters, no inputs and no loss.
TABLE4: dict[str, Components] = {
    "full": Components(tags=True, mcr=True, phrases=True, wpg=True),
    "wo_mcr": Components(tags=True, mcr=False, phrases=True, wpg=True),
    "wo_mcr_tag": Components(tags=False, mcr=False, phrases=True, wpg=True),
    "wo_wpg": Components(tags=True, mcr=True, phrases=True, wpg=False),
    "wo_wpg_phrase": Components(tags=True, mcr=True, phrases=False, wpg=False),
}


# The two readings of MVPTR (#15): what each reading switch of MVPTRConfig takes unless set
# explicitly. "paper" follows the paper's text, "official" the authors' code
# (Junction4Nako/mvp_pytorch), as the audit of #15 describes it. The README's table of readings
# lists every difference.
READINGS = {
    "paper": {"vsc_projection": "none", "temperature_clamp": "clip", "itm_draw": "objectives",
              "itm_exclude": "same_image", "wpg_negatives": "itm_hard", "wpg_region": "best",
              "tag_vocab": "tag_classes", "text_pass": "separate", "phrase_masking": "chain"},
    "official": {"vsc_projection": "linear", "temperature_clamp": "none", "itm_draw": "hardest",
                 "itm_exclude": "own_pair", "wpg_negatives": "random_positive_pass", "wpg_region": "random_top3",
                 "tag_vocab": "word_pieces", "text_pass": "single_masked", "phrase_masking": "chain_and_random"},
}


@dataclass
class MVPTRConfig(Readings):
    """``model.mvptr``: MVPTR-specific options (Li et al., 2022, §3 and Table 4)."""

    ablation: Literal[tuple(TABLE4)] = "full"  # a Table-4 row
    wpg_margin: float = 0.2  # WPG hinge margin (§3.3)
    # Layers of the textual, visual and multi-modal encoders (6 each in the paper: the uni-modal
    # encoders from BERT-base layers 0-5, the multi-modal encoder from layers 6-11).
    text_layers: int = 6
    visual_layers: int = 6
    fusion_layers: int = 6
    # The paper fine-tunes every layer (0). k > 0 keeps the textual encoder's word, position,
    # segment and phrase-concept embeddings and its first k layers as ``text_init`` loaded them,
    # and runs them without autograd: a budget choice for small compute, never the paper's.
    frozen_text_layers: int = 0
    # Reading switches (base.Readings; READINGS above gives each reading's values; itm_exclude
    # and reading are the base's).
    READINGS: ClassVar[dict[str, dict[str, str]]] = READINGS
    # VSC's global embeddings (eq. 1): "none", the [CLS] outputs L2-normalised as they are
    # ("we take the L2-normalized [CLS]"), or "linear", a learnable projection to model.embed_dim
    # before normalising (the official code's txt_proj / vis_proj).
    vsc_projection: Literal["", "none", "linear"] = ""
    # The textual side of VSC's global embedding (eq. 1): "cls", the [CLS] output (the paper and
    # the official code), or "mean", the mean over the caption's words (blocks.sentence_embedding).
    # Not a reading: the choice belongs to the text checkpoint, and the Flickr8k presets read
    # the offline MiniLM as it was pre-trained to be read, by the mean.
    vsc_text_pooling: Literal["cls", "mean"] = "cls"
    # The visual side of VSC's global embedding: "cls", the visual [CLS] output (the paper and the
    # official code), or "mean", the mean over the visual encoder's outputs at its real positions
    # ([CLS], tags and regions; padding not). Not a reading either: a visual encoder started from
    # a mean-read checkpoint (the Flickr8k presets' MiniLM layers, bert_layer_plan) has no [CLS]
    # pre-trained as a summary (SIMLA's itc_image_pooling reads its hybrid ViT's mean for that
    # reason). On Flickr8k it ran level with [CLS] (one seed, README "Real-data signal"), so the
    # presets keep [CLS].
    vsc_image_pooling: Literal["cls", "mean"] = "cls"
    # The learnable temperature τ of eq. 1: "clip", τ >= 0.01 (CLIP's cap; the paper states
    # none), or "none", unclamped (the official code).
    temperature_clamp: Literal["", "clip", "none"] = ""
    # ITM's hard negative (eq. 4): "objectives", drawn as objectives.itm_negatives says (sample
    # from p_s2v / p_v2s by default, the paper's "sampled"), or "hardest", the argmax (the
    # official code's hn_mod='hard').
    itm_draw: Literal["", "objectives", "hardest"] = ""
    # WPG's negative image (§3.3): "itm_hard", ITM's hard negative image, its regions fused with
    # this text in the negative pass; or "random_positive_pass", another image of the batch drawn
    # uniformly, its region states taken from its own positive pass (official).
    wpg_negatives: Literal["", "itm_hard", "random_positive_pass"] = ""
    # Each phrase's region in S_wpg (eq. 2): "best", the max; or "random_top3", one of its 3 most
    # similar regions drawn uniformly (official).
    wpg_region: Literal["", "best", "random_top3"] = ""
    # What tags are written in (§3.1-3.2). "tag_classes": the classes of tags.txt, embedded by a
    # table of their own, MCR masking them at objectives.mcr_prob (the paper's 25%) with random
    # replacements from the tags, and predicting the tag class through an MLP head. "word_pieces"
    # (official): the tags' word pieces, embedded by the textual encoder's word embeddings,
    # masked as the words are (the same random_word at objectives.mlm_prob, 15%, random
    # replacements from the word vocabulary; oscar/oscar_datasets_ml/oscar_tsv4.py
    # convert_example_to_features on tokens_b), MCR predicting the word through a head whose
    # decoder is the word embeddings (BiBertImgForPreTraining.half_mlm, tied in tie_weights,
    # oscar/modeling/modeling_vlbert.py).
    tag_vocab: Literal["", "tag_classes", "word_pieces"] = ""
    # The caption the objectives read (§3.3). "separate": VSC, ITM and WPG read the caption and
    # its phrases unmasked; MLM reads a pass of its own over the masked caption and the
    # chain-masked phrases. "single_masked" (official): the masked caption and phrases are the
    # only text: one textual pass feeds VSC, the ITM and WPG pairs, and MLM reads the positive
    # pairs' multi-modal outputs (BiBertImgForPreTraining.forward takes the masked input_ids_a
    # alone).
    text_pass: Literal["", "separate", "single_masked"] = ""
    # The tags VSC and the multi-modal encoder read (§3.2-3.3). "single_masked": the visual pass
    # on the MCR-masked tags serves MCR, VSC and the region states (the official code; the paper
    # does not say). "separate": MCR reads a visual pass of its own on the masked tags, the rest
    # a second one on the unmasked tags, as evaluation encodes them; a visual pass more a step,
    # text_pass's "separate" on the visual side. Not a reading switch: the paper gives no reading
    # to follow, and single_masked keeps every figure measured before the switch. On Flickr8k
    # "separate" ran level with it at 1.2x the step (README, "MVPTR's Table 4 on the dev split").
    tag_pass: Literal["single_masked", "separate"] = "single_masked"
    # Phrase masking of the masked text (§3.3). "chain": a phrase is masked exactly when it holds
    # a masked word (chain masking). "chain_and_random" (official): every other phrase is also
    # masked at objectives.mlm_prob, by BERT's 80/10/10 over the phrase vocabulary, with no target
    # (random_phrases, oscar/oscar_datasets_ml/oscar_tsv4.py).
    phrase_masking: Literal["", "chain", "chain_and_random"] = ""
    # Not in the paper: three additions for relations between objects (issue #13; README,
    # "Relation swaps"), all off by default. ``geometry_bias``: a relative-geometry term in the
    # visual encoder's self-attention between regions (blocks.GeometryBias), ``geometry_slope``
    # its heads' initial directional slope (0: the term learned from zero). ``placed_tags``: with
    # the term, tag i takes region i's box, so a tag, which names its region's class outright,
    # stands where its region does; it needs one tag a region in box order (the synthetic set's
    # tags; not the word-piece tags, nor a detector set with a whole-image box) and applies in the
    # rows that keep tags. ``itm_negative_captions``: each row's ``negative_caption`` (a shard
    # column: a caption false of the image that differs from a true one in one thing; the
    # synthetic set writes each relation caption with one clause reversed), fused with the row's
    # own image, is ITM's negative against the row's positive pair in a loss of its own
    # (``itm_negative_captions``, weighted by objectives.weights like the others): NegCLIP's hard
    # negative captions (Yuksekgonul et al. 2023) in ITM instead of the contrastive loss.
    geometry_bias: bool = False
    geometry_slope: float = 10.0
    placed_tags: bool = False
    itm_negative_captions: bool = False

    @property
    def components(self) -> Components:
        return TABLE4[self.ablation]


class MVPTR(PretrainingModel):
    objectives = ("vsc", "mcr", "wpg", "mlm", "itm", "itm_negative_captions")
    optional_objectives = ("mcr", "wpg", "mlm", "itm_negative_captions")
    # §4.2: retrieval is fine-tuned "with L_vsc + L_itm with the same setting in pre-training".
    retrieval_objectives = ("vsc", "itm")

    def __init__(self, model_cfg, objectives_cfg, vocab: Vocab):
        super().__init__()
        cfg = model_cfg.mvptr
        self.parts = cfg.components
        self.off = self.switched_off(objectives_cfg)
        self.margin = cfg.wpg_margin
        self.negatives = objectives_cfg.negatives
        self.cfg = cfg
        self.negative_mode = "hardest" if cfg.switch("itm_draw") == "hardest" else objectives_cfg.itm_negatives
        size = TransformerSize(model_cfg.hidden_size, model_cfg.num_heads, model_cfg.intermediate_size,
                               model_cfg.dropout)
        h = size.hidden_size
        if self.parts.tags and not vocab.tags:
            raise ValueError("MVPTR with tags needs the shard set's tags.txt (or ablation 'wo_mcr_tag')")
        if self.parts.phrases and not vocab.concepts:
            raise ValueError("MVPTR with phrases needs the shard set's concepts.txt (or ablation 'wo_wpg_phrase')")

        self.text_embeddings = TextEmbeddings(vocab.size, size)
        self.text_encoder = TransformerEncoder(size, cfg.text_layers)
        self.visual_cls = nn.Parameter(torch.zeros(1, 1, h))
        self.region_embeddings = RegionEmbeddings(model_cfg.image.region_dim, size)
        self.visual_encoder = TransformerEncoder(size, cfg.visual_layers)
        self.fusion_encoder = TransformerEncoder(size, cfg.fusion_layers)
        self.mlm_head = PredictionHead(h, vocab.size)  # words only: phrases are no MLM candidates (§3.3)
        self.itm_head = PredictionHead(h, 2)
        if self.parts.phrases:
            self.phrase_embeddings = nn.Embedding(len(vocab.concepts) + CONCEPT_OFFSET, h, padding_idx=0)
        # Tags as word pieces (the official reading) share the word embeddings and MCR predicts
        # words; as tag classes (the paper's) they have a table and a classifier of their own.
        self.tag_words = cfg.switch("tag_vocab") == "word_pieces"
        if self.parts.tags and not self.tag_words:
            self.tag_embeddings = TextEmbeddings(len(vocab.tags) + CONCEPT_OFFSET, size)
        if self.parts.mcr:
            self.mcr_head = PredictionHead(h, vocab.size if self.tag_words else len(vocab.tags))
        if cfg.switch("vsc_projection") == "linear":
            self.vsc_image_proj = nn.Linear(h, model_cfg.embed_dim)
            self.vsc_text_proj = nn.Linear(h, model_cfg.embed_dim)
        init_weights(self, model_cfg.init_std)
        if cfg.geometry_bias:  # after init_weights: the term's last layer must start at zero
            self.geometry_bias = GeometryBias(size.num_heads, cfg.geometry_slope)
        self.placed_tags = cfg.placed_tags and self.parts.tags
        if self.parts.mcr and self.tag_words:
            # Tied after the initialisation, so the shared rows are the word embeddings' (and a
            # checkpoint's word embeddings, loaded below, are the decoder's too).
            self.mcr_head.decoder.weight = self.text_embeddings.word_embeddings.weight
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / model_cfg.temperature)))

        if model_cfg.text_init:
            ckpt = BertCheckpoint.from_pretrained(model_cfg.text_init)
            ckpt.check_size(size, "model.text_init")
            ckpt.load_embeddings(self.text_embeddings)
            ckpt.load_encoder(self.text_encoder, bert_layer_plan(ckpt.num_layers, cfg.text_layers, 0))
            ckpt.load_encoder(self.visual_encoder, bert_layer_plan(ckpt.num_layers, cfg.visual_layers, 0))
            ckpt.load_encoder(self.fusion_encoder,
                              bert_layer_plan(ckpt.num_layers, cfg.fusion_layers, cfg.text_layers))
        if self.parts.phrases:
            self._init_phrases(vocab)
        if cfg.frozen_text_layers:
            # Every input below layer k is frozen too, so autograd records nothing until layer k:
            # the saving is the frozen layers' backward and their kept activations.
            frozen = [self.text_embeddings, *self.text_encoder.layers[:cfg.frozen_text_layers]]
            for module in frozen + ([self.phrase_embeddings] if self.parts.phrases else []):
                module.requires_grad_(False)
        # A switched-off objective's head gets no gradient.
        self.find_unused_parameters = bool(self.off)

    @torch.no_grad()
    def _init_phrases(self, vocab: Vocab) -> None:
        """Each phrase concept's row = the mean of its tokens' word embeddings (§3.1); the concept
        [MASK] row = the word [MASK]'s."""
        words = self.text_embeddings.word_embeddings.weight
        self.phrase_embeddings.weight[CONCEPT_MASK] = words[vocab.mask_id]
        for k, tokens in enumerate(vocab.concepts):
            if tokens:
                self.phrase_embeddings.weight[k + CONCEPT_OFFSET] = words[list(tokens)].mean(0)

    @classmethod
    def input_spec(cls, model_cfg, objectives_cfg) -> InputSpec:
        cfg = model_cfg.mvptr
        parts = cfg.components
        off = cls.switched_off(objectives_cfg)
        mlm = "mlm" not in off
        return InputSpec(regions=True, tags=parts.tags, tags_by_region=parts.tags and cfg.placed_tags,
                         phrases=parts.phrases, mlm=mlm,
                         mcr=parts.mcr and "mcr" not in off,
                         tag_words=parts.tags and cfg.switch("tag_vocab") == "word_pieces",
                         random_phrases=mlm and parts.phrases and cfg.switch("phrase_masking") == "chain_and_random",
                         negative_captions=cfg.itm_negative_captions and "itm_negative_captions" not in off)

    # ----------------------------------------------------------------------------------------
    # Encoders
    # ----------------------------------------------------------------------------------------

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    phrase_ids: torch.Tensor | None = None, phrase_mask: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """{w̃, c̃}: (B, L + P, d) and its key mask; P = 0 without phrases."""
        x, mask = self.text_embeddings(input_ids), attention_mask.bool()
        if self.parts.phrases:
            c = self.text_embeddings(phrase_ids, token_type=1, position_offset=input_ids.shape[1],
                                     table=self.phrase_embeddings)
            x, mask = torch.cat([x, c], 1), torch.cat([mask, phrase_mask.bool()], 1)
        return self.text_encoder(x, mask)[0], mask

    def encode_image(self, batch: dict[str, torch.Tensor], tag_ids: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """{t̃_cls, t̃, r̃}: (B, 1 + T + K, d), its key mask, and where the regions start (1 + T).
        ``tag_ids`` defaults to the unmasked tags."""
        feats, rmask = batch["region_features"], batch["region_mask"].bool()
        b = feats.shape[0]
        parts, masks = [self.visual_cls.expand(b, -1, -1)], [torch.ones_like(rmask[:, :1])]
        if self.parts.tags:
            tag_table = self.text_embeddings if self.tag_words else self.tag_embeddings
            parts.append(tag_table(batch["tag_ids"] if tag_ids is None else tag_ids))
            masks.append(batch["tag_mask"].bool())
        start = sum(p.shape[1] for p in parts)
        parts.append(self.region_embeddings(feats))
        masks.append(rmask)
        mask = torch.cat(masks, 1)
        x = torch.cat(parts, 1)
        return self.visual_encoder(x, mask, attn_bias=self.geometry(batch, x.shape[1]))[0], mask, start

    def geometry(self, batch: dict[str, torch.Tensor], length: int) -> torch.Tensor | None:
        """The geometry term's scores (B, heads, length, length) over the visual sequence: between
        the regions (the last K positions), and with ``placed_tags`` between the tags and regions
        too, tag i at region i's box (the data stage checks each row has one tag a region,
        InputSpec.tags_by_region: a check here would cost a device sync a step); zero elsewhere.
        None without the term."""
        if not self.cfg.geometry_bias:
            return None
        boxes = batch["boxes"]
        if self.placed_tags:
            boxes = torch.cat([boxes, boxes], 1)
        k = boxes.shape[1]
        bias = boxes.new_zeros(boxes.shape[0], self.geometry_bias.slopes.shape[0], length, length)
        bias[:, :, length - k:, length - k:] = self.geometry_bias(boxes)
        return bias

    def fuse(self, text: torch.Tensor, text_mask: torch.Tensor, regions: torch.Tensor, region_mask: torch.Tensor
             ) -> torch.Tensor:
        """The multi-modal encoder over {w̃, c̃, r̃} (tags excluded, §3.3)."""
        return self.fusion_encoder(torch.cat([text, regions], 1), torch.cat([text_mask, region_mask], 1))[0]

    # ----------------------------------------------------------------------------------------
    # Retrieval interface (§4.2)
    # ----------------------------------------------------------------------------------------

    def vsc_embedding(self, cls: torch.Tensor, modality: str) -> torch.Tensor:
        """VSC's global embedding (eq. 1) of a visual or textual [CLS] output: L2-normalised, after
        the official reading's learnable projection where ``vsc_projection`` is "linear"."""
        if self.cfg.switch("vsc_projection") == "linear":
            cls = (self.vsc_image_proj if modality == "image" else self.vsc_text_proj)(cls)
        return F.normalize(cls, dim=-1)

    def embed_images(self, batch):
        vis, vmask, _ = self.encode_image(batch)
        return self.vsc_embedding(sentence_embedding(vis, vmask, self.cfg.vsc_image_pooling), "image")

    def embed_texts(self, batch):
        text = self.encode_text(batch["input_ids"], batch["attention_mask"], batch.get("phrase_ids"),
                                batch.get("phrase_mask"))[0]
        return self.vsc_embedding(sentence_embedding(text, batch["attention_mask"], self.cfg.vsc_text_pooling), "text")

    def match_scores(self, images, texts):
        """p_itm(match) of each aligned pair, for re-ranking the uni-modal top-k."""
        return self.match_from_states(self.match_image_states(images), self.match_text_states(texts))

    def match_image_states(self, images):
        """The visual encoder's region states r̃ (tags stay out of the fusion, §3.3)."""
        vis, vmask, start = self.encode_image(images)
        return {"regions": vis[:, start:], "region_mask": vmask[:, start:]}

    def match_text_states(self, texts):
        txt, tmask = self.encode_text(texts["input_ids"], texts["attention_mask"], texts.get("phrase_ids"),
                                      texts.get("phrase_mask"))
        return {"text": txt, "text_mask": tmask}

    def match_from_states(self, images, texts):
        return self.itm_head(self.match_fused(images, texts)[:, 0]).float().softmax(-1)[:, 1]

    def fused(self, batch):
        """The multi-modal encoder over {w̃, c̃, r̃}: its [CLS] and its region states (MVPTR §4.2
        fine-tunes on both: the [CLS] for VQA / SNLI-VE, [CLS]-to-region similarity for RefCOCO+)."""
        from alignlab.models.downstream import Fused

        texts = self.match_text_states(batch)
        fused = self.match_fused(self.match_image_states(batch), texts)
        return Fused(cls=fused[:, 0], regions=fused[:, texts["text"].shape[1]:])

    def match_fused(self, images, texts) -> torch.Tensor:
        return self.fuse(texts["text"], texts["text_mask"], images["regions"], images["region_mask"])

    # ----------------------------------------------------------------------------------------
    # Objectives
    # ----------------------------------------------------------------------------------------

    def mcr_loss(self, tag_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L_mcr (§3.2): the MCR head over the visual encoder's outputs at masked tags only
        (``labels`` = the target there, IGNORE elsewhere): the tag-vocabulary MLP predicting the
        tag class, or, with ``tag_vocab = word_pieces``, the word-vocabulary head tied to the word
        embeddings predicting the word piece."""
        sel = labels != IGNORE
        return masked_token_loss(self.mcr_head(tag_states[sel]), labels[sel])

    @staticmethod
    def negative_caption_itm_loss(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """ITM (eq. 4's cross-entropy, the same head) over the rows that have a negative caption:
        each row's positive pair (``positive``, its logits from the ITM pass) against its own
        image with its negative caption (``negative``), one to one. A loss of its own rather than
        more pairs in L_itm: there a few such pairs among 2n others moved nothing in 3,200 steps
        (README, "Relation swaps"); paired and weighted like this, the relation probe learnt. Zero,
        with a gradient path, for a batch without any (every worker logs the same losses)."""
        if not len(negative):
            return negative.sum() * 0.0
        labels = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))]).long().to(negative.device)
        return itm_loss(torch.cat([positive, negative]), labels)

    def mlm_loss(self, word_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L_mlm (eq. 3) over the multi-modal outputs at masked words, over the word vocabulary."""
        sel = labels != IGNORE
        return masked_token_loss(self.mlm_head(word_states[sel]), labels[sel])

    def _rows(self, tensors: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``idx`` (indices into the candidate columns) of each tensor: of the global batch
        with ``negatives = global`` (fetched from their workers), of the local one otherwise."""
        if self.negatives == "global":
            return gather_rows(tensors, idx)
        return {k: v[idx] for k, v in tensors.items()}

    def forward(self, batch):
        p = self.parts
        n, n_words = batch["input_ids"].shape
        losses: dict[str, torch.Tensor] = {}

        # Stage 1, uni-modal. One visual pass on the MCR-masked tags serves MCR, VSC and the
        # multi-modal inputs (tags never reach the multi-modal encoder, so their masking cannot
        # leak there), or MCR alone with tag_pass "separate".
        mcr, mlm = p.mcr and "mcr" not in self.off, "mlm" not in self.off
        vis, vmask, start = self.encode_image(batch, batch["mcr_tag_ids"] if mcr else None)
        if mcr:
            losses["mcr"] = self.mcr_loss(vis[:, 1:start], batch["mcr_labels"])
            if self.cfg.tag_pass == "separate":
                vis, vmask, start = self.encode_image(batch)
        regions, rmask = vis[:, start:], vmask[:, start:]
        # The text every objective but MLM reads: the unmasked caption (the paper), or the masked
        # one, which then serves MLM too (the official single pass, text_pass). Without MLM
        # nothing is masked.
        single_pass = self.cfg.switch("text_pass") == "single_masked" and mlm
        text_ids, phrase_ids = ("mlm_input_ids", "mlm_phrase_ids") if single_pass else ("input_ids", "phrase_ids")
        txt, tmask = self.encode_text(batch[text_ids], batch["attention_mask"], batch.get(phrase_ids),
                                      batch.get("phrase_mask"))

        # VSC (eq. 1) on the L2-normalised uni-modal global embeddings ([CLS] outputs, or the
        # means that vsc_image_pooling / vsc_text_pooling choose), against the global batch.
        img_g = self.vsc_embedding(sentence_embedding(vis, vmask, self.cfg.vsc_image_pooling), "image")
        txt_g = self.vsc_embedding(sentence_embedding(txt, batch["attention_mask"], self.cfg.vsc_text_pooling), "text")
        img_all, offset = global_view(img_g, self.negatives)
        txt_all, _ = global_view(txt_g, self.negatives)
        scale = clamp_logit_scale(self.log_scale, max_scale=math.inf if self.cfg.switch("temperature_clamp") == "none"
                                  else 100.0)
        losses["vsc"] = contrastive_loss(img_g, txt_g, scale, img_all, txt_all, offset)

        # Hard negatives for ITM (n positives + n negatives, eq. 4): the first half of the texts
        # get an image from p_s2v, the second half of the images a text from p_v2s, so both
        # directions of eq. 1 are used. WPG (text-to-image only) reuses the image negatives.
        with torch.no_grad():
            logits_i2t, logits_t2i = contrastive_logits(img_g, txt_g, scale, img_all, txt_all)
            keys = batch["image_key"]
            keys_all = gather_no_grad(keys) if self.negatives == "global" else keys
        h = (n + 1) // 2
        exclude = self.cfg.switch("itm_exclude")
        neg_img, ok_img = global_hard_negatives(logits_t2i[:h], keys[:h], keys_all, self.negative_mode,
                                                exclude=exclude, offset=offset)
        neg_txt, ok_txt = global_hard_negatives(logits_i2t[h:], keys[h:], keys_all, self.negative_mode,
                                                exclude=exclude, offset=offset + h)
        img_rows = self._rows({"states": regions, "mask": rmask}, neg_img)
        txt_rows = self._rows({"states": txt, "mask": tmask}, neg_txt)

        # Stage 2: one multi-modal pass over [positives; negatives; MLM inputs], the MLM inputs
        # being the positives themselves in the single masked pass.
        texts = [txt, txt[:h][ok_img], txt_rows["states"][ok_txt]]
        text_masks = [tmask, tmask[:h][ok_img], txt_rows["mask"][ok_txt]]
        images = [regions, img_rows["states"][ok_img], regions[h:][ok_txt]]
        image_masks = [rmask, img_rows["mask"][ok_img], rmask[h:][ok_txt]]
        # The shard set's negative captions (itm_negative_captions), each with its own image,
        # fused in the same pass, after the ITM pairs.
        negative_captions = self.cfg.itm_negative_captions and "itm_negative_captions" not in self.off
        has_negative = batch["has_negative"].bool() if negative_captions \
            else torch.zeros(n, dtype=torch.bool, device=txt.device)
        if has_negative.any():
            phrases = self.parts.phrases
            neg, neg_mask = self.encode_text(batch["negative_input_ids"][has_negative],
                                             batch["negative_attention_mask"][has_negative],
                                             batch["negative_phrase_ids"][has_negative] if phrases else None,
                                             batch["negative_phrase_mask"][has_negative] if phrases else None)
            texts.append(neg), text_masks.append(neg_mask)
            images.append(regions[has_negative]), image_masks.append(rmask[has_negative])
        if mlm and not single_pass:
            mlm_txt, mlm_mask = self.encode_text(batch["mlm_input_ids"], batch["attention_mask"],
                                                 batch.get("mlm_phrase_ids"), batch.get("phrase_mask"))
            texts.append(mlm_txt), text_masks.append(mlm_mask), images.append(regions), image_masks.append(rmask)
        text_mask_all = torch.cat(text_masks)
        fused = self.fuse(torch.cat(texts), text_mask_all, torch.cat(images), torch.cat(image_masks))
        n_pairs = n + int(ok_img.sum()) + int(ok_txt.sum())
        n_negative = int(has_negative.sum())

        itm_logits = self.itm_head(fused[:n_pairs, 0])
        itm_labels = torch.zeros(n_pairs, dtype=torch.long, device=fused.device)
        itm_labels[:n] = 1
        losses["itm"] = itm_loss(itm_logits, itm_labels)
        if negative_captions:
            losses["itm_negative_captions"] = self.negative_caption_itm_loss(
                itm_logits[:n][has_negative], self.itm_head(fused[n_pairs:n_pairs + n_negative, 0]))
        if mlm:
            mlm_states = fused[:n] if single_pass else fused[n_pairs + n_negative:]
            losses["mlm"] = self.mlm_loss(mlm_states[:, :n_words], batch["mlm_labels"])

        wpg = p.wpg and "wpg" not in self.off
        if wpg and self.cfg.switch("wpg_negatives") == "random_positive_pass":
            losses["wpg"] = self._wpg_from_positive_passes(fused[:n], n_words, txt.shape[1], text_mask_all[:n], rmask)
        elif wpg:
            # Eq. 2 on the positive pairs of the first half and their image negatives.
            n_neg_img = int(ok_img.sum())
            pairs = torch.cat([torch.arange(h, device=fused.device)[ok_img],
                               n + torch.arange(n_neg_img, device=fused.device)])
            phrase_end = txt.shape[1]
            s = wpg_similarity(fused[pairs, n_words:phrase_end], fused[pairs, phrase_end:],
                               text_mask_all[pairs, n_words:], torch.cat(image_masks)[pairs], self._wpg_top)
            has_phrases = text_mask_all[pairs[:n_neg_img], n_words:].any(-1)
            pos, neg = s[:n_neg_img][has_phrases], s[n_neg_img:][has_phrases]
            losses["wpg"] = wpg_hinge(pos, neg, self.margin) if len(pos) else fused.sum() * 0.0

        with torch.no_grad():
            itm_acc = (itm_logits.argmax(-1) == itm_labels).float().mean()
        return ModelOutput(losses=losses, metrics={"temperature": 1.0 / scale.detach(), "itm_acc": itm_acc})

    @property
    def _wpg_top(self) -> int:
        return 3 if self.cfg.switch("wpg_region") == "random_top3" else 1

    def _wpg_from_positive_passes(self, positive: torch.Tensor, n_words: int, phrase_end: int,
                                  text_mask: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
        """The official code's WPG (#15): text i against another image j of the batch, drawn
        uniformly, with j's region states from j's own positive pass (``positive`` (n, L + P + K,
        d), the positive pairs' multi-modal outputs), so WPG needs no pass of its own."""
        n = positive.shape[0]
        if n < 2:
            return positive.sum() * 0.0
        other = (torch.arange(n, device=positive.device) + torch.randint(1, n, (n,), device=positive.device)) % n
        phrases, phrase_mask = positive[:, n_words:phrase_end], text_mask[:, n_words:]
        regions = positive[:, phrase_end:]
        pos = wpg_similarity(phrases, regions, phrase_mask, region_mask, self._wpg_top)
        neg = wpg_similarity(phrases, regions[other], phrase_mask, region_mask[other], self._wpg_top)
        has = phrase_mask.any(-1)
        return wpg_hinge(pos[has], neg[has], self.margin) if has.any() else positive.sum() * 0.0


def check_config(cfg) -> None:
    m = cfg.model.mvptr
    for key in ("text_layers", "visual_layers", "fusion_layers"):
        if getattr(m, key) < 1:
            raise ConfigError(f"config key 'model.mvptr.{key}' must be >= 1")
    if not 0 <= m.frozen_text_layers < m.text_layers:
        raise ConfigError(f"config key 'model.mvptr.frozen_text_layers' = {m.frozen_text_layers} must be in "
                          f"[0, model.mvptr.text_layers = {m.text_layers}): VSC trains the textual [CLS]")
    if m.frozen_text_layers and not cfg.model.text_init:
        raise ConfigError("config key 'model.mvptr.frozen_text_layers' freezes pretrained layers: set "
                          "'model.text_init' (a BERT checkpoint), or leave it at 0")
    if m.wpg_margin < 0:
        raise ConfigError(f"config key 'model.mvptr.wpg_margin' = {m.wpg_margin} must be >= 0")
    if m.placed_tags and not m.geometry_bias:
        raise ConfigError("config key 'model.mvptr.placed_tags' places the tags in the geometry term: set "
                          "'model.mvptr.geometry_bias=true' too, or leave it false")
    if m.placed_tags and m.switch("tag_vocab") == "word_pieces":
        raise ConfigError("config key 'model.mvptr.placed_tags' needs one tag a region; word-piece tags "
                          "(model.mvptr.tag_vocab = 'word_pieces') have several: set model.mvptr.tag_vocab=tag_classes")
    if m.placed_tags and cfg.data.max_tags != cfg.data.max_regions:
        raise ConfigError(f"config key 'model.mvptr.placed_tags' needs one tag a region: 'data.max_tags' = "
                          f"{cfg.data.max_tags} must equal 'data.max_regions' = {cfg.data.max_regions}")
    paper_rate = ObjectivesConfig.mcr_prob
    if m.switch("tag_vocab") == "word_pieces" and cfg.objectives.mcr_prob != paper_rate:
        # The rate would be silently unused: word-piece tags are masked with the words.
        raise ConfigError(f"config key 'objectives.mcr_prob' = {cfg.objectives.mcr_prob} sets the tag classes' MCR "
                          f"rate, unused under model.mvptr.tag_vocab = 'word_pieces' (tags masked with the words at "
                          f"objectives.mlm_prob); leave it at {paper_rate} or set model.mvptr.tag_vocab=tag_classes")


# What Table 4 (Flickr30k retrieval RSUM; the uni-modal one for VSC) and §4.4's text claim, as
# (claim, row A, row B, metric, sign): the paper's figures are 502.6 full / 498.1 w/o MCR /
# 494.8 w/o MCR+Tag / 498.3 w/o WPG / 500.4 w/o WPG+Phrase, uni-modal 471.9 full / 463.2 w/o MCR.
# The last is the paper's reading of WPG ("fine-grained alignment"), tested on the compositional
# split's attribute swaps.
TABLE4_CLAIMS = (
    ("MCR helps matching", "full", "wo_mcr", "eval/rsum", +1),
    ("tags help beyond MCR", "wo_mcr", "wo_mcr_tag", "eval/rsum", +1),
    ("MCR helps the uni-modal encoders", "full", "wo_mcr", "eval/uni_rsum", +1),
    ("WPG helps matching", "full", "wo_wpg", "eval/rsum", +1),
    ("phrases without WPG do not help", "wo_wpg", "wo_wpg_phrase", "eval/rsum", -1),
    ("phrase-level alignment helps binding", "full", "wo_wpg_phrase", "eval/compo/itm_acc_swap_attribute", +1),
)

SPEC = ModelSpec(
    name="mvptr", model=MVPTR, config=MVPTRConfig, check_config=check_config,
    # The visual encoder reads detector regions and tags (§3.1).
    image_kinds=("regions",),
    tasks=("vqa", "gqa", "snli_ve", "nlvr2", "refcoco", "retrieval"),
    ablations=lambda cfg: {"table4": Ablation("MVPTR ablations (Table 4)", {"model.mvptr.ablation": tuple(TABLE4)},
                                              "model.mvptr.ablation", reference="full", claims=TABLE4_CLAIMS)},
)
