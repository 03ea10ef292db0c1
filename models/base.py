"""The contract between a model and the platform.

A model is an ``nn.Module`` whose ``forward(batch)`` returns a :class:`ModelOutput` of named,
unweighted losses; the platform weights and sums them, and owns devices, precision, DDP, logging
and checkpoints. What a model needs from the Ray Data CPU stage (pixels, regions, tags, phrases,
masking) it declares in an :class:`InputSpec`, so the data stage prepares exactly that.

Each architecture declares itself in a :class:`ModelSpec` beside its model: its config section
with the paper's defaults, the checks that section needs, its inputs and its named ablations. The
platform reads specs through ``models/registry.py`` and never names an architecture.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Mapping

import torch
from torch import nn

from alignlab.models.inputs import (  # noqa: F401  (re-exported: the models' side of the contract)
    CONCEPT_MASK, CONCEPT_OFFSET, CONCEPT_PAD, IGNORE, ConfigError, InputSpec, Vocab, load_refusal)


@dataclass
class ModelOutput:
    losses: dict[str, torch.Tensor]
    # Scalars worth logging besides the losses (accuracies, temperatures, ...).
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class PretrainingModel(nn.Module):
    """Base class: names the objectives a model can produce and the retrieval interface."""

    #: Every loss name ``forward`` may return; objective weights are validated against it.
    objectives: tuple[str, ...] = ()
    #: Those a zero weight switches off (:meth:`switched_off`): not computed, their masks not
    #: prepared. The others feed objectives that stay (VSC's similarities draw ITM's
    #: negatives), so a zero weight only takes them out of the sum.
    optional_objectives: tuple[str, ...] = ()
    #: The objectives the paper fine-tunes retrieval with (``alignlab finetune retrieval`` weights
    #: the other optional ones 0); empty where the paper names none: pre-training's continue.
    retrieval_objectives: tuple[str, ...] = ()

    @classmethod
    def retrieval_finetuning(cls, model_cfg) -> dict:
        """What ``alignlab finetune retrieval`` lays over the checkpoint's config (nested, as a
        preset): weight 0, which switches them off, for the optional objectives its paper does
        not fine-tune retrieval with; nothing where the paper names no retrieval objectives."""
        if not cls.retrieval_objectives:
            return {}
        return {"objectives": {"weights": {o: 0.0 for o in cls.optional_objectives
                                           if o not in cls.retrieval_objectives}}}

    @classmethod
    def switched_off(cls, objectives_cfg) -> frozenset[str]:
        """The optional objectives ``objectives_cfg`` weights 0."""
        return frozenset(o for o in cls.optional_objectives if objectives_cfg.weights.get(o, 1.0) == 0)

    @classmethod
    def input_spec(cls, model_cfg, objectives_cfg) -> InputSpec:
        """What the data stage must prepare, from the config alone (the driver asks before any
        weights exist)."""
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def embed_images(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised global image embeddings (B, d) for uni-modal retrieval."""
        raise NotImplementedError

    def embed_texts(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """L2-normalised global text embeddings (B, d) for uni-modal retrieval."""
        raise NotImplementedError

    def match_scores(self, images: dict[str, torch.Tensor], texts: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """ITM match score per aligned (image, text) pair, shape (B,), for re-ranked retrieval;
        None when the architecture has no multi-modal encoder."""
        return None

    # Re-ranking scores each gallery image against k captions and each caption against k images:
    # what a model computes of one side alone (uni-modal encoder states) it computes once per item
    # in these, and ``match_from_states`` runs only the multi-modal part per pair. The defaults
    # keep the inputs and score them with ``match_scores``.
    def match_image_states(self, images: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-image tensors (batch-first) that :meth:`match_from_states` takes for the image side."""
        return images

    def match_text_states(self, texts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-caption tensors (batch-first) that :meth:`match_from_states` takes for the text side."""
        return texts

    def match_from_states(self, images: dict[str, torch.Tensor], texts: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`match_scores` of aligned pairs given their ``match_*_states`` rows."""
        return self.match_scores(images, texts)

    def fused(self, batch: dict[str, torch.Tensor]):
        """The multi-modal encoder's reading of each aligned (image, text) pair of ``batch``, for
        fine-tuning (:class:`~alignlab.models.downstream.Fused`: the fused [CLS], and the fused
        region states where the image side is regions). Architectures without a multi-modal
        encoder have none: their spec lists no task that needs it."""
        raise NotImplementedError(f"{type(self).__name__} has no multi-modal encoder to fine-tune")

    #: DDP must tolerate parameters without a gradient in some steps (a component that only
    #: ranks negatives, a mode that skips cross-attention).
    find_unused_parameters: bool = False

    def begin_step(self, step: int, steps_per_epoch: int) -> None:
        """Called by the trainer before each optimiser step (schedules such as SIMLA's α ramp)."""

    def no_weight_decay(self) -> set[str]:
        """Names of parameters kept out of weight decay besides biases and norms (timm's hook):
        by default every learnable temperature ``log_scale``."""
        return {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] == "log_scale"}


@dataclass
class Readings:
    """The two readings of a paper (#15) in an architecture's config section: ``reading`` picks
    the paper's text or the authors' code for every switch left "" (the section's ``READINGS``
    table: switch -> value, per reading). A switch set explicitly wins, so readings can be mixed."""

    READINGS: ClassVar[dict[str, dict[str, str]]] = {}
    reading: Literal["paper", "official"] = "paper"
    # The columns ITM never draws a hard negative from: "same_image", any caption of the row's
    # image, or "own_pair", only the row's own pair (the official MVPTR and SIMLA code's
    # fill_diagonal_(0), under which another caption of the same image can be a "negative").
    itm_exclude: Literal["", "same_image", "own_pair"] = ""

    def switch(self, name: str) -> str:
        """A reading switch's value: set explicitly, else the reading's."""
        return getattr(self, name) or self.READINGS[self.reading][name]


@dataclass(frozen=True)
class Ablation:
    """One of a paper's ablation sweeps: ``grid`` maps config keys to the values swept (a key with
    one value fixes it for the sweep), ``group_by`` is the key whose values are the table's rows,
    and ``line`` asks for a plot against it (a numeric axis such as SIMLA's k). ``reference`` names
    the row every other is compared with (paired over seeds), and ``claims`` are the paper's
    claims the sweep can test: (text, row A, row B, metric, +1 if A should exceed B else -1)."""

    title: str
    grid: Mapping[str, tuple]
    group_by: str
    line: bool = False
    reference: str = ""
    claims: tuple[tuple[str, str, str, str, int], ...] = ()


def _no_check(cfg: Any) -> None:
    """An architecture whose section needs no cross-field checks."""


@dataclass(frozen=True)
class ModelSpec:
    """What the platform needs to know of one architecture, declared beside its model.

    ``config`` is the dataclass of the architecture's section ``model.<name>`` (the paper's
    defaults; None: no section). ``check_config`` receives the whole validated config and raises
    :class:`ConfigError` for combinations a single field cannot express. ``image_kinds`` lists the
    ``model.image.kind`` values the model reads (empty: any). ``ablations(cfg)`` returns the
    paper's named sweeps for a config (some depend on its sizes, e.g. SemVLP's L_s).
    """

    name: str
    model: type[PretrainingModel]
    config: type | None = None
    check_config: Callable[[Any], None] = _no_check
    image_kinds: tuple[str, ...] = ()
    ablations: Callable[[Any], Mapping[str, Ablation]] = lambda cfg: {}
    # The downstream tasks (models/downstream.py TASKS) it fine-tunes on: a task needing a fused
    # [CLS] needs :meth:`PretrainingModel.fused`, grounding needs fused regions.
    tasks: tuple[str, ...] = ("retrieval",)

    @property
    def objectives(self) -> tuple[str, ...]:
        return self.model.objectives

    def input_spec(self, model_cfg, objectives_cfg) -> InputSpec:
        return self.model.input_spec(model_cfg, objectives_cfg)

    def build(self, model_cfg, objectives_cfg, vocab: Vocab) -> PretrainingModel:
        return self.model(model_cfg, objectives_cfg, vocab)
