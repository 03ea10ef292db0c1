"""The one training-checkpoint format, written and read here only. Nothing in it can execute code
when loaded.

A checkpoint is a directory of three files:

* ``model.safetensors``: the model's state dict (safetensors: tensors only, no code; the same
  weights any safetensors reader loads);
* ``trainer_state.pt``: the optimiser, LR schedule, gradient scaler and RNG states, read back with
  ``torch.load(weights_only=True)``, which unpickles tensors and plain containers only and
  refuses anything else (a crafted pickle raises instead of running);
* ``trainer_state.json``: the format version, the step and epoch, the resolved config and the
  vocabulary summary the model was built with (:class:`~alignlab.models.base.Vocab`: sizes,
  special ids, tags, phrase concepts, answers) as plain data, readable without torch, so the model
  can be rebuilt from the checkpoint alone; and the metrics the checkpoint covers that the run
  had not yet handed to MLflow (``unlogged_metrics``), so a run killed between committing the
  checkpoint and logging them logs them on resume instead of losing them.

A missing, truncated or crafted file raises :class:`CheckpointError` naming it.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignlab.models.base import load_refusal
from alignlab.models.config import without_init_sources

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
META_FILE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names the file and why."""


@dataclass
class CheckpointContents:
    model: dict[str, torch.Tensor]
    step: int
    epoch: int
    config: dict[str, Any]
    vocab: dict[str, Any] = field(default_factory=dict)
    # optimizer / scheduler / scaler / rng: state dicts of tensors and plain values.
    trainer: dict[str, Any] = field(default_factory=dict)
    # [{"metrics": {key: value}, "step": MLflow step, "at_step": training step or None}], in order.
    unlogged_metrics: list[dict[str, Any]] = field(default_factory=list)

    def model_vocab(self):
        """The :class:`~alignlab.models.base.Vocab` the model was built with (the typed config
        builder turns the JSON lists back into its tuples)."""
        from alignlab.models.base import Vocab
        from alignlab.models.config import build

        return build(Vocab, self.vocab, "vocab")


def write_weights(path: str | Path, state: dict[str, torch.Tensor]) -> None:
    """A state dict as a safetensors file. safetensors refuses tensors that share storage (tied
    weights); those are saved as copies, and ``load_state_dict`` ties them again."""
    from safetensors.torch import save_file

    shared = Counter(v.untyped_storage().data_ptr() for v in state.values())
    save_file({k: v.detach().clone().contiguous() if shared[v.untyped_storage().data_ptr()] > 1
               else v.detach().contiguous() for k, v in state.items()}, str(path))


def write_checkpoint(directory: str | Path, contents: CheckpointContents) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_weights(d / MODEL_FILE, contents.model)
    torch.save(contents.trainer, d / STATE_FILE)
    (d / META_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, "step": contents.step,
                                           "epoch": contents.epoch, "config": contents.config,
                                           "vocab": contents.vocab,
                                           "unlogged_metrics": contents.unlogged_metrics}))


def read_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> CheckpointContents:
    """Reads a checkpoint directory, or raises :class:`CheckpointError` naming the bad file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    meta_path, model_path, state_path = d / META_FILE, d / MODEL_FILE, d / STATE_FILE
    for path in (meta_path, model_path, state_path):
        if not path.is_file():
            legacy = " (a checkpoint of AlignLab before the safetensors format; it is not loaded, since " \
                     "unpickling it could run code)" if (d / "state.pt").exists() else ""
            raise CheckpointError(f"checkpoint {d}: {path.name} is missing{legacy}")
    try:
        meta = json.loads(meta_path.read_text())
        version, step, epoch, config = meta["format_version"], int(meta["step"]), int(meta["epoch"]), meta["config"]
        vocab, unlogged = meta.get("vocab", {}), list(meta.get("unlogged_metrics", []))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint file {meta_path} is not a valid trainer state ({type(e).__name__}: {e})") \
            from None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint file {meta_path} has format version {version}; this AlignLab reads "
                              f"version {FORMAT_VERSION}")
    try:
        model = load_file(str(model_path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {model_path} is not a readable safetensors file ({e})") from None
    try:
        trainer = torch.load(state_path, map_location=map_location, weights_only=True)
    except Exception as e:  # weights_only refuses code; a truncated file raises from the unpickler
        raise CheckpointError(f"checkpoint file {state_path} was refused: it is corrupt or holds more than tensors "
                              f"and plain values ({type(e).__name__}: {load_refusal(e)}); nothing in it was "
                              f"executed") from None
    return CheckpointContents(model=model, step=step, epoch=epoch, config=config, vocab=vocab, trainer=trainer,
                              unlogged_metrics=unlogged)


def read_meta(directory: str | Path) -> tuple[dict[str, Any], Any]:
    """(config, :class:`~alignlab.models.base.Vocab`) of a checkpoint, from its metadata alone
    (the driver of a fine-tuning run reads no weights)."""
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text())
        return meta["config"], CheckpointContents({}, 0, 0, meta["config"], meta.get("vocab", {})).model_vocab()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint file {path} cannot be read ({type(e).__name__}: {e})") from None


def load_trained(directory: str | Path, overrides: list[str] | tuple[str, ...] = (),
                 map_location: str | torch.device = "cpu"):
    """(config, model, contents) of a training checkpoint: the model rebuilt from the
    checkpoint's own config and vocabulary (``overrides`` applied, e.g. another data split), its
    weights loaded, in eval mode. Initialisation sources (``model.text_init``, a ViT checkpoint or
    hub weights, a hybrid ViT's trunk weights) are not read: the checkpoint holds every weight."""
    from alignlab.models import downstream
    from alignlab.models.registry import get_spec
    from alignlab.platform import config as config_lib

    contents = read_checkpoint(directory, map_location)
    cfg = config_lib.load_config(data=contents.config, overrides=list(overrides))
    model = downstream.build(cfg.finetune.task, get_spec(cfg.model.architecture), without_init_sources(cfg.model),
                             cfg.objectives, contents.model_vocab())
    missing, unexpected = model.load_state_dict(contents.model, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {directory}: its weights do not fit the model its config builds "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return cfg, model.to(map_location).eval(), contents
