"""The model-facing sections of the experiment configuration (``model`` and ``objectives``:
:class:`ModelConfig`, :class:`ImageEncoderConfig`, :class:`ObjectivesConfig`), the typed builder that
turns plain data into them with every key checked, and :func:`to_dict`, its inverse.

They live in ``models/`` because a model is built from them alone: a trained model exported by
``alignlab export`` is rebuilt by :mod:`alignlab.models.pretrained`, which may not import the
platform. :mod:`alignlab.platform.config` re-exports them beside the platform's own sections (data,
optimiser, scaling, tracking ...) and builds the whole experiment config with the same
:func:`build`, so every existing import, preset and override keeps working and there is one
builder. Importable without torch: every Ray Data CPU worker reads the config.

The builder checks each key against the dataclass annotations: an unknown key, a value of the
wrong type or a choice outside a ``Literal`` fails with a :class:`ConfigError` naming the dotted
key and the valid choices; with ``complete=True`` (a file that must describe a model in full, such
as an export's config.json) so does a missing one.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from alignlab.models.inputs import TRUNKS, ConfigError, hybrid_cells
from alignlab.models.registry import get_spec


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
    # Std of the normal initialisation of every linear and embedding weight that no checkpoint
    # loads: BERT's initializer_range, 0.02, set for width 768. A layer's gain at initialisation
    # grows as std * sqrt(width), so a narrow model with 0.02 starts with near-zero attention and
    # a fusion stack that barely reads its image (#13); 0.02 * sqrt(768 / width) keeps
    # BERT-base's gain at any width.
    init_std: float = 0.02
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

    # Objective name -> weight (1 where absent); an objective absent from the model's list is an
    # error. A weight of 0 switches off an objective the model lists as optional
    # (PretrainingModel.optional_objectives): it is not computed and its masks are not prepared.
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


def _coerce(value: Any, tp: Any, key: str, complete: bool = False) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats, lists
    become tuples). ``complete``: every dataclass field must be given (see :func:`build`)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of {sorted(_field_types(tp))}, got {value!r}")
        return build(tp, value, key, complete)
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
                return _coerce(value, arg, key, complete)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' = {value!r} is not of type {_type_name(tp)}")
    if origin is tuple and get_args(tp)[1:] == (Ellipsis,):  # tuple[X, ...]: any length
        (arg, _) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' = {value!r} must be a list of {_type_name(arg)}")
        return tuple(_coerce(v, arg, f"{key}[{i}]", complete) for i, v in enumerate(value))
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}' = {value!r} must be a list of {len(args)} ({_type_name(tp)})")
        return tuple(_coerce(v, a, f"{key}[{i}]", complete) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' = {value!r} must be a list of {_type_name(arg)}")
        return [_coerce(v, arg, f"{key}[{i}]", complete) for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' = {value!r} must be a mapping {_type_name(tp)}")
        return {_coerce(k, kt, f"{key}"): _coerce(v, vt, f"{key}.{k}", complete) for k, v in value.items()}
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


def build(cls: type, data: dict, prefix: str = "", complete: bool = False) -> Any:
    """The dataclass ``cls`` from the plain mapping ``data``, every key checked (``prefix``: the
    dotted key ``data`` sits at, for the errors). A key left out takes the field's default, unless
    ``complete``: then it fails naming the key (a file that describes a trained model in full,
    where a default standing in for a lost value would build a different model)."""
    types_ = _field_types(cls)
    kwargs = {}
    data = dict(data)
    if cls is ModelConfig:
        kwargs["section"] = _build_section(data, prefix, complete)
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in types_:
            raise _unknown_key(key, list(types_))
        kwargs[k] = _coerce(v, types_[k], key, complete)
    missing = sorted(set(types_) - set(data)) if complete else []
    if missing:
        raise ConfigError(f"config key '{prefix + '.' if prefix else ''}{missing[0]}' is missing"
                          + (f" (and {', '.join(missing[1:])})" if missing[1:] else ""))
    return cls(**kwargs)


def _build_section(data: dict, prefix: str, complete: bool = False) -> Any:
    """Pops ``model.<architecture>`` from ``data`` and builds it with the spec's dataclass (its
    defaults when absent, unless ``complete``). A section of another architecture is an error,
    not silently ignored."""
    from alignlab.models.registry import names

    if complete and "architecture" not in data:
        raise ConfigError(f"config key '{prefix}.architecture' is missing")
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
    if complete and spec.config is not None and arch not in data:
        raise ConfigError(f"config key '{prefix}.{arch}' is missing (architecture {arch!r}'s own section)")
    section = data.pop(arch, None) or {}
    if spec.config is None:
        if section:
            raise ConfigError(f"config key '{prefix}.{arch}': architecture {arch!r} has no options of its own")
        return None
    return _coerce(section, spec.config, f"{prefix}.{arch}", complete)


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


def without_init_sources(model_cfg: ModelConfig) -> ModelConfig:
    """``model_cfg`` with its initialisation sources unread (a text checkpoint, ViT hub weights or
    file, a hybrid trunk's weights), for building a model whose weights are about to be loaded
    (a training checkpoint, an export): they hold every weight. Applied to the model that is
    built, never to the config a run records, which stays as trained (a config checked with
    frozen pretrained layers keeps naming their source)."""
    image = dataclasses.replace(model_cfg.image, pretrained=False, checkpoint="", trunk_pretrained=False,
                                trunk_checkpoint="")
    return dataclasses.replace(model_cfg, text_init="", image=image)
