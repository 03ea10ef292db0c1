"""Architecture names -> :class:`~alignlab.models.base.ModelSpec`. A config names an architecture
(``model.architecture: mvptr``), never a class path; the platform asks this registry for the spec.

The built-in architectures are imported lazily, by module, so that validating a config imports only
the architecture it names. Another architecture registers itself with :func:`register` (a research
fork, a test's toy model); its module must then be importable wherever the config is read again
(Ray pickles the spec to the train workers by reference).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from alignlab.models.inputs import ConfigError

if TYPE_CHECKING:  # the specs' modules import torch; reading a config must not (Ray Data workers read it)
    from alignlab.models.base import ModelSpec, PretrainingModel, Vocab

# Each module defines ``SPEC``.
BUILTIN: dict[str, str] = {
    "dual_encoder": "alignlab.models.dual_encoder",
    "mvptr": "alignlab.models.mvptr",
    "semvlp": "alignlab.models.semvlp",
    "simla": "alignlab.models.simla",
}

_registered: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Adds (or replaces) an architecture; returns the spec, so a module can write
    ``SPEC = register(ModelSpec(...))``."""
    _registered[spec.name] = spec
    return spec


def names() -> list[str]:
    return sorted(set(BUILTIN) | set(_registered))


def get_spec(architecture: str) -> ModelSpec:
    if architecture not in _registered and architecture in BUILTIN:
        spec = importlib.import_module(BUILTIN[architecture]).SPEC
        _registered.setdefault(spec.name, spec)
    try:
        return _registered[architecture]
    except KeyError:
        raise ConfigError(f"config key 'model.architecture' = {architecture!r} is not a registered "
                          f"architecture; valid choices: {', '.join(map(repr, names()))}") from None


def build_model(model_cfg, objectives_cfg, vocab: Vocab) -> PretrainingModel:
    """The model of ``model_cfg.architecture`` (the config was checked when it was loaded)."""
    return get_spec(model_cfg.architecture).build(model_cfg, objectives_cfg, vocab)
