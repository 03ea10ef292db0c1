"""Sweep concurrency from what the cluster can become, and the start-up check that every node
reaches the run's storage (platform/cluster.py)."""
from pathlib import Path

import pytest
import yaml

from alignlab.platform import cluster
from alignlab.platform.config import ConfigError, load_config
from alignlab.platform.experiment import parse_args
from alignlab.platform.sweep import trial_concurrency

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_cluster_yaml_grows_to_four_gpu_nodes_from_a_head_with_nothing():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    # head: 0 CPU / 0 GPU; gpu_worker: 48 CPU, 4 GPU, up to 4 nodes.
    assert cluster.largest_cluster(config) == {"CPU": 192, "GPU": 16}


def test_trial_concurrency_comes_from_the_autoscaler_maximum_not_from_the_empty_cluster_at_start():
    path = str(ROOT / "cluster.yaml")
    paper = load_config("mvptr_paper", [f"scaling.autoscaling_config={path}"])
    assert paper.scaling.use_gpu and paper.scaling.num_workers * paper.scaling.gpus_per_worker == 8
    assert trial_concurrency(paper) == 2  # 16 GPUs at most, 8 per trial
    one_gpu = load_config("mvptr_paper", [f"scaling.autoscaling_config={path}", "scaling.num_workers=1"])
    assert trial_concurrency(one_gpu) == 16
    capped = load_config("mvptr_paper", [f"scaling.autoscaling_config={path}", "scaling.max_concurrent_trials=3"])
    assert trial_concurrency(capped) == 3


def test_the_cluster_wide_max_workers_goes_to_the_gpu_types_first():
    config = {"max_workers": 3, "head_node_type": "head",
              "available_node_types": {"head": {"resources": {"CPU": 2}, "max_workers": 0},
                                       "cpu": {"resources": {"CPU": 8}, "max_workers": 4},
                                       "gpu": {"resources": {"CPU": 4, "GPU": 1}, "max_workers": 2}}}
    assert cluster.largest_cluster(config) == {"CPU": 2 + 2 * 4 + 1 * 8, "GPU": 2}
    assert cluster.trials_that_fit({"CPU": 18, "GPU": 2}, cpus_per_trial=6, gpus_per_trial=1) == 2
    assert cluster.trials_that_fit({"CPU": 18, "GPU": 2}, cpus_per_trial=6, gpus_per_trial=0) == 3
    assert cluster.trials_that_fit({"CPU": 0, "GPU": 0}, cpus_per_trial=6, gpus_per_trial=1) == 1


def test_a_node_type_without_declared_resources_is_named():
    config = {"head_node_type": "head", "available_node_types": {"head": {"resources": {}},
                                                                 "g5": {"node_config": {}, "max_workers": 2}}}
    with pytest.raises(ValueError, match="'g5' declares no 'resources'.*--max-concurrent-trials"):
        cluster.largest_cluster(config)


def test_a_missing_or_malformed_autoscaling_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="scaling.autoscaling_config = '/nowhere.yaml'"):
        cluster.autoscaling_config("/nowhere.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_name: x\n")
    with pytest.raises(ValueError, match=f"{bad} is not an autoscaler cluster YAML"):
        cluster.autoscaling_config(str(bad))


def test_max_concurrent_trials_flag_and_placement_strategy_choices():
    args = parse_args("", "mvptr_demo", ["table4"], ["--max-concurrent-trials", "2", "optim.lr=1e-3"])
    assert args.overrides == ["optim.lr=1e-3", "scaling.max_concurrent_trials=2"]
    with pytest.raises(ConfigError, match="'STRICT_SPREAD'"):
        load_config("mvptr_demo", ["scaling.placement_strategy=spread"])
    with pytest.raises(ConfigError, match="scaling.max_concurrent_trials"):
        load_config("mvptr_demo", ["scaling.max_concurrent_trials=-1"])


def test_local_paths_behind_storage_locations_and_mlflow_uris():
    assert cluster.local_path("sqlite:////home/u/.alignlab/mlflow.db") == "/home/u/.alignlab"
    assert cluster.local_path("file:///mnt/mlruns") == "/mnt/mlruns"
    assert cluster.local_path("/data/ray_results") == "/data/ray_results"
    for remote in ("s3://bucket/ray", "http://10.0.0.1:5000", "gs://b/x", "databricks"):
        assert cluster.local_path(remote) is None


MOUNTS = """overlay / overlay rw 0 0
10.0.0.5:/export /mnt/shared nfs4 rw 0 0
/dev/nvme0n1p1 /home ext4 rw 0 0
"""


def test_filesystem_type_takes_the_longest_mount_point_above_the_path():
    assert cluster.filesystem_type("/mnt/shared/ray_results", MOUNTS) == "nfs4"
    assert cluster.filesystem_type("/home/u/.alignlab", MOUNTS) == "ext4"
    assert cluster.filesystem_type("/tmp/x", MOUNTS) == "overlay"
    assert cluster.filesystem_type("/mnt/sharedother", MOUNTS) == "overlay"


def _aws(provider="aws"):
    return {"provider": {"type": provider}, "head_node_type": "head",
            "available_node_types": {"head": {"resources": {"CPU": 0}, "max_workers": 0},
                                     "gpu_worker": {"resources": {"CPU": 48, "GPU": 4}, "max_workers": 4}}}


def test_a_node_that_cannot_see_a_local_storage_path_fails_the_start_naming_node_and_key(tmp_path):
    def seeing(paths):
        assert all(Path(p).exists() for p in paths)  # the markers exist while the nodes look
        return {"10.0.0.1 (head)": [True, True], "10.0.0.2 (abcd1234)": [True, False]}

    locations = {"tracking.storage_path": str(tmp_path / "ray"), "tracking.mlflow_uri": f"sqlite:///{tmp_path}/m.db"}
    with pytest.raises(cluster.StorageNotShared, match=r"tracking.mlflow_uri = .* node 10.0.0.2 \(abcd1234\) cannot"):
        cluster.check_shared_storage(locations, None, seeing)
    assert not list(tmp_path.rglob(".alignlab-shared-*"))  # markers removed


def test_nodes_an_autoscaler_may_add_elsewhere_need_shared_or_object_storage(tmp_path):
    everyone = lambda paths: {"head": [True] * len(paths)}  # noqa: E731
    local = {"tracking.storage_path": str(tmp_path), "tracking.mlflow_uri": "http://10.0.0.1:5000"}
    mounts = f"/dev/sda1 / ext4 rw 0 0\n10.0.0.5:/x {tmp_path} nfs4 rw 0 0\n"
    with pytest.raises(cluster.StorageNotShared, match=r"tracking.storage_path = .*local disk \(ext4\).*gpu_worker"):
        cluster.check_shared_storage(local, _aws(), everyone, mounts="/dev/sda1 / ext4 rw 0 0\n")
    cluster.check_shared_storage(local, _aws(), everyone, mounts=mounts)  # an NFS mount is shared
    cluster.check_shared_storage(local, _aws("fake_multinode"), everyone, mounts="/dev/sda1 / ext4 rw 0 0\n")
    cluster.check_shared_storage(local, None, everyone, mounts="/dev/sda1 / ext4 rw 0 0\n")  # no autoscaler

    def never(paths):
        raise AssertionError("object storage and a tracking server need no node check")

    cluster.check_shared_storage({"tracking.storage_path": "s3://b/ray", "tracking.mlflow_uri": "http://h:5000"},
                                 _aws(), never)
