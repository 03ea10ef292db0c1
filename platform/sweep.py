"""Ray Tune sweeps of config overrides: each trial pre-trains (a Ray Train job) and evaluates, and
MLflow holds one parent run per sweep with one child run per trial.

The Train V2 pattern: a Tune *function* trainable launches ``TorchTrainer.fit()`` with a
``TuneReportCallback``, so the Train workers' reports become the trial's results. Trials run as
many at a time as the cluster holds at its largest (:func:`trial_concurrency`; one at a time on a
2-CPU machine). An interrupted sweep resumes with ``Tuner.restore``: finished trials are kept,
unfinished ones restart and their Train runs resume from their own last checkpoints, logging into
the same MLflow child runs. A sweep is its name and what it runs (:func:`sweep_key`): changing
the config or the grid starts a new one.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Any

from alignlab.platform import config as config_lib
from alignlab.platform import tracking
from alignlab.platform.config import Config
# The comparison artifacts moved to report.py; experiment.py still imports publish_comparison from here.
from alignlab.platform.report import publish_comparison  # noqa: F401


@dataclass
class TrialResult:
    overrides: dict[str, Any]
    metrics: dict[str, float]
    mlflow_run_id: str = ""
    error: str = ""


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    mlflow_uri: str
    trials: list[TrialResult] = field(default_factory=list)


def grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    """The cartesian product of a grid of override values, in a stable order."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def validate_grid(base: Config, grid: dict[str, list]) -> None:
    """Every grid point must make a valid config: fail before any trial starts."""
    if not grid:
        raise config_lib.ConfigError("a sweep needs at least one key to vary")
    for point in grid_points(grid):
        config_lib.load_config(data=config_lib.to_dict(base), overrides=_as_overrides(point))


def sweep_key(base: Config, grid: dict[str, list], name: str, finetune: dict | None = None) -> str:
    """The sweep's identity: ``name`` and a digest of everything its trials run (the base config
    as :func:`~alignlab.platform.train.config_digest` reads it, the grid, a downstream sweep's
    fine-tuning). The same sweep run again resumes (``Tuner.restore`` keeps its finished trials);
    one whose preset, overrides or seeds changed is another sweep, with a Tune directory and an
    MLflow parent run of its own, as is one on a shard set rebuilt otherwise. Tune checks only the
    keys of a restored ``param_space``, never its values, so under its name alone a changed sweep
    got the old trials' results back, or failed where a key was added (``--seeds 3`` after
    ``--seeds 1``)."""
    from alignlab.platform.train import config_digest

    payload = json.dumps({"base": config_digest(base), "grid": grid, "finetune": finetune}, sort_keys=True, default=str)
    return f"{name}-{hashlib.sha1(payload.encode()).hexdigest()[:10]}"


def _as_overrides(point: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in point.items()]


def trial_concurrency(cfg: Config) -> int:
    """How many trials run at once: ``scaling.max_concurrent_trials`` where set, else as many as
    the cluster holds at its largest — the autoscaler's configured maximum where one runs
    (:mod:`alignlab.platform.cluster`), else the resources present now. Each trial needs its
    train workers plus the slots of its data stages (``train.trial_cpus``). On an autoscaling
    cluster the trials beyond what is up now wait for their resources, which is what makes the
    autoscaler add nodes."""
    import ray

    from alignlab.platform import cluster
    from alignlab.platform.train import trial_cpus

    if cfg.scaling.max_concurrent_trials:
        return cfg.scaling.max_concurrent_trials
    autoscaler = cluster.autoscaling_config(cfg.scaling.autoscaling_config)
    resources = cluster.largest_cluster(autoscaler) if autoscaler else ray.cluster_resources()
    gpus = cfg.scaling.num_workers * cfg.scaling.gpus_per_worker if cfg.scaling.use_gpu else 0
    return cluster.trials_that_fit(resources, trial_cpus(cfg), gpus)


def _trial(trial_config: dict[str, Any]) -> None:
    """The Tune function trainable: one pre-training run and its evaluation."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from alignlab.platform.train import fit

    overrides = trial_config["overrides"]
    finetune = trial_config.get("finetune")
    parent = trial_config["parent_run_id"]
    if finetune is None:
        cfg = config_lib.load_config(data=trial_config["base"], overrides=_as_overrides(overrides))
    else:
        # A downstream trial: the fine-tuning config of its checkpoint, a child of its pre-training run.
        from alignlab.platform.finetune import task_config

        cfg = task_config(overrides["finetune.task"], overrides["finetune.init"], finetune["preset"],
                          [*finetune["overrides"], *_as_overrides({k: v for k, v in overrides.items()
                                                                  if not k.startswith("finetune.")})],
                          base=trial_config["base"], demo=finetune["demo"])
        parent = finetune["parents"].get(overrides["finetune.init"], parent)
    ctx = ray.tune.get_context()
    trial_name = ctx.get_trial_name()
    uri = trial_config["mlflow_uri"]
    run_id = _child_run(uri, cfg.tracking.experiment, parent, trial_config["sweep"], trial_name, overrides)
    logger = tracking.open_run(uri, run_id, cfg, {f"sweep.{k}": v for k, v in overrides.items()})
    with tracking.failure_marks(logger):
        result = fit(cfg, uri, run_id, storage_path=trial_config["train_storage"],
                     name=f"{trial_config['sweep']}-{trial_name}", callbacks=[TuneReportCallback()])
    tracking.close_run(logger, result, cfg)
    if finetune is not None and parent != trial_config["parent_run_id"]:
        from alignlab.platform.finetune import log_on_pretraining_run

        log_on_pretraining_run(uri, parent, cfg.finetune.task, dict(result.metrics or {}))


def _child_run(uri: str, experiment: str, parent_run_id: str, sweep: str, trial: str, overrides: dict) -> str:
    """The trial's child run; a restored trial finds and continues its own."""
    label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in overrides.items())
    run_id, _ = tracking.find_or_create_run(uri, experiment, {"alignlab.sweep": sweep, "alignlab.trial": trial},
                                            f"{trial} [{label}]", parent_run_id)
    return run_id


def _parent_run(uri: str, experiment: str, sweep: str, grid: dict) -> str:
    """The sweep's parent run: re-running (restoring) a sweep keeps logging under the same one."""
    run_id, created = tracking.find_or_create_run(uri, experiment, {"alignlab.sweep_parent": sweep}, sweep)
    if created:
        tracking.RunLogger(uri, run_id).log_params({f"grid.{k}": v for k, v in grid.items()})
    return run_id


def run_sweep(base: Config, grid: dict[str, list], name: str, storage_path: str | None = None,
              finetune: dict | None = None) -> SweepResult:
    """Runs (or resumes) sweep ``name``, stored as :func:`sweep_key`: one trial per grid point.
    ``finetune`` makes it a downstream sweep (:func:`alignlab.platform.finetune.run_downstream`):
    each point names a checkpoint and a task (``finetune.init``, ``finetune.task``), and its trial
    fine-tunes with the fine-tuning ``preset`` and ``overrides``, as an MLflow child of the run in
    ``parents`` (checkpoint -> pre-training run id)."""
    import ray
    import ray.tune

    from alignlab.platform import cluster, console
    from alignlab.platform.train import check_cluster_storage, init_ray, prepare

    validate_grid(base, grid)
    base = config_lib.with_absolute_paths(base)
    key = sweep_key(base, grid, name, finetune)
    init_ray(base, quiet=not base.tracking.verbose)
    prepare(base)  # schema and vocabulary checks once, before any trial
    uri = tracking.resolve_tracking_uri(base.tracking.mlflow_uri)
    root = storage_path or tracking.resolve_storage(base.tracking.storage_path)
    check_cluster_storage(base, uri, root)
    if cluster.autoscaling_config(base.scaling.autoscaling_config):
        cluster.pin_data_bookkeeping_here()
    parent = _parent_run(uri, base.tracking.experiment, key, grid)
    tune_path = _join(root, "tune")
    param_space = {
        "overrides": {k: ray.tune.grid_search(v) for k, v in grid.items()},
        "base": config_lib.to_dict(base), "mlflow_uri": uri, "parent_run_id": parent, "sweep": key,
        "train_storage": _join(root, "train"), "finetune": finetune,
    }
    # The trainable itself only drives a Train job, whose workers request their own resources;
    # Tune needs a non-empty request, so it asks for a sliver of a CPU.
    trainable = ray.tune.with_resources(_trial, {"CPU": 0.1})
    if ray.tune.Tuner.can_restore(_join(tune_path, key)):
        tuner = ray.tune.Tuner.restore(_join(tune_path, key), trainable=trainable, resume_errored=True,
                                       param_space=param_space)
    else:
        tuner = ray.tune.Tuner(
            trainable, param_space=param_space,
            tune_config=ray.tune.TuneConfig(max_concurrent_trials=trial_concurrency(base)),
            run_config=ray.tune.RunConfig(name=key, storage_path=tune_path,
                                          failure_config=ray.tune.FailureConfig(max_failures=1),
                                          verbose=None if base.tracking.verbose else 0,
                                          callbacks=[] if base.tracking.verbose else [
                                              console.TrialLines(name, len(grid_points(grid)))]))
    grid_result = tuner.fit()
    children = _children_by_overrides(uri, base.tracking.experiment, key)
    trials = []
    for r in grid_result:
        overrides = dict(r.config["overrides"]) if r.config else {}
        key = tuple(sorted((f"sweep.{k}", str(v)) for k, v in overrides.items()))
        trials.append(TrialResult(overrides=overrides, metrics=dict(r.metrics or {}),
                                  mlflow_run_id=children.get(key, ""), error=str(r.error) if r.error else ""))
    result = SweepResult(name=name, parent_run_id=parent, mlflow_uri=uri, trials=trials)
    tracking.gather_datasets(uri, parent, [t.mlflow_run_id for t in trials if t.mlflow_run_id])
    status = "FAILED" if any(t.error for t in trials) else "FINISHED"
    tracking.RunLogger(uri, parent).finish(status)
    return result


def _children_by_overrides(uri: str, experiment: str, sweep: str) -> dict[tuple, str]:
    """The sweep's child runs keyed by the ``sweep.*`` params each trial logged."""
    client = tracking.client(uri)
    runs = client.search_runs([tracking.experiment_id(uri, experiment)],
                              filter_string=f"tags.`alignlab.sweep` = '{sweep}'", max_results=10_000)
    return {tuple(sorted((k, v) for k, v in r.data.params.items() if k.startswith("sweep."))): r.info.run_id
            for r in runs}


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if "://" in root else os.path.join(root, *parts)
