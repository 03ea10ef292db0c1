"""What a person reads on a sweep driver's stdout: one line per trial at its log steps, warnings
for skipped rows and failed trials, then the comparison tables.

A sweep's stdout is where ``ray job submit`` logs and CI put it, usually a file. Left to Ray, it
fills with what each process of the cluster prints (train workers, Ray Data stages, Tune's trial
actors, each line forwarded to the driver), Tune's status and config tables (a 130-line table per
trial) and the drivers' INFO logs, and the table the user came for is buried at the bottom. So,
unless ``tracking.verbose``, the driver starts Ray with ``log_to_driver=False`` (every process's
output stays in the Ray session's log files, named at the start), Tune runs at verbosity 0, and
:class:`TrialLines` prints what is worth reading.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from ray.tune import Callback

# The logger AlignLab's own driver-side messages go through; Ray's and MLflow's stay at WARNING.
LOGGER = "alignlab"


def configure_logging(verbose: bool) -> None:
    """The driver's Python logging: AlignLab's INFO lines always, every library's only when
    ``verbose`` (otherwise warnings and errors)."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ray and MLflow bring their own handlers, which the root level does not reach; MLflow sets
    # its level from this variable when it is first imported.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", logging.getLevelName(level))
    for name in ("ray", "mlflow"):
        logging.getLogger(name).setLevel(level)
    logging.getLogger(LOGGER).setLevel(logging.INFO)


# Ray Train's detached PlacementGroupCleaner asks the State API, every second of a run, whether
# the train controller still lives. The State API is served by the dashboard, which the local
# cluster (init_ray) does not start, so each answer was a warning forwarded to the driver: ~3,600
# lines an hour of `alignlab train`. A local cluster's placement groups end with it anyway; a
# cluster started by `ray up` / `ray start` runs the dashboard, and its cleaner works and stays loud.
PLACEMENT_GROUP_CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_placement_group_cleaner() -> None:
    """A local cluster's ``worker_process_setup_hook``: the cleaner's errors only."""
    logging.getLogger(PLACEMENT_GROUP_CLEANER).setLevel(logging.ERROR)


def duration(seconds: float) -> str:
    """``3h05m``, ``4m10s``, ``42s``."""
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def trial_label(overrides: dict[str, Any]) -> str:
    """A trial named by its grid point, each key by its last part: ``ablation=wo_mcr seed=1``."""
    return " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in overrides.items()) or "trial"


def last_evaluation(result: dict[str, Any]) -> str:
    """The latest evaluation figure a result carries: zero-shot RSUM, or a fine-tuned task's
    headline (retrieval's RSUM, VQA accuracy, accuracy); "" before any evaluation."""
    for key in ("eval/rsum", "downstream/retrieval/rsum"):
        if key in result:
            return f"eval RSUM {result[key]:.1f}"
    for key in sorted(result):
        if key.startswith("downstream/") and key.rsplit("/", 1)[-1] in ("vqa_accuracy", "accuracy"):
            return f"{key.split('/')[1]} accuracy {result[key]:.1f}"
    return ""


@dataclass
class _Progress:
    label: str
    # (time, progress) of the first report: the ETA's origin
    first: tuple[float, float | None] | None = None
    printed_at: float = -1e18
    printed_step: float = -1.0
    skipped: float = 0.0
    evaluation: str = ""


class TrialLines(Callback):
    """One line per trial at each of its log steps (``trial step/total samples/s ETA loss last
    evaluation``), no more often than every ``min_interval_s`` unless it brings a new evaluation
    or the last step; a warning line whenever a trial's count of skipped rows grows; a line with
    the error file when a trial fails. The results are the Train workers' reports, which carry
    ``train/step``, ``train/max_steps``, ``train/progress``, ``throughput/samples_per_s``,
    ``loss/total``, the last evaluation and the ``data/skipped_*`` counters. ``total``: the
    sweep's number of trials (Tune creates them one by one)."""

    def __init__(self, sweep: str, total: int, min_interval_s: float = 15.0, out: TextIO | None = None,
                 clock=time.monotonic):
        self.sweep, self.total, self.min_interval_s, self.out, self.clock = sweep, total, min_interval_s, out, clock
        self.trials: dict[str, _Progress] = {}
        self.finished = 0

    def _say(self, line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", file=self.out or sys.stdout, flush=True)

    def _progress(self, trial) -> _Progress:
        if trial.trial_id not in self.trials:
            self.trials[trial.trial_id] = _Progress(trial_label((trial.config or {}).get("overrides", {})))
        return self.trials[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._say(f"[{self.sweep}] {self._progress(trial).label}: started (trial {len(self.trials)} of {self.total})")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._line(trial, result, final=False)

    def _line(self, trial, result: dict[str, Any], final: bool) -> None:
        p, now = self._progress(trial), self.clock()
        step, total = result.get("train/step"), result.get("train/max_steps")
        if step is None:
            return
        # The share of the run done: the trainer's (train/progress, which a time budget moves) or
        # the steps'.
        done = result.get("train/progress", step / total if total else None)
        if p.first is None:
            p.first = (now, done)
        skipped = float(result.get("data/skipped_total", 0.0))
        if skipped > p.skipped:
            reasons = ", ".join(f"{k.removeprefix('data/skipped_')}: {int(v)}" for k, v in sorted(result.items())
                                if k.startswith("data/skipped_") and k != "data/skipped_total" and v)
            self._say(f"WARNING [{self.sweep}] {p.label}: {int(skipped)} rows skipped so far ({reasons}); each is "
                      f"logged with its file and caption id in the Ray session's worker logs")
            p.skipped = skipped
        evaluation = last_evaluation(result)
        new_eval = evaluation != p.evaluation
        p.evaluation = evaluation
        if step == p.printed_step and not (final and new_eval):
            return
        if now - p.printed_at < self.min_interval_s and not (new_eval or final):
            return
        p.printed_at, p.printed_step = now, step
        parts = [f"step {int(step)}/{int(total)}" if total else f"step {int(step)}"]
        if "throughput/samples_per_s" in result:
            parts.append(f"{result['throughput/samples_per_s']:.1f} samples/s")
        t0, d0 = p.first
        if done is not None and d0 is not None and d0 < done < 1:
            parts.append(f"ETA {duration((1 - done) * (now - t0) / (done - d0))}")
        if "loss/total" in result:
            parts.append(f"loss {result['loss/total']:.4f}")
        if evaluation:
            parts.append(evaluation)
        self._say(f"[{self.sweep}] {p.label}: " + "  ".join(parts))

    def on_trial_complete(self, iteration, trials, trial, **info):
        # Tune hands a trial's last report to the completion, not to on_trial_result.
        self._line(trial, trial.last_result or {}, final=True)
        self.finished += 1
        self._say(f"[{self.sweep}] {self._progress(trial).label}: done ({self.finished} of {self.total} trials "
                  f"finished)")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._say(f"ERROR [{self.sweep}] {self._progress(trial).label}: the trial failed; its error is in "
                  f"{trial.error_file or trial.path}")


def ray_log_dir() -> str:
    """Where this Ray session's processes write their output, on the head node."""
    import ray

    ctx = ray.get_runtime_context()
    return f"{ctx.get_temp_dir()}/{ctx.get_session_name()}/logs"
