"""End to end through Ray Data, Ray Train, Ray Tune and MLflow, on a tiny model and data set."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignlab.platform.checkpoint import read_checkpoint
from alignlab.platform.config import load_config
from alignlab.platform.synth import SynthConfig, generate

pytestmark = pytest.mark.slow

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
        "model.embed_dim=16", "model.image.img_size=32", "model.image.patch_size=8", "model.image.embed_dim=32",
        "model.image.depth=1", "model.image.num_heads=2", "data.image_size=32", "data.batch_size=16",
        "data.eval_max_images=16", "data.eval_batch_size=16", "data.preprocess_batch_size=16",
        "data.shuffle_buffer=0", "tracking.log_every=2"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(str(root), SynthConfig(n_train_images=64, n_test_images=16, rows_per_file=32))
    return root


def _overrides(synth, tmp, *extra):
    return [*TINY, f"data.shards={synth}", f"tracking.mlflow_uri=sqlite:///{tmp}/mlflow.db",
            f"tracking.storage_path={tmp}/ray_results", *extra]


def _client(tmp):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")


def test_two_ddp_workers_see_disjoint_data(ray_session, synth, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    from alignlab.models.base import InputSpec
    from alignlab.platform.ingest import build_dataset

    cfg = load_config("dual_encoder_demo", _overrides(synth, tmp_path, "scaling.num_workers=2"))

    def loop(config):
        import torch.distributed as dist

        keys = []
        for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=8):
            keys += batch["caption_key"].tolist()
        with open(os.path.join(config["dir"], f"rank{dist.get_rank()}"), "w") as f:
            f.write("\n".join(map(str, keys)))

    seen = tmp_path / "seen"
    seen.mkdir()
    ds = build_dataset(cfg.data, cfg.objectives, InputSpec(pixels=True), "train", train=True)
    TorchTrainer(loop, train_loop_config={"dir": str(seen)}, scaling_config=ray.train.ScalingConfig(num_workers=2),
                 run_config=ray.train.RunConfig(storage_path=str(tmp_path / "rr")), datasets={"train": ds}).fit()
    seen_by = [set(map(int, (seen / f"rank{r}").read_text().split())) for r in (0, 1)]
    # 128 rows: each worker saw its own half, none twice, together all.
    assert len(seen_by[0]) == len(seen_by[1]) == 64
    assert not seen_by[0] & seen_by[1]


def test_ddp_training_two_workers_logs_to_mlflow(ray_session, synth, tmp_path):
    from alignlab.platform.train import train

    cfg = load_config("dual_encoder_demo", _overrides(synth, tmp_path, "scaling.num_workers=2", "optim.max_steps=6",
                                                        "tracking.checkpoint_every=3", "tracking.run_name=ddp"))
    out = train(cfg)
    assert out["metrics"]["train/step"] == 6.0
    assert out["checkpoint"] and Path(out["checkpoint"], "model.safetensors").exists()
    assert read_checkpoint(out["checkpoint"]).step == 6
    run = _client(tmp_path).get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["scaling.num_workers"] == "2" and "git_commit" in run.data.params
    assert "version.torch" in run.data.params
    for key in ("loss/itc", "loss/total", "lr", "throughput/samples_per_s", "time/data_wait_fraction",
                "data/skipped_total", "eval/uni_rsum"):
        assert key in run.data.metrics, key
    history = _client(tmp_path).get_metric_history(run.info.run_id, "loss/itc")
    assert [m.step for m in history] == [2, 4, 6]

    # `alignlab eval` on the run's checkpoint, by path and by run id, reproduces its final
    # evaluation exactly and logs it under eval/<split>/ in the same run.
    from alignlab.platform.evaluate import evaluate_checkpoint

    for source in (out["checkpoint"], out["mlflow_run_id"]):
        again = evaluate_checkpoint(source, str(synth), "test", mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db")
        assert again.pop("mlflow_run_id") == run.info.run_id
        assert again == {k.removeprefix("eval/"): v for k, v in run.data.metrics.items() if k.startswith("eval/")}
    logged = _client(tmp_path).get_run(run.info.run_id).data.metrics
    assert logged["eval/test/uni_rsum"] == run.data.metrics["eval/uni_rsum"]


def test_killed_run_resumes_from_its_last_checkpoint(ray_session, synth, tmp_path):
    """SIGKILL the driver mid-run, run the same command again: training continues from the
    checkpointed step, into the same MLflow run, and finishes at max_steps."""
    args = [sys.executable, "-m", "alignlab.platform.cli", "train", "dual_encoder_demo",
            *_overrides(synth, tmp_path, "optim.max_steps=40", "tracking.checkpoint_every=4", "tracking.run_name=killme")]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    run_dir = tmp_path / "ray_results" / "killme"
    deadline = time.time() + 240
    # A checkpoint counts once Ray Train has registered it in the run's snapshot.
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    while time.time() < deadline and not snapshot.exists():
        assert proc.poll() is None, "the run ended before it was killed"
        time.sleep(0.5)
    assert snapshot.exists(), "no checkpoint was registered"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # let Ray reap the driver's actors

    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    client = _client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("alignlab-demo").experiment_id],
                              filter_string="tags.`alignlab.run_key` = 'killme'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    resumed = [m.value for m in client.get_metric_history(runs[0].info.run_id, "train/resumed_from_step")]
    assert len(resumed) == 1 and resumed[0] > 0 and resumed[0] % 4 == 0
    # Every logged step exactly once, none lost across the kill: metrics reach MLflow only once a
    # checkpoint covers their step, and the resumed run logs the steps after it afresh.
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss/itc"))
    assert steps == list(range(2, 41, 2))


def test_two_trial_sweep_has_one_parent_and_two_children(ray_session, synth, tmp_path):
    from alignlab.platform.report import publish_comparison
    from alignlab.platform.sweep import run_sweep

    cfg = load_config("dual_encoder_demo", _overrides(synth, tmp_path, "optim.max_steps=4",
                                                        "tracking.checkpoint_every=100"))
    result = run_sweep(cfg, {"model.image.kind": ["vit", "regions"]}, "sweep-test")
    assert len(result.trials) == 2 and not any(t.error for t in result.trials)
    assert {t.overrides["model.image.kind"] for t in result.trials} == {"vit", "regions"}
    client = _client(tmp_path)
    exp = client.get_experiment_by_name("alignlab-demo").experiment_id
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.params["model.image.kind"] for c in children} == {"vit", "regions"}
    assert all("eval/uni_rsum" in c.data.metrics for c in children)
    md = publish_comparison(result, ["model.image.kind"], ["eval/uni_rsum"], "test", str(tmp_path / "report"))
    assert "| vit | 1 |" in md and "| regions | 1 |" in md
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"comparison.md", "comparison.csv", "comparison.png"} <= artifacts

    # Running the same sweep again restores it (Tuner.restore): nothing re-runs, nothing is added.
    again = run_sweep(cfg, {"model.image.kind": ["vit", "regions"]}, "sweep-test")
    assert again.parent_run_id == result.parent_run_id
    assert {t.mlflow_run_id for t in again.trials} == {c.info.run_id for c in children}
    assert len(client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")) == 2
