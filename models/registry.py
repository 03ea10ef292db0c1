"""Architecture names -> model classes. A config names an architecture, never a class path."""
from __future__ import annotations

import importlib

from alignlab.models.base import PretrainingModel, Vocab

# Resolved lazily so that validating a config does not import every architecture.
ARCHITECTURES: dict[str, str] = {
    "dual_encoder": "alignlab.models.dual_encoder:DualEncoder",
    "simla": "alignlab.models.simla:SIMLA",
    "mvptr": "alignlab.models.mvptr:MVPTR",
    "semvlp": "alignlab.models.semvlp:SemVLP",
}


def model_class(architecture: str) -> type[PretrainingModel]:
    try:
        module, name = ARCHITECTURES[architecture].split(":")
    except KeyError:
        raise ValueError(f"model.architecture = {architecture!r} is not implemented; "
                         f"available: {', '.join(sorted(ARCHITECTURES))}") from None
    return getattr(importlib.import_module(module), name)


def check_objectives(architecture: str, weights: dict[str, float]) -> None:
    """Objective weights may only name losses the architecture produces."""
    valid = model_class(architecture).objectives
    unknown = sorted(set(weights) - set(valid))
    if unknown:
        raise ValueError(f"objectives.weights names {unknown}, which {architecture} does not produce; "
                         f"valid objectives: {', '.join(valid)}")


def build_model(model_cfg, objectives_cfg, vocab: Vocab) -> PretrainingModel:
    check_objectives(model_cfg.architecture, objectives_cfg.weights)
    return model_class(model_cfg.architecture)(model_cfg, objectives_cfg, vocab)
