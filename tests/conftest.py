"""Shared fixtures: one local Ray instance per test session (starting Ray costs seconds), the
location of the real data beside the project, and a tiny saved BERT for the loading code."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("ALIGNLAB_SHARED_DATA", REPO.parent / "shared" / "data"))


def experiment_script(name: str):
    """``experiments/<name>.py`` imported as the module ``name`` (the scripts are no package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def shared_data(sub: str) -> Path:
    """A folder of ../shared/data, or skip the test saying what is missing."""
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"real data {path} is absent (set ALIGNLAB_SHARED_DATA to its folder)")
    return path


def command_lines() -> dict[int, str]:
    """Every process's command line by pid, its arguments joined by spaces (read from /proc; the
    project does not depend on psutil). Ray names its workers "ray::<actor or task>" there."""
    lines = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            line = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        lines[int(proc.name)] = line.replace(b"\0", b" ").decode(errors="replace").strip()
    return lines


@pytest.fixture(scope="session", autouse=True)
def alignlab_home(tmp_path_factory):
    """Runs that name no store write under $ALIGNLAB_HOME: a temporary one, never the user's."""
    home = tmp_path_factory.mktemp("alignlab_home")
    old = os.environ.get("ALIGNLAB_HOME")
    os.environ["ALIGNLAB_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("ALIGNLAB_HOME", None)
    else:
        os.environ["ALIGNLAB_HOME"] = old


# Ray's settings for the tests' tiny runs, in every cluster a test starts: Ray Train's controller
# polls its workers every 0.2 s, not 2 (it takes one report per worker a poll); a Parquet read
# starts one footer-reading actor, not 32 (10-20 s on 2 cores; 1 s with one);
# and no PreemptionWatcher process per run (it polls for nodes a cloud is taking back: one
# machine, or the fake cluster of test_scale_out, has none; 2.3 CPU-s of a tiny run's 35 s).
RAY_TEST_PACING = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
                   "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster for the whole session, with the slots the driver's own local cluster
    would declare for two train workers of two threads (the demo presets' trainers take both
    cores) and their data stages, a compositional split's included."""
    import ray

    from alignlab.platform.config import load_config
    from alignlab.platform.train import local_cluster_cpus

    if not ray.is_initialized():
        # Ray's defaults for big jobs pace the tiny test runs (RAY_TEST_PACING). Drivers started
        # from here (subprocesses too) and every process of the cluster inherit these.
        for key, value in RAY_TEST_PACING.items():
            os.environ.setdefault(key, value)
        cfg = load_config(None, ["scaling.num_workers=2", "scaling.cpus_per_worker=2",
                                 "data.compositional_split=compositional"])
        ray.init(num_cpus=local_cluster_cpus(cfg),
                 include_dashboard=False, configure_logging=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


# The MVPTR demo shrunk to what a CPU test trains in seconds: the same model code, tiny widths.
MVPTR_SMALL = ["data.batch_size=16", "data.eval_batch_size=16", "data.eval_max_images=16",
               "data.preprocess_batch_size=16", "data.shuffle_buffer=0", "model.hidden_size=32", "model.num_heads=2",
               "model.intermediate_size=64", "model.mvptr.text_layers=1", "model.mvptr.visual_layers=1",
               "model.mvptr.fusion_layers=1", "eval.k_captions=4", "eval.k_images=2", "tracking.log_every=2"]


@pytest.fixture(scope="session")
def mvptr_pretrained(ray_session, tmp_path_factory):
    """One 4-step MVPTR pre-training run through the platform (Ray Data, Ray Train, MLflow) on a
    small synthetic set, with a RefCOCO task set built on its vocabularies: the run that
    MVPTR's end-to-end test reads and the fine-tuning tests start from. Each Ray Train run costs
    30-50 s of process start-up on 2 cores, so the suite trains this one once.
    Returns (root, store, train's result)."""
    from alignlab.platform.config import load_config
    from alignlab.platform.synth import SynthConfig, generate, generate_task
    from alignlab.platform.train import train

    root = tmp_path_factory.mktemp("mvptr_pretrained")
    small = SynthConfig(n_train_images=48, n_test_images=16, rows_per_file=64)
    generate(str(root / "synth"), small)
    generate_task(str(root / "tasks" / "refcoco"), "refcoco", small, vocab_from=str(root / "synth"))
    store = f"sqlite:///{root}/mlflow.db"
    cfg = load_config("mvptr_demo", [f"data.shards={root / 'synth'}", *MVPTR_SMALL, "optim.max_steps=4",
                                     f"tracking.mlflow_uri={store}", f"tracking.storage_path={root}/ray_results",
                                     "tracking.run_name=mvptr-e2e", "data.compositional_split="])
    return root, store, train(cfg)


@pytest.fixture
def s3_root():
    """An S3 bucket on a moto server bound to loopback; returns a pyarrow-style URI prefix
    (credentials and endpoint in the URI) for the bucket ``shards``."""
    import socket

    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="test",
                     aws_secret_access_key="test", region_name="us-east-1").create_bucket(Bucket="shards")
        yield lambda key: f"s3://test:test@shards/{key}?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    finally:
        server.stop()


def save_tiny_bert(path, layers: int = 2, vocab_size: int = 30, hidden: int = 16, heads: int = 2,
                   intermediate: int = 32):
    """A randomly initialised Hugging Face BERT saved at ``path`` (seed 0), for the loading code's
    tests; returns the model, in eval mode."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=heads, intermediate_size=intermediate,
                                 max_position_embeddings=64)).eval()
    model.save_pretrained(path)
    return model
