"""Typed experiment configuration: dataclasses with the papers' defaults, YAML presets and
command-line overrides (``optim.lr=1e-4``).

Every key is checked at start-up: an unknown key, a value of the wrong type or a choice outside
a ``Literal`` fails with a :class:`ConfigError` naming the dotted key and the valid choices, so a
typo never surfaces an hour into a cluster run.

A config names an architecture (``model.architecture: mvptr``), never a class path; the model
registry maps names to builders.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration problem, raised before any work starts."""


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
    """Pixels through a timm ViT, or a transformer over pre-extracted region features."""

    kind: Literal["vit", "regions"] = "vit"
    # timm model name; created with the overrides below (img_size/embed_dim/depth/num_heads
    # of 0 keep the timm architecture's own value).
    timm_name: str = "vit_base_patch16_224"
    # True: timm's own pretrained loading path (hub or a pretrained_cfg overlay file);
    # a path: a checkpoint file (state dict) loaded into the created model.
    pretrained: bool = False
    checkpoint: str = ""
    img_size: int = 0
    patch_size: int = 0
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    # Region features: their width (2048 + 6 for VinVL; see the shard schema).
    region_dim: int = 2054


@dataclass
class MVPTRConfig:
    """MVPTR-specific options (Li et al., 2022, §3 and Table 4)."""

    # Table 4's rows: the full model, without masked concept recovering, without MCR and the tag
    # input, without weakly-supervised phrase grounding, without WPG and the phrase input. A
    # removed component contributes no parameters, no inputs and no loss.
    ablation: Literal["full", "wo_mcr", "wo_mcr_tag", "wo_wpg", "wo_wpg_phrase"] = "full"
    # WPG hinge margin (§3.3).
    wpg_margin: float = 0.2
    # Layers of the textual, visual and multi-modal encoders (6 each in the paper: the uni-modal
    # encoders from BERT-base layers 0-5, the multi-modal encoder from layers 6-11).
    text_layers: int = 6
    visual_layers: int = 6
    fusion_layers: int = 6


@dataclass
class SIMLAConfig:
    """SIMLA (§2, §2.5): momentum distillation, feature queues, XMM's visual tokenizer and
    block-wise image masking, PSL, and the Table-1 component switches."""

    momentum: float = 0.995  # EMA coefficient of the momentum encoders and heads (§2.5)
    # Length M of the image and text feature queues (65,536 in the paper); a multiple of the
    # global batch (data.batch_size), so small runs size it to their batch.
    queue_size: int = 65536
    alpha: float = 0.4  # distillation coefficient, ramped linearly from 0 ...
    alpha_ramp_epochs: float = 1.0  # ... over this many epochs (§2.5: the first epoch)
    psl_k: int = 4  # pseudo-labels per caption (appendix §3: k = 4 is best)
    # Layers of the language encoder from this index on hold cross-attention (the paper: all).
    cross_from: int = 0
    # Table-1 components; a disabled one contributes no loss and builds no head.
    itm: bool = True
    itc: bool = True
    mlm: bool = True
    mim: bool = True
    psl: bool = True
    # A named Table-1 row (see SIMLA_ROWS) overriding the flags above: one sweepable key.
    row: Literal["", "a", "b", "c", "d", "e"] = ""
    # MIM targets: "random_projection" (BEST-RQ's frozen random-projection quantizer, needs no
    # weights: the default here) or "dvae" (a DALL-E / BEiT dVAE encoder loaded from dvae_path).
    visual_tokenizer: Literal["random_projection", "dvae"] = "random_projection"
    codebook_size: int = 8192  # visual vocabulary (the DALL-E dVAE's is 8192)
    rpq_dim: int = 16  # projection width of the random-projection quantizer (BEST-RQ)
    rpq_seed: int = 0  # seed of its frozen projection and codebook
    dvae_path: str = ""
    # BEiT block-wise masking: the fraction of image patches masked is drawn uniformly from
    # these bounds per image (BEiT: 75 of 196 patches, about 0.4).
    mim_ratio: tuple[float, float] = (0.35, 0.45)

    def components(self) -> tuple[str, ...]:
        """The enabled objectives: the named row's, or the flags'."""
        if self.row:
            return SIMLA_ROWS[self.row]
        return tuple(c for c in ("itm", "itc", "mlm", "mim", "psl") if getattr(self, c))


# SIMLA's Table-1 ablation rows as named component sets (the paper labels its last two rows both
# "(d)"; here they are d and e). ``row: ""`` uses the component flags instead.
SIMLA_ROWS: dict[str, tuple[str, ...]] = {
    "a": ("itm",),
    "b": ("itm", "itc"),
    "c": ("itm", "itc", "mlm"),
    "d": ("itm", "itc", "mlm", "mim"),
    "e": ("itm", "itc", "mlm", "mim", "psl"),
}


@dataclass
class SemVLPConfig:
    """SemVLP (Li et al., 2021, §3 and §4.3-4.4): one shared encoder run in single-stream and
    two-stream mode, with cross-modal attention in the layers above ``cross_layer``."""

    # Pre-training mode (Table 4): single-stream only, two-stream only, or both, alternating per
    # mini-batch with probability ``single_prob`` of single-stream (§3.3.2: 0.5). "single" builds
    # no cross-modal attention at all.
    mode: Literal["single", "two", "both"] = "both"
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


@dataclass
class ModelConfig:
    # An architecture registered in alignlab.models.registry.
    architecture: Literal["dual_encoder", "mvptr", "simla", "semvlp"] = "dual_encoder"
    # Transformer width shared by the text stack (and region/fusion stacks).
    hidden_size: int = 768
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 3072
    dropout: float = 0.1
    # Hugging Face BERT checkpoint name or path for the text stack ("" = random init).
    text_init: str = ""
    # Width of the shared contrastive space (g_v, g_l in SIMLA; 256 as in ALBEF).
    embed_dim: int = 256
    # Initial temperature of the learnable InfoNCE temperature (CLIP / ALBEF use 0.07).
    temperature: float = 0.07
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    simla: SIMLAConfig = field(default_factory=SIMLAConfig)
    mvptr: MVPTRConfig = field(default_factory=MVPTRConfig)
    semvlp: SemVLPConfig = field(default_factory=SemVLPConfig)


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


@dataclass
class TrackingConfig:
    # "" = $MLFLOW_TRACKING_URI, else a local SQLite store in the working directory.
    mlflow_uri: str = ""
    experiment: str = "alignlab"
    run_name: str = ""
    log_every: int = 10
    checkpoint_every: int = 200
    # Ray Train storage for checkpoints: local dir or object-storage URI ("" = ./ray_results).
    storage_path: str = ""
    # Ray Train restarts on worker failure before giving up.
    max_failures: int = 2
    # Zero-shot retrieval every N steps during pre-training (0 = only at the end).
    eval_every: int = 0


@dataclass
class EvalConfig:
    # Re-ranked retrieval (MVPTR §4.2): top k captions per image and top k images per caption
    # are re-scored by the multi-modal ITM head (capped by the gallery size).
    k_captions: int = 128
    k_images: int = 64
    rerank: bool = True


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
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
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
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; valid keys here: {', '.join(sorted(valid))}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    types_ = _field_types(cls)
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in types_:
            raise _unknown_key(key, list(types_))
        kwargs[k] = _coerce(v, types_[k], key)
    obj = cls(**kwargs)
    validate = getattr(obj, "__validate__", None)
    if validate:
        validate()
    return obj


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists), suitable for YAML and Ray's config passing."""

    def conv(v):
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


def check(cfg: Config) -> None:
    """Cross-field checks that single fields cannot express."""
    from alignlab.models.registry import check_objectives

    try:
        check_objectives(cfg.model.architecture, cfg.objectives.weights)
    except ValueError as e:
        raise ConfigError(f"config key 'objectives.weights': {e}") from None
    if cfg.model.architecture == "mvptr" and cfg.model.image.kind != "regions":
        raise ConfigError("config key 'model.image.kind' must be 'regions' for model.architecture = 'mvptr' "
                          "(its visual encoder reads detector regions and tags, §3.1)")
    if cfg.model.architecture == "simla":
        _check_simla(cfg)
    if cfg.model.architecture == "semvlp":
        _check_semvlp(cfg)
    if cfg.data.batch_size % cfg.scaling.num_workers:
        raise ConfigError(
            f"config key 'data.batch_size' = {cfg.data.batch_size} must divide evenly across "
            f"scaling.num_workers = {cfg.scaling.num_workers} (it is the global batch)")
    if cfg.optim.grad_accum < 1:
        raise ConfigError("config key 'optim.grad_accum' must be >= 1")
    if cfg.optim.max_steps < 1:
        raise ConfigError("config key 'optim.max_steps' must be >= 1")
    for key, v in (("objectives.mlm_prob", cfg.objectives.mlm_prob), ("objectives.mcr_prob", cfg.objectives.mcr_prob),
                   ("objectives.object_mask_prob", cfg.objectives.object_mask_prob)):
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"config key '{key}' = {v} must be in [0, 1)")
    if cfg.precision.precision == "fp16" and not cfg.scaling.use_gpu:
        raise ConfigError(
            "config key 'precision.precision' = 'fp16' needs CUDA (autocast + GradScaler); "
            "with scaling.use_gpu = false choose one of 'bf16', 'fp32', 'auto'")


def _check_simla(cfg: Config) -> None:
    s, img = cfg.model.simla, cfg.model.image
    components = s.components()
    if "itc" in components and s.queue_size % cfg.data.batch_size:
        raise ConfigError(f"config key 'model.simla.queue_size' = {s.queue_size} must be a multiple of the "
                          f"global batch data.batch_size = {cfg.data.batch_size}")
    if not 0.0 <= s.mim_ratio[0] <= s.mim_ratio[1] < 1.0:
        raise ConfigError(f"config key 'model.simla.mim_ratio' = {list(s.mim_ratio)} must be 0 <= low <= high < 1")
    if s.psl_k < 1:
        raise ConfigError("config key 'model.simla.psl_k' must be >= 1")
    if img.kind != "vit":
        raise ConfigError("config key 'model.image.kind' must be 'vit' for simla (a ViT below the language encoder)")
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


def _check_semvlp(cfg: Config) -> None:
    s, layers = cfg.model.semvlp, cfg.model.num_layers
    if cfg.model.image.kind != "regions":
        raise ConfigError("config key 'model.image.kind' must be 'regions' for semvlp (objects are detector "
                          "regions with boxes and labels, §3.1.1)")
    if not 0 <= s.cross_layer <= layers:
        raise ConfigError(f"config key 'model.semvlp.cross_layer' = {s.cross_layer} must be in 0..model.num_layers "
                          f"= {layers}")
    if s.mode != "single" and s.cross_layer == layers:
        raise ConfigError(f"config key 'model.semvlp.cross_layer' = {layers} leaves no cross-attending layer, so "
                          f"two-stream mode (model.semvlp.mode = {s.mode!r}) could not fuse; use L_s < "
                          f"{layers} or mode 'single'")
    if s.mode == "single" and s.eval_mode == "two" or s.mode == "two" and s.eval_mode == "single":
        raise ConfigError(f"config key 'model.semvlp.eval_mode' = {s.eval_mode!r} was not pre-trained "
                          f"(model.semvlp.mode = {s.mode!r})")
    if not 0.0 < s.single_prob < 1.0 and s.mode == "both":
        raise ConfigError("config key 'model.semvlp.single_prob' must be in (0, 1) for mode 'both'")


def with_absolute_paths(cfg: Config) -> Config:
    """Local relative paths made absolute against the driver's working directory: Ray workers run
    elsewhere (``ray job submit --working-dir .`` unpacks the code into a session directory)."""
    import os

    def absolute(p: str) -> str:
        return p if not p or "://" in p else os.path.abspath(p)

    data = dataclasses.replace(cfg.data, shards=absolute(cfg.data.shards),
                               tokenizer=absolute(cfg.data.tokenizer) if os.path.exists(cfg.data.tokenizer)
                               else cfg.data.tokenizer)
    tracking = dataclasses.replace(cfg.tracking, storage_path=absolute(cfg.tracking.storage_path))
    # A local checkpoint directory (e.g. the offline MiniLM in the venv), not a hub name.
    model = dataclasses.replace(cfg.model, text_init=absolute(cfg.model.text_init)
                                if os.path.exists(cfg.model.text_init) else cfg.model.text_init)
    return dataclasses.replace(cfg, data=data, model=model, tracking=tracking)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
