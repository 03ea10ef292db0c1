"""SemVLP: vision-language pre-training by aligning semantics at multiple levels (Li et al., 2021).

One shared stack of L transformer blocks (self-attention φ_S + FFN φ_F) serves two modes (§3.2):

* **single-stream** (feature-level alignment, §3.2.1): the blocks run over the concatenation
  S⁰ = [o_IMG, o_1..o_n; e_CLS, e_1..e_m], so objects and words attend to each other in every
  layer;
* **two-stream** (high-level alignment, §3.2.2): the text runs alone through all L blocks
  (H^L); the objects run through the *same* blocks, and in each block l > L_s they also
  cross-attend (φ_C^l) to the text's last-layer states H^L. Only text → image, as the paper's
  equations and footnote state: the text never sees the image in this mode.

The blocks are :class:`~alignlab.models.blocks.TransformerEncoder` built with ``cross_from = L_s``:
layers below L_s have no cross-attention, layers from L_s on own one and skip it when called
without context. So the text pass and the single-stream pass use exactly the tensors the object
pass uses, and two-stream adds only the φ_C modules (``mode = "single"`` builds none).

Inputs (§3.1.1): BERT word + position + segment embeddings for the words; for each object its
region feature f_j concatenated with its normalised box l_j = (x1, y1, x2, y2), linearly projected
to the hidden size; a learnt [IMG] embedding in front of the objects. Region features that
already carry a position part (VinVL's and the synthetic set's +6) keep it: the box is the
paper's l_j either way, and the duplicate costs four inputs.

Pre-training tasks (§3.3.1), computed from one forward pass in the step's mode, each its own loss
named ``<task>_<mode>`` so that every task has a curve per mode (the platform averages a loss
over the steps that produced it):

* ``mlm``: masked words (15%, the CPU stage's BERT masking) predicted from H^L — with the image in
  single-stream mode, from the text alone in two-stream mode;
* ``roi_regression`` and ``object_label``: objects masked at 15% by the CPU stage (features
  zeroed, boxes kept) and predicted from O^L: their detector feature (mean squared error,
  ``objectives.feature_regression_loss``) and their detected label (the region's tag) — only at
  masked objects;
* ``itm``: in half of the pairs the sentence is replaced by a random caption of another image
  (LXMERT, which SemVLP follows); a classifier on h_CLS (single-stream) or o_IMG (two-stream)
  tells them apart. MLM and object losses are not taken on mismatched pairs (§3.3.1);
* ``qa`` (image QA as classification over ``semvlp.num_answers`` answers, on h_CLS / o_IMG): on
  shards built from VQA v2 / GQA (``alignlab data build``: question rows, whose caption is the
  question, with an ``answer`` column and the shard set's ``answers.txt``), the CPU stage gives
  each row ``answer_labels``, its answer's line in answers.txt (IGNORE on caption rows and rare
  answers), and the loss is taken on matched pairs. ``num_answers`` = 0 turns it off; otherwise
  it must cover answers.txt. A split without question rows yields no ``answer_labels`` and no
  ``qa`` loss.

Alternation (§3.3.2): :meth:`SemVLP.begin_step` draws the step's mode from a generator seeded by the
step, so every DDP rank takes the same mode (and a resumed run replays the same sequence); the
cross-attention gets no gradient in single-stream steps, hence ``find_unused_parameters``.

Readings where the paper leaves a choice:

* L_s counts blocks from 1 ("l > L_s"), so 0-based layer i cross-attends when i >= L_s; L_s = L
  leaves no fusion at all and is only valid for ``mode = "single"``.
* One set of heads (MLM, object, ITM, QA) serves both modes: the paper keeps "only one copy of
  parameter set", and its parameter counts (110M / 140M) differ by the cross-attention only.
* The mismatched sentence is drawn uniformly from the local batch's captions of other images
  (LXMERT samples at random, not hard negatives); a row whose batch has no such caption stays
  matched. One pass serves every task, as in LXMERT, so ITM sees the masked inputs too.
* Retrieval fine-tuning: the paper's settings are in a supplement we do not have. §3.3.3 fine-tunes
  in one mode (Table 5: single-stream is better on every task), cross-modality read from h_CLS,
  so ``alignlab finetune retrieval`` pins the step's mode to ``eval_mode`` (``single_prob`` 1 or 0),
  keeps ITM alone (the masked-prediction tasks are ``optional_objectives``, weighted 0 there) and
  draws its negatives hard (``itm_pairs: hard``), as the single-stream models SemVLP compares
  with fine-tune retrieval (UNITER's hard negatives; ALBEF's sampling ∝ exp(S/τ)): the evaluation
  re-ranks a shortlist's near misses, which LXMERT's random captions seldom resemble. SemVLP has
  no contrastive similarity to draw them from, so S is the cosine of the captions' text-stream
  states, mean-pooled (the sentence representation MiniLM, the CPU presets' initialisation, was
  trained for), at temperature ``hard_temperature``: a caption like this image's own is its hard
  negative text, and the image of a caption like this one its hard negative image. Where the
  evaluation re-ranks another model's shortlist (``eval.shortlist``), ``itm_pairs: shortlist``
  draws them instead from that retriever's image-caption similarities (``shortlist_scores``, the
  trainer computes them), the near misses the re-ranking will meet, as re-rankers are trained on
  their first stage's candidates. ``itm_loss: ranking`` trains the same pairs as UNITER's
  hard-negative retrieval fine-tuning does: a hinge (margin ``rank_margin``, UNITER's 0.2) on
  p(match) of each negative against the positive it shares an image or a caption with
  (``objectives.itm_ranking_loss``), where the binary loss asks each pair's p(match) for its label.
  UNITER scores with a separate rank head; we keep ITM's, the score the evaluation sorts by.
  Binary stays the reading: from one checkpoint on Flickr8k (README, the real-data section) the
  ranking loss re-ranked 10 RSUM below it, and the shortlist's negatives 4.5 below the text
  stream's (one seed each).
* Retrieval (§4, evaluated as MVPTR's): SemVLP has no contrastive objective, so the uni-modal
  embeddings (:meth:`embed_images`, :meth:`embed_texts`) only shortlist candidates; the ranking
  that matters is the ITM re-ranking in ``semvlp.eval_mode`` (Table 5: single-stream by default).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from alignlab.models.base import (IGNORE, Ablation, ConfigError, InputSpec, ModelOutput, ModelSpec, PretrainingModel,
                                  Vocab)
from alignlab.models.blocks import (BertCheckpoint, PredictionHead, RegionEmbeddings, TextEmbeddings,
                                    TransformerEncoder, TransformerSize, bert_layer_plan, init_weights,
                                    sentence_embedding)
from alignlab.models.objectives import (feature_regression_loss, itm_loss, itm_ranking_loss, masked_token_loss,
                                        same_item_mask, sample_hard_negatives)


@dataclass
class SemVLPConfig:
    """``model.semvlp`` (Li et al., 2021, §3 and §4.3-4.4): one shared encoder run in
    single-stream and two-stream mode, with cross-modal attention in the layers above
    ``cross_layer``."""

    # Pre-training mode (Table 4): single-stream only, two-stream only, or both, alternating per
    # mini-batch with probability ``single_prob`` of single-stream (§3.3.2: 0.5). "single" builds
    # no cross-modal attention at all.
    mode: Literal["single", "two", "both"] = "both"
    # 1 or 0 pins mode "both" to one mode: fine-tuning runs in ``eval_mode`` (§3.3.3).
    single_prob: float = 0.5
    # L_s (§3.2.2): layers 1..L_s of the object stream are self-attention only, layers above
    # L_s also cross-attend to the text's last-layer states (the paper: 6 of 12).
    cross_layer: int = 6
    # Mode of the ITM re-ranking at evaluation (Table 5: either works after pre-training; the
    # paper found single-stream better). "auto": single-stream unless pre-trained two-stream only.
    eval_mode: Literal["auto", "single", "two"] = "auto"
    # Image-QA answer classes (§3.3.1); 0 builds no QA head. Otherwise at least the lines of the
    # shard set's answers.txt (built from VQA / GQA); the head trains on question rows.
    num_answers: int = 0
    # ITM's pairs: "random" (§3.3.1 after LXMERT: half the sentences replaced by a caption of
    # another image drawn uniformly from the batch) or "hard" (every pair kept, plus one negative
    # caption per image and one negative image per caption drawn ∝ exp(S/τ) over the batch's
    # caption similarities, τ = ``hard_temperature``; retrieval fine-tuning, see the module's
    # readings), or "shortlist": the same draw from the ``eval.shortlist`` retriever's image-caption
    # similarities, the near misses of the ranking the evaluation re-ranks.
    itm_pairs: Literal["random", "hard", "shortlist"] = "random"
    hard_temperature: float = 0.05
    # ITM's loss: "binary" (§3.3.1: cross-entropy over [no-match, match] on every pair) or
    # "ranking" (UNITER's hard-negative retrieval fine-tuning: the hinge of each negative pair's
    # p(match) against its positive's, margin ``rank_margin``; needs ``itm_pairs`` hard or shortlist).
    itm_loss: Literal["binary", "ranking"] = "binary"
    rank_margin: float = 0.2


MODES = ("single", "two")
TASKS = ("mlm", "roi_regression", "object_label", "itm", "qa")
# The masked-prediction tasks; a weight of 0 switches one off (ITM pairs every step's rows).
PREDICTION_TASKS = ("mlm", "roi_regression", "object_label", "qa")
BOX_DIM = 4  # l_j = (x1/W, y1/H, x2/W, y2/H), §3.1.1


def run_modes(cfg: SemVLPConfig) -> tuple[str, ...]:
    """The modes the steps run in: ``mode``'s, less one that ``single_prob`` of 0 or 1 never draws."""
    if cfg.mode != "both":
        return (cfg.mode,)
    return ("single",) if cfg.single_prob >= 1.0 else ("two",) if cfg.single_prob <= 0.0 else MODES


def resolved_eval_mode(cfg: SemVLPConfig) -> str:
    """``eval_mode`` with "auto" resolved: single-stream unless pre-trained two-stream only."""
    return cfg.eval_mode if cfg.eval_mode != "auto" else ("two" if cfg.mode == "two" else "single")


class SemVLP(PretrainingModel):
    objectives = tuple(f"{task}_{mode}" for mode in MODES for task in TASKS)
    optional_objectives = tuple(f"{task}_{mode}" for mode in MODES for task in PREDICTION_TASKS)
    retrieval_objectives = tuple(f"itm_{mode}" for mode in MODES)

    def __init__(self, model_cfg, objectives_cfg, vocab: Vocab):
        super().__init__()
        cfg = model_cfg.semvlp
        if not vocab.tags:
            raise ValueError("SemVLP's detected-label classification needs the shard set's tags.txt")
        if cfg.num_answers and not vocab.answers:
            raise ValueError(f"model.semvlp.num_answers = {cfg.num_answers} turns image QA on, but the shard set "
                             f"has no answers.txt: build it from VQA / GQA (`alignlab data build`), or set "
                             f"model.semvlp.num_answers=0")
        if cfg.num_answers and cfg.num_answers < len(vocab.answers):
            raise ValueError(f"model.semvlp.num_answers = {cfg.num_answers} is smaller than the shard set's "
                             f"answers.txt ({len(vocab.answers)} answers); set model.semvlp.num_answers="
                             f"{len(vocab.answers)}")
        self.modes = run_modes(cfg)
        self.single_prob = cfg.single_prob
        self.cross_layer = cfg.cross_layer
        self.eval_mode = resolved_eval_mode(cfg)
        self.mode = self.modes[0]  # until the trainer's first begin_step
        self.off = self.switched_off(objectives_cfg)
        self.itm_pairs, self.hard_temperature = cfg.itm_pairs, cfg.hard_temperature
        self.itm_ranking, self.rank_margin = cfg.itm_loss == "ranking", cfg.rank_margin
        self.negative_mode = objectives_cfg.itm_negatives
        size = TransformerSize(model_cfg.hidden_size, model_cfg.num_heads, model_cfg.intermediate_size,
                               model_cfg.dropout)
        h, region_dim = size.hidden_size, model_cfg.image.region_dim

        self.text_embeddings = TextEmbeddings(vocab.size, size)
        self.object_embeddings = RegionEmbeddings(region_dim + BOX_DIM, size)
        self.img_token = nn.Parameter(torch.zeros(1, 1, h))  # [IMG]
        # The shared blocks; φ_C only in layers >= L_s, and only when two-stream mode is used.
        self.encoder = TransformerEncoder(size, model_cfg.num_layers,
                                          cross_from=None if cfg.mode == "single" else cfg.cross_layer)
        self.mlm_head = PredictionHead(h, vocab.size)
        self.feature_head = PredictionHead(h, region_dim)  # RoI-feature regression
        self.label_head = PredictionHead(h, len(vocab.tags))  # detected-label classification
        self.itm_head = PredictionHead(h, 2)
        self.qa_head = PredictionHead(h, cfg.num_answers) if cfg.num_answers else None
        init_weights(self, model_cfg.init_std)
        if model_cfg.text_init:
            ckpt = BertCheckpoint.from_pretrained(model_cfg.text_init)
            ckpt.check_size(size, "model.text_init")
            ckpt.load_embeddings(self.text_embeddings)
            ckpt.load_encoder(self.encoder, bert_layer_plan(ckpt.num_layers, model_cfg.num_layers, 0))
        # Single-stream steps leave the cross-attention without gradient, caption-only batches the
        # QA head, a switched-off task its head.
        self.find_unused_parameters = cfg.mode == "both" or self.qa_head is not None or bool(self.off)

    @classmethod
    def input_spec(cls, model_cfg, objectives_cfg) -> InputSpec:
        cfg = model_cfg.semvlp
        on = {f"{t}_{m}" for t in PREDICTION_TASKS for m in run_modes(cfg)} - cls.switched_off(objectives_cfg)
        return InputSpec(regions=True, mlm=any(o.startswith("mlm_") for o in on),
                         objects=any(o.startswith(("roi_regression_", "object_label_")) for o in on),
                         qa=cfg.num_answers > 0 and any(o.startswith("qa_") for o in on),
                         shortlist_scores=cfg.itm_pairs == "shortlist")

    @classmethod
    def retrieval_finetuning(cls, model_cfg) -> dict:
        """ITM alone, in ``eval_mode``, with hard negatives (the module's readings)."""
        cfg = model_cfg.semvlp
        pinned = {"single_prob": 1.0 if resolved_eval_mode(cfg) == "single" else 0.0} if cfg.mode == "both" else {}
        return {**super().retrieval_finetuning(model_cfg), "model": {"semvlp": {"itm_pairs": "hard", **pinned}}}

    def begin_step(self, step: int, steps_per_epoch: int) -> None:
        """The step's mode: single-stream with probability ``single_prob``, from a generator seeded
        by the step alone, so all DDP ranks agree without communicating."""
        if len(self.modes) == 1:
            return
        draw = torch.rand((), generator=torch.Generator().manual_seed(step)).item()
        self.mode = "single" if draw < self.single_prob else "two"

    # ----------------------------------------------------------------------------------------
    # Encoding
    # ----------------------------------------------------------------------------------------

    def embed_objects(self, features: torch.Tensor, boxes: torch.Tensor, region_mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """[o_IMG, o'_1..o'_n] (B, 1 + K, d) and its key mask: o'_j = W [f_j; l_j] (§3.1.1)."""
        objects = self.object_embeddings(torch.cat([features, boxes.to(features.dtype)], -1))
        x = torch.cat([self.img_token.expand(features.shape[0], -1, -1).to(objects.dtype), objects], 1)
        return x, torch.cat([torch.ones_like(region_mask[:, :1]), region_mask], 1).bool()

    def encode(self, mode: str, objects: torch.Tensor, object_mask: torch.Tensor, input_ids: torch.Tensor,
               attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(O^L, H^L): the object states ([IMG] first) and the text states ([CLS] first)."""
        words, text_mask = self.text_embeddings(input_ids), attention_mask.bool()
        if mode == "single":
            s = self.encoder(torch.cat([objects, words], 1), torch.cat([object_mask, text_mask], 1))[0]
            return s[:, :objects.shape[1]], s[:, objects.shape[1]:]
        text = self.encoder(words, text_mask)[0]
        return self.encoder(objects, object_mask, context=text, context_mask=text_mask)[0], text

    def pooled(self, mode: str, objects: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The cross-modal representation: h_CLS in single-stream mode, o_IMG in two-stream."""
        return text[:, 0] if mode == "single" else objects[:, 0]

    # ----------------------------------------------------------------------------------------
    # Retrieval interface
    # ----------------------------------------------------------------------------------------

    def embed_images(self, batch):
        """o_IMG of the objects encoded alone (two-stream's object stream with its cross-attention
        skipped), L2-normalised. No objective aligns it with :meth:`embed_texts`: it only
        shortlists candidates for the ITM re-ranking."""
        x, mask = self.embed_objects(batch["region_features"], batch["boxes"], batch["region_mask"])
        return F.normalize(self.encoder(x, mask)[0][:, 0], dim=-1)

    def embed_texts(self, batch):
        """h_CLS of the text encoded alone (two-stream's text stream), L2-normalised."""
        words = self.text_embeddings(batch["input_ids"])
        return F.normalize(self.encoder(words, batch["attention_mask"].bool())[0][:, 0], dim=-1)

    def match_scores(self, images, texts):
        """p_itm(match) of each aligned pair, encoded in ``semvlp.eval_mode``."""
        return self.itm_head(self.fused({**images, **texts}).cls).float().softmax(-1)[:, 1]

    def fused(self, batch):
        """The pair encoded in ``semvlp.eval_mode`` (the mode §4 fine-tunes in): h_CLS or o_IMG,
        and the object states O^L, which attend to the words in either mode."""
        from alignlab.models.downstream import Fused

        x, mask = self.embed_objects(batch["region_features"], batch["boxes"], batch["region_mask"])
        objects, text = self.encode(self.eval_mode, x, mask, batch["input_ids"], batch["attention_mask"])
        return Fused(cls=self.pooled(self.eval_mode, objects, text), regions=objects[:, 1:])

    # ----------------------------------------------------------------------------------------
    # Pre-training
    # ----------------------------------------------------------------------------------------

    @staticmethod
    def mismatch(image_key: torch.Tensor, prob: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM pairing (LXMERT): (text row per pair, matched). With probability ``prob`` a pair's
        sentence is replaced by a caption, drawn uniformly from the batch, of another image."""
        n = image_key.shape[0]
        other, valid = sample_hard_negatives(torch.zeros(n, n, device=image_key.device),
                                             same_item_mask(image_key, image_key))
        swap = valid & (torch.rand(n, device=image_key.device) < prob)
        return torch.where(swap, other, torch.arange(n, device=image_key.device)), ~swap

    def hard_pairs(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """ITM pairing for ``itm_pairs: hard`` and ``shortlist``: (image row, text row, matched)
        per pair, and the index of each negative pair's positive (the pair sharing its image or
        its caption). Every row's own pair, then for each image one negative caption and for each
        caption one negative image, drawn (``objectives.itm_negatives``) from softmax(S/τ) over
        the batch's captions of other images (no gradient). S is, for ``hard``, the cosine of the
        captions' mean-pooled text-stream states (image i stands for its caption i); for
        ``shortlist``, ``shortlist_scores``, the retriever's image-caption cosine. The local
        batch, as pre-training's random captions and ALBEF's: SemVLP gathers nothing across
        workers."""
        keys = batch["image_key"]
        rows = torch.arange(keys.shape[0], device=keys.device)
        if self.itm_pairs == "shortlist":
            scores = batch["shortlist_scores"].float()
        else:
            mask = batch["attention_mask"]
            with torch.no_grad():
                text = self.encoder(self.text_embeddings(batch["input_ids"]), mask.bool())[0]
                sentence = F.normalize(sentence_embedding(text, mask, "mean").float(), dim=-1)
                scores = sentence @ sentence.t()
        same = same_item_mask(keys, keys)
        neg_text, ok_image = sample_hard_negatives(scores / self.hard_temperature, same, self.negative_mode)
        neg_image, ok_text = sample_hard_negatives(scores.t() / self.hard_temperature, same, self.negative_mode)
        image_rows = torch.cat([rows, rows[ok_image], neg_image[ok_text]])
        text_rows = torch.cat([rows, neg_text[ok_image], rows[ok_text]])
        return image_rows, text_rows, image_rows == text_rows, torch.cat([rows[ok_image], rows[ok_text]])

    def forward(self, batch):
        mode = self.mode
        on = {t for t in PREDICTION_TASKS if f"{t}_{mode}" not in self.off}
        if self.itm_pairs != "random":
            image_rows, text_rows, matched, positive_of = self.hard_pairs(batch)
        else:
            text_rows, matched = self.mismatch(batch["image_key"])
            image_rows = torch.arange(len(text_rows), device=text_rows.device)
        # A step whose masked-prediction tasks are all off reads the clean inputs.
        predict_objects = bool(on & {"roi_regression", "object_label"})
        features = batch["masked_region_features" if predict_objects else "region_features"]
        objects, object_mask = self.embed_objects(features[image_rows], batch["boxes"][image_rows],
                                                  batch["region_mask"][image_rows])
        o, h = self.encode(mode, objects, object_mask, batch["mlm_input_ids" if "mlm" in on else "input_ids"][text_rows],
                           batch["attention_mask"][text_rows])
        regions = o[:, 1:]
        losses: dict[str, torch.Tensor] = {}

        # No masked-prediction loss on a mismatched pair (§3.3.1).
        if "mlm" in on:
            mlm_labels = batch["mlm_labels"][text_rows].masked_fill(~matched[:, None], IGNORE)
            sel = mlm_labels != IGNORE
            losses[f"mlm_{mode}"] = masked_token_loss(self.mlm_head(h[sel]), mlm_labels[sel])
        if predict_objects:
            masked = batch["object_mask"][image_rows].bool() & matched[:, None]
        if "roi_regression" in on:
            losses[f"roi_regression_{mode}"] = feature_regression_loss(
                self.feature_head(regions[masked]), batch["region_features"][image_rows][masked])
        if "object_label" in on:
            labels = batch["object_labels"][image_rows].masked_fill(~masked, IGNORE)
            sel = labels != IGNORE
            losses[f"object_label_{mode}"] = masked_token_loss(self.label_head(regions[sel]), labels[sel])

        pooled = self.pooled(mode, o, h)
        itm_logits = self.itm_head(pooled)
        metrics = {"mode_single": torch.tensor(float(mode == "single"))}
        # A batch of one image's captions only has no negative to rank against.
        ranked = self.itm_pairs != "random" and len(positive_of) > 0
        if ranked:
            # hard_pairs puts the n positives first, then the negatives in positive_of's order.
            n = len(matched) - len(positive_of)
            positive_logits, negative_logits = itm_logits[:n][positive_of], itm_logits[n:]
            with torch.no_grad():
                log_odds = (itm_logits[:, 1] - itm_logits[:, 0]).float()
                metrics[f"itm_rank_acc_{mode}"] = (log_odds[:n][positive_of] > log_odds[n:]).float().mean()
        if self.itm_ranking:
            losses[f"itm_{mode}"] = (itm_ranking_loss(positive_logits, negative_logits, self.rank_margin)
                                     if ranked else itm_logits.sum() * 0.0)
        else:
            losses[f"itm_{mode}"] = itm_loss(itm_logits, matched)
        if self.qa_head is not None and "qa" in on and "answer_labels" in batch:
            answers = batch["answer_labels"][text_rows].masked_fill(~matched, IGNORE)
            losses[f"qa_{mode}"] = masked_token_loss(self.qa_head(pooled), answers)

        with torch.no_grad():
            metrics[f"itm_acc_{mode}"] = (itm_logits.argmax(-1) == matched.long()).float().mean()
        return ModelOutput(losses=losses, metrics=metrics)


def cross_layers(num_layers: int) -> tuple[int, ...]:
    """Figure 3's L_s = 2, 4, 6, 8, 10 of 12 layers as fractions k/6 of L, rounded, distinct and
    below L (L_s = L would leave two-stream mode without fusion)."""
    return tuple(sorted({min(num_layers - 1, max(1, round(k * num_layers / 6))) for k in range(1, 6)}))


def check_config(cfg) -> None:
    s, layers = cfg.model.semvlp, cfg.model.num_layers
    if not 0 <= s.cross_layer <= layers:
        raise ConfigError(f"config key 'model.semvlp.cross_layer' = {s.cross_layer} must be in 0..model.num_layers "
                          f"= {layers}")
    if s.mode != "single" and s.cross_layer == layers:
        raise ConfigError(f"config key 'model.semvlp.cross_layer' = {layers} leaves no cross-attending layer, so "
                          f"two-stream mode (model.semvlp.mode = {s.mode!r}) could not fuse; use L_s < "
                          f"{layers} or mode 'single'")
    if s.itm_loss == "ranking" and s.itm_pairs == "random":
        raise ConfigError("config key 'model.semvlp.itm_loss' = 'ranking' sets each negative pair against the "
                          "positive it shares an image or caption with, which model.semvlp.itm_pairs = 'random' "
                          "does not keep: set model.semvlp.itm_pairs to 'hard' or 'shortlist'")
    if not 0.0 < s.rank_margin < 1.0:
        raise ConfigError(f"config key 'model.semvlp.rank_margin' = {s.rank_margin} must be in (0, 1): it "
                          f"separates two probabilities")
    if not 0.0 <= s.single_prob <= 1.0:
        raise ConfigError(f"config key 'model.semvlp.single_prob' = {s.single_prob} must be in [0, 1]")
    if resolved_eval_mode(s) not in run_modes(s):
        raise ConfigError(f"config key 'model.semvlp.eval_mode' = {s.eval_mode!r} scores in the "
                          f"{resolved_eval_mode(s)}-stream mode, which no step trains (model.semvlp.mode = "
                          f"{s.mode!r}, single_prob = {s.single_prob}): set model.semvlp.eval_mode={run_modes(s)[0]!r}")
    if s.hard_temperature <= 0:
        raise ConfigError(f"config key 'model.semvlp.hard_temperature' = {s.hard_temperature} must be > 0")
    if s.num_answers < 0:
        raise ConfigError("config key 'model.semvlp.num_answers' must be >= 0")


SPEC = ModelSpec(
    name="semvlp", model=SemVLP, config=SemVLPConfig, check_config=check_config,
    # Objects are detector regions with boxes and labels (§3.1.1).
    image_kinds=("regions",),
    tasks=("vqa", "gqa", "snli_ve", "nlvr2", "refcoco", "retrieval"),
    ablations=lambda cfg: {
        # §4.3 pre-trains "with only high-level semantic alignment" to place L_s (Figure 3).
        "L_s": Ablation("SemVLP Fig. 3: two-stream retrieval vs L_s",
                        {"model.semvlp.cross_layer": cross_layers(cfg.model.num_layers), "model.semvlp.mode": ("two",)},
                        "model.semvlp.cross_layer", line=True),
        "modes": Ablation("SemVLP Table 4: pre-training mode", {"model.semvlp.mode": ("single", "two", "both")},
                          "model.semvlp.mode"),
    },
)
