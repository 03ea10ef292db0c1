"""SIMLA end to end through the platform: Ray Data (pixels, MLM and block-wise MIM masks on the CPU
stage), Ray Train, zero-shot retrieval during pre-training, MLflow."""
import pytest

from alignlab.platform.config import load_config
from alignlab.platform.synth import SynthConfig, generate

pytestmark = pytest.mark.slow

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
        "model.embed_dim=16", "model.image.img_size=32", "model.image.patch_size=8", "model.image.embed_dim=32",
        "model.image.depth=1", "model.image.num_heads=2", "data.image_size=32", "data.batch_size=16",
        "data.eval_max_images=16", "data.eval_batch_size=16", "data.preprocess_batch_size=16",
        "data.shuffle_buffer=0", "model.simla.queue_size=64", "model.simla.codebook_size=32",
        "tracking.log_every=2", "tracking.eval_every=3", "optim.max_steps=6", "tracking.checkpoint_every=100"]


def test_simla_demo_trains_with_two_ddp_workers_and_logs_every_objective(ray_session, tmp_path):
    """Two DDP workers: global contrastive columns, queues of the global batch, hard negatives
    fetched from the other worker (gather_rows), the momentum EMA on every rank."""
    from mlflow.tracking import MlflowClient

    from alignlab.platform.train import train

    generate(str(tmp_path / "synth"), SynthConfig(n_train_images=64, n_test_images=16, rows_per_file=32))
    cfg = load_config("simla_demo", [*TINY, f"data.shards={tmp_path / 'synth'}",
                                     f"tracking.mlflow_uri=sqlite:///{tmp_path}/mlflow.db",
                                     f"tracking.storage_path={tmp_path}/ray_results", "scaling.num_workers=2"])
    out = train(cfg)
    assert out["metrics"]["train/step"] == 6.0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(out["mlflow_run_id"])
    metrics = run.data.metrics
    for name in ("itc", "itm", "mlm", "mim", "psl"):
        assert metrics[f"loss/{name}"] > 0, name
    # Both retrieval forms: uni-modal and ITM re-ranked, and the pairs re-scored.
    for key in ("eval/uni_rsum", "eval/rsum", "eval/itm_pairs", "eval/uni_i2t_r1", "eval/t2i_r1"):
        assert key in metrics, key
    assert 0 <= metrics["eval/rsum"] <= 600
    # Zero-shot retrieval during pre-training (eval_every=3), the data-efficiency curve.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/uni_rsum")] == [3, 6]
    # α ramps over the first epoch (128 rows / 16 = 8 steps): at the step-6 window it is below 0.4.
    alpha = client.get_metric_history(run.info.run_id, "model/alpha")
    assert 0 < alpha[-1].value < 0.4
    assert run.data.params["model.simla.visual_tokenizer"] == "random_projection"
    assert run.data.params["scaling.num_workers"] == "2"
