"""MLflow tracking. The driver creates runs (a sweep's parent, one child per trial); the rank-0
train worker logs into its run by id, so params, per-objective losses, throughput and downstream
metrics of every trial land side by side in the MLflow UI.

The default store is a local SQLite file in the working directory; ``MLFLOW_TRACKING_URI`` or
``tracking.mlflow_uri`` overrides it (on a cluster: the head node's ``mlflow server``).
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import time
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "torchvision", "ray", "transformers", "timm", "mlflow", "pyarrow", "alignlab")


def resolve_tracking_uri(configured: str = "") -> str:
    """Config, then $MLFLOW_TRACKING_URI, then ``sqlite:///<cwd>/mlflow.db`` (absolute, so Ray
    workers in other directories write to the same store)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        uri = f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    return uri


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    return exp.experiment_id if exp else c.create_experiment(name)


def create_run(uri: str, experiment: str, run_name: str, parent_run_id: str | None = None,
               tags: dict[str, str] | None = None) -> str:
    """A new run (nested under ``parent_run_id`` when given); returns its id."""
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client(uri).create_run(experiment_id(uri, experiment), run_name=run_name or None, tags=all_tags)
    return run.info.run_id


def find_or_create_run(uri: str, experiment: str, tags: dict[str, str], run_name: str,
                       parent_run_id: str | None = None, include_finished: bool = True) -> tuple[str, bool]:
    """The latest run carrying all ``tags`` (set back to RUNNING: a resumed run or restored sweep
    keeps logging into it), or a new one. Returns (run id, whether it was created)."""
    c = client(uri)
    conditions = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    if not include_finished:
        conditions.append("attributes.status != 'FINISHED'")
    found = c.search_runs([experiment_id(uri, experiment)], filter_string=" and ".join(conditions), max_results=1,
                          order_by=["attributes.start_time DESC"])
    if found:
        c.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id, False
    return create_run(uri, experiment, run_name, parent_run_id, tags=tags), True


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_params() -> dict[str, str]:
    out = {"git_commit": git_commit()}
    for p in PACKAGES:
        try:
            out[f"version.{p}"] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


class RunLogger:
    """Logs into one existing run by id. Cheap to construct in a worker."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.client = client(uri)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):  # MLflow's per-call limit
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)
