"""Typed experiment configuration: dataclasses with the papers' defaults, YAML presets and
command-line overrides (``optim.lr=1e-4``).

Every key is checked at start-up: an unknown key, a value of the wrong type or a choice outside
a ``Literal`` fails with a :class:`ConfigError` naming the dotted key and the valid choices, so a
typo never surfaces an hour into a cluster run.

A config names an architecture (``model.architecture``), never a class path. The sections every
architecture shares live here, but for the model-facing ones (``model``, ``objectives``) and the
typed builder, which live in :mod:`alignlab.models.config` and are re-exported here; each
architecture's own section (``model.<name>``) is the dataclass its
:class:`~alignlab.models.base.ModelSpec` declares beside its model, found through
``alignlab.models.registry``, so this module knows no architecture by name.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# The model-facing sections and the typed builder live beside the models (an exported model is
# rebuilt from them without the platform); re-exported here, where the whole config is built.
from alignlab.models.config import (  # noqa: F401
    ImageEncoderConfig, ModelConfig, ObjectivesConfig, build, to_dict)
from alignlab.models.inputs import TASKS, ConfigError, check_task
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
    # Evaluation splits of at most this many rows are prepared inside rank 0's worker by the same
    # Preprocessor, not through a Ray Data pipeline: a pipeline starts read tasks and a new actor
    # at every evaluation (6 s for a 16-image split on 2 cores), and its one actor
    # (preprocess_concurrency = 1) prepares no faster than the worker. Larger splits stream
    # through Ray Data, preprocess_concurrency actors wide. 0: always Ray Data.
    eval_in_worker_rows: int = 20000
    shuffle_buffer: int = 1000
    # Cap on rows read from the training split (0 = all); for quick experiments.
    max_train_rows: int = 0



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
    # A budget of training time in minutes (0 = none), counted as time/train_seconds counts it
    # (data wait in, evaluations and checkpoints out): the schedule runs on the larger of the
    # steps' and the time's fraction, and the run ends at whichever of max_steps and max_minutes
    # it reaches first. A "45 minutes on 2 cores" preset sized in steps leaves a third of its
    # budget unused on a CPU 1.5x faster than the one it was sized on, and overruns on a slower
    # one; with max_minutes the run uses its minutes wherever it runs, max_steps capping it.
    # The price: where the run stops, and so its result, depends on the machine's speed.
    max_minutes: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1
    # Steps with a non-finite loss are skipped (as fp16 overflows are); this many in a row fail
    # the run.
    nonfinite_patience: int = 10


@dataclass
class PrecisionConfig:
    # fp16 = CUDA autocast + GradScaler; bf16 = autocast (CPU or CUDA); fp32; auto = fp16 on
    # CUDA, bf16 on a CPU with native bf16 (AVX512-BF16, AMX), fp32 on other CPUs.
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
    # A sweep driver's console: false prints one line per trial at its log steps, skipped-row
    # warnings, errors and the tables, while Ray's process output, Ray Data's progress and Tune's
    # status tables stay in the Ray session's log files (platform/console.py); true shows them all.
    verbose: bool = False
    # Seconds between samples of MLflow's system metrics (system/*: CPU, memory, disk, network,
    # NVIDIA GPU utilisation and memory), logged into the run by each machine's first train
    # worker (0 = none). $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL in the workers overrides it.
    system_metrics_every: float = 10.0
    # The model registry name a finished run's final model (its MLflow model, ``model``) is
    # registered under ("" = logged with the run, not registered).
    registered_model: str = ""


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
    # The reference row the experiment scripts add beside the ablation rows: a preset trained on
    # the same shards and seeds, showing what a user gets without the architecture's
    # multi-level pre-training. "" = none unless `--reference` asks for one.
    reference: str = ""


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
# Overrides, presets, loading and the cross-field checks
# --------------------------------------------------------------------------------------------



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
    cfg = build(Config, data)
    check(cfg)
    return cfg


# Ranges of single values that would otherwise only fail minutes later, in a worker.
_AT_LEAST_ONE = ("data.max_text_len", "data.max_phrases", "data.max_regions", "data.max_tags", "data.image_size",
                 "data.batch_size", "data.eval_batch_size", "data.eval_max_images", "data.preprocess_batch_size",
                 "data.preprocess_concurrency", "model.hidden_size", "model.num_layers", "model.num_heads",
                 "model.intermediate_size", "model.embed_dim", "model.image.region_dim", "optim.max_steps",
                 "optim.grad_accum", "optim.nonfinite_patience", "scaling.num_workers", "tracking.log_every", "tracking.checkpoint_every",
                 "eval.k_captions", "eval.k_images")
_NON_NEGATIVE = ("data.prefetch_batches", "data.shuffle_buffer", "data.eval_in_worker_rows", "data.max_train_rows",
                 "optim.min_lr", "optim.weight_decay", "optim.warmup_steps", "optim.max_minutes", "optim.grad_clip",
                 "tracking.max_failures", "tracking.eval_every", "scaling.gpus_per_worker",
                 "scaling.max_concurrent_trials")
_POSITIVE = ("optim.lr", "optim.eps", "model.temperature", "model.init_std", "scaling.cpus_per_worker")
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
