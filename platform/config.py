"""Typed experiment configuration: dataclasses with the papers' defaults, YAML presets and
command-line overrides (``optim.lr=1e-4``).

Every key is checked at start-up: an unknown key, a value of the wrong type or a choice outside
a ``Literal`` fails with a :class:`ConfigError` naming the dotted key and the valid choices, so a
typo never surfaces an hour into a cluster run.

A config names an architecture (``model.architecture``), never a class path. The sections every
architecture shares live here; each architecture's own section (``model.<name>``) is the dataclass
its :class:`~alignlab.models.base.ModelSpec` declares beside its model, found through
``alignlab.models.registry``, so this module knows no architecture by name.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml

from alignlab.models.inputs import TASKS, TRUNKS, ConfigError, check_task, hybrid_cells
from alignlab.models.registry import get_spec


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where shards live and how the Ray Data CPU stage turns rows into model inputs."""

    # Local directory or any pyarrow filesystem URI (s3://bucket/prefix, gs://..., file://...).
    shards: str = "data/synth"
    train_split: str = "train"
    eval_split: str = "test"
    # A split of candidate captions (shards.COMPOSITIONAL_COLUMNS; the synthetic set writes
    # "compositional") scored by evaluate_compositional beside retrieval; empty: none.
    compositional_split: str = ""
    # "auto": the shard directory's own vocab.txt (written by `alignlab data synth`); otherwise
    # a Hugging Face tokenizer name or local path, or a WordPiece vocab.txt file.
    tokenizer: str = "auto"
    max_text_len: int = 35  # MVPTR §4.1
    max_phrases: int = 5  # MVPTR §4.1
    max_regions: int = 50  # MVPTR §4.1
    max_tags: int = 20  # MVPTR §4.1
    image_size: int = 224
    # Random-resized-crop scale range; (1.0, 1.0) disables cropping. Horizontal flips are off by
    # default because they silently invert "left of"/"right of" in captions.
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = False
    # RandAugment without colour changes on training images (ALBEF's recipe, SIMLA §2.5: two
    # of identity, auto-contrast, equalize, brightness, sharpness, shear, translate, rotate).
    randaugment: bool = False
    batch_size: int = 64  # global: split evenly across train workers
    eval_batch_size: int = 128
    eval_max_images: int = 1000
    prefetch_batches: int = 2
    # Rows per Ray Data preprocessing call; larger amortises Python overhead.
    preprocess_batch_size: int = 64
    preprocess_concurrency: int = 1
    shuffle_buffer: int = 1000
    # Cap on rows read from the training split (0 = all); for quick experiments.
    max_train_rows: int = 0


@dataclass
class ImageEncoderConfig:
    """Pixels through a timm ViT (or a hybrid ViT over a CNN trunk), or a transformer over
    pre-extracted region features."""

    kind: Literal["vit", "regions"] = "vit"
    # timm model name; created with the overrides below (img_size/embed_dim/depth/num_heads
    # of 0 keep the timm architecture's own value).
    timm_name: str = "vit_base_patch16_224"
    # True: timm's own pretrained loading path (hub or a pretrained_cfg overlay file);
    # a path: a checkpoint file (state dict) loaded into the created model.
    pretrained: bool = False
    checkpoint: str = ""
    img_size: int = 0
    # Pixels a side of a patch; for a hybrid, a multiple of the trunk's stride.
    patch_size: int = 0
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    # A hybrid ViT (timm's vit_*_r50_* design): patch tokens from this pretrained CNN trunk's
    # feature grid instead of a linear patch embedding ("": a plain ViT).
    trunk: Literal[("",) + tuple(TRUNKS)] = ""
    # The trunk's ImageNet weights: trunk_checkpoint (a state-dict file or pkg://<package>/<file>)
    # or, when empty, the file its package ships; false: random (a checkpoint restores them).
    trunk_pretrained: bool = True
    trunk_checkpoint: str = ""
    # Frozen: no gradient, BatchNorm statistics kept, no activations stored.
    freeze_trunk: bool = False
    # Region features: their width (2048 + 6 for VinVL; see the shard schema).
    region_dim: int = 2054

    def __post_init__(self):
        if self.trunk:
            hybrid_cells(self.trunk, self.patch_size, self.pretrained)


@dataclass
class ModelConfig:
    """Sizes and encoders every architecture shares, and the architecture's own section.

    ``section`` holds ``model.<architecture>``: the dataclass its spec declares (MVPTR's
    ``model.mvptr``, ...), read as ``cfg.model.mvptr`` and written under that key in YAML,
    overrides and MLflow params. Only the chosen architecture's section exists.
    """

    # An architecture registered in alignlab.models.registry.
    architecture: str = "dual_encoder"
    # Transformer width shared by the text stack (and region/fusion stacks).
    hidden_size: int = 768
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 3072
    dropout: float = 0.1
    # Text stack initialisation ("" = random): a Hugging Face BERT checkpoint name, a local
    # directory, or pkg://<python package>/<folder> for a checkpoint a package ships.
    text_init: str = ""
    # Width of the shared contrastive space (g_v, g_l in SIMLA; 256 as in ALBEF).
    embed_dim: int = 256
    # Initial temperature of the learnable InfoNCE temperature (CLIP / ALBEF use 0.07).
    temperature: float = 0.07
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    section: Any = None

    def __post_init__(self) -> None:
        if self.section is None:  # a config built without a model section: the paper's defaults
            own = get_spec(self.architecture).config
            self.section = own() if own is not None else None

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not fields: ``cfg.model.<architecture>``.
        if not name.startswith("_") and name == self.__dict__.get("architecture") and self.section is not None:
            return self.section
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


@dataclass
class ObjectivesConfig:
    """Which objectives run, their weights, and the masking that feeds them."""

    # Objective name -> weight; an objective absent from the model's list is an error.
    weights: dict[str, float] = field(default_factory=dict)
    # Contrastive and hard-negative candidates: the global batch gathered across DDP workers
    # (as the papers' batch sizes are global), or each worker's local slice.
    negatives: Literal["global", "local"] = "global"
    mlm_prob: float = 0.15  # BERT, MVPTR eq. 3
    mcr_prob: float = 0.25  # MVPTR §3.2
    object_mask_prob: float = 0.15  # SemVLP §3.3.1 masked object prediction (LXMERT)
    # ITM hard negatives: sample from the contrastive distribution (MVPTR eq. 1, ALBEF)
    # or take the hardest one.
    itm_negatives: Literal["sample", "hardest"] = "sample"


@dataclass
class OptimConfig:
    """AdamW with linear warm-up, then linear (or cosine) decay."""

    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 0
    # Warm-up as a fraction of max_steps, used when warmup_steps is 0.
    warmup_ratio: float = 0.0
    max_steps: int = 1000
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1
    # Steps with a non-finite loss are skipped (as fp16 overflows are); this many in a row fail
    # the run.
    nonfinite_patience: int = 10


@dataclass
class PrecisionConfig:
    # fp16 = CUDA autocast + GradScaler; bf16 = autocast (CPU or CUDA); fp32; auto = fp16 on
    # CUDA, fp32 on CPU.
    precision: Literal["auto", "fp16", "bf16", "fp32"] = "auto"


@dataclass
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    # How a run's train workers spread over nodes (Ray placement-group strategies): PACK fills a
    # node first; SPREAD / STRICT_SPREAD put one DDP worker per node where the cluster allows.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Trials a sweep runs at once; 0 = as many as the cluster holds at its largest (the
    # autoscaler's configured maximum where one runs, else what the cluster has now).
    max_concurrent_trials: int = 0
    # The autoscaler's cluster YAML ("" = ~/ray_bootstrap_config.yaml, where `ray up` puts it on
    # the head that runs the job drivers).
    autoscaling_config: str = ""


@dataclass
class TrackingConfig:
    # "" = $MLFLOW_TRACKING_URI, else a SQLite store under $ALIGNLAB_HOME (~/.alignlab).
    mlflow_uri: str = ""
    experiment: str = "alignlab"
    run_name: str = ""
    log_every: int = 10
    checkpoint_every: int = 200
    # Ray Train storage for checkpoints: local dir or object-storage URI ("" = $ALIGNLAB_HOME/ray_results).
    storage_path: str = ""
    # Ray Train restarts on worker failure before giving up.
    max_failures: int = 2
    # Zero-shot retrieval every N steps during pre-training (0 = only at the end).
    eval_every: int = 0
    # Seconds between samples of MLflow's system metrics (system/*: CPU, memory, disk, network,
    # NVIDIA GPU utilisation and memory), logged into the run by each machine's first train
    # worker (0 = none). $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL in the workers overrides it.
    system_metrics_every: float = 10.0


@dataclass
class EvalConfig:
    # Re-ranked retrieval (MVPTR §4.2): top k captions per image and top k images per caption
    # are re-scored by the multi-modal ITM head (capped by the gallery size).
    k_captions: int = 128
    k_images: int = 64
    rerank: bool = True
    # A retrieval model whose uni-modal ranking shortlists the candidates ITM re-ranks: a
    # checkpoint folder or an MLflow run id (its `checkpoint` tag), read from the same shards; ""
    # = the model's own uni-modal ranking. For a model without a contrastive objective (SemVLP),
    # whose own [CLS] ranks no better than chance, as re-ranking systems take theirs from a
    # first-stage retriever. With it, eval/uni_* score the shortlisting model's ranking.
    shortlist: str = ""


@dataclass
class FinetuneConfig:
    """Fine-tuning on a downstream task (``alignlab finetune``, models/downstream.py): the run
    trains the task's head over the architecture initialised from ``init``."""

    # "" = pre-training.
    task: Literal[("",) + TASKS] = ""
    # The pre-trained checkpoint folder (`alignlab finetune` resolves an MLflow run id to it);
    # "" = the architecture's own initialisation (the no-pre-training baseline).
    init: str = ""
    # The task's shard set, "{task}" standing for the task's name; "" = the synthetic task set
    # beside the embedded synthetic set, for a model pre-trained on it.
    shards: str = ""


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# --------------------------------------------------------------------------------------------
# Building from plain data, with validation
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of {sorted(_field_types(tp))}, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}' = {value!r} is not a valid choice; valid choices: {', '.join(map(repr, choices))}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' = {value!r} is not of type {_type_name(tp)}")
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}' = {value!r} must be a list of {len(args)} ({_type_name(tp)})")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' = {value!r} must be a list of {_type_name(arg)}")
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' = {value!r} must be a mapping {_type_name(tp)}")
        return {_coerce(k, kt, f"{key}"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' = {value!r} must be a float")
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}' = {value!r} must be a finite number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' = {value!r} must be an int")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' = {value!r} must be true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' = {value!r} must be a string")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"config key '{key}': unsupported annotation {tp!r}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if not (cls is ModelConfig and f.name == "section")}


def _acronym(key: str) -> str:
    return "".join(part[0] for part in key.split("_") if part)


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    """The error for a key that does not exist, with the closest valid key: by spelling, or by
    initials (``learning_rate`` -> ``lr``)."""
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, valid, n=1) or [v for v in valid if v == _acronym(name)]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; valid keys here: {', '.join(sorted(valid))}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    types_ = _field_types(cls)
    kwargs = {}
    data = dict(data)
    if cls is ModelConfig:
        kwargs["section"] = _build_section(data, prefix)
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in types_:
            raise _unknown_key(key, list(types_))
        kwargs[k] = _coerce(v, types_[k], key)
    return cls(**kwargs)


def _build_section(data: dict, prefix: str) -> Any:
    """Pops ``model.<architecture>`` from ``data`` and builds it with the spec's dataclass (its
    defaults when absent). A section of another architecture is an error, not silently ignored."""
    from alignlab.models.registry import names

    arch = data.get("architecture", ModelConfig.architecture)
    if not isinstance(arch, str):
        raise ConfigError(f"config key '{prefix}.architecture' = {arch!r} must be a string")
    spec = get_spec(arch)
    for other in names():
        if other != arch and other in data:
            # `model.<other>=null` drops a section a preset brings (a preset of one architecture
            # reused for another, as the bench's baseline at SIMLA's size).
            if data.pop(other) is not None:
                raise ConfigError(f"config key '{prefix}.{other}' configures architecture {other!r}, but "
                                  f"{prefix}.architecture = {arch!r}; drop it with {prefix}.{other}=null or set "
                                  f"{prefix}.architecture={other}")
    section = data.pop(arch, None) or {}
    if spec.config is None:
        if section:
            raise ConfigError(f"config key '{prefix}.{arch}': architecture {arch!r} has no options of its own")
        return None
    return _coerce(section, spec.config, f"{prefix}.{arch}")


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists), suitable for YAML and MLflow params; the
    architecture's section appears under its own name (``model.mvptr``)."""

    def conv(v):
        if isinstance(v, ModelConfig):
            out = {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v) if f.name != "section"}
            if v.section is not None:
                out[v.architecture] = conv(v.section)
            return out
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the form MLflow params and overrides use."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = "{}" if isinstance(v, dict) else v
    return out


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> (["optim", "lr"], 3e-4); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML reads 1e-4 as a string (it needs a dot); accept the form people type.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") and value.strip() not in ("", ".") else value
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = _deep_merge({}, data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
        node[path[-1]] = value
    return data


PRESET_DIR = Path(__file__).resolve().parent.parent / "experiments" / "configs"


def resolve_preset(name_or_path: str) -> Path:
    """A YAML path, or the name of a preset under ``experiments/configs/``."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    presets = sorted(x.stem for x in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.exists() else []
    raise ConfigError(f"config {name_or_path!r} is neither a YAML file nor a preset; presets: {', '.join(presets)}")


def load_yaml(path: str | Path) -> dict:
    """A YAML file, following ``base:`` (another preset or file) so presets can extend each other."""
    path = Path(path)
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("base", None)
    if base:
        data = _deep_merge(load_yaml(resolve_preset(base)), data)
    return data


def load_config(preset: str | None = None, overrides: list[str] | None = None, data: dict | None = None) -> Config:
    """Defaults <- preset YAML <- ``data`` <- command-line overrides, validated."""
    merged: dict = {}
    if preset:
        merged = load_yaml(resolve_preset(preset))
    if data:
        merged = _deep_merge(merged, data)
    merged = apply_overrides(merged, overrides or [])
    return from_dict(merged)


def from_dict(data: dict) -> Config:
    cfg = _build(Config, data)
    check(cfg)
    return cfg


# Ranges of single values that would otherwise only fail minutes later, in a worker.
_AT_LEAST_ONE = ("data.max_text_len", "data.max_phrases", "data.max_regions", "data.max_tags", "data.image_size",
                 "data.batch_size", "data.eval_batch_size", "data.eval_max_images", "data.preprocess_batch_size",
                 "data.preprocess_concurrency", "model.hidden_size", "model.num_layers", "model.num_heads",
                 "model.intermediate_size", "model.embed_dim", "model.image.region_dim", "optim.max_steps",
                 "optim.grad_accum", "optim.nonfinite_patience", "scaling.num_workers", "tracking.log_every", "tracking.checkpoint_every",
                 "eval.k_captions", "eval.k_images")
_NON_NEGATIVE = ("data.prefetch_batches", "data.shuffle_buffer", "data.max_train_rows", "optim.min_lr",
                 "optim.weight_decay", "optim.warmup_steps", "optim.grad_clip", "tracking.max_failures",
                 "tracking.eval_every", "scaling.gpus_per_worker", "scaling.max_concurrent_trials")
_POSITIVE = ("optim.lr", "optim.eps", "model.temperature", "scaling.cpus_per_worker")
_UNIT_INTERVAL = ("model.dropout", "optim.warmup_ratio", "objectives.mlm_prob", "objectives.mcr_prob",
                  "objectives.object_mask_prob", "optim.betas[0]", "optim.betas[1]")  # [0, 1)


def _value(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.replace("[", ".").replace("]", "").split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def check(cfg: Config) -> None:
    """Ranges and cross-field checks that single fields cannot express, then the architecture's
    own (its spec's ``check_config``)."""
    for key in _AT_LEAST_ONE:
        if _value(cfg, key) < 1:
            raise ConfigError(f"config key '{key}' = {_value(cfg, key)} must be >= 1")
    for key in _NON_NEGATIVE:
        if _value(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' = {_value(cfg, key)} must be >= 0")
    for key in _POSITIVE:
        if _value(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}' = {_value(cfg, key)} must be > 0")
    for key in _UNIT_INTERVAL:
        if not 0.0 <= _value(cfg, key) < 1.0:
            raise ConfigError(f"config key '{key}' = {_value(cfg, key)} must be in [0, 1)")
    spec = get_spec(cfg.model.architecture)
    unknown = sorted(set(cfg.objectives.weights) - set(spec.objectives))
    if unknown:
        raise ConfigError(f"config key 'objectives.weights' names {unknown}, which {spec.name} does not produce; "
                          f"valid objectives: {', '.join(spec.objectives)}")
    if spec.image_kinds and cfg.model.image.kind not in spec.image_kinds:
        raise ConfigError(f"config key 'model.image.kind' = {cfg.model.image.kind!r} is not read by "
                          f"model.architecture = {spec.name!r}; valid choices: {', '.join(map(repr, spec.image_kinds))}")
    if cfg.data.batch_size % cfg.scaling.num_workers:
        raise ConfigError(
            f"config key 'data.batch_size' = {cfg.data.batch_size} must divide evenly across "
            f"scaling.num_workers = {cfg.scaling.num_workers} (it is the global batch)")
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"config key 'optim.min_lr' = {cfg.optim.min_lr} must not exceed optim.lr = {cfg.optim.lr}")
    if cfg.precision.precision == "fp16" and not cfg.scaling.use_gpu:
        raise ConfigError(
            "config key 'precision.precision' = 'fp16' needs CUDA (autocast + GradScaler); "
            "with scaling.use_gpu = false choose one of 'bf16', 'fp32', 'auto'")
    if cfg.scaling.use_gpu and cfg.scaling.gpus_per_worker <= 0:
        raise ConfigError("config key 'scaling.gpus_per_worker' must be > 0 with scaling.use_gpu = true")
    if cfg.finetune.task:
        check_task(spec, cfg.finetune.task)
    spec.check_config(cfg)


def with_absolute_paths(cfg: Config) -> Config:
    """Local relative paths made absolute against the driver's working directory: Ray workers run
    elsewhere (``ray job submit --working-dir .`` unpacks the code into a session directory).
    URIs, ``pkg://`` resources and hub names are left as they are: each process resolves them."""

    def absolute(p: str) -> str:
        return p if not p or "://" in p else os.path.abspath(p)

    def existing(p: str) -> str:
        return absolute(p) if p and "://" not in p and os.path.exists(p) else p

    data = dataclasses.replace(cfg.data, shards=absolute(cfg.data.shards), tokenizer=existing(cfg.data.tokenizer))
    tracking = dataclasses.replace(cfg.tracking, storage_path=absolute(cfg.tracking.storage_path))
    image = dataclasses.replace(cfg.model.image, checkpoint=existing(cfg.model.image.checkpoint),
                                trunk_checkpoint=existing(cfg.model.image.trunk_checkpoint))
    model = dataclasses.replace(cfg.model, text_init=existing(cfg.model.text_init), image=image)
    evaluation = dataclasses.replace(cfg.eval, shortlist=existing(cfg.eval.shortlist))
    finetune = dataclasses.replace(cfg.finetune, init=existing(cfg.finetune.init))
    return dataclasses.replace(cfg, data=data, model=model, tracking=tracking, eval=evaluation, finetune=finetune)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
