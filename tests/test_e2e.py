"""End to end through Ray Data, Ray Train, Ray Tune and MLflow, on a tiny model and data set."""
import os
import signal
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


def _named(title: str) -> set[int]:
    """The processes of Ray actor ``title``, idle ("ray::TrainController") or in a method
    ("ray::TrainController.run")."""
    from conftest import command_lines

    return {pid for pid, line in command_lines().items() if line.split(".")[0] == title}


def _gone(title: str, timeout_s: float, besides: set[int]) -> bool:
    """Whether, within ``timeout_s``, no process named ``title`` is left but those in ``besides``
    (an earlier test's: one that ran a TorchTrainer itself keeps Ray's handler, and so its own
    controller, until a later run replaces it)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if not _named(title) - besides:
            return True
        time.sleep(0.5)
    return False


def _client(tmp):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")


def test_two_ddp_workers_see_disjoint_data(ray_session, synth, tmp_path):
    """A training stream of two passes split over two workers: within each pass the workers'
    rows are disjoint and together every row once, and both read as many batches (equal
    streaming_split: DDP steps in lockstep)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from alignlab.models.base import InputSpec
    from alignlab.platform.ingest import PASS_COLUMN, build_dataset

    cfg = load_config("dual_encoder_demo", _overrides(synth, tmp_path, "scaling.num_workers=2"))

    def loop(config):
        import torch.distributed as dist

        rows, batches = [], 0
        for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=8):
            rows += zip(batch[PASS_COLUMN].tolist(), batch["caption_key"].tolist())
            batches += 1
        with open(os.path.join(config["dir"], f"rank{dist.get_rank()}"), "w") as f:
            f.write("\n".join([str(batches)] + [f"{p} {k}" for p, k in rows]))

    seen = tmp_path / "seen"
    seen.mkdir()
    ds = build_dataset(cfg.data, cfg.objectives, InputSpec(pixels=True), "train", train=True, passes=2)
    TorchTrainer(loop, train_loop_config={"dir": str(seen)}, scaling_config=ray.train.ScalingConfig(num_workers=2),
                 run_config=ray.train.RunConfig(storage_path=str(tmp_path / "rr")), datasets={"train": ds}).fit()
    batches, rows = zip(*((int(lines[0]), [tuple(map(int, r.split())) for r in lines[1:]])
                          for lines in ((seen / f"rank{r}").read_text().split("\n") for r in (0, 1))))
    assert batches[0] == batches[1] == 2 * 128 // 2 // 8
    for p in (0, 1):
        # 128 rows a pass: none seen twice in the pass, together all.
        keys = [[k for q, k in worker if q == p] for worker in rows]
        assert len(keys[0]) + len(keys[1]) == len(set(keys[0]) | set(keys[1])) == 128, p


def test_ddp_training_two_workers_logs_to_mlflow(ray_session, synth, tmp_path):
    from alignlab.platform.train import train

    # 64 training rows: 4 steps an epoch, so the 6 steps read a stream of two passes. The run
    # evaluates through a Ray Data pipeline (data.eval_in_worker_rows=0), which `alignlab eval`'s
    # in-process read below must reproduce exactly; the other end-to-end runs read theirs in rank 0.
    cfg = load_config("dual_encoder_demo", _overrides(synth, tmp_path, "scaling.num_workers=2", "optim.max_steps=6",
                                                        "tracking.checkpoint_every=3", "tracking.run_name=ddp",
                                                        "tracking.system_metrics_every=1", "data.max_train_rows=64",
                                                        "data.eval_in_worker_rows=0"))
    sigint, controllers = signal.getsignal(signal.SIGINT), _named("ray::TrainController")
    out = train(cfg)
    assert out["metrics"]["train/step"] == 6.0
    assert out["checkpoint"] and Path(out["checkpoint"], "model.safetensors").exists()
    # The run's Ctrl-C handler (Ray Train's, holding its controller) is gone, and so is the controller.
    assert signal.getsignal(signal.SIGINT) is sigint
    assert _gone("ray::TrainController", timeout_s=30, besides=controllers)
    assert read_checkpoint(out["checkpoint"]).step == 6
    run = _client(tmp_path).get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["scaling.num_workers"] == "2" and "git_commit" in run.data.params
    assert "version.torch" in run.data.params
    # The precision the workers computed in, beside the configured one (`auto` resolves per device).
    assert run.data.params["precision.precision"] == "fp32" and run.data.tags["alignlab.precision"] == "fp32"
    for key in ("loss/itc", "loss/total", "lr", "throughput/samples_per_s", "time/data_wait_fraction",
                "time/train_seconds", "data/skipped_total", "eval/uni_rsum"):
        assert key in run.data.metrics, key
    history = _client(tmp_path).get_metric_history(run.info.run_id, "loss/itc")
    assert [m.step for m in history] == [2, 4, 6]
    # Both epochs of the stream reached the runner: their skip counts are logged at steps 0 and 1.
    epochs = _client(tmp_path).get_metric_history(run.info.run_id, "data/epoch_skipped_total")
    assert [m.step for m in epochs] == [0, 1]
    # System metrics from one monitor for the machine (its first worker), not one per worker: each
    # step once, and no second node's keys.
    system = _client(tmp_path).get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert system and len({m.step for m in system}) == len(system)
    assert not [k for k in run.data.metrics if k.startswith("system/node_")]
    datasets = {(d.dataset.name, d.tags[0].value) for d in run.inputs.dataset_inputs}
    assert datasets == {(f"{synth.name}/train", "training"), (f"{synth.name}/test", "evaluation")}

    # `alignlab eval` on the run's checkpoint, by path and by run id, reproduces its final
    # evaluation exactly and logs it under eval/<split>/ in the same run.
    from alignlab.platform.evaluate import evaluate_checkpoint

    for source in (out["checkpoint"], out["mlflow_run_id"]):
        again = evaluate_checkpoint(source, str(synth), "test", mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db")
        assert again.pop("mlflow_run_id") == run.info.run_id
        assert again == {k.removeprefix("eval/"): v for k, v in run.data.metrics.items() if k.startswith("eval/")}
    logged = _client(tmp_path).get_run(run.info.run_id)
    assert logged.data.metrics["eval/test/uni_rsum"] == run.data.metrics["eval/uni_rsum"]
    # The split it scored is the run's evaluation dataset already: the two evaluations added none.
    assert {(d.dataset.name, d.tags[0].value) for d in logged.inputs.dataset_inputs} == datasets


@pytest.fixture(scope="module")
def sweep(ray_session, synth, tmp_path_factory):
    """A two-trial sweep and its comparison, published on its parent run: one store for the
    tests of the sweep and of what the MLflow UI shows of it (system metrics sampled every second,
    so that the short trials log some)."""
    from alignlab.platform.report import publish_comparison
    from alignlab.platform.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("sweep")
    cfg = load_config("dual_encoder_demo", _overrides(synth, tmp, "optim.max_steps=4", "tracking.checkpoint_every=100",
                                                        "tracking.system_metrics_every=1"))
    result = run_sweep(cfg, {"model.image.kind": ["vit", "regions"]}, "sweep-test")
    md = publish_comparison(result, ["model.image.kind"], ["eval/uni_rsum"], "test", str(tmp / "report"))
    return tmp, cfg, result, md


def test_two_trial_sweep_has_one_parent_and_two_children(sweep):
    from alignlab.platform.sweep import run_sweep

    tmp_path, cfg, result, md = sweep
    assert len(result.trials) == 2 and not any(t.error for t in result.trials)
    assert {t.overrides["model.image.kind"] for t in result.trials} == {"vit", "regions"}
    client = _client(tmp_path)
    exp = client.get_experiment_by_name("alignlab-demo").experiment_id
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.params["model.image.kind"] for c in children} == {"vit", "regions"}
    assert all("eval/uni_rsum" in c.data.metrics for c in children)
    assert "| vit | 1 |" in md and "| regions | 1 |" in md
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"comparison.md", "comparison.csv", "comparison.png"} <= artifacts

    # Running the same sweep again restores it (Tuner.restore): nothing re-runs, nothing is added.
    again = run_sweep(cfg, {"model.image.kind": ["vit", "regions"]}, "sweep-test")
    assert again.parent_run_id == result.parent_run_id
    assert {t.mlflow_run_id for t in again.trials} == {c.info.run_id for c in children}
    assert len(client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")) == 2
    # Another config under the same name is another sweep (its own Tune directory and parent run,
    # both named by sweep_key): tests/test_experiment.py checks the key, without a third training.


@pytest.fixture(scope="module")
def mlflow_ui(sweep):
    """The command AlignLab prints to open the UI (`mlflow ui --backend-store-uri ...`), on a free
    loopback port, over the sweep's store; its address once it answers. Stopped after the module."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from alignlab.platform.tracking import ui_command

    tmp = sweep[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, *args = ui_command(f"sqlite:///{tmp}/mlflow.db").split()
    log = open(tmp / "mlflow_ui.log", "wb")
    # One web worker and no job runners (by default 4 workers and 7 Huey consumers, which take a
    # minute to start on 2 cores); its own process group, so that they all stop with it.
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), *args, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"mlflow ui exited: {(tmp / 'mlflow_ui.log').read_text()[-3000:]}"
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "mlflow ui did not answer within 120 s"
                time.sleep(0.5)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def _rest(base: str, endpoint: str, body: dict | None = None) -> dict:
    """A call to the MLflow REST API the UI reads (a POST when ``body`` is given)."""
    import json
    import urllib.request

    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{endpoint}",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_the_mlflow_ui_shows_the_sweep_as_training_runs(sweep, mlflow_ui, synth):
    """What the UI lists, through the REST API it reads: an experiment of the training kind, the
    sweep's parent with its comparison artifacts, and each child with its losses, evaluation,
    system metrics and datasets."""
    import json
    import urllib.request

    from alignlab.platform.shards import describe_split
    from alignlab.platform.tracking import runs_page

    _, _, result, _ = sweep
    experiment = _rest(mlflow_ui, "experiments/get-by-name?experiment_name=alignlab-demo")["experiment"]
    print(f"\nexperiment {experiment['name']} ({experiment['experiment_id']}) tags: {experiment['tags']}")
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]
    runs = _rest(mlflow_ui, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]

    def tags(run):
        return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

    parent = next(r for r in runs if r["info"]["run_id"] == result.parent_run_id)
    children = [r for r in runs if tags(r).get("mlflow.parentRunId") == result.parent_run_id]
    for run in [parent, *children]:
        print(f"run {run['info']['run_name']!r} {run['info']['status']} parent={tags(run).get('mlflow.parentRunId')}")
        print("  metrics:", sorted(m["key"] for m in run["data"].get("metrics", [])))
        for d in run.get("inputs", {}).get("dataset_inputs", []):
            print(f"  dataset {d['dataset']['name']} digest={d['dataset']['digest']} "
                  f"source={d['dataset']['source']} tags={d.get('tags')}")
    assert len(children) == 2 and all(c["info"]["status"] == "FINISHED" for c in children)
    for child in children:
        metrics = {m["key"] for m in child["data"]["metrics"]}
        assert {"loss/itc", "loss/total", "eval/uni_rsum", "eval/rsum"} <= metrics
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= metrics
        history = _rest(mlflow_ui, f"metrics/get-history?run_id={child['info']['run_id']}"
                                   f"&metric_key=system/cpu_utilization_percentage")["metrics"]
        assert history  # the System metrics tab's chart
        datasets = {(d["dataset"]["name"], tuple((t["key"], t["value"]) for t in d["tags"])): d["dataset"]
                    for d in child["inputs"]["dataset_inputs"]}
        assert set(datasets) == {(f"{synth.name}/train", (("mlflow.data.context", "training"),)),
                                 (f"{synth.name}/test", (("mlflow.data.context", "evaluation"),))}
        for (name, _), dataset in datasets.items():
            split = synth / name.split("/")[1]
            assert dataset["digest"] == describe_split(str(split)).digest
            assert (dataset["source_type"], json.loads(dataset["source"])) == ("local", {"uri": str(split)})
            assert "caption" in {c["name"] for c in json.loads(dataset["schema"])["mlflow_colspec"]}
    # Each child's final model, logged as an MLflow model (the export folder as a pyfunc). The
    # store also holds the changed sweep's run (test_two_trial_sweep_has_one_parent_and_two_children).
    models = _rest(mlflow_ui, "logged-models/search", {"experiment_ids": [experiment["experiment_id"]]})["models"]
    print("logged models:", [(m["info"]["name"], m["info"]["source_run_id"], m["info"]["status"]) for m in models])
    child_ids = {c["info"]["run_id"] for c in children}
    assert sorted((m["info"]["name"], m["info"]["source_run_id"], m["info"]["status"]) for m in models
                  if m["info"]["source_run_id"] in child_ids) == \
        sorted(("model", c["info"]["run_id"], "LOGGED_MODEL_READY") for c in children)
    # The parent's row, over its folded trials, shows the data they read.
    assert {(d["dataset"]["name"], d["dataset"]["digest"]) for d in parent["inputs"]["dataset_inputs"]} == \
        {(d["dataset"]["name"], d["dataset"]["digest"]) for c in children for d in c["inputs"]["dataset_inputs"]}
    files = _rest(mlflow_ui, f"artifacts/list?run_id={result.parent_run_id}")["files"]
    print("parent artifacts:", [(f["path"], f.get("file_size")) for f in files])
    assert {"comparison.md", "comparison.csv", "comparison.png"} <= {f["path"] for f in files}
    # The address AlignLab prints beside `mlflow ui`: the runs table in the machine-learning view.
    page = runs_page(mlflow_ui, result.parent_run_id)
    print("runs page:", page)
    assert page == f"{mlflow_ui}/#/experiments/{experiment['experiment_id']}/runs?workflowType=machine_learning"
    with urllib.request.urlopen(page, timeout=60) as response:
        assert "<title>MLflow</title>" in response.read().decode()


def test_the_runs_page_renders_the_sweep_in_a_browser(sweep, mlflow_ui, tmp_path):
    """The runs page at the address AlignLab prints, as a browser renders it, and a screenshot."""
    import shutil
    import subprocess

    from alignlab.platform.tracking import runs_page

    names = ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome")
    browser = next(filter(None, map(shutil.which, names)), None)
    if browser is None:
        pytest.skip(f"no headless Chromium on PATH ({', '.join(names)}) to render the runs page; the REST test "
                    f"checks what it lists")
    page = runs_page(mlflow_ui, sweep[2].parent_run_id)
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000",
             "--virtual-time-budget=30000"]
    dom = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True, timeout=180, check=True).stdout
    # The runs table with the sweep's parent, in the machine-learning view: none of the GenAI
    # view's navigation (its Overview page, its Judges).
    assert "sweep-test" in dom and "Overview" not in dom and "Judges" not in dom
    shot = tmp_path / "runs_page.png"
    subprocess.run([*flags, f"--screenshot={shot}", page], capture_output=True, timeout=180, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print("screenshot of the runs page:", shot)
