"""Downstream tasks (#14): the heads, losses and predictions the papers fine-tune with, over any
pre-trained architecture's jointly encoded representation.

An architecture exposes its multi-modal encoder through :meth:`PretrainingModel.fused`, which
returns the fused [CLS] and, where its image side is regions with boxes, the fused region states
(:class:`Fused`); its spec lists the tasks it supports (``ModelSpec.tasks``). :class:`TaskModel`
wraps the pre-trained model (``backbone``, whose weights the platform loads from the pre-training
checkpoint) with one task head and is itself a :class:`PretrainingModel`: ``forward(batch)``
returns the task's named loss, and the platform fine-tunes it exactly as it pre-trains (DDP,
precision, checkpoints, resume); ``predict(batch)`` gives what evaluation scores.

The tasks, with the papers' heads:

* ``vqa`` (VQA v2) and ``gqa``: an MLP over the fused [CLS] classifies over the answer set built
  from train (``answers.txt``; MVPTR §4.2 after VinVL, 3,129 answers on VQA v2). VQA trains on
  each question's soft answer scores (:func:`~alignlab.models.objectives.soft_target_loss`) and is
  scored by VQA accuracy; GQA trains and scores on its one answer (exact match).
* ``snli_ve``: 3-way classification (entailment / neutral / contradiction) of the fused [CLS]
  (MVPTR §4.2 after UNITER); accuracy.
* ``nlvr2``: two images, one statement: the statement is fused with each image, the two [CLS]
  are concatenated and classified true / false (ALBEF's and MVPTR's pair reading; SemVLP §4 pairs
  them the same way); accuracy.
* ``refcoco`` (RefCOCO+): each region candidate is scored by the cosine similarity of the fused
  [CLS] with the region's fused state (MVPTR §4.2, "Visual Grounding"), trained as binary
  classification with IoU >= 0.5 positives; accuracy of the top region at IoU >= 0.5.
* ``retrieval``: the architecture's own objectives continued on the task's train split, those
  its paper fine-tunes retrieval with (``PretrainingModel.retrieval_finetuning``: MVPTR's L_vsc +
  L_itm, §4.2; SIMLA's ITC + ITM, §3.3; SemVLP's ITM in its evaluated mode with hard pairs, our
  reading of §3.3.3; the platform weights the others 0, which switches them off), else all of
  its pre-training objectives; scored by the retrieval evaluation; no head, so no
  :class:`TaskModel`.

Readings: MVPTR's "task-specific MLP" is read as UNITER's and VinVL's two-layer classifier
(Linear 2d, GELU, LayerNorm, Linear); the grounding similarity's temperature is learnt (cosine
similarities in [-1, 1] under a sigmoid could not express a confident positive), initialised at
``model.temperature`` as the contrastive temperatures are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from alignlab.models.base import IGNORE, InputSpec, ModelOutput, ModelSpec, PretrainingModel, Vocab
from alignlab.models.inputs import check_task
from alignlab.models.blocks import init_weights
from alignlab.models.objectives import box_iou, grounding_loss, masked_token_loss, soft_target_loss

CLASSIFICATION = ("vqa", "gqa", "snli_ve", "nlvr2")
# IoU at which a region counts as the referred object (RefCOCO+'s accuracy, MVPTR's positives).
GROUNDING_IOU = 0.5


@dataclass
class Fused:
    """An architecture's jointly encoded (image, text) pair: ``cls`` (B, d), the fused [CLS]; and,
    for a region-based image side, ``regions`` (B, K, d) aligned with the batch's ``boxes`` and
    ``region_mask``."""

    cls: torch.Tensor
    regions: torch.Tensor | None = None


def input_spec(task: str, spec: ModelSpec, model_cfg, objectives_cfg) -> InputSpec:
    """What the data stage prepares for a run on ``task``: the architecture's own inputs for
    pre-training ("") and retrieval; otherwise its image and text inputs without the pre-training
    masks, and the task's labels."""
    base = spec.input_spec(model_cfg, objectives_cfg)
    if task in ("", "retrieval"):
        return base
    return replace(base.unmasked(), qa=task in CLASSIFICATION, answer_scores=task == "vqa", image_pair=task == "nlvr2",
                   target_box=task == "refcoco")


def build(task: str, spec: ModelSpec, model_cfg, objectives_cfg, vocab: Vocab) -> PretrainingModel:
    """The model a run trains: the architecture for pre-training (``task`` "") and for retrieval
    fine-tuning, else a :class:`TaskModel` around it. A fine-tuned model's backbone is built with
    the vocabulary it was pre-trained with (``vocab.pretrained_answers`` as its answers)."""
    if not task:
        return spec.build(model_cfg, objectives_cfg, vocab)
    check_task(spec, task)
    backbone = spec.build(model_cfg, objectives_cfg, replace(vocab, answers=vocab.pretrained_answers))
    return backbone if task == "retrieval" else TaskModel(task, backbone, model_cfg, vocab)


def second_image(batch: dict[str, torch.Tensor], suffix: str = "_b") -> dict[str, torch.Tensor]:
    """An NLVR2 batch seen from its second image: each ``<key>_b`` as ``<key>``, the text kept."""
    return {**batch, **{k[: -len(suffix)]: v for k, v in batch.items() if k.endswith(suffix)}}


class Classifier(nn.Sequential):
    """UNITER's and VinVL's task MLP: Linear to ``hidden``, GELU, LayerNorm, Linear to the classes."""

    def __init__(self, in_dim: int, hidden: int, classes: int):
        super().__init__(nn.Linear(in_dim, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, classes))


class TaskModel(PretrainingModel):
    """A pre-trained architecture (``backbone``) with one downstream head."""

    def __init__(self, task: str, backbone: PretrainingModel, model_cfg, vocab: Vocab):
        super().__init__()
        if task in CLASSIFICATION and not vocab.answers:
            raise ValueError(f"fine-tuning {task} needs the task set's answers.txt (its classes); build the set with "
                             f"`alignlab data build` or `alignlab data synth --task {task}`")
        self.task, self.backbone = task, backbone
        self.objectives = (task,)
        # The pre-training heads (MLM, ITM, ...) get no gradient while fine-tuning.
        self.find_unused_parameters = True
        h = model_cfg.hidden_size
        self.head: nn.Module | None = None
        self.classes = len(vocab.answers) if task in CLASSIFICATION else 0
        if task in CLASSIFICATION:
            pair = 2 if task == "nlvr2" else 1
            self.head = Classifier(pair * h, 2 * h, self.classes)
            init_weights(self.head, model_cfg.init_std)
        else:  # refcoco: the cosine of the fused [CLS] and each fused region, at a learnt temperature
            self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / model_cfg.temperature)))

    def begin_step(self, step: int, steps_per_epoch: int) -> None:
        self.backbone.begin_step(step, steps_per_epoch)

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Class logits (B, C), or region scores (B, K) for grounding (padding at -inf)."""
        if self.task == "nlvr2":
            pooled = torch.cat([self.backbone.fused(batch).cls, self.backbone.fused(second_image(batch)).cls], -1)
            return self.head(pooled)
        fused = self.backbone.fused(batch)
        if self.head is not None:
            return self.head(fused.cls)
        sim = torch.einsum("bd,bkd->bk", F.normalize(fused.cls.float(), dim=-1), F.normalize(fused.regions.float(), dim=-1))
        return (sim * self.log_scale.exp()).masked_fill(~batch["region_mask"].bool(), float("-inf"))

    def forward(self, batch):
        logits = self.logits(batch)
        if self.task == "vqa":
            loss = soft_target_loss(logits, batch["answer_scores"])
        elif self.task in CLASSIFICATION:
            loss = masked_token_loss(logits.float(), batch["answer_labels"])
        else:
            positive = box_iou(batch["boxes"], batch["target_box"][:, None]) >= GROUNDING_IOU
            loss = grounding_loss(logits, positive, batch["region_mask"])
        with torch.no_grad():
            metrics = {"train_accuracy": task_scores(self.task, logits.argmax(-1), batch).mean()}
        return ModelOutput(losses={self.task: loss}, metrics=metrics)

    @torch.no_grad()
    def predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each row's prediction: its class, or its top region's index for grounding."""
        return self.logits(batch).argmax(-1)


def task_scores(task: str, predicted: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's score in ``task``'s metric (B,): VQA accuracy of the predicted answer (its
    ``answer_scores`` entry, :func:`~alignlab.models.inputs.vqa_accuracy`); exact match of the
    class for GQA, SNLI-VE and NLVR2 (a row whose answer is outside answers.txt scores 0: it
    stays in the denominator, as in the official evaluations); for RefCOCO+, whether the predicted
    region's box has IoU >= 0.5 with the referred box."""
    if task == "vqa":
        return batch["answer_scores"].gather(1, predicted[:, None]).squeeze(1).float()
    if task in CLASSIFICATION:
        labels = batch["answer_labels"]
        return ((predicted == labels) & (labels != IGNORE)).float()
    box = batch["boxes"].gather(1, predicted[:, None, None].expand(-1, 1, 4)).squeeze(1)
    return (box_iou(box, batch["target_box"]) >= GROUNDING_IOU).float()


def baseline_scores(task: str, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each row's score under the baselines every downstream table shows beside a model:
    ``majority`` (always the most frequent train answer, class 0 of answers.txt) for the
    classifications; for grounding, ``chance`` (the expected score of a uniformly drawn region)
    and ``oracle`` (whether any region reaches IoU 0.5: the detector's ceiling)."""
    if task in CLASSIFICATION:
        return {"majority": task_scores(task, torch.zeros_like(batch["input_ids"][:, 0]), batch)}
    hit = (box_iou(batch["boxes"], batch["target_box"][:, None]) >= GROUNDING_IOU) & batch["region_mask"].bool()
    regions = batch["region_mask"].sum(1).clamp(min=1)
    return {"chance": hit.sum(1) / regions, "oracle": hit.any(1).float()}
