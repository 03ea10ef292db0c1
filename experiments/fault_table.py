"""Fault injection (issue #17): every probe of the issue, run against the platform as a user would
meet it, each checking the good outcome and recording the message the user sees. Prints a
Markdown table: probe | outcome | message.

    python experiments/fault_table.py              # every probe; the kills start a local Ray cluster
    python experiments/fault_table.py --no-ray     # only the probes that need no Ray
    python experiments/fault_table.py -k kill      # probes whose name contains 'kill'

tests/test_faults.py runs the same probes (``PROBES``), one test each. A probe raises
:class:`ProbeFailed` when the outcome is not the good one; the script then prints the row as
FAILED and exits 1.

The kills strike mid-epoch: the driver once MLflow shows the second checkpoint's metrics (with a
checkpoint every 2 steps; its newest checkpoint is then torn), and in one other run the Ray Data preprocessing actor as soon as it is up,
then a Ray Train worker once the first checkpoint's metrics show. Each run must end at
``max_steps``, FINISHED, with every logged step of ``loss/total`` exactly once.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from itertools import count, islice
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Collection

REPO = Path(__file__).resolve().parent.parent
PRESET = "dual_encoder_demo"
EXPERIMENT = "alignlab-demo"  # the preset's tracking.experiment
# A tiny dual encoder over the synthetic set's region features: no image decoding, steps in ms.
TINY = ["model.image.kind=regions", "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
        "model.intermediate_size=64", "model.embed_dim=16", "data.batch_size=16", "data.eval_max_images=16",
        "data.eval_batch_size=16", "data.preprocess_batch_size=16", "data.shuffle_buffer=0",
        "eval.k_captions=4", "eval.k_images=4"]
# The kills' runs: 128 training rows in batches of 8 make a 16-step epoch, and a run of 12 steps
# with a checkpoint every 4 strikes and resumes mid-epoch. Each epoch, and each resume, starts the
# Ray Data pipeline again: the slowest part of a tiny run.
LOG_EVERY, CHECKPOINT_EVERY, MAX_STEPS = 2, 4, 12
KILL_RUN = ["data.batch_size=8", f"tracking.log_every={LOG_EVERY}", f"tracking.checkpoint_every={CHECKPOINT_EVERY}",
            f"optim.max_steps={MAX_STEPS}"]
KILL_TIMEOUT_S = 300


class ProbeFailed(AssertionError):
    """The platform did not show the good outcome; the message says what it did instead."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise ProbeFailed(what)


def expect_raises(kind: type[BaseException], fn: Callable[[], object]) -> BaseException:
    try:
        fn()
    except kind as e:
        return e
    raise ProbeFailed(f"expected {kind.__name__}, nothing was raised")


@dataclass
class Finding:
    outcome: str  # what happened, in words
    message: str  # what the user sees (an error, a log line, the facts MLflow shows)


@dataclass
class Probe:
    name: str  # the table's first column
    key: str  # a short id (the tests' parameter id)
    run: Callable[["Lab"], Finding]
    needs_ray: bool = False


PROBES: list[Probe] = []


def probe(name: str, needs_ray: bool = False, key: str = ""):
    def register(fn: Callable[["Lab"], Finding]) -> Callable[["Lab"], Finding]:
        PROBES.append(Probe(name, key or fn.__name__, fn, needs_ray))
        return fn
    return register


class Payload:
    """A pickle that creates ``path`` when it is unpickled: proof that loading ran code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# --------------------------------------------------------------------------------------------
# The lab: one synthetic set, a folder per probe, the CLI in-process
# --------------------------------------------------------------------------------------------


class Lab:
    """Shared by the probes: the synthetic set (generated once), a fresh folder per probe, the
    ``alignlab`` command run in this process, and the Ray cluster the kills run on."""

    def __init__(self, root: Path):
        from alignlab.platform.synth import SynthConfig, generate

        self.root = root
        self.synth = root / "synth"
        if not (self.synth / "manifest.json").exists():
            generate(str(self.synth), SynthConfig(n_train_images=64, n_test_images=16, rows_per_file=32))
        self._dirty: Path | None = None
        self.run_count()  # the store exists before a run and the kill watcher could race to create it

    def dir(self, name: str) -> Path:
        d = self.root / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    @property
    def store(self) -> str:
        """One MLflow store for every probe (each makes its own runs): a new SQLite store costs
        seconds of schema migrations."""
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def overrides(self, home: Path, *extra: str) -> list[str]:
        return [*TINY, f"data.shards={self.synth}", f"tracking.mlflow_uri={self.store}",
                f"tracking.storage_path={home / 'ray_results'}", *extra]

    def run_count(self) -> int:
        from alignlab.platform import tracking

        exp = tracking.client(self.store).get_experiment_by_name(EXPERIMENT)
        return len(tracking.client(self.store).search_runs([exp.experiment_id])) if exp else 0

    def config(self, home: Path, *extra: str):
        from alignlab.platform.config import load_config

        return load_config(PRESET, self.overrides(home, *extra))

    def cli(self, *argv: str) -> tuple[int, str]:
        """``alignlab ARGV`` in this process: (exit status, what it printed and logged)."""
        from alignlab.platform import cli

        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.setLevel(logging.WARNING)
        logger = logging.getLogger("alignlab")
        logger.addHandler(handler)
        try:
            with contextlib.redirect_stdout(out):
                cli.main(list(argv))
            status = 0
        except SystemExit as e:  # the CLI's start-up errors: sys.exit("alignlab: error: ...")
            status = e.code if isinstance(e.code, int) else 1
            if isinstance(e.code, str):
                out.write(e.code)
        finally:
            logger.removeHandler(handler)
        return status, out.getvalue().strip()

    def runner(self, cfg, ctx, sink=None):
        """The real Runner, set up as a Ray Train worker sets it up, in this process."""
        from alignlab.platform.train import Runner, prepare

        info = prepare(cfg)
        return Runner(cfg, info.spec, info.vocab, ctx, info.steps_per_epoch, sink).setup()

    def batches(self, cfg, split: str, counter=None) -> list[dict]:
        """A split's rows through the data stage's Preprocessor, in this process."""
        from alignlab.platform.ingest import local_eval_batches
        from alignlab.platform.train import prepare

        inputs = prepare(cfg).spec.input_spec(cfg.model, cfg.objectives)
        return list(local_eval_batches(cfg.data, cfg.objectives, inputs, split, cfg.data.batch_size, counter=counter))

    def dirty(self) -> Path:
        """A shard set of the synthetic training rows in which 40 rows carry NaN features or an
        infinite box and one caption is Latin-1 bytes under a string type (as a writer that never
        checks UTF-8 leaves it). Its tokenizer is the synthetic set's vocab.txt."""
        if self._dirty is None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            from alignlab.platform import shards

            rows = pq.read_table(str(self.synth / "train")).to_pylist()
            for i in range(0, 80, 2):
                if i % 4:
                    rows[i]["boxes"][0][2] = float("inf")
                else:
                    rows[i]["region_features"][0][5] = float("nan")
            table = shards.rows_to_table(rows, region_dim=len(rows[0]["region_features"][0]))
            captions = [r["caption"].encode() for r in rows]
            captions[1] = "un café au lait".encode("latin-1")
            table = table.set_column(table.schema.get_field_index("caption"), "caption",
                                     pa.array(captions, pa.binary()).view(pa.string()))
            root = self.root / "dirty"
            (root / "train").mkdir(parents=True, exist_ok=True)
            pq.write_table(table, str(root / "train" / "part-00000.parquet"))
            self._dirty = root
        return self._dirty

    def dirty_overrides(self) -> list[str]:
        return [f"data.shards={self.dirty()}", f"data.tokenizer={self.synth / 'vocab.txt'}", "data.eval_split=train"]

    def ray_address(self) -> str:
        """The running cluster's address; if there is none, one is started as ``alignlab train``
        of a kill's run would start it."""
        import ray

        from alignlab.platform.train import init_ray

        init_ray(self.config(self.root, *KILL_RUN))
        return ray.get_runtime_context().gcs_address


def md5s(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def runs_of(store: str, key: str) -> list:
    from alignlab.platform import tracking

    c = tracking.client(store)
    exp = c.get_experiment_by_name(EXPERIMENT)
    return c.search_runs([exp.experiment_id], filter_string=f"tags.`alignlab.run_key` = '{key}'") if exp else []


def steps_of(store: str, run_id: str, metric: str) -> list[int]:
    from alignlab.platform import tracking

    return [m.step for m in tracking.client(store).get_metric_history(run_id, metric)]


def one_line(text: str) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------------------------
# Security
# --------------------------------------------------------------------------------------------


def _checkpoint_root(lab: Lab, home: Path):
    """The config of a run, its checkpoint root and the checkpoint its runner reported there."""
    from alignlab.platform.train import LocalContext

    cfg = lab.config(home)
    ctx = LocalContext(list, checkpoint_root=str(home / "checkpoints"))
    lab.runner(cfg, ctx).checkpoint()
    return cfg, ctx.root, ctx.checkpoints()[0]


def _resume_refused(lab: Lab, home: Path, state: bytes) -> BaseException:
    from alignlab.platform.checkpoint import STATE_FILE, CheckpointError
    from alignlab.platform.train import LocalContext

    cfg, root, checkpoint = _checkpoint_root(lab, home)
    (checkpoint / STATE_FILE).write_bytes(state)
    error = expect_raises(CheckpointError, lambda: lab.runner(cfg, LocalContext(list, checkpoint_root=str(root))))
    expect(str(checkpoint / STATE_FILE) in str(error), f"the error does not name the file: {error}")
    expect("weights_only` set to `False`" not in str(error), f"the error advises the unsafe way: {error}")
    return error


@probe("crafted pickle as a checkpoint's `trainer_state.pt`, then resume")
def crafted_checkpoint(lab: Lab) -> Finding:
    home = lab.dir("crafted_checkpoint")
    marker = home / "payload_ran"
    error = _resume_refused(lab, home, pickle.dumps({"optimizer": Payload(marker)}, protocol=2))  # as torch.save
    expect(not marker.exists(), "the pickle's payload ran")
    expect("nothing in it was executed" in str(error), f"unexpected message: {error}")
    return Finding("refused unread (`weights_only`); the payload never ran", one_line(error))


@probe("crafted pickle as SIMLA's dVAE encoder file")
def crafted_dvae(lab: Lab) -> Finding:
    from alignlab.models.visual_tokenizers import DVAEError, DVAETokenizer

    home = lab.dir("crafted_dvae")
    marker, path = home / "payload_ran", home / "encoder.pkl"
    path.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    error = expect_raises(DVAEError, lambda: DVAETokenizer(str(path), grid=2))
    expect(not marker.exists(), "the pickle's payload ran")
    expect(str(path) in str(error) and "nothing in it ran" in str(error) and "weights_only` set to `False`" not in
           str(error), f"unexpected message: {error}")
    return Finding("refused unread; the payload never ran", one_line(error))


@probe("cluster.yaml: the Ray dashboard, job API and MLflow; a node without the Ray token")
def cluster_doors(lab: Lab) -> Finding:
    import yaml

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    head = " ".join(raw["head_start_ray_commands"])
    expect("--dashboard-host=127.0.0.1" in head, "the dashboard / job API is not bound to 127.0.0.1")
    expect("--app-name basic-auth" in head, "MLflow runs without its login")
    expect("RAY_AUTH_MODE=token" in " ".join(raw["setup_commands"]), "Ray token auth is off")
    expect(all(n["node_config"].get("SecurityGroupIds") for n in raw["available_node_types"].values()),
           "a node type falls back to Ray's default security group, open to all traffic inside it")
    home = lab.dir("cluster_doors")
    node = subprocess.run(["bash", "-c", raw["setup_commands"][0]], env={"HOME": str(home), "PATH": os.environ["PATH"]},
                          capture_output=True, text=True, timeout=10)
    expect(node.returncode != 0, "a node without the Ray token passed its setup")
    return Finding("dashboard and job API on 127.0.0.1, MLflow behind basic-auth, Ray token auth on every node, "
                   "security groups of its own; a node without the token fails its setup", one_line(node.stdout))


# --------------------------------------------------------------------------------------------
# Data loss and silent garbage
# --------------------------------------------------------------------------------------------


@probe("`data.train_split=trian` on an existing shard set")
def split_typo(lab: Lab) -> Finding:
    home = lab.dir("split_typo")
    before = md5s(lab.synth)
    status, said = lab.cli("train", PRESET, *lab.overrides(home, "data.train_split=trian"))
    expect(status != 0 and "'trian'" in said, f"exit {status}: {said}")
    expect(md5s(lab.synth) == before, "files of the shard set changed")
    expect(not (lab.synth / "trian").exists(), "the typo's split was created")
    return Finding(f"refused at start-up; all {len(before)} files' md5 unchanged", one_line(said))


@probe("`data.shards=` a path that does not exist")
def shards_typo(lab: Lab) -> Finding:
    home = lab.dir("shards_typo")
    missing = home / "does" / "not" / "exist"
    demo = Path("data/synth").exists()
    runs = lab.run_count()
    status, said = lab.cli("train", PRESET, *lab.overrides(home), f"data.shards={missing}")
    expect(status != 0 and str(missing) in said, f"exit {status}: {said}")
    expect("generating" not in said and not missing.exists() and Path("data/synth").exists() == demo,
           "synthetic data was generated")
    expect(lab.run_count() == runs, "a run was opened")
    return Finding("refused at start-up naming the path; nothing generated, no run opened", one_line(said))


@probe("40 rows with NaN/Inf region features in the training split")
def non_finite_rows(lab: Lab) -> Finding:
    from alignlab.platform.ingest import DataQuality
    from alignlab.platform.train import LocalContext

    home = lab.dir("non_finite_rows")
    cfg = lab.config(home, *lab.dirty_overrides(), "optim.max_steps=6", "tracking.log_every=2")
    quality = DataQuality()
    batches = lab.batches(cfg, "train", SimpleNamespace(add=SimpleNamespace(remote=quality.add)))
    final = lab.runner(cfg, LocalContext(lambda: batches, lambda: batches[:1])).run()
    counts = quality.snapshot()["counts"]
    expect(counts.get("non_finite_regions") == 40, f"skipped {counts}")
    expect(all(v == v and abs(v) != float("inf") for v in final.values()), f"non-finite metrics: {final}")
    example = next(e for e in quality.snapshot()["examples"] if e.startswith("non_finite_regions"))
    return Finding(f"40 rows skipped and counted (`data/skipped_non_finite_regions`); loss/total "
                   f"{final['loss/total']:.3f} and eval/uni_rsum {final['eval/uni_rsum']:.1f} finite",
                   f"skipped row: {example}")


@probe("non-finite loss on every step (NaN features past the data stage)")
def non_finite_loss(lab: Lab) -> Finding:
    from alignlab.platform import tracking
    from alignlab.platform.train import LocalContext, NonFiniteLossError

    home = lab.dir("non_finite_loss")
    cfg = lab.config(home, "optim.max_steps=8", "optim.nonfinite_patience=3", "tracking.log_every=2")
    batches = lab.batches(cfg, "train")
    clean = batches[:2]
    poisoned = [{**b, "region_features": b["region_features"] * float("nan")} for b in batches[2:5]]
    store = lab.store
    run_id = tracking.create_run(store, EXPERIMENT, "non-finite")
    logger = tracking.RunLogger(store, run_id)
    root = home / "checkpoints"
    runner = lab.runner(cfg, LocalContext(lambda: clean + poisoned, checkpoint_root=str(root)), logger)

    def run():
        with tracking.failure_marks(logger):  # as train() wraps fit()
            runner.run()

    error = expect_raises(NonFiniteLossError, run)
    expect("3 steps in a row, the last at step 4" in str(error), f"unexpected message: {error}")
    run = tracking.client(store).get_run(run_id)
    expect(run.info.status == "FAILED" and "non-finite loss" in run.data.tags.get("alignlab.error", ""),
           f"MLflow: {run.info.status}, tags {run.data.tags}")
    expect(not any(k.startswith("eval/") for k in run.data.metrics) and not root.exists(),
           "a diverged model was evaluated or checkpointed")
    weights_finite = all(bool(p.isfinite().all()) for p in runner.model.parameters())
    expect(weights_finite, "the weights went non-finite")
    return Finding("3 steps skipped (weights untouched), then the run stops: MLflow FAILED with the error as "
                   "`alignlab.error`; no evaluation, no checkpoint", one_line(error))


# --------------------------------------------------------------------------------------------
# Crashes instead of clear errors
# --------------------------------------------------------------------------------------------


@probe("a caption that is not valid UTF-8")
def latin1_caption(lab: Lab) -> Finding:
    from alignlab.platform.ingest import DataQuality

    home = lab.dir("latin1_caption")
    cfg = lab.config(home, *lab.dirty_overrides())
    quality = DataQuality()
    rows = sum(len(b["input_ids"]) for b in lab.batches(cfg, "train", SimpleNamespace(
        add=SimpleNamespace(remote=quality.add))))
    snap = quality.snapshot()
    expect(snap["counts"].get("invalid_utf8_caption") == 1, f"skipped {snap['counts']}")
    example = next(e for e in snap["examples"] if e.startswith("invalid_utf8_caption"))
    expect("part-00000.parquet" in example and "byte 0xe9" in example, example)
    return Finding(f"skipped and counted (`data/skipped_invalid_utf8_caption` = 1); the other {rows} rows read",
                   f"skipped row: {example}")


@probe("a truncated Parquet file in the training split")
def truncated_parquet(lab: Lab) -> Finding:
    home = lab.dir("truncated_parquet")
    root = home / "shards"
    shutil.copytree(lab.synth, root)
    damaged = root / "train" / "part-00001.parquet"
    damaged.write_bytes(damaged.read_bytes()[:3000])
    args = [*lab.overrides(home, "tracking.run_name=truncated"), f"data.shards={root}"]
    status, said = lab.cli("train", PRESET, *args)
    expect(status != 0 and f"{damaged}: not a readable Parquet file" in said, f"exit {status}: {said}")
    (run,) = runs_of(lab.store, "truncated")
    expect(run.info.status == "FAILED" and str(damaged) in run.data.tags.get("alignlab.error", ""),
           f"MLflow: {run.info.status}, tags {run.data.tags}")
    return Finding("named at start-up from its footer, before Ray starts; the MLflow run is FAILED with the error",
                   one_line(said))


@probe("garbage bytes as a checkpoint's `trainer_state.pt`, then resume")
def garbage_checkpoint(lab: Lab) -> Finding:
    home = lab.dir("garbage_checkpoint")
    error = _resume_refused(lab, home, os.urandom(256))
    return Finding("refused, naming the file", one_line(error))


def _config_probe(override: str, says: str, outcome: str) -> None:
    def run(lab: Lab) -> Finding:
        home = lab.dir("config")
        runs = lab.run_count()
        status, said = lab.cli("train", PRESET, *lab.overrides(home), override)
        expect(status != 0 and says in said, f"exit {status}: {said}")
        expect(lab.run_count() == runs, "a run was opened")
        return Finding(outcome, one_line(said))
    probe(f"`{override}`", key=override)(run)


_config_probe("optim.lr=.nan", "'optim.lr' = nan must be a finite number", "refused at start-up, no run opened")
_config_probe("optim.lr=-1", "'optim.lr' = -1.0 must be > 0", "refused at start-up, no run opened")
_config_probe("data.batch_size=0", "'data.batch_size' = 0 must be >= 1", "refused at start-up, no run opened")
_config_probe("tracking.checkpoint_every=0", "'tracking.checkpoint_every' = 0 must be >= 1",
              "refused at start-up, no run opened")
_config_probe("optim.learning_rate=1e-4", "did you mean 'lr'?", "refused at start-up with the hint, no run opened")


# --------------------------------------------------------------------------------------------
# Bookkeeping
# --------------------------------------------------------------------------------------------


class Killed(BaseException):
    """Stands in for a SIGKILL of the process the runner runs in."""


@probe("the runner stopped between checkpoints, then resumed (in-process)")
def resume_in_process(lab: Lab) -> Finding:
    from alignlab.platform import tracking
    from alignlab.platform.train import LocalContext

    home = lab.dir("resume_in_process")
    cfg = lab.config(home, "optim.max_steps=8", "tracking.log_every=2", "tracking.checkpoint_every=4")
    batches = lab.batches(cfg, "train")[:4]
    served = count(1)

    def killed_at_step_7():
        for b in batches:
            if next(served) == 7:  # steps 5 and 6 logged since the checkpoint at 4: lost with the process
                raise Killed()
            yield b

    store, root = lab.store, str(home / "checkpoints")
    run_id = tracking.create_run(store, EXPERIMENT, "resume")
    with contextlib.suppress(Killed):
        lab.runner(cfg, LocalContext(killed_at_step_7, checkpoint_root=root), tracking.RunLogger(store, run_id)).run()
    lab.runner(cfg, LocalContext(lambda: batches, lambda: batches[:1], checkpoint_root=root),
               tracking.RunLogger(store, run_id)).run()
    steps = steps_of(store, run_id, "loss/total")
    resumed = [m.value for m in tracking.client(store).get_metric_history(run_id, "train/resumed_from_step")]
    expect(steps == [2, 4, 6, 8] and resumed == [4.0], f"loss/total steps {steps}, resumed from {resumed}")
    return Finding("resumed from step 4; each step logged once", f"MLflow loss/total steps {steps}; "
                   f"train/resumed_from_step = 4")


@probe("bad rows read 1.2 times (an epoch and a fifth)")
def counted_per_row(lab: Lab) -> Finding:
    from alignlab.platform.ingest import DataQuality, local_eval_batches
    from alignlab.platform.train import prepare

    home = lab.dir("counted_per_row")
    cfg = lab.config(home, *lab.dirty_overrides())
    quality = DataQuality()
    counter = SimpleNamespace(add=SimpleNamespace(remote=quality.add))
    inputs = prepare(cfg).spec.input_spec(cfg.model, cfg.objectives)

    def read():
        return local_eval_batches(cfg.data, cfg.objectives, inputs, "train", cfg.data.batch_size, counter=counter)

    epoch = sum(1 for _ in read())
    sum(1 for _ in islice(read(), max(1, epoch // 5)))
    counts = quality.snapshot()["counts"]
    expect(counts == {"non_finite_regions": 40, "invalid_utf8_caption": 1}, f"counted {counts}")
    return Finding("each bad row counted once", "; ".join(f"data/skipped_{k} = {v}" for k, v in sorted(counts.items())))


@probe("re-running the command of a finished run")
def rerun_finished(lab: Lab) -> Finding:
    from alignlab.platform import tracking
    from alignlab.platform.train import run_key

    home = lab.dir("rerun_finished")
    args = lab.overrides(home, "tracking.run_name=done")
    cfg = lab.config(home, "tracking.run_name=done")
    store = lab.store
    # The run as train() leaves it: found by its key, finished.
    run_id, _ = tracking.find_or_create_run(store, EXPERIMENT, {"alignlab.run_key": run_key(cfg)}, "done",
                                            include_finished=False)
    logger = tracking.open_run(store, run_id, cfg)
    logger.log_metrics({"loss/total": 1.0}, 300)
    logger.finish()
    status, said = lab.cli("train", PRESET, *args)
    expect(status == 0 and "already finished" in said and "tracking.run_name=<new name>" in said, f"exit {status}: {said}")
    runs = runs_of(store, "done")
    expect([r.info.run_id for r in runs] == [run_id], f"runs now: {[r.info.run_id for r in runs]}")
    expect(steps_of(store, run_id, "loss/total") == [300], "the run logged more steps")
    expect(not (home / "ray_results").exists(), "something trained")
    return Finding("nothing trained, no new MLflow run; its metrics are printed",
                   one_line(said.splitlines()[0]))


@probe("`ray job submit --working-dir .`: where the MLflow store and Train storage land")
def working_dir_jobs(lab: Lab) -> Finding:
    from alignlab.platform import tracking

    home = lab.dir("working_dir_jobs")
    saved = {k: os.environ.get(k) for k in ("ALIGNLAB_HOME", "MLFLOW_TRACKING_URI")}
    cwd = os.getcwd()
    seen = []
    try:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.environ["ALIGNLAB_HOME"] = str(home / "alignlab_home")
        for job in ("_ray_pkg_1f2e", "_ray_pkg_9a0b"):  # two jobs: two per-session copies of the code
            package = home / "runtime_resources" / "working_dir_files" / job
            package.mkdir(parents=True)
            os.chdir(package)
            seen.append((tracking.resolve_tracking_uri(), tracking.resolve_storage()))
    finally:
        os.chdir(cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    expect(seen[0] == seen[1] and "runtime_resources" not in " ".join(seen[0]), f"jobs' stores: {seen}")
    return Finding("every job uses one store under `$ALIGNLAB_HOME` (default `~/.alignlab`)",
                   f"MLflow store {seen[0][0]}; Train storage {seen[0][1]}")


# --------------------------------------------------------------------------------------------
# Data build
# --------------------------------------------------------------------------------------------


def _token_file(home: Path) -> Path:
    """A Flickr8k token file: line 2 has no tab, line 3 a Latin-1 byte; two real images."""
    from PIL import Image

    (home / "images").mkdir(parents=True, exist_ok=True)
    for name in ("img0.jpg", "img1.jpg"):
        Image.new("RGB", (32, 24), (200, 30, 30)).save(home / "images" / name)
    token = home / "Flickr8k.token.txt"
    token.write_bytes(b"img0.jpg#0\ta dog runs on the grass\n"
                      b"img0.jpg#1 a dog without a tab\n"
                      b"img1.jpg#0\tun caf\xe9 au lait on a table\n"
                      b"img1.jpg#1\ta cup of coffee on a table\n")
    return token


def _planned_skips(lab: Lab, name: str) -> tuple[Path, list[dict]]:
    from alignlab.platform.databuild import builder
    from alignlab.platform.databuild.config import BuildConfig
    from alignlab.platform.databuild.readers import open_reader

    token = _token_file(lab.dir(name))
    cfg = BuildConfig(source=str(token), out=str(token.parent / "out"), phrases=False).validate()
    reader = open_reader(cfg.source, cfg.layout, cfg.image_root, cfg.default_split)
    units, skipped = builder.plan_units(reader, cfg, {})
    expect(sum(u["rows"] for u in units) == 2, f"units: {units}")
    return token, skipped.listed


def _skipped_line(lab: Lab, name: str, reason: str, line: int) -> Finding:
    token, listed = _planned_skips(lab, name)
    entry = next((s for s in listed if s["reason"] == reason), None)
    expect(entry is not None and entry["where"] == f"{token}:{line}", f"skipped: {listed}")
    return Finding("the line is skipped and counted; the build goes on", f"{entry['where']}: {entry['reason']}: "
                   f"{entry['detail']}")


@probe("data build: a token-file line without a tab")
def build_line_without_tab(lab: Lab) -> Finding:
    return _skipped_line(lab, "build_line_without_tab", "malformed_line", 2)


@probe("data build: a Latin-1 byte in a token file")
def build_latin1_line(lab: Lab) -> Finding:
    return _skipped_line(lab, "build_latin1_line", "invalid_utf8", 3)


@probe("data build: which rows the manifest says were skipped", needs_ray=True)
def build_manifest(lab: Lab) -> Finding:
    from alignlab.platform.databuild import builder
    from alignlab.platform.databuild.config import BuildConfig

    lab.ray_address()
    home = lab.dir("build_manifest")
    token = _token_file(home)
    manifest = builder.build(BuildConfig(source=str(token), out=str(home / "out"), phrases=False, workers=1))
    on_disk = json.loads((home / "out" / "manifest.json").read_text())
    expect(manifest["rows_written"] == 2 and on_disk["rows_skipped"] == {"invalid_utf8": 1, "malformed_line": 1},
           f"manifest: {on_disk}")
    where = [(s["where"], s["reason"]) for s in on_disk["skipped_rows"]]
    expect(where == [(f"{token}:2", "malformed_line"), (f"{token}:3", "invalid_utf8")], f"skipped_rows: {where}")
    return Finding("2 rows written; `rows_skipped` counts and `skipped_rows` lists each with file:line and why",
                   "skipped_rows: " + "; ".join(f"{w} {r}" for w, r in where))


# --------------------------------------------------------------------------------------------
# Kills mid-epoch, through Ray Train
# --------------------------------------------------------------------------------------------


def _alive_actor(class_part: str, not_job_id: str | None = None, not_ids: Collection[str] = ()) -> dict | None:
    """An ALIVE actor whose class name contains ``class_part`` (of another job than
    ``not_job_id``, if given; none of ``not_ids``) and whose process is running it (Ray's actor
    table, from the GCS: the state API needs the dashboard, which local clusters here run without;
    Ray titles an actor's process ``ray::<class name>``)."""
    from ray._private import state

    return next((a for a in state.actors(actor_state_name="ALIVE").values()
                 if class_part in a["ActorClassName"] and a["JobID"] != not_job_id
                 and a["ActorID"] not in not_ids and _runs_actor(a)), None)


def _runs_actor(actor: dict) -> bool:
    """Whether the actor's process (from Ray's actor table) is still running it."""
    if not Path("/proc").is_dir():  # no process titles to check
        return True
    with contextlib.suppress(OSError):
        title = Path(f"/proc/{actor['Pid']}/cmdline").read_bytes().split(b"\0")[0].decode()
        return title.startswith(f"ray::{actor['ActorClassName']}")
    return False


def _wait_for_checkpointed_metrics(lab: Lab, key: str, running: Callable[[], bool],
                                   through: int = CHECKPOINT_EVERY) -> int:
    """Blocks until MLflow holds ``loss/total`` at step ``through`` (a checkpoint's step, so a
    committed checkpoint covers it); returns the last step logged."""
    deadline = time.time() + KILL_TIMEOUT_S
    while time.time() < deadline:
        expect(running(), "the run ended before it was killed")
        runs = runs_of(lab.store, key)
        steps = steps_of(lab.store, runs[0].info.run_id, "loss/total") if runs else []
        if steps and max(steps) >= through:
            return max(steps)
        time.sleep(0.2)
    raise ProbeFailed(f"no checkpointed metrics within {KILL_TIMEOUT_S}s")


def _finished_once_each(lab: Lab, key: str) -> list[float]:
    """Checks the run's MLflow facts after the kill: one run, FINISHED at max_steps, every logged
    step of loss/total exactly once. Returns its train/resumed_from_step values."""
    from alignlab.platform import tracking

    store = lab.store
    runs = runs_of(store, key)
    expect(len(runs) == 1, f"{len(runs)} MLflow runs for one command")
    run = runs[0]
    expect(run.info.status == "FINISHED" and run.data.metrics.get("train/step") == MAX_STEPS,
           f"MLflow: {run.info.status} at step {run.data.metrics.get('train/step')}")
    steps = steps_of(store, run.info.run_id, "loss/total")
    twice = sorted(s for s, n in Counter(steps).items() if n > 1)
    expect(sorted(steps) == list(range(LOG_EVERY, MAX_STEPS + 1, LOG_EVERY)),
           f"loss/total steps {sorted(steps)}" + (f": {twice} logged twice" if twice else ""))
    resumed = [m.value for m in tracking.client(store).get_metric_history(run.info.run_id, "train/resumed_from_step")]
    return resumed


def _train_and_strike(lab: Lab, home: Path, key: str, strikes: list[tuple[bool, Callable[[], str]]]) -> list[str]:
    """``alignlab train`` in this process on the lab's cluster while a watcher runs ``strikes`` in
    turn: each ``(after_checkpoint, strike)`` kills something and says what, once the first
    checkpoint's metrics are in MLflow, or at once (a strike that waits for its own moment).
    Returns what they said."""
    lab.ray_address()
    struck: list[str] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def watch():
        try:
            for after_checkpoint, strike in strikes:
                if after_checkpoint:
                    _wait_for_checkpointed_metrics(lab, key, lambda: not done.is_set())
                struck.append(strike())
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        status, said = lab.cli("train", PRESET, *lab.overrides(home, *KILL_RUN, f"tracking.run_name={key}"))
    finally:
        done.set()
        watcher.join(timeout=30)
    if errors:
        raise errors[0]
    expect(status == 0, f"the run failed after the kills: {said[-2000:]}")
    expect(len(struck) == len(strikes), f"killed only {struck}")
    return struck


@probe("SIGKILL of the driver (`alignlab train`) mid-epoch, its newest checkpoint torn, then the same command "
       "again", needs_ray=True)
def kill_driver(lab: Lab) -> Finding:
    """The driver dies once Ray keeps two checkpoints, and the newest is then truncated, as a write
    cut off by a full disk or a lost node would leave it. Checkpoints come every 2 steps here, so
    the second is early enough that the run is still going when the kill comes."""
    from alignlab.platform import tracking
    from alignlab.platform.checkpoint import MODEL_FILE, read_checkpoint

    home = lab.dir("kill_driver")
    key = "kill-driver"
    every = 2
    args = ["train", PRESET, *lab.overrides(home, *KILL_RUN, f"tracking.checkpoint_every={every}",
                                            f"tracking.run_name={key}")]
    import ray
    from ray._private import state

    address = lab.ray_address()  # first: starting the cluster sets RAY_AUTH_MODE=token in os.environ
    env = {**os.environ, "RAY_ADDRESS": address}
    # Controllers an earlier abnormal end left behind are not this driver's.
    earlier = set(state.actors(actor_state_name="ALIVE"))
    with open(home / "first_driver.log", "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "alignlab.platform.cli", *args], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            step = _wait_for_checkpointed_metrics(lab, key, lambda: driver.poll() is None, 2 * every)
            # The killed driver's job: Train runs of this process (its own job) may still hold
            # a controller.
            this_job = ray.get_runtime_context().get_job_id()
            controller = _alive_actor("TrainController", not_job_id=this_job, not_ids=earlier)
            expect(controller is not None, "the driver's Ray Train controller was not found to wait for its end")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    deadline = time.time() + 60
    # Ray reaps the dead driver's actors; only its controller matters (another job's may live on).
    # Its process, not the GCS's word: the GCS marks it dead before the process exits, and in
    # between the process can still register a checkpoint and rewrite the snapshot read below (a
    # resume from step 6 after the one at 4 was torn, once in a loaded suite).
    while _runs_actor(controller) and time.time() < deadline:
        time.sleep(0.2)
    expect(not _runs_actor(controller), f"the killed driver's controller (pid {controller['Pid']}) still runs after 60 s")
    # The checkpoints Ray registered, as its snapshot (what a restored run reads) lists them: a
    # newer folder may be on disk, uploaded but not yet registered when the driver died.
    run_dir = home / "ray_results" / key
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    registered = [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]
    expect(len(registered) >= 2, f"Ray registered {registered}")
    newest = run_dir / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    torn_step = read_checkpoint(newest).step
    torn = newest / MODEL_FILE
    torn.write_bytes(torn.read_bytes()[:100])
    status, said = lab.cli(*args)
    expect(status == 0, f"the second run failed: {said[-2000:]}")
    resumed = _finished_once_each(lab, key)
    run_id = runs_of(lab.store, key)[0].info.run_id
    refused = [m.value for m in tracking.client(lab.store).get_metric_history(run_id, "train/checkpoints_refused")]
    expect(len(resumed) == 1 and every <= resumed[0] < torn_step and refused == [1.0],
           f"resumed from {resumed}, refusing {refused} checkpoint(s), after tearing the one at step {torn_step}")
    rows = _resumed_epoch_rows(lab, key, resumed[0])
    return Finding(f"killed after step {step} was logged; the checkpoint at step {torn_step} torn; the same command "
                   f"named it, resumed from the one before (step {resumed[0]:.0f}) and finished at {MAX_STEPS}, "
                   f"FINISHED, each step of loss/total logged once",
                   f"warning: `{torn} is not a readable safetensors file (...); trying the checkpoint before it`; "
                   f"`train/checkpoints_refused` = 1, `train/resumed_from_step` = {resumed[0]:.0f}, "
                   f"`train/resumed_epoch_rows` = {rows:.0f}; loss/total at "
                   f"steps {LOG_EVERY}..{MAX_STEPS}, once each")


def _resumed_epoch_rows(lab: Lab, key: str, step: float) -> float:
    """The rows of its epoch the resumed run's stream started past: a kill run's epoch is 16
    steps of 8 rows, so a resume before step 16 must skip the 8 rows of each step before it."""
    from alignlab.platform import tracking

    run_id = runs_of(lab.store, key)[0].info.run_id
    rows = [m.value for m in tracking.client(lab.store).get_metric_history(run_id, "train/resumed_epoch_rows")]
    expect(rows == [step * 8], f"the resumed stream started past {rows} rows of its epoch, not the "
                               f"{step * 8:.0f} that its {step:.0f} steps read")
    return rows[0]


@probe("SIGKILL of the Ray Data preprocessing actor (`MapWorker(MapBatches(Preprocessor))`) as the epoch's "
       "batches are in flight, then of a Ray Train worker (`RayTrainWorker`) mid-epoch, in one run", needs_ray=True)
def kill_data_actor_then_worker(lab: Lab) -> Finding:
    """Two faults in one run: Ray must restart the data actor and retry its tasks, then Ray Train
    restart the workers from the last checkpoint, and the run still log each step once."""
    from ray._private import state

    home = lab.dir("kill_data_actor_then_worker")
    killed: list[dict] = []

    def kill_data_actor() -> str:
        # The pool lives while it preprocesses the epoch, which on this tiny set ends before the
        # first checkpoint: the strike comes as soon as the actor is up.
        deadline = time.time() + KILL_TIMEOUT_S
        actor = None
        while actor is None and time.time() < deadline:
            actor = _alive_actor("MapBatches(Preprocessor)")
            time.sleep(0.02)
        expect(actor is not None, "no preprocessing actor alive")
        os.kill(actor["Pid"], signal.SIGKILL)
        killed.append(actor)
        return f"{actor['ActorClassName']} pid {actor['Pid']}"

    def kill_train_worker() -> str:
        worker = _alive_actor("RayTrainWorker")
        expect(worker is not None, "no RayTrainWorker alive")
        os.kill(worker["Pid"], signal.SIGKILL)
        return f"RayTrainWorker pid {worker['Pid']}"

    actor, worker = _train_and_strike(lab, home, "kill-data-actor-then-worker",
                                      [(False, kill_data_actor), (True, kill_train_worker)])
    resumed = _finished_once_each(lab, "kill-data-actor-then-worker")
    after = state.actors(killed[0]["ActorID"])
    expect(after["NumRestarts"] >= 1 or after["State"] == "DEAD", f"the data actor was not hit: {after}")
    expect(len(resumed) == 1 and CHECKPOINT_EVERY <= resumed[0] < MAX_STEPS, f"resumed from {resumed}")
    rows = _resumed_epoch_rows(lab, "kill-data-actor-then-worker", resumed[0])
    data = (f"Ray restarted it ({after['NumRestarts']} restart) and retried its tasks" if after["NumRestarts"]
            else "Ray Data replaced it")
    return Finding(f"{actor} killed: {data}; then {worker} killed: Ray Train restarted the workers from the "
                   f"checkpoint at step {resumed[0]:.0f}; finished at {MAX_STEPS}, FINISHED, each step of loss/total "
                   f"logged once",
                   f"`train/resumed_from_step` = {resumed[0]:.0f}, `train/resumed_epoch_rows` = {rows:.0f}; loss/total "
                   f"at steps {LOG_EVERY}..{MAX_STEPS}, once each")


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def cell(text: str, limit: int = 260) -> str:
    text = one_line(text).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="run the probes whose name or key contains this text")
    parser.add_argument("--no-ray", action="store_true", help="skip the probes that need a Ray cluster")
    args = parser.parse_args(argv)
    chosen = [p for p in PROBES if args.k.lower() in (p.name + " " + p.key).lower()
              and not (args.no_ray and p.needs_ray)]
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as root:
        lab = Lab(Path(root))
        for p in chosen:
            start = time.perf_counter()
            try:
                found = p.run(lab)
                rows.append((p.name, found.outcome, found.message))
            except Exception as e:  # noqa: BLE001 - every probe gets its row
                failed += 1
                rows.append((p.name, f"**FAILED**: {type(e).__name__}: {e}", ""))
            print(f"{time.perf_counter() - start:6.1f}s  {p.name}", file=sys.stderr, flush=True)
    print("| probe | outcome | message the user sees |\n|---|---|---|")
    for name, outcome, message in rows:
        print(f"| {cell(name)} | {cell(outcome)} | {cell(message)} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
