"""MLflow tracking. The driver creates runs (a sweep's parent, one child per trial); the rank-0
train worker logs into its run by id, so params, per-objective losses, throughput and downstream
metrics of every trial land side by side in the MLflow UI.

The default store is a SQLite file under ``$ALIGNLAB_HOME`` (``~/.alignlab``); ``MLFLOW_TRACKING_URI``
or ``tracking.mlflow_uri`` overrides it (on a cluster: the head node's ``mlflow server``).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

PACKAGES = ("torch", "torchvision", "ray", "transformers", "timm", "mlflow", "pyarrow", "alignlab")


def alignlab_home() -> Path:
    """Where local runs keep their state by default: ``$ALIGNLAB_HOME``, else ``~/.alignlab``.
    An absolute, stable place, so every run of a user lands in one store, including
    ``ray job submit --working-dir .`` jobs, whose working directory is a per-session copy."""
    return Path(os.environ.get("ALIGNLAB_HOME") or "~/.alignlab").expanduser().resolve()


def resolve_tracking_uri(configured: str = "") -> str:
    """Config, then $MLFLOW_TRACKING_URI, then ``sqlite:///<alignlab_home>/mlflow.db``."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        alignlab_home().mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{alignlab_home() / 'mlflow.db'}"
    return uri


def resolve_storage(configured: str = "") -> str:
    """Ray Train / Tune storage: ``tracking.storage_path``, else ``<alignlab_home>/ray_results``."""
    return configured or str(alignlab_home() / "ray_results")


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# The MLflow UI's kind of an experiment: its tag ``mlflow.experimentKind``, one of the UI's
# ExperimentKind values ("custom_model_development", "genai_development", ...: the enum in
# MLflow 3.17.2's bundle, mlflow/server/js/build/static/js/main.*.js). The machine-learning kind's
# experiment page opens on its runs table, the GenAI kind's on its overview and traces. MLflow
# 3.17.2's UI reads the tag only where its workflow-based navigation is off, and that release has
# it on (useExperimentKind / shouldEnableWorkflowBasedNavigation in the same bundle): there the
# "GenAI | Machine learning" switch decides (the URL's ``workflowType``, else the browser's last
# choice, GenAI at first). So the tag serves the UIs that read it, and :func:`runs_page` gives the
# address that opens the runs table in 3.17 too.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"


def local_artifact_location(uri: str, name: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: ``mlartifacts/<name>`` beside
    the database. MLflow's default is ``./mlruns`` in the working directory of whichever process
    creates the experiment: under ``ray job submit --working-dir .`` a copy of the code that Ray
    deletes, elsewhere whatever folder the command ran in, so the store outlived its artifacts
    (a model, a comparison table) or scattered them. None for any other store: a tracking server
    decides its own."""
    from alignlab.platform.cluster import local_path

    if not uri.startswith("sqlite:///"):
        return None
    folder = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
    return str((Path(local_path(uri)) / "mlartifacts" / folder).resolve())


def experiment_id(uri: str, name: str) -> str:
    """The experiment's id, creating it of the training kind (:data:`TRAINING_KIND`), its
    artifacts beside a SQLite store (:func:`local_artifact_location`). An existing experiment
    without a kind gets it; a kind someone set stays."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return c.create_experiment(name, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND},
                                   artifact_location=local_artifact_location(uri, name))
    if EXPERIMENT_KIND_TAG not in exp.tags:
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return exp.experiment_id


def runs_page(uri: str, run_id: str) -> str:
    """The address of the runs table of ``run_id``'s experiment in the MLflow UI: the server
    itself for an http(s) store, else where ``mlflow ui`` serves by default. The URL asks for the
    UI's machine-learning view, which MLflow 3.17 does not take from the experiment's kind."""
    base = _public_uri(uri).rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    experiment = client(uri).get_run(run_id).info.experiment_id
    return f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning"


def create_run(uri: str, experiment: str, run_name: str, parent_run_id: str | None = None,
               tags: dict[str, str] | None = None) -> str:
    """A new run (nested under ``parent_run_id`` when given); returns its id."""
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client(uri).create_run(experiment_id(uri, experiment), run_name=run_name or None, tags=all_tags)
    return run.info.run_id


def _search(uri: str, experiment: str, tags: dict[str, str], extra: list[str] | None = None):
    c = client(uri)
    conditions = [f"tags.`{k}` = '{v}'" for k, v in tags.items()] + list(extra or [])
    found = c.search_runs([experiment_id(uri, experiment)], filter_string=" and ".join(conditions), max_results=1,
                          order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def find_run(uri: str, experiment: str, tags: dict[str, str], status: str | None = None):
    """The latest run carrying all ``tags`` (and in ``status``, if given), or None."""
    return _search(uri, experiment, tags, [f"attributes.status = '{status}'"] if status else None)


def find_or_create_run(uri: str, experiment: str, tags: dict[str, str], run_name: str,
                       parent_run_id: str | None = None, include_finished: bool = True) -> tuple[str, bool]:
    """The latest run carrying all ``tags`` (set back to RUNNING: a resumed run or restored sweep
    keeps logging into it), or a new one. Returns (run id, whether it was created)."""
    found = _search(uri, experiment, tags, None if include_finished else ["attributes.status != 'FINISHED'"])
    if found:
        client(uri).update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id, False
    return create_run(uri, experiment, run_name, parent_run_id, tags=tags), True


# MLflow's contexts of a run's input dataset (its ``mlflow.data.context`` input tag).
TRAINING, EVALUATION = "training", "evaluation"


def log_datasets(uri: str, run_id: str, root: str, splits: list[tuple[str, str]]) -> None:
    """The splits of shard set ``root`` that a run reads, as the run's MLflow datasets (the runs
    table's Dataset column): ``splits`` holds (split, context) pairs, context :data:`TRAINING` or
    :data:`EVALUATION`; an empty split name is skipped. Each is named ``<set>/<split>``, with the
    split's location as its source (a URI without its credentials and options), and its digest,
    schema, rows and files from the Parquet footers (:func:`~alignlab.platform.shards.describe_split`).
    A dataset is a name and a digest, as MLflow keys it: one the run already holds is not logged
    again (a resumed run, a restored sweep, a second ``alignlab eval`` add nothing), so a split read
    for training and evaluation alike keeps its first context."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from alignlab.platform import shards

    c = client(uri)
    held = _held_datasets(c, run_id)
    inputs = []
    for split, context in splits:
        if not split:
            continue
        summary = shards.describe_split(shards.child_uri(root, split))
        name = f"{_set_name(root)}/{split}"
        if (name, summary.digest) in held:
            continue
        held.add((name, summary.digest))
        location = shards.child_uri(root, split)
        source_type, source = ("local", os.path.abspath(location)) if "://" not in location else \
            (location.split("://", 1)[0], _public_uri(location))
        dataset = Dataset(name=name, digest=summary.digest, source_type=source_type,
                          source=json.dumps({"uri": source}),
                          schema=json.dumps({"mlflow_colspec": _mlflow_schema(summary.schema).to_dict()}),
                          profile=json.dumps({"num_rows": summary.rows, "num_files": summary.files}))
        inputs.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    if inputs:
        c.log_inputs(run_id, datasets=inputs)


def gather_datasets(uri: str, run_id: str, sources: list[str]) -> None:
    """The datasets of runs ``sources`` on run ``run_id`` too, each once: a sweep's parent lists
    the data its trials read, in the runs table's parent row (the trials' rows are folded
    under it)."""
    c = client(uri)
    held = _held_datasets(c, run_id)
    inputs = {}
    for source in sources:
        for d in c.get_run(source).inputs.dataset_inputs:
            if (d.dataset.name, d.dataset.digest) not in held:
                inputs.setdefault((d.dataset.name, d.dataset.digest), d)
    if inputs:
        c.log_inputs(run_id, datasets=list(inputs.values()))


def _held_datasets(c, run_id: str) -> set[tuple[str, str]]:
    """(name, digest) of each dataset the run holds: MLflow's key of a run's dataset."""
    return {(d.dataset.name, d.dataset.digest) for d in c.get_run(run_id).inputs.dataset_inputs}


def _set_name(root: str) -> str:
    """A shard set's name: its folder's."""
    if "://" not in root:
        return os.path.basename(os.path.abspath(root))
    return root.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


def _public_uri(uri: str) -> str:
    """``uri`` without the credentials and options it may carry (``s3://KEY:SECRET@bucket/...``,
    ``?endpoint_override=...``, ``http://user:password@host``): what may be printed or stored."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.hostname or ''}{':' + str(parts.port) if parts.port else ''}{parts.path}"


def _mlflow_schema(schema):
    """An Arrow schema as an MLflow column schema (what the UI's dataset view lists). The shard
    format's required columns are required, the others optional; a type MLflow has no name for
    (a struct, a map, a decimal) is ``any``."""
    import pyarrow as pa
    from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Schema

    from alignlab.platform.shards import REQUIRED_COLUMNS

    def convert(tp: pa.DataType):
        if pa.types.is_list(tp) or pa.types.is_large_list(tp) or pa.types.is_fixed_size_list(tp):
            return Array(convert(tp.value_type))
        for test, name in ((pa.types.is_boolean, DataType.boolean), (pa.types.is_string, DataType.string),
                           (pa.types.is_large_string, DataType.string), (pa.types.is_binary, DataType.binary),
                           (pa.types.is_large_binary, DataType.binary),
                           (pa.types.is_fixed_size_binary, DataType.binary), (pa.types.is_int64, DataType.long),
                           (pa.types.is_uint64, DataType.long), (pa.types.is_uint32, DataType.long),
                           (pa.types.is_integer, DataType.integer), (pa.types.is_float64, DataType.double),
                           (pa.types.is_floating, DataType.float), (pa.types.is_temporal, DataType.datetime)):
            if test(tp):
                return name
        return AnyType()

    return Schema([ColSpec(convert(f.type), f.name, required=f.name in REQUIRED_COLUMNS) for f in schema])


@contextlib.contextmanager
def system_metrics(uri: str, run_id: str, interval: float, node: int = 0) -> Iterator[None]:
    """MLflow's system metrics of this machine (CPU, memory, disk, network; each NVIDIA GPU's
    utilisation, memory and power where its NVML library loads, none without) logged into run
    ``run_id`` every ``interval`` seconds while the block runs, as ``system/*``; ``interval`` 0
    logs none. Node ``node`` > 0 of a multi-node run logs as ``system/node_<node>/*``. A resumed
    run continues the steps it holds."""
    if interval <= 0:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=True,
                                   node_id=f"node_{node}" if node else None, tracking_uri=uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def open_run(uri: str, run_id: str, cfg, extra_params: dict | None = None) -> "RunLogger":
    """A logger on the run with the flattened resolved config, git commit and package versions
    as params, and the resolved config YAML as an artifact."""
    from alignlab.platform import config as config_lib

    logger = RunLogger(uri, run_id)
    logger.log_params({**config_lib.flatten(config_lib.to_dict(cfg)), **environment_params(), **(extra_params or {})})
    logger.log_text(config_lib.dump_yaml(cfg), "config.yaml")
    return logger


@contextlib.contextmanager
def failure_marks(logger: "RunLogger") -> Iterator[None]:
    """Marks the run FAILED, with the error as the ``alignlab.error`` tag, when the block raises
    (Ray Train's ``fit()`` raises once its retries are spent), so no failed run stays RUNNING."""
    try:
        yield
    except BaseException as e:
        logger.set_tag("alignlab.error", f"{type(e).__name__}: {e}"[:5000])
        logger.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise


def close_run(logger: "RunLogger", result, cfg) -> None:
    """Marks the MLflow run finished (recording where its checkpoint is, and logging the final
    model, :func:`log_final_model`) or failed (re-raising)."""
    if result.error:
        logger.set_tag("alignlab.error", f"{type(result.error).__name__}: {result.error}"[:5000])
        logger.finish("FAILED")
        raise result.error
    if result.checkpoint:
        logger.set_tag("checkpoint", result.checkpoint.path)
        logger.log_text(result.checkpoint.path + "\n", "checkpoint_location.txt")
        log_final_model(logger, result.checkpoint, cfg)
    logger.finish()


def log_final_model(logger: "RunLogger", checkpoint, cfg) -> None:
    """Logs a finished run's final checkpoint as its MLflow model (``model``: the export folder as
    a pyfunc that embeds images and texts, :func:`alignlab.platform.export.log_model`), registered
    as ``tracking.registered_model`` when set. A model fine-tuned on a classification or
    grounding task predicts rather than embeds: its run keeps the checkpoint, which ``alignlab
    export`` turns into a folder. The training is done and its checkpoint kept, so a model that
    cannot be logged is a warning and an ``alignlab.model_error`` tag, not a failed run."""
    import logging

    from alignlab.platform import export

    if cfg.finetune.task not in ("", "retrieval"):
        return
    try:
        with checkpoint.as_directory() as directory:
            export.log_model(logger.uri, logger.run_id, directory, cfg.tracking.registered_model or None)
    except Exception as e:  # noqa: BLE001 - any failure here leaves a finished training intact
        logging.getLogger("alignlab").warning("run %s: the final model was not logged as an MLflow model (%s: %s); "
                                              "`alignlab export %s OUT_DIR` writes it from the checkpoint",
                                              logger.run_id, type(e).__name__, e, checkpoint.path)
        logger.set_tag("alignlab.model_error", f"{type(e).__name__}: {e}"[:5000])


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

    def last_logged_step(self, key: str) -> int | None:
        history = self.client.get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=None)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)
