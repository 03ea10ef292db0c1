"""The sweep console (platform/console.py): one line per trial at its log steps, throttled, with
ETA and the last evaluation; warnings for skipped rows; the failed trial's error file."""
from __future__ import annotations

import io
from types import SimpleNamespace

from alignlab.platform.console import TrialLines, duration, last_evaluation, trial_label


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _trial(trial_id="t0", ablation="wo_mcr", seed=1, status="RUNNING"):
    return SimpleNamespace(trial_id=trial_id, config={"overrides": {"model.mvptr.ablation": ablation, "seed": seed}},
                           status=status, TERMINATED="TERMINATED", error_file="/r/t0/error.txt", path="/r/t0")


def _lines(out: io.StringIO) -> list[str]:
    # Each line starts with the wall-clock time; the rest is what the tests check.
    return [line.split(" ", 1)[1] for line in out.getvalue().splitlines()]


def test_one_line_per_log_step_with_eta_throttled_but_never_hiding_an_evaluation_or_the_end():
    out, clock, trial = io.StringIO(), Clock(), _trial()
    lines = TrialLines("demo", 5, min_interval_s=15, out=out, clock=clock)
    lines.on_trial_start(0, [trial], trial)

    def report(t, step, **extra):
        clock.now = t
        lines.on_trial_result(0, [trial], trial, {"train/step": step, "train/max_steps": 800.0, "loss/total": 2.5,
                                                  "throughput/samples_per_s": 40.0, **extra})

    report(0, 50)      # the first report: printed, no rate yet
    report(10, 100)    # within 15 s: held back
    report(20, 150)    # 100 steps in 20 s since the first: 650 steps left = 130 s
    report(25, 150)    # the same step again (a checkpoint's report): nothing new
    report(30, 200, **{"eval/rsum": 301.25})  # a new evaluation shows at once
    report(200, 800, **{"eval/rsum": 350.0})  # the end
    assert _lines(out) == [
        "[demo] ablation=wo_mcr seed=1: started (trial 1 of 5)",
        "[demo] ablation=wo_mcr seed=1: step 50/800  40.0 samples/s  loss 2.5000",
        "[demo] ablation=wo_mcr seed=1: step 150/800  40.0 samples/s  ETA 2m10s  loss 2.5000",
        "[demo] ablation=wo_mcr seed=1: step 200/800  40.0 samples/s  ETA 2m00s  loss 2.5000  eval RSUM 301.2",
        "[demo] ablation=wo_mcr seed=1: step 800/800  40.0 samples/s  loss 2.5000  eval RSUM 350.0",
    ]


def test_a_time_budgeted_trials_eta_follows_its_progress_not_its_step_cap():
    out, clock, trial = io.StringIO(), Clock(), _trial()
    lines = TrialLines("demo", 1, min_interval_s=15, out=out, clock=clock)
    for t, step, progress in ((0, 50, 0.1), (20, 150, 0.3)):  # its minutes end long before step 5000
        clock.now = t
        lines.on_trial_result(0, [trial], trial, {"train/step": step, "train/max_steps": 5000.0,
                                                  "train/progress": progress})
    assert _lines(out)[-1] == "[demo] ablation=wo_mcr seed=1: step 150/5000  ETA 1m10s"  # 0.7 left at 0.2 / 20 s


def test_skipped_rows_warn_when_their_count_grows_and_a_failed_trial_names_its_error_file():
    out, trial = io.StringIO(), _trial()
    lines = TrialLines("demo", 5, min_interval_s=1e9, out=out, clock=Clock())
    for skipped in (0.0, 3.0, 3.0, 5.0):
        lines.on_trial_result(0, [trial], trial, {"train/step": 10.0 + skipped, "train/max_steps": 100.0,
                                                  "data/skipped_total": skipped, "data/skipped_corrupt_image": skipped,
                                                  "data/skipped_empty_caption": 0.0})
    lines.on_trial_error(0, [trial], trial)
    warnings = [line for line in _lines(out) if line.startswith("WARNING")]
    assert [w.split(": ", 1)[1].split(";")[0] for w in warnings] == [
        "3 rows skipped so far (corrupt_image: 3)", "5 rows skipped so far (corrupt_image: 5)"]
    assert _lines(out)[-1] == ("ERROR [demo] ablation=wo_mcr seed=1: the trial failed; its error is in "
                               "/r/t0/error.txt")


def test_completion_prints_the_last_report_tune_hands_to_it_and_counts_finished_trials():
    out, clock = io.StringIO(), Clock()
    a, b = _trial("a"), _trial("b", "full", 0)
    lines = TrialLines("demo", 2, out=out, clock=clock)
    lines.on_trial_result(0, [a, b], a, {"train/step": 700.0, "train/max_steps": 800.0, "loss/total": 3.0})
    clock.now = 1.0  # within the interval, but the end and its evaluation always show
    a.last_result = {"train/step": 800.0, "train/max_steps": 800.0, "loss/total": 2.0, "eval/rsum": 400.0}
    lines.on_trial_complete(0, [a, b], a)
    b.last_result = {}
    lines.on_trial_complete(0, [a, b], b)
    assert _lines(out) == ["[demo] ablation=wo_mcr seed=1: step 700/800  loss 3.0000",
                           "[demo] ablation=wo_mcr seed=1: step 800/800  loss 2.0000  eval RSUM 400.0",
                           "[demo] ablation=wo_mcr seed=1: done (1 of 2 trials finished)",
                           "[demo] ablation=full seed=0: done (2 of 2 trials finished)"]


def test_labels_durations_and_the_evaluation_shown():
    assert trial_label({"model.mvptr.ablation": "full", "seed": 2}) == "ablation=full seed=2"
    assert [duration(s) for s in (0, 42.4, 250, 3 * 3600 + 5 * 60)] == ["0s", "42s", "4m10s", "3h05m"]
    assert last_evaluation({"eval/rsum": 12.345, "eval/uni_rsum": 1.0}) == "eval RSUM 12.3"
    assert last_evaluation({"downstream/vqa/vqa_accuracy": 36.81, "downstream/vqa/chance": 4.5}) == \
        "vqa accuracy 36.8"
    assert last_evaluation({"loss/total": 1.0}) == ""


def test_a_local_cluster_silences_the_placement_group_cleaners_state_api_warnings_in_every_worker():
    """Without the dashboard the cleaner's State API query fails every second; init_ray's local
    cluster sets its logger to errors in each worker (a cluster of its own, in a subprocess)."""
    import subprocess
    import sys

    code = (
        "import logging, ray\n"
        "from ray.train.v2._internal.execution.controller import placement_group_cleaner as m\n"
        "from alignlab.platform.console import PLACEMENT_GROUP_CLEANER\n"
        "from alignlab.platform.train import init_ray\n"
        "assert m.logger.name == PLACEMENT_GROUP_CLEANER, m.logger.name\n"
        "init_ray(quiet=True)\n"
        "level = ray.get(ray.remote(num_cpus=0)(lambda: logging.getLogger(PLACEMENT_GROUP_CLEANER).level).remote())\n"
        "print('level', level, logging.getLogger(m.__name__.rsplit('.', 1)[0]).level)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    # ERROR in the worker; the parent logger is untouched, so other Ray Train warnings still show.
    assert out.stdout.split()[-2:] == [str(40), str(0)]
