"""SIMLA (Khan et al., 2022): single-stream multi-level alignment.

A timm ViT E_v below a BERT-style language encoder E_l whose layers also cross-attend (§2.1). One
set of weights serves two roles: given text alone it is the text encoder (cross-attention is
skipped, :class:`~alignlab.models.blocks.TransformerLayer`); given text plus E_v's states it is
the multi-modal encoder E_mm. A momentum copy of the encoders, projections and heads (EMA 0.995)
provides the queue features and the distillation targets.

Objectives (each its own loss, each weighted by the platform, eq. 10):

* ``itc`` (eq. 1-4): online features against the momentum features of the (global) batch and the
  queues, targets (1 - α) y + α p_m.
* ``itm`` (eq. 5): one hard negative text per image and one hard negative image per text, drawn
  from the contrastive similarities (ALBEF; BLIP's global-batch mining across workers).
* ``mlm``, ``mim`` (eq. 6-7, XMM): masked caption tokens predicted by E_mm with the image as
  context; masked image patches (BEiT block-wise) predicted as visual tokens by E_mm with the
  *image patches as queries* and the caption as context (the appendix: "SIMLA's multimodal
  encoder is capable of using both image patches and language tokens as queries"); both
  distilled from the momentum model's predictions.
* ``psl`` (eq. 8-9): the k tokens the multi-modal [CLS] attends to most in E_mm's last
  self-attention layer are the image's pseudo-labels; a linear head on the unimodal image [CLS]
  predicts them with a multi-label BCE over the vocabulary, distilled from the momentum head.

α ramps linearly from 0 to ``simla.alpha`` over the first ``alpha_ramp_epochs`` epochs, and the
momentum encoders are updated, in :meth:`SIMLA.begin_step`, which the trainer calls before each
optimiser step.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from alignlab.models.base import (IGNORE, Ablation, ConfigError, InputSpec, ModelOutput, ModelSpec, PretrainingModel,
                                  Readings, Vocab)
from alignlab.models.blocks import (BertCheckpoint, PredictionHead, TextEmbeddings, TransformerEncoder,
                                    TransformerSize, ViTEncoder, bert_layer_plan, init_weights, sentence_embedding)
from alignlab.models.objectives import (FeatureQueue, clamp_logit_scale, distillation_loss, gather_no_grad,
                                        gather_rows, global_hard_negatives, itm_loss, local_offset, multilabel_bce,
                                        own_pair_mask, positive_targets, psl_targets, psl_vote_targets)
from alignlab.models.visual_tokenizers import build_visual_tokenizer

# Table 1's rows as component sets (the paper labels its last two rows both "(d)"; here they are
# d and e).
TABLE1: dict[str, tuple[str, ...]] = {
    "a": ("itm",),
    "b": ("itm", "itc"),
    "c": ("itm", "itc", "mlm"),
    "d": ("itm", "itc", "mlm", "mim"),
    "e": ("itm", "itc", "mlm", "mim", "psl"),
}
PSL_K = (1, 2, 4, 8)  # the appendix's sweep of pseudo-labels per caption

# The two readings of SIMLA (#15): what each reading switch of SIMLAConfig takes unless set
# explicitly. "paper" follows the paper's text, "official" the authors' code (codezakh/SIMLA,
# models/simla/pretrain.py, SIMLA.forward). The README's table of readings lists them all.
READINGS = {
    "paper": {"itc_targets": "same_image", "temperature_clamp": "clip", "itm_similarity": "online",
              "itm_exclude": "same_image", "psl_labels": "online_mean", "psl_head_input": "vit_cls",
              "rerank_score": "match_probability",
              "mim_inputs": "states"},
    "official": {"itc_targets": "diagonal", "temperature_clamp": "official", "itm_similarity": "momentum",
                 "itm_exclude": "own_pair", "psl_labels": "momentum_votes", "psl_head_input": "itc_feature",
                 "rerank_score": "match_logit",
                 "mim_inputs": "embeddings"},
}
PSL_VOTED_POSITIONS = 5  # the official code's counts_per_position.topk(5)
# 1/τ bounds (min, max) per temperature_clamp: CLIP's cap τ >= 0.01 (the paper states none);
# the official code's in-place clamp of τ to [0.001, 0.5].
LOGIT_SCALE_BOUNDS = {"clip": (0.0, 100.0), "official": (2.0, 1000.0)}


@dataclass
class SIMLAConfig(Readings):
    """``model.simla`` (§2, §2.5): momentum distillation, feature queues, XMM's visual tokenizer
    and block-wise image masking, PSL, and the Table-1 component switches."""

    momentum: float = 0.995  # EMA coefficient of the momentum encoders and heads (§2.5)
    # Length M of the image and text feature queues (65,536 in the paper); at least the global
    # batch (data.batch_size), so small runs size it to their batch.
    queue_size: int = 65536
    alpha: float = 0.4  # distillation coefficient, ramped linearly from 0 ...
    alpha_ramp_epochs: float = 1.0  # ... over this many epochs (§2.5: the first epoch)
    psl_k: int = 4  # pseudo-labels per caption (appendix §3: k = 4 is best)
    # Layers of the language encoder from this index on hold cross-attention (the paper: all).
    cross_from: int = 0
    # The paper fine-tunes every layer of E_l (0). k > 0 keeps the word and position embeddings
    # and the first k layers as model.text_init loaded them and runs them without autograd. They
    # must be text-only (k <= cross_from), so their output is a function of the caption alone,
    # the same in the text-encoder role and in every E_mm pass, online and momentum (a frozen
    # module's EMA is itself): it is computed once per caption and step. A budget choice for
    # small compute (ALBEF's split of the stack into text and fusion layers), never the paper's.
    frozen_text_layers: int = 0
    # Table-1 components; a disabled one contributes no loss and builds no head.
    itm: bool = True
    itc: bool = True
    mlm: bool = True
    mim: bool = True
    psl: bool = True
    # A named Table-1 row (TABLE1) overriding the flags above: one sweepable key.
    row: Literal[("",) + tuple(TABLE1)] = ""
    # MIM targets: "random_projection" (BEST-RQ's frozen random-projection quantizer, needs no
    # weights: the default here) or "dvae" (a DALL-E / BEiT dVAE encoder loaded from dvae_path).
    visual_tokenizer: Literal["random_projection", "dvae"] = "random_projection"
    codebook_size: int = 8192  # visual vocabulary (the DALL-E dVAE's is 8192)
    rpq_dim: int = 16  # projection width of the random-projection quantizer (BEST-RQ)
    rpq_seed: int = 0  # seed of its frozen projection and codebook
    dvae_path: str = ""
    # BEiT block-wise masking (SIMLA §2.3 "following the masking strategy of BEiT"): the
    # fraction of image patches masked is drawn uniformly from these bounds per image (BEiT: about
    # 40%, its 75 of 196), in blocks of at least mim_min_block patches (BEiT's min_num_patches).
    # The official SIMLA code keeps BEiT's count instead, 75 of its 256 patches (0.29).
    mim_ratio: tuple[float, float] = (0.35, 0.45)
    mim_min_block: int = 16
    # Reading switches (base.Readings; READINGS above gives each reading's values; itm_exclude
    # and reading are the base's).
    READINGS: ClassVar[dict[str, dict[str, str]]] = READINGS
    # ITC ground truth y (eq. 2): "same_image", every column showing the row's image
    # (objectives.positive_targets; the paper's one-hot read with several captions per image),
    # or "diagonal", the row's own pair only (official: sim_targets.fill_diagonal_(1)).
    itc_targets: Literal["", "same_image", "diagonal"] = ""
    # What g_l reads for ITC (§2.2): "cls", E_l's [CLS] state (the paper and the official code),
    # or "mean", the mean over the caption's words (blocks.sentence_embedding). Not a reading:
    # the choice belongs to the text checkpoint, and the Flickr8k presets read the offline MiniLM
    # by the mean it was pre-trained on.
    itc_text_pooling: Literal["cls", "mean"] = "cls"
    # What g_v reads for ITC: "cls", E_v's [CLS] state (the paper and the official code), or
    # "mean", the mean over its patch states. Not a reading either: a hybrid ViT's CNN trunk was
    # pre-trained under global average pooling, and a ViT-S block or two above it start random,
    # so the mean of their patch states starts near the pooled ImageNet feature the reference row
    # reads, where the [CLS] starts as a random mixture. PSL's head keeps the [CLS] (§2.4).
    itc_image_pooling: Literal["cls", "mean"] = "cls"
    # Bounds of the learnable temperature τ: "clip", τ >= 0.01 (§2.2 gives none), or
    # "official", τ clamped to [0.001, 0.5] (official: self.temp.clamp_(0.001, 0.5)).
    temperature_clamp: Literal["", "clip", "official"] = ""
    # ITM hard negatives (§2.2, ∝ exp(s/τ)) from which similarity: "online", the online image
    # and text features (BLIP), or "momentum", online features against the batch's momentum
    # features (official: the ITC sims sim_i2t[:, :bs]; needs ITC).
    itm_similarity: Literal["", "online", "momentum"] = ""
    # PSL's hard labels (§2.4): "online_mean", the online positive pass's last-layer [CLS] row
    # averaged over heads, its psl_k most attended non-special positions; or "momentum_votes",
    # the momentum stack on the online image, each head voting for its psl_k most attended
    # positions, the 5 most voted positions' tokens, only [CLS] removed (objectives.psl_vote_targets).
    psl_labels: Literal["", "online_mean", "momentum_votes"] = ""
    # What PSL's "single fully-connected layer" reads: "vit_cls", E_v's [CLS] state, or
    # "itc_feature", the normalised ITC image feature (official: concept_head(image_feat); needs ITC).
    psl_head_input: Literal["", "vit_cls", "itc_feature"] = ""
    # The score ITM re-ranking sorts by: "match_probability", p_itm(match), or "match_logit", the
    # raw match logit (official); they order pairs differently when the no-match logit varies.
    rerank_score: Literal["", "match_probability", "match_logit"] = ""
    # MIM's inputs to E_mm (eq. 6): "states", the masked image's E_v states as queries and the
    # caption's E_l states as context; or "embeddings", the patch states through the text stack's
    # embedding layer (positions, LayerNorm) as queries and the caption's word-embedding output
    # as context, the online model's for both copies (official: inputs_embeds= and
    # encoder_hidden_states=self.text_encoder.bert.embeddings(text.input_ids)).
    mim_inputs: Literal["", "states", "embeddings"] = ""

    def components(self) -> tuple[str, ...]:
        """The enabled objectives: the named row's, or the flags'."""
        if self.row:
            return TABLE1[self.row]
        return tuple(c for c in ("itm", "itc", "mlm", "mim", "psl") if getattr(self, c))


class SIMLA(PretrainingModel):
    objectives = ("itc", "itm", "mlm", "mim", "psl")
    optional_objectives = ("mlm", "mim", "psl")
    # §3.3: "We use ITC (Eq. 2) and ITM losses (Eq. 5) during fine-tuning" for retrieval.
    retrieval_objectives = ("itc", "itm")

    def __init__(self, model_cfg, objectives_cfg, vocab: Vocab):
        super().__init__()
        s = model_cfg.simla
        self.cfg = s
        self.components = s.components()
        self.off = self.switched_off(objectives_cfg)
        self.negatives = objectives_cfg.negatives
        self.itm_negatives = objectives_cfg.itm_negatives
        self.vocab_size = vocab.size
        self.cls_id = vocab.cls_id
        self.alpha = 0.0
        self._momentum_step = -1
        size = TransformerSize(model_cfg.hidden_size, model_cfg.num_heads, model_cfg.intermediate_size,
                               model_cfg.dropout)
        img = model_cfg.image
        # E_v: timm initialises (or loads) the ViT, or the hybrid ViT over a pretrained CNN trunk.
        self.image = ViTEncoder.from_config(img)
        # E_l = E_mm: one stack, cross-attending to E_v's states from layer cross_from on.
        self.embeddings = TextEmbeddings(vocab.size, size)
        self.encoder = TransformerEncoder(size, model_cfg.num_layers, cross_from=s.cross_from,
                                          context_dim=self.image.width)
        self.vision_proj = nn.Linear(self.image.width, model_cfg.embed_dim)  # g_v
        self.text_proj = nn.Linear(size.hidden_size, model_cfg.embed_dim)  # g_l
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / model_cfg.temperature)))
        heads = []
        if "itm" in self.components:
            self.itm_head = nn.Linear(size.hidden_size, 2)
            heads.append("itm_head")
        if "mlm" in self.components:
            self.mlm_head = PredictionHead(size.hidden_size, vocab.size)
            heads.append("mlm_head")
        if "mim" in self.components:
            if self.image.width != size.hidden_size:
                raise ValueError(f"simla's MIM feeds image patches to the language encoder as queries, so the "
                                 f"ViT width ({self.image.width}) must equal model.hidden_size ({size.hidden_size})")
            # BEiT's learnable [MASK] patch embedding, initialised N(0, 0.02²) as BEiT's.
            self.mask_token = nn.Parameter(torch.randn(self.image.width) * 0.02)
            self.mim_head = PredictionHead(size.hidden_size, s.codebook_size)
            grid = img.img_size // img.patch_size
            self.visual_tokenizer = build_visual_tokenizer(s, img.patch_size, grid)
            heads.append("mim_head")
        if "psl" in self.components:
            width = model_cfg.embed_dim if s.switch("psl_head_input") == "itc_feature" else self.image.width
            self.psl_head = nn.Linear(width, vocab.size)  # "a single fully-connected layer"
            heads.append("psl_head")
        for name in ("embeddings", "encoder", "vision_proj", "text_proj", *heads):
            init_weights(getattr(self, name), model_cfg.init_std)
        if model_cfg.text_init:
            ckpt = BertCheckpoint.from_pretrained(model_cfg.text_init)
            ckpt.check_size(size, "model.text_init")
            ckpt.load_embeddings(self.embeddings)
            ckpt.load_encoder(self.encoder, bert_layer_plan(ckpt.num_layers, model_cfg.num_layers, 0))
        self.frozen_layers = s.frozen_text_layers
        if self.frozen_layers:
            for module in (self.embeddings, *self.encoder.layers[:self.frozen_layers]):
                module.requires_grad_(False)
        self.register_buffer("special_ids", torch.tensor([vocab.pad_id, vocab.cls_id, vocab.sep_id, vocab.mask_id]),
                             persistent=False)

        # The momentum model: what the distilled objectives and the queues read. ITM (row a of
        # Table 1 alone) needs none.
        distilled = [c for c in ("itc", "mlm", "mim", "psl") if c in self.components]
        self.momentum_names = ["image", "embeddings", "encoder"] if distilled else []
        if "itc" in self.components:
            self.momentum_names += ["vision_proj", "text_proj"]
            self.queue = FeatureQueue(s.queue_size, model_cfg.embed_dim)
        self.momentum_names += [f"{c}_head" for c in ("mlm", "mim", "psl") if c in self.components]
        self.momentum = nn.ModuleDict({n: copy.deepcopy(getattr(self, n)) for n in self.momentum_names})
        if "mim" in self.components:
            self.momentum_mask_token = nn.Parameter(self.mask_token.detach().clone())
        for p in self._momentum_params():
            p.requires_grad_(False)  # updated by EMA only; the optimiser never sees them
        # Without ITC (Table 1 row a) the projections and temperature only rank ITM negatives,
        # without gradient, so DDP must allow parameters that receive none; so must the heads of
        # switched-off objectives.
        self.find_unused_parameters = "itc" not in self.components or bool(self.off)

    @classmethod
    def input_spec(cls, model_cfg, objectives_cfg) -> InputSpec:
        s, img = model_cfg.simla, model_cfg.image
        on = set(s.components()) - cls.switched_off(objectives_cfg)
        mim = "mim" in on
        return InputSpec(pixels=True, mlm="mlm" in on, mim=mim,
                         mim_grid=img.img_size // img.patch_size if mim else 0,
                         mim_ratio=tuple(s.mim_ratio) if mim else (0.0, 0.0), mim_min_block=s.mim_min_block)

    # ----------------------------------------------------------------------------------------
    # Momentum model and schedules
    # ----------------------------------------------------------------------------------------

    def _momentum_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(online, momentum) parameters the EMA moves: frozen ones (a frozen trunk, frozen text
        layers) never change, so their momentum copies stay as they started, equal to them."""
        pairs = [(o, m) for n in self.momentum_names
                 for o, m in zip(getattr(self, n).parameters(), self.momentum[n].parameters()) if o.requires_grad]
        if "mim" in self.components:
            pairs.append((self.mask_token, self.momentum_mask_token))
        return pairs

    def _momentum_params(self) -> list[torch.Tensor]:
        return [m for _, m in self._momentum_pairs()]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """θ_m ← m θ_m + (1 - m) θ (MoCo, ALBEF; m = ``simla.momentum``)."""
        pairs = self._momentum_pairs()
        if pairs:
            online, momentum = zip(*pairs)
            torch._foreach_mul_(momentum, self.cfg.momentum)
            torch._foreach_add_(momentum, online, alpha=1.0 - self.cfg.momentum)

    def begin_step(self, step: int, steps_per_epoch: int) -> None:
        """α ramps linearly from 0 to ``alpha`` over the first ``alpha_ramp_epochs`` epochs (§2.5,
        as ALBEF: α · min(1, i / steps of epoch 1)); the momentum model takes one EMA step per
        optimiser step (once per step, even when the trainer calls again at an epoch boundary).
        ALBEF updates before every forward; with gradient accumulation one update per optimiser
        step is the same schedule, since the online weights only change at optimiser steps."""
        ramp = max(1.0, self.cfg.alpha_ramp_epochs * steps_per_epoch)
        self.alpha = self.cfg.alpha * min(1.0, step / ramp)
        if step != self._momentum_step:
            self.momentum_update()
            self._momentum_step = step

    # ----------------------------------------------------------------------------------------
    # Encoders (``p`` is the online model's modules or the momentum copies)
    # ----------------------------------------------------------------------------------------

    def _parts(self, momentum: bool):
        return self.momentum if momentum else {n: getattr(self, n) for n in ("image", "embeddings", "encoder")}

    def _text_inputs(self, ids: torch.Tensor, mask: torch.Tensor, momentum: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the trained part of the stack reads for a caption, for the online model and (with
        ``momentum``) the momentum model: the embedding layer's output, or with k =
        ``frozen_text_layers`` the output of the frozen embeddings and first k layers, one tensor
        without autograd serving both models and every role."""
        if self.frozen_layers:
            with torch.no_grad():
                x = self.encoder(self.embeddings(ids), mask, layers=slice(0, self.frozen_layers))[0]
            return x, x
        x = self.embeddings(ids)
        if not momentum:
            return x, None
        with torch.no_grad():
            return x, self.momentum["embeddings"](ids)

    def _text(self, p, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """E_l: the shared stack without context (text encoder role) over :meth:`_text_inputs`."""
        return p["encoder"](x, mask, layers=slice(self.frozen_layers, None))[0]

    def _fuse(self, p, x: torch.Tensor, mask: torch.Tensor, image_states: torch.Tensor,
              return_attention: bool = False):
        """E_mm with text (:meth:`_text_inputs`) as queries and E_v's states as keys and values."""
        return p["encoder"](x, mask, context=image_states, return_attention=return_attention,
                            layers=slice(self.frozen_layers, None))

    def _fuse_image_queries(self, p, image_states: torch.Tensor, text_states: torch.Tensor,
                            text_mask: torch.Tensor) -> torch.Tensor:
        """E_mm with image patches as queries and the caption's E_l states as keys and values (MIM).

        The queries enter at layer ``cross_from``. In the paper (cross_from 0) that is the whole
        stack. Under ALBEF's split (cross_from k > 0) the layers below k are the text encoder's
        alone, E_l and never E_mm: the patches already had their own encoder, E_v, and running
        them through text-only layers (frozen ones, with ``frozen_text_layers``) would put the
        text encoder's early layers between E_v and the fusion layers for MIM only, where ITM,
        MLM and PSL fuse the image as E_mm's cross-attention context."""
        return p["encoder"](image_states, None, context=text_states, context_mask=text_mask,
                            layers=slice(self.cfg.cross_from, None))[0]

    def _image_feature(self, proj: nn.Module, v: torch.Tensor) -> torch.Tensor:
        """The normalised ITC image feature g_v(E_v(I)) of E_v's states ``v`` (``itc_image_pooling``)."""
        pooled = v[:, 0] if self.cfg.itc_image_pooling == "cls" else v[:, self.image.num_prefix_tokens:].mean(1)
        return F.normalize(proj(pooled), dim=-1)

    def _columns(self, x: torch.Tensor) -> torch.Tensor:
        return gather_no_grad(x) if self.negatives == "global" else x

    def _rows(self, tensors: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return gather_rows(tensors, idx) if self.negatives == "global" else {k: v[idx] for k, v in tensors.items()}

    # ----------------------------------------------------------------------------------------
    # Retrieval interface
    # ----------------------------------------------------------------------------------------

    def embed_images(self, batch):
        return self._image_feature(self.vision_proj, self.image(batch["pixels"]))

    def embed_texts(self, batch):
        mask = batch["attention_mask"].bool()
        states = self._text(self._parts(False), self._text_inputs(batch["input_ids"], mask)[0], mask)
        return F.normalize(self.text_proj(sentence_embedding(states, batch["attention_mask"], self.cfg.itc_text_pooling)),
                           dim=-1)

    def match_scores(self, images, texts):
        """p^itm(I, T) of the match class (eq. 5), for re-ranking."""
        if "itm" not in self.components:
            return None
        return self.match_from_states(self.match_image_states(images), self.match_text_states(texts))

    def match_image_states(self, images):
        """E_v's patch states: the text side is the shared stack's own fused pass, so only the
        image side is computed once per image."""
        return {"image_states": self.image(images["pixels"])}

    def fused(self, batch):
        """E_mm's [CLS] over the caption and E_v's patches (SIMLA fine-tunes VQA, NLVR2 and SNLI-VE
        from it, as ALBEF does). The image side is patches, not boxes: no fused regions, so
        box-supervised grounding is not among SIMLA's tasks (its weakly supervised reading is not
        built)."""
        from alignlab.models.downstream import Fused

        mask = batch["attention_mask"].bool()
        mm, _ = self._fuse(self._parts(False), self._text_inputs(batch["input_ids"], mask)[0], mask,
                           self.image(batch["pixels"]))
        return Fused(cls=mm[:, 0])

    def match_text_states(self, texts):
        """What E_mm's trained layers read of the caption (:meth:`_text_inputs`): with frozen
        text-only layers, their output, computed once per caption for all its re-ranked pairs."""
        mask = texts["attention_mask"]
        return {"text_inputs": self._text_inputs(texts["input_ids"], mask.bool())[0], "attention_mask": mask}

    def match_from_states(self, images, texts):
        mm, _ = self._fuse(self._parts(False), texts["text_inputs"], texts["attention_mask"].bool(),
                           images["image_states"])
        logits = self.itm_head(mm[:, 0]).float()
        return logits[:, 1] if self.cfg.switch("rerank_score") == "match_logit" else logits.softmax(-1)[:, 1]

    # ----------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------

    def forward(self, batch):
        c = [o for o in self.components if o not in self.off]
        ids, mask, pixels, keys = batch["input_ids"], batch["attention_mask"].bool(), batch["pixels"], batch["image_key"]
        online = self._parts(False)
        grid = self.image.frozen_grid(pixels)  # a frozen trunk runs once for both models
        patches = self.image.patch_embeddings(pixels, grid)  # shared with MIM's masked view
        v = self.image.encode(patches)
        x, x_m = self._text_inputs(ids, mask, momentum=bool(self.momentum_names))
        text_states = self._text(online, x, mask)
        img_feat = self._image_feature(self.vision_proj, v)
        txt_feat = F.normalize(self.text_proj(sentence_embedding(text_states, mask, self.cfg.itc_text_pooling)), dim=-1)
        low, high = LOGIT_SCALE_BOUNDS[self.cfg.switch("temperature_clamp")]
        scale = clamp_logit_scale(self.log_scale, max_scale=high, min_scale=low)
        losses: dict[str, torch.Tensor] = {}
        metrics = {"alpha": torch.tensor(self.alpha), "temperature": 1.0 / scale.detach()}
        with torch.no_grad():  # the momentum model's unimodal states, shared by its objectives
            patches_m = self.momentum["image"].patch_embeddings(pixels, grid) if self.momentum_names else None
            v_m = self.momentum["image"].encode(patches_m) if self.momentum_names else None
            text_m = self._text(self.momentum, x_m, mask) if "itc" in c or "mim" in c else None
            p = self.momentum
            feats_m = (self._image_feature(p["vision_proj"], v_m),
                       F.normalize(p["text_proj"](sentence_embedding(text_m, mask, self.cfg.itc_text_pooling)), dim=-1)
                       ) if "itc" in c else None

        if "itm" in c or "psl" in c:
            mm, attn = self._fuse(online, x, mask, v, return_attention="psl" in c)
            if "itm" in c:  # before ITC enqueues this batch
                columns = feats_m if self.cfg.switch("itm_similarity") == "momentum" else (img_feat, txt_feat)
                losses["itm"], metrics["itm_acc"] = self._itm(v, x, mask, mm[:, 0], img_feat, txt_feat, columns,
                                                              keys, scale)
        if "itc" in c:
            losses["itc"] = self._itc(feats_m, img_feat, txt_feat, keys, scale)
            if "psl" in c:
                losses["psl"], metrics["psl_labels"] = self._psl(v, v_m, ids, x_m, mask, attn, img_feat, feats_m)
        if "mlm" in c:
            losses["mlm"] = self._mlm(v, v_m, batch["mlm_input_ids"], mask, batch["mlm_labels"])
        if "mim" in c:
            losses["mim"] = self._mim(pixels, patches, patches_m, batch["mim_mask"].flatten(1).bool(), ids, mask,
                                      text_states, text_m)
        return ModelOutput(losses=losses, metrics=metrics)

    def _itc(self, feats_m, img_feat, txt_feat, keys, scale) -> torch.Tensor:
        """Eq. 1-4: online image (text) features against the momentum text (image) features of
        the batch — all workers' with ``negatives: global`` — and the queue, with targets
        (1 - α) y + α p_m, p_m being eq. 1 on the momentum features alone, y per the
        ``itc_targets`` switch. The batch's momentum features are enqueued afterwards."""
        img_m, txt_m = feats_m
        with torch.no_grad():
            img_cols = torch.cat([self._columns(img_m), self.queue.image_queue])
            txt_cols = torch.cat([self._columns(txt_m), self.queue.text_queue])
            if self.cfg.switch("itc_targets") == "diagonal":
                hard = own_pair_mask(len(keys), len(img_cols), local_offset(len(keys), self.negatives),
                                     keys.device).float()
            else:
                hard = positive_targets(keys, torch.cat([self._columns(keys), self.queue.idx_queue]))
            s = scale.detach()
            teacher_i2t = (s * img_m @ txt_cols.t()).softmax(-1)
            teacher_t2i = (s * txt_m @ img_cols.t()).softmax(-1)
        loss = 0.5 * (distillation_loss(scale * img_feat @ txt_cols.t(), hard, teacher_i2t, self.alpha)
                      + distillation_loss(scale * txt_feat @ img_cols.t(), hard, teacher_t2i, self.alpha))
        self.queue.enqueue(img_m, txt_m, keys)
        return loss

    def _itm(self, v, x, mask, pos_cls, img_feat, txt_feat, columns, keys, scale
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 5 over the batch's positive pairs, one hard negative text per image and one hard
        negative image per text, drawn ∝ exp(S/τ) among the (global) batch's columns (ALBEF;
        BLIP mines across workers and so do we with ``negatives: global``): S is the online
        features against ``columns`` (image, text) — the online features themselves, detached,
        as BLIP's, or the momentum ones (``itm_similarity``) — and the columns never drawn are
        the ``itm_exclude`` switch's."""
        with torch.no_grad():
            col_ids = self._columns(keys)
            sim_i2t = scale * img_feat @ self._columns(columns[1]).t()
            sim_t2i = scale * txt_feat @ self._columns(columns[0]).t()
        exclude, offset = self.cfg.switch("itm_exclude"), local_offset(len(keys), self.negatives)
        neg_text, ok_i = global_hard_negatives(sim_i2t, keys, col_ids, self.itm_negatives, exclude=exclude, offset=offset)
        neg_image, ok_t = global_hard_negatives(sim_t2i, keys, col_ids, self.itm_negatives, exclude=exclude,
                                                offset=offset)
        texts = self._rows({"x": x, "mask": mask.long()}, neg_text)
        images = self._rows({"v": v}, neg_image)
        neg_v = torch.cat([v[ok_i], images["v"][ok_t]])
        neg_x = torch.cat([texts["x"][ok_i], x[ok_t]])
        neg_mask = torch.cat([texts["mask"][ok_i].bool(), mask[ok_t]])
        neg_cls = self._fuse(self._parts(False), neg_x, neg_mask, neg_v)[0][:, 0]
        logits = self.itm_head(torch.cat([pos_cls, neg_cls]))
        labels = torch.cat([torch.ones(len(pos_cls)), torch.zeros(len(neg_cls))]).to(logits.device)
        return itm_loss(logits, labels), (logits.argmax(-1) == labels).float().mean().detach()

    def _mlm(self, v, v_m, mlm_ids, mask, labels) -> torch.Tensor:
        """Eq. 6-7, language side: masked tokens from the image-conditioned E_mm, distilled from
        the momentum model's prediction on the same masked caption. Only masked positions are
        decoded (the head over the vocabulary is the costly part)."""
        selected = labels != IGNORE
        x, x_m = self._text_inputs(mlm_ids, mask, momentum=True)
        logits = self.mlm_head(self._fuse(self._parts(False), x, mask, v)[0][selected])
        with torch.no_grad():
            states_m = self._fuse(self.momentum, x_m, mask, v_m)[0][selected]
            teacher = self.momentum["mlm_head"](states_m).float().softmax(-1)
        hard = F.one_hot(labels[selected], self.vocab_size)
        return distillation_loss(logits, hard, teacher, self.alpha)

    def _mim(self, pixels, patches, patches_m, patch_mask, ids, mask, text_states, text_m) -> torch.Tensor:
        """Eq. 6-7, image side: the visual tokens of block-wise masked patches, predicted by E_mm
        with the masked image's patches as queries and the caption as context, distilled from
        the momentum model's prediction on the same masked image and caption.

        Masking replaces patch embeddings (BEiT, :meth:`ViTEncoder.encode`), so the masked view
        starts from the unmasked view's ``patches`` (``patches_m``: the momentum model's): a hybrid
        ViT's trunk runs once per model and step, a frozen one once per step. ``mim_inputs`` picks
        the reading of E_mm's inputs (the paper's: states; the official code's: embedding-layer
        outputs)."""
        tokens = self.visual_tokenizer(pixels)  # of the unmasked image
        prefix = self.image.num_prefix_tokens
        embedded = self.cfg.switch("mim_inputs") == "embeddings"
        if embedded:
            context = context_m = self.embeddings(ids)
        else:
            context, context_m = text_states, text_m
        v_hat = self.image.encode(patches, patch_mask, self.mask_token)
        queries = self.embeddings(None, extra=v_hat) if embedded else v_hat
        states = self._fuse_image_queries(self._parts(False), queries, context, mask)
        logits = self.mim_head(states[:, prefix:][patch_mask])
        with torch.no_grad():
            p = self.momentum
            v_hat_m = p["image"].encode(patches_m, patch_mask, self.momentum_mask_token)
            queries_m = p["embeddings"](None, extra=v_hat_m) if embedded else v_hat_m
            states_m = self._fuse_image_queries(p, queries_m, context_m.detach(), mask)
            teacher = p["mim_head"](states_m[:, prefix:][patch_mask]).float().softmax(-1)
        hard = F.one_hot(tokens[patch_mask], self.cfg.codebook_size)
        return distillation_loss(logits, hard, teacher, self.alpha)

    def _psl(self, v, v_m, ids, x_m, mask, attn, img_feat, feats_m) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 8-9: pseudo-labels from the [CLS] row of E_mm's last self-attention layer on the
        positive pair (averaged over heads, detached: labels, not a path for gradients), predicted
        from the unimodal image [CLS] by a linear head; targets (1 - α) y + α σ(p_m). That is the
        paper reading; ``psl_labels`` and ``psl_head_input`` switch to the official code's.

        The appendix extracts the row from "the multi-modal encoder" without saying which copy;
        we read it off the online model's positive ITM pass, which the step computes anyway (the
        momentum model still recommends labels beyond the caption through its head, eq. 9).
        The appendix orders cross-attention before the self-attention whose row is read; our
        layers (BERT / ALBEF order) self-attend first, so the row read in the last layer is over
        states that the earlier layers have already fused with the image — with a single layer
        it would be text-only, so keep num_layers >= 2."""
        if self.cfg.switch("psl_labels") == "momentum_votes":
            with torch.no_grad():
                attn_m = self._fuse(self.momentum, x_m, mask, v.detach(), return_attention=True)[1]
            y = psl_vote_targets(attn_m[:, :, 0], ids, self.cfg.psl_k, PSL_VOTED_POSITIONS, self.vocab_size,
                                 self.cls_id)
        else:
            row = attn[:, :, 0].mean(1).detach()  # (B, N): [CLS] attending to each text position
            special = ~mask | torch.isin(ids, self.special_ids)
            y = psl_targets(row, ids, special, self.cfg.psl_k, self.vocab_size)
        if self.cfg.switch("psl_head_input") == "itc_feature":
            x, x_m = img_feat, feats_m[0]
        else:
            x, x_m = v[:, 0], v_m[:, 0]
        logits = self.psl_head(x)
        with torch.no_grad():
            teacher = torch.sigmoid(self.momentum["psl_head"](x_m).float())
        return multilabel_bce(logits, (1.0 - self.alpha) * y + self.alpha * teacher), y.sum(-1).mean()


def check_config(cfg) -> None:
    s, img = cfg.model.simla, cfg.model.image
    components = s.components()
    if "itc" in components and s.queue_size < cfg.data.batch_size:
        raise ConfigError(f"config key 'model.simla.queue_size' = {s.queue_size} must hold the global batch "
                          f"data.batch_size = {cfg.data.batch_size}")
    if not 0.0 <= s.mim_ratio[0] <= s.mim_ratio[1] < 1.0:
        raise ConfigError(f"config key 'model.simla.mim_ratio' = {list(s.mim_ratio)} must be 0 <= low <= high < 1")
    if s.mim_min_block < 1:
        raise ConfigError(f"config key 'model.simla.mim_min_block' = {s.mim_min_block} must be >= 1")
    if s.psl_k < 1:
        raise ConfigError("config key 'model.simla.psl_k' must be >= 1")
    k = s.frozen_text_layers
    if not 0 <= k < cfg.model.num_layers:
        raise ConfigError(f"config key 'model.simla.frozen_text_layers' = {k} must be in [0, model.num_layers = "
                          f"{cfg.model.num_layers}): ITC trains the top of the language encoder")
    if k and not cfg.model.text_init:
        raise ConfigError("config key 'model.simla.frozen_text_layers' freezes pretrained layers: set "
                          "'model.text_init' (a BERT checkpoint), or leave it at 0")
    if k > s.cross_from:
        raise ConfigError(f"config key 'model.simla.frozen_text_layers' = {k} exceeds model.simla.cross_from = "
                          f"{s.cross_from}: a frozen layer must be text-only (no cross-attention) so one pass "
                          f"serves every role; set cross_from >= {k}")
    if "psl" in components and "itc" not in components and s.switch("psl_head_input") == "itc_feature":
        raise ConfigError("config key 'model.simla.psl_head_input' = 'itc_feature' (the official reading's) reads the "
                          "ITC image feature: enable model.simla.itc, or set psl_head_input: vit_cls")
    if "itm" in components and "itc" not in components and s.switch("itm_similarity") == "momentum":
        raise ConfigError("config key 'model.simla.itm_similarity' = 'momentum' (the official reading's) draws ITM "
                          "negatives from ITC's momentum features: enable model.simla.itc, or set itm_similarity: online")
    if not 0.0 <= s.momentum < 1.0:
        raise ConfigError(f"config key 'model.simla.momentum' = {s.momentum} must be in [0, 1)")
    if not 0.0 <= s.alpha <= 1.0:
        raise ConfigError(f"config key 'model.simla.alpha' = {s.alpha} must be in [0, 1]")
    if "mim" in components:
        # The CPU stage draws the block-wise mask on the patch grid, so the grid must be explicit.
        if not (img.img_size and img.patch_size) or img.img_size % img.patch_size:
            raise ConfigError("simla's MIM needs model.image.img_size and model.image.patch_size set "
                              "(img_size a multiple of patch_size): the data stage masks on that patch grid")
        if cfg.data.image_size != img.img_size:
            raise ConfigError(f"config key 'data.image_size' = {cfg.data.image_size} must equal "
                              f"model.image.img_size = {img.img_size} for simla's MIM")
        if s.visual_tokenizer == "dvae" and not s.dvae_path:
            raise ConfigError("config key 'model.simla.dvae_path' must name a dVAE encoder file when "
                              "model.simla.visual_tokenizer = 'dvae'")


SPEC = ModelSpec(
    name="simla", model=SIMLA, config=SIMLAConfig, check_config=check_config,
    image_kinds=("vit",),  # a ViT below the language encoder (§2.1)
    tasks=("vqa", "gqa", "snli_ve", "nlvr2", "retrieval"),
    # The rows and k are two sweeps rather than one product grid: k means nothing without PSL.
    ablations=lambda cfg: {
        "rows": Ablation("SIMLA Table 1: components (a ITM, b +ITC, c +MLM, d +MIM, e +PSL)",
                         {"model.simla.row": tuple(TABLE1)}, "model.simla.row"),
        "k": Ablation("SIMLA: retrieval against the number of PSL pseudo-labels k",
                      {"model.simla.psl_k": PSL_K}, "model.simla.psl_k", line=True),
    },
)
