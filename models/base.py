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

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

# Label of positions that carry no target (cross-entropy's default ignore_index): unmasked tokens,
# caption rows for QA, objects the data stage did not select.
IGNORE = -100


class ConfigError(ValueError):
    """A configuration problem, raised before any work starts. Its message names the dotted key
    and what would be valid."""


def load_refusal(error: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one sentence: the unpickler's own
    reason (the object the file tried to build, or the opcode it met). torch's message around it
    advises turning the safe unpickler off or allow-listing the global, the unsafe ways, and is
    left out."""
    reason = re.search(r"WeightsUnpickler error: (.+?)(?:\n\n|$)", str(error), re.S)
    return " ".join((reason.group(1) if reason else str(error)).split()).split(". ")[0][:160]


@dataclass(frozen=True)
class InputSpec:
    """Which inputs the CPU stage must prepare for a model."""

    pixels: bool = False  # uint8 images (B, 3, H, W)
    regions: bool = False  # region_features (B, K, D), region_mask, boxes
    tags: bool = False  # tag_ids (B, T) of detected object classes (MVPTR's visual concepts)
    phrases: bool = False  # phrase_ids (B, P) of phrase concepts (MVPTR §3.1)
    # SIMLA's MIM: a BEiT block-wise mask ``mim_mask`` (B, grid, grid) over the image patches,
    # True where a patch is masked, its masked fraction drawn from ``mim_ratio`` per image.
    mim: bool = False
    mim_grid: int = 0
    mim_ratio: tuple[float, float] = (0.0, 0.0)
    # mlm_input_ids / mlm_labels, masked at objectives.mlm_prob; with phrases also mlm_phrase_ids
    # (chain masking, MVPTR §3.3)
    mlm: bool = False
    mcr: bool = False  # mcr_tag_ids / mcr_labels (tag class index), tags masked at objectives.mcr_prob
    # SemVLP's masked object prediction (§3.3.1): objects selected at objectives.object_mask_prob,
    # ``object_mask`` (B, K) True there, ``masked_region_features`` with those rows zeroed, and
    # ``object_labels`` (B, K) the detected label (tags.txt index of the region's tag) at selected
    # regions, IGNORE elsewhere and at tags outside tags.txt. Needs regions (and their tags).
    objects: bool = False
    # Image QA (SemVLP §3.3.1): ``answer_labels`` (B,), the answers.txt index of a QA row's answer,
    # IGNORE on caption rows and for answers outside answers.txt. Only for a split whose shards
    # carry the question / answer columns; a caption-only split yields no answer_labels.
    qa: bool = False


# Id layout of concept sequences (tag_ids and phrase_ids), shared by the data stage and the models:
# 0 pads, 1 is the concept [MASK] (MCR's masked tags, chain-masked phrases), and entry k of
# tags.txt / concepts.txt has id k + CONCEPT_OFFSET.
CONCEPT_PAD = 0
CONCEPT_MASK = 1
CONCEPT_OFFSET = 2


@dataclass(frozen=True)
class Vocab:
    """What a model needs to know of the tokenizer and the shard set's concept vocabularies."""

    size: int
    pad_id: int = 0
    cls_id: int = 101
    sep_id: int = 102
    mask_id: int = 103
    tags: tuple[str, ...] = ()
    # Phrase concepts as token-id tuples (each tuple's words tokenised), for MVPTR's
    # mean-of-tokens initialisation of phrase embeddings.
    concepts: tuple[tuple[int, ...], ...] = ()
    # Image-QA answers (answers.txt), most frequent first; entry k is answer class k.
    answers: tuple[str, ...] = ()


@dataclass
class ModelOutput:
    losses: dict[str, torch.Tensor]
    # Scalars worth logging besides the losses (accuracies, temperatures, ...).
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class PretrainingModel(nn.Module):
    """Base class: names the objectives a model can produce and the retrieval interface."""

    #: Every loss name ``forward`` may return; objective weights are validated against it.
    objectives: tuple[str, ...] = ()

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

    #: DDP must tolerate parameters without a gradient in some steps (a component that only
    #: ranks negatives, a mode that skips cross-attention).
    find_unused_parameters: bool = False

    def begin_step(self, step: int, steps_per_epoch: int) -> None:
        """Called by the trainer before each optimiser step (schedules such as SIMLA's α ramp)."""

    def no_weight_decay(self) -> set[str]:
        """Names of parameters kept out of weight decay besides biases and norms (timm's hook):
        by default every learnable temperature ``log_scale``."""
        return {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] == "log_scale"}


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

    @property
    def objectives(self) -> tuple[str, ...]:
        return self.model.objectives

    def input_spec(self, model_cfg, objectives_cfg) -> InputSpec:
        return self.model.input_spec(model_cfg, objectives_cfg)

    def build(self, model_cfg, objectives_cfg, vocab: Vocab) -> PretrainingModel:
        return self.model(model_cfg, objectives_cfg, vocab)
