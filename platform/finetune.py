"""Fine-tuning a pre-trained checkpoint on a downstream task (#14): ``alignlab finetune TASK
--from CHECKPOINT_OR_RUN``.

A fine-tuning run is a training run (``platform/train.py``: Ray Train, DDP, the same precision,
checkpoints, resume and fault tolerance) whose config is the pre-trained checkpoint's own, with
the fine-tuning preset laid over it (its optimisation: learning rate, steps, warm-up), the task
(``finetune.task``), the checkpoint (``finetune.init``) and the task's shard set, then the user's
overrides. The runner builds the task's model around the architecture (models/downstream.py),
loads the pre-trained weights into it, and evaluates the task's metric.

MLflow: the run is a child of the pre-training run (found by the checkpoint's run id, or by its
``checkpoint`` tag), and its final ``downstream/<task>/<metric>`` figures are also logged on that
pre-training run, so the MLflow UI compares pre-training runs by their downstream results side by
side.

Task data: ``finetune.shards`` names the task's shard set (``{task}`` stands for the task's name;
``alignlab data build`` writes it). A model pre-trained on the embedded synthetic set defaults to
the synthetic task sets beside it (``data/synth_tasks/<task>``, generated on first use;
retrieval fine-tunes on the synthetic set itself).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from alignlab.platform import config as config_lib
from alignlab.platform.config import Config, ConfigError

log = logging.getLogger(__name__)

# The optimisation of a fine-tuning run, laid over the checkpoint's config.
FINETUNE_PRESET = "finetune_demo"


def synthetic_task_shards(task: str) -> str:
    """Where the synthetic set's version of ``task`` lives (beside the embedded synthetic set)."""
    from alignlab.platform.experiment import DEMO_SHARDS

    return DEMO_SHARDS if task == "retrieval" else f"{DEMO_SHARDS}_tasks/{task}"


def _is_demo(shards: str) -> bool:
    from alignlab.platform.experiment import DEMO_SHARDS

    return "://" not in shards and os.path.abspath(shards) == os.path.abspath(DEMO_SHARDS)


def task_shards(finetune: config_lib.FinetuneConfig, pretraining_shards: str) -> str:
    """The task's shard set: ``finetune.shards`` with ``{task}`` filled in, else the synthetic task
    set for a model pre-trained on the synthetic set."""
    if finetune.shards:
        return finetune.shards.replace("{task}", finetune.task)
    if _is_demo(pretraining_shards):
        return synthetic_task_shards(finetune.task)
    raise ConfigError(f"config key 'finetune.shards' is empty, and the checkpoint was pre-trained on "
                      f"{pretraining_shards}, which has no synthetic task sets: name the {finetune.task} shard set "
                      f"built with `alignlab data build` (finetune.shards=DIR, or a template such as "
                      f"finetune.shards=data/tasks/{{task}})")


def task_config(checkpoint: str, task: str, preset: str = "", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The fine-tuning config of ``checkpoint`` (a folder) on ``task``: the checkpoint's config, the
    fine-tuning preset over it, the task, then ``overrides``; data from :func:`task_shards` unless
    an override names ``data.shards``."""
    from alignlab.platform.checkpoint import read_meta

    pretrained, _ = read_meta(checkpoint)
    data = config_lib._deep_merge(pretrained, config_lib.load_yaml(config_lib.resolve_preset(preset or FINETUNE_PRESET)))
    # A pre-training run's name and compositional split belong to it, not to its fine-tuning runs.
    data.setdefault("tracking", {})["run_name"] = ""
    data.setdefault("data", {})["compositional_split"] = ""
    data["finetune"] = {**data.get("finetune", {}), "task": task, "init": str(checkpoint)}
    cfg = config_lib.load_config(data=data, overrides=list(overrides))
    if not any(o.split("=", 1)[0] == "data.shards" for o in overrides):
        cfg.data.shards = task_shards(cfg.finetune, pretrained.get("data", {}).get("shards", ""))
    return cfg


def ensure_task_data(cfg: Config) -> None:
    """Generates a synthetic task set on first use (and the synthetic set its vocabularies come
    from); any other missing task set is an error naming it (``ensure_synthetic_data``)."""
    from alignlab.platform import shards
    from alignlab.platform.experiment import DEMO_SHARDS, ensure_synthetic_data

    task = cfg.finetune.task
    root = cfg.data.shards
    synthetic = "://" not in root and os.path.abspath(root) == os.path.abspath(synthetic_task_shards(task))
    if not synthetic or task == "retrieval" or Path(shards.child_uri(root, cfg.data.train_split)).exists():
        ensure_synthetic_data(cfg)
        return
    from alignlab.platform.synth import generate_task

    ensure_synthetic_data(config_lib.load_config(overrides=[f"data.shards={DEMO_SHARDS}"]))
    print(f"generating the synthetic {task} set into {root} ...", flush=True)
    print(generate_task(root, task, vocab_from=DEMO_SHARDS), flush=True)


def pretraining_run(uri: str, experiment: str, checkpoint: str, run_id: str | None) -> str | None:
    """The MLflow run the checkpoint came from: the given run id, else the run whose
    ``checkpoint`` tag names the folder."""
    from alignlab.platform import tracking

    if run_id:
        return run_id
    found = tracking.find_run(uri, experiment, {"checkpoint": checkpoint})
    return found.info.run_id if found else None


def finetune(task: str, source: str, preset: str = "", overrides: list[str] | tuple[str, ...] = (),
             mlflow_uri: str = "") -> dict[str, Any]:
    """Fine-tunes ``source`` (a checkpoint folder or an MLflow run id) on ``task`` and evaluates it;
    returns :func:`~alignlab.platform.train.train`'s summary with ``parent_run_id``."""
    from alignlab.platform import tracking
    from alignlab.platform.evaluate import resolve_checkpoint
    from alignlab.platform.train import train

    path, run_id = resolve_checkpoint(source, mlflow_uri)
    cfg = task_config(os.path.abspath(path) if "://" not in path else path, task, preset, overrides)
    ensure_task_data(cfg)
    uri = tracking.resolve_tracking_uri(mlflow_uri or cfg.tracking.mlflow_uri)
    parent = pretraining_run(uri, cfg.tracking.experiment, cfg.finetune.init, run_id)
    out = train(cfg, parent_run_id=parent, run_name=f"{task} from {parent or Path(path).name}")
    if parent:
        final = {k: v for k, v in out["metrics"].items() if k.startswith(f"downstream/{task}/")}
        tracking.RunLogger(uri, parent).log_metrics(final, 0)
    return {**out, "parent_run_id": parent}
