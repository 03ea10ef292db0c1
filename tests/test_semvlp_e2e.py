"""SemVLP end to end through the platform on two DDP workers: objects masked on the Ray Data CPU
stage, single/two-stream steps alternating in lock-step on both ranks (the cross-attention unused
in single-stream steps), per-mode losses and the mode logged to MLflow, ITM re-ranked retrieval."""
import math

import pytest

from alignlab.platform.config import load_config
from alignlab.platform.synth import SynthConfig, generate

pytestmark = pytest.mark.slow

STEPS, LOG_EVERY = 8, 2


def test_semvlp_demo_alternates_modes_on_two_workers_and_logs_per_mode_losses(ray_session, tmp_path):
    from mlflow.tracking import MlflowClient

    from alignlab.models.registry import build_model
    from alignlab.models.base import Vocab
    from alignlab.platform.train import train

    generate(str(tmp_path / "synth"), SynthConfig(n_train_images=64, n_test_images=8, rows_per_file=64))
    cfg = load_config("semvlp_demo", [
        f"data.shards={tmp_path / 'synth'}", "data.batch_size=16", "data.eval_batch_size=16",
        "data.eval_max_images=8", "data.preprocess_batch_size=16", "data.shuffle_buffer=0",
        "model.hidden_size=32", "model.num_heads=2", "model.intermediate_size=64", "model.num_layers=2",
        "model.semvlp.cross_layer=1", f"optim.max_steps={STEPS}", f"tracking.log_every={LOG_EVERY}",
        "eval.k_captions=16", "eval.k_images=8", "scaling.num_workers=2",
        f"tracking.mlflow_uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.storage_path={tmp_path}/ray_results",
        "tracking.run_name=semvlp-e2e"])
    out = train(cfg)
    m = out["metrics"]
    assert m["train/step"] == STEPS
    # Every pair of the 8-image gallery is re-scored by the ITM head in both directions.
    assert m["eval/itm_pairs"] == 8 * 16 + 16 * 8
    assert 0.0 <= m["eval/rsum"] <= 600.0

    # The modes the trainer's begin_step drew, recomputed here: the logged window means of
    # model/mode_single must match them (and did on both ranks, or DDP would have hung).
    probe = build_model(cfg.model, cfg.objectives, Vocab(size=8, tags=("x",)))
    modes = []
    for step in range(STEPS):
        probe.begin_step(step, 1)
        modes.append(probe.mode)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    history = {h.step: h.value for h in client.get_metric_history(out["mlflow_run_id"], "model/mode_single")}
    for step in range(LOG_EVERY, STEPS, LOG_EVERY):
        window = modes[step - LOG_EVERY:step]
        assert history[step] == pytest.approx(window.count("single") / LOG_EVERY), step
    assert {"single", "two"} <= set(modes)
    logged = client.get_run(out["mlflow_run_id"]).data.metrics
    for mode in ("single", "two"):
        for task in ("mlm", "roi_regression", "object_label", "itm"):
            assert math.isfinite(logged[f"loss/{task}_{mode}"]), (task, mode)
