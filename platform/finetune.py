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
retrieval fine-tunes on the pre-training set itself unless ``finetune.shards`` names another).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignlab.platform import config as config_lib
from alignlab.platform.config import Config, ConfigError

log = logging.getLogger(__name__)

# The optimisation of a fine-tuning run, laid over the checkpoint's config.
FINETUNE_PRESET = "finetune_demo"


def demo_root() -> str:
    """The embedded synthetic set's folder, absolute: a Ray worker resolves nothing against the
    driver's working directory."""
    from alignlab.platform.experiment import DEMO_SHARDS

    return os.path.abspath(DEMO_SHARDS)


def synthetic_task_shards(task: str, demo: str) -> str:
    """Where the synthetic set's version of ``task`` lives: beside the synthetic set ``demo``."""
    return demo if task == "retrieval" else f"{demo}_tasks/{task}"


def task_shards(finetune: config_lib.FinetuneConfig, pretraining_shards: str, demo: str) -> str:
    """The task's shard set: ``finetune.shards`` with ``{task}`` filled in, else the pre-training
    set itself for retrieval (its train split, scored on its evaluation split), else the synthetic
    task set for a model pre-trained on the synthetic set ``demo``."""
    if finetune.shards:
        return finetune.shards.replace("{task}", finetune.task)
    if finetune.task == "retrieval" and pretraining_shards:
        return pretraining_shards
    if "://" not in pretraining_shards and os.path.abspath(pretraining_shards) == demo:
        return synthetic_task_shards(finetune.task, demo)
    raise ConfigError(f"config key 'finetune.shards' is empty, and the checkpoint was pre-trained on "
                      f"{pretraining_shards}, which has no synthetic task sets: name the {finetune.task} shard set "
                      f"built with `alignlab data build` (finetune.shards=DIR, or a template such as "
                      f"finetune.shards=data/tasks/{{task}})")


def task_config(task: str, checkpoint: str, preset: str = "", overrides: list[str] | tuple[str, ...] = (),
                base: dict | None = None, demo: str = "") -> Config:
    """The fine-tuning config of ``checkpoint`` (a folder) on ``task``: the checkpoint's config, the
    fine-tuning preset over it, the task, then ``overrides``; data from :func:`task_shards` unless
    an override names ``data.shards``. Without a checkpoint, ``base`` (a config as a dict) stands
    for the pre-training config: the architecture fine-tuned from its own initialisation, the
    no-pre-training row of a downstream table. ``demo``: the synthetic set's folder (default:
    :func:`demo_root`)."""
    from alignlab.platform.checkpoint import read_meta

    pretrained = read_meta(checkpoint)[0] if checkpoint else dict(base or {})
    data = config_lib._deep_merge(pretrained, config_lib.load_yaml(config_lib.resolve_preset(preset or FINETUNE_PRESET)))
    # A pre-training run's name and compositional split belong to it, not to its fine-tuning runs.
    data.setdefault("tracking", {})["run_name"] = ""
    data.setdefault("data", {})["compositional_split"] = ""
    data["finetune"] = {**data.get("finetune", {}), "task": task, "init": str(checkpoint)}
    if task == "retrieval":
        data = config_lib._deep_merge(data, retrieval_finetuning(config_lib.load_config(data=data)))
    cfg = config_lib.load_config(data=data, overrides=list(overrides))
    if not any(o.split("=", 1)[0] == "data.shards" for o in overrides):
        cfg.data.shards = task_shards(cfg.finetune, pretrained.get("data", {}).get("shards", ""), demo or demo_root())
    return cfg


def retrieval_finetuning(cfg: Config) -> dict:
    """What the architecture's retrieval fine-tuning lays over ``cfg`` (the checkpoint's config
    with the fine-tuning preset), as a nested dict: its paper's objectives, and whatever else its
    reading of the paper's fine-tuning sets (``PretrainingModel.retrieval_finetuning``)."""
    from alignlab.models.registry import get_spec

    return get_spec(cfg.model.architecture).model.retrieval_finetuning(cfg.model)


def ensure_task_data(cfg: Config) -> None:
    """Generates a synthetic task set on first use (and the synthetic set its vocabularies come
    from); any other missing task set is an error naming it (``ensure_synthetic_data``)."""
    from alignlab.platform import shards
    from alignlab.platform.experiment import DEMO_SHARDS, ensure_synthetic_data

    task = cfg.finetune.task
    root = cfg.data.shards
    synthetic = "://" not in root and os.path.abspath(root) == synthetic_task_shards(task, demo_root())
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
    cfg = task_config(task, os.path.abspath(path) if "://" not in path else path, preset, overrides)
    ensure_task_data(cfg)
    uri = tracking.resolve_tracking_uri(mlflow_uri or cfg.tracking.mlflow_uri)
    parent = pretraining_run(uri, cfg.tracking.experiment, cfg.finetune.init, run_id)
    out = train(cfg, parent_run_id=parent, run_name=f"{task} from {parent or Path(path).name}")
    if parent:
        log_on_pretraining_run(uri, parent, task, out["metrics"])
    return {**out, "parent_run_id": parent}


def log_on_pretraining_run(uri: str, run_id: str, task: str, metrics: dict[str, float]) -> None:
    """A fine-tuning run's final ``downstream/<task>/*`` figures, on the pre-training run too: the
    MLflow UI then compares pre-training runs by their downstream results."""
    from alignlab.platform import tracking

    final = {k: v for k, v in metrics.items() if k.startswith(f"downstream/{task}/")}
    if final:
        tracking.RunLogger(uri, run_id).log_metrics(final, 0)


def headline_metric(task: str) -> str:
    """The column a downstream table shows for ``task``: VQA accuracy for VQA v2, else accuracy."""
    return f"downstream/{task}/{'vqa_accuracy' if task == 'vqa' else 'accuracy'}"


@dataclass
class DownstreamResult:
    """A downstream sweep's figures: per pre-training MLflow run its ``downstream/*`` metrics, those
    of the architecture fine-tuned without pre-training (one run per task, one seed), and each
    task's chance and majority-answer baselines."""

    by_run: dict[str, dict[str, float]]
    scratch: dict[str, float]
    chance: dict[str, float]
    majority: dict[str, float]


def run_downstream(result, base: Config, tasks: list[str], name: str, preset: str = "",
                   overrides: list[str] | tuple[str, ...] = ()) -> DownstreamResult:
    """Fine-tunes every finished trial of the pre-training sweep ``result`` on each of ``tasks``, and
    the architecture from its own initialisation once per task (the no-pre-training row), as the
    trials of a Tune sweep of their own (``<name>-downstream``). Each fine-tuning run is an MLflow
    child of its pre-training run, which gets its final figures too."""
    from alignlab.platform import tracking
    from alignlab.platform.sweep import run_sweep

    uri = result.mlflow_uri
    parents: dict[str, str] = {}
    for t in result.trials:
        checkpoint = tracking.client(uri).get_run(t.mlflow_run_id).data.tags.get("checkpoint") \
            if t.mlflow_run_id and not t.error else None
        if checkpoint:
            parents[checkpoint] = t.mlflow_run_id
    base_dict = config_lib.to_dict(base)
    for task in tasks:  # task data exists, and every (architecture, task) pair is valid, before any trial
        ensure_task_data(task_config(task, "", preset, overrides, base=base_dict))
    grid = {"finetune.init": [*parents, ""], "finetune.task": list(tasks)}
    sweep = run_sweep(base, grid, f"{name}-downstream", finetune={
        "preset": preset, "overrides": list(overrides), "parents": parents, "demo": demo_root()})
    out = DownstreamResult({}, {}, {}, {})
    for t in sweep.trials:
        if t.error:
            print(f"downstream trial {t.overrides} failed: {t.error}")
            continue
        task, init = t.overrides["finetune.task"], t.overrides["finetune.init"]
        figures = {k: v for k, v in t.metrics.items() if k.startswith("downstream/")}
        if init:
            out.by_run.setdefault(parents[init], {}).update(figures)
        else:
            out.scratch.update(figures)
        for baseline, into in (("chance", out.chance), ("majority", out.majority)):
            if f"downstream/{task}/{baseline}" in figures:
                into[headline_metric(task)] = figures[f"downstream/{task}/{baseline}"]
    return out
