"""A trained model rebuilt from the folder ``alignlab export`` writes, with AlignLab's models
alone::

    from alignlab.models.pretrained import from_pretrained

    model = from_pretrained("exports/my_model")  # in eval mode, on the CPU

Issue #18 asks for ``alignlab.models.from_pretrained``; ``alignlab.models`` is a namespace package
(``models/`` has no ``__init__.py``, so that ``platform/`` beside it can stay one too without
shadowing the stdlib module), so the function lives in this submodule.

The folder (:mod:`alignlab.platform.export` writes it; its README.md lists the files) holds
``config.json`` and ``model.safetensors``, which are all this module reads: the architecture, the
downstream task (``""``: the pre-trained model), the resolved ``model`` and ``objectives`` config
and the vocabulary summary (:class:`~alignlab.models.inputs.Vocab`) build the model, and the
weights fill it. Nothing read can execute code (JSON and safetensors), and no initialisation
source (``model.text_init``, timm hub weights or a ViT file, a hybrid trunk's ImageNet weights)
is read: the folder holds every weight.

The model-facing config sections are built with the typed builder of
:mod:`alignlab.models.config`, the one the platform validates experiment configs with: the
``model`` and ``objectives`` sections moved there from ``platform/config.py`` (which re-exports
them), because models may not import the platform and a second builder would drift from the
first. The file describes a trained model in full, so a missing key fails as an unknown one does
(a default standing in for a lost value would build a different model); each failure names the
file and the dotted key.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alignlab.models.config import ModelConfig, ObjectivesConfig, build, without_init_sources
from alignlab.models.inputs import TASKS, ConfigError, Vocab

FORMAT = "alignlab-export"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# The keys of config.json: these build the model ...
MODEL_KEYS = ("format", "format_version", "architecture", "task", "model", "objectives", "vocab", "step")
# ... and these are for the data stage (``preprocessing``) and for provenance, not read here.
OTHER_KEYS = ("epoch", "alignlab_version", "alignlab_commit", "source", "preprocessing", "training_config")


class ExportError(ValueError):
    """An export folder that cannot be read (or written); the message names the file and key."""


@dataclass(frozen=True)
class ExportedConfig:
    """The model-facing contents of an export's config.json."""

    architecture: str
    task: str  # "" (pre-training) or a downstream task the model was fine-tuned on
    step: int
    model: ModelConfig
    objectives: ObjectivesConfig
    vocab: Vocab
    raw: dict[str, Any]  # the whole file, provenance and preprocessing included


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or :class:`ExportError` naming it."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path} is missing: {path.parent} is not an AlignLab export (`alignlab export` writes "
                          f"one)") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} is not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: the top level must be a mapping")
    return data


def is_export(directory: str | Path) -> bool:
    """Whether ``directory`` holds an AlignLab export (its config.json says so)."""
    try:
        return read_json(Path(directory) / CONFIG_FILE).get("format") == FORMAT
    except ExportError:
        return False


def read_config(directory: str | Path) -> ExportedConfig:
    """The model-facing part of ``directory``'s config.json, every key checked."""
    from alignlab.models.registry import get_spec

    path = Path(directory) / CONFIG_FILE
    data = read_json(path)
    if data.get("format") != FORMAT:
        raise ExportError(f"{path}: key 'format' = {data.get('format')!r}, not {FORMAT!r}: not an AlignLab export")
    if data.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: key 'format_version' = {data.get('format_version')!r}; this AlignLab reads "
                          f"version {FORMAT_VERSION}")
    unknown = sorted(set(data) - set(MODEL_KEYS) - set(OTHER_KEYS))
    missing = [k for k in MODEL_KEYS if k not in data]
    if unknown or missing:
        raise ExportError(f"{path}: " + (f"unknown key '{unknown[0]}'" if unknown else f"key '{missing[0]}' is missing")
                          + f"; its keys are {', '.join(MODEL_KEYS + OTHER_KEYS)}")
    try:
        if data["task"] not in ("", *TASKS):
            raise ConfigError(f"config key 'task' = {data['task']!r} is not a valid choice; valid choices: "
                              f"{', '.join(map(repr, ('', *TASKS)))}")
        if not isinstance(data["step"], int) or isinstance(data["step"], bool):
            raise ConfigError(f"config key 'step' = {data['step']!r} must be an int")
        if not isinstance(data["architecture"], str):
            raise ConfigError(f"config key 'architecture' = {data['architecture']!r} must be a string")
        get_spec(data["architecture"])  # an unknown architecture fails naming the registered ones
        model = build(ModelConfig, _mapping(data, "model"), "model", complete=True)
        if model.architecture != data["architecture"]:
            raise ConfigError(f"config key 'architecture' = {data['architecture']!r} but model.architecture = "
                              f"{model.architecture!r}")
        objectives = build(ObjectivesConfig, _mapping(data, "objectives"), "objectives", complete=True)
        vocab = build(Vocab, _mapping(data, "vocab"), "vocab", complete=True)
    except ConfigError as e:
        raise ExportError(f"{path}: {e}") from None
    return ExportedConfig(data["architecture"], data["task"], data["step"], model, objectives, vocab, data)


def _mapping(data: dict[str, Any], key: str) -> dict[str, Any]:
    if not isinstance(data[key], dict):
        raise ConfigError(f"config key '{key}' must be a mapping, got {data[key]!r}")
    return data[key]


def from_pretrained(directory: str | Path, map_location: str | torch.device = "cpu"):
    """The model exported to ``directory``, in eval mode on ``map_location``: the pre-trained
    architecture (a :class:`~alignlab.models.base.PretrainingModel`: ``embed_images``,
    ``embed_texts``, ``match_scores``), or the fine-tuned task model when it was exported from a
    fine-tuning run (``predict``). Its inputs are the batches the platform's data stage makes;
    ``alignlab.platform.export.Processor`` makes them from images and strings. A crafted or
    mismatched file raises :class:`ExportError` naming it; nothing in it is executed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from alignlab.models import downstream
    from alignlab.models.registry import get_spec

    cfg = read_config(directory)
    weights = Path(directory) / WEIGHTS_FILE
    try:
        state = load_file(str(weights), device="cpu")
    except FileNotFoundError:
        raise ExportError(f"{weights} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{weights} is not a readable safetensors file ({e}); nothing in it was executed") from None
    try:
        model = downstream.build(cfg.task, get_spec(cfg.architecture), without_init_sources(cfg.model),
                                 cfg.objectives, cfg.vocab)
    except (ConfigError, ValueError) as e:
        raise ExportError(f"{Path(directory) / CONFIG_FILE}: the model it describes cannot be built ({e})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise ExportError(f"{weights} does not fit the model {CONFIG_FILE} describes: {e}") from None
    if missing or unexpected:
        raise ExportError(f"{weights} does not fit the model {CONFIG_FILE} describes (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    return model.to(map_location).eval()
