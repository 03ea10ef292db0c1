"""What the Ray cluster can become, and whether every node of it reaches the run's storage.

A sweep's concurrency must come from the cluster's *largest* size, not from what it holds when the
sweep starts: ``ray up cluster.yaml`` starts a head that declares no CPU and no GPU and no worker
node, so sizing by ``ray.cluster_resources()`` at start runs one trial at a time and never asks
the autoscaler for the other nodes. Pending trials are what make the autoscaler add nodes (each
trial's Ray Train controller requests its workers' placement group, and Ray Train retries a group
that does not fit until it does), and idle nodes go back after the YAML's
``idle_timeout_minutes``.

The autoscaler's configuration is the YAML it runs: ``ray up`` writes it to
``~/ray_bootstrap_config.yaml`` on the head, where job drivers run (Ray Tune reads the same file
to tell an autoscaling cluster), and ``scaling.autoscaling_config`` names another.
"""
from __future__ import annotations

import logging
import math
import os
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import yaml

logger = logging.getLogger(__name__)

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
# Providers whose nodes are processes on the machine that runs the driver: a local path is shared.
SAME_HOST_PROVIDERS = ("fake_multinode",)
# File systems a path on which other machines can mount too (from /proc/mounts' type column).
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "glusterfs", "cephfs", "ceph",
                       "9p", "fuse.s3fs", "fuse.gcsfuse", "fuse.mountpoint-s3", "fuse.juicefs", "fuse.sshfs",
                       "fuse.glusterfs", "fuse.cephfs", "efs", "wekafs", "alluxio")


class StorageNotShared(RuntimeError):
    """A local storage path that some node of the cluster cannot reach."""


def autoscaling_config(configured: str = "") -> dict[str, Any] | None:
    """The autoscaler's cluster YAML: ``configured``, else ``~/ray_bootstrap_config.yaml`` where it
    exists, else None (a fixed cluster, or a local one). A configured file that is missing or not a
    cluster YAML fails with the path in the message."""
    path = Path(configured or BOOTSTRAP_CONFIG).expanduser()
    if not path.exists():
        if configured:
            raise FileNotFoundError(f"scaling.autoscaling_config = {configured!r}: no such file")
        return None
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or not isinstance(config.get("available_node_types"), dict):
        raise ValueError(f"{path} is not an autoscaler cluster YAML: it has no 'available_node_types' mapping")
    return config


def largest_cluster(config: dict[str, Any]) -> dict[str, float]:
    """The resources of the cluster at its largest under ``config``: the head's plus each worker
    type's ``resources`` times its ``max_workers``, with the cluster-wide ``max_workers`` spent on
    the types with the most GPUs (then CPUs) first, as a sweep of GPU trials would have them.
    A worker type without declared ``resources`` (the autoscaler then reads them from the cloud's
    instance type) cannot be counted: it fails with the type's name."""
    types = config["available_node_types"]
    head = config.get("head_node_type")
    total: Counter = Counter(types.get(head, {}).get("resources") or {})
    workers = {name: t for name, t in types.items() if name != head}
    for name, t in workers.items():
        if not isinstance(t.get("resources"), dict):
            raise ValueError(f"node type {name!r} declares no 'resources': state its CPU and GPU counts in the "
                             f"cluster YAML, or pass the sweep's concurrency with --max-concurrent-trials")
    budget = config.get("max_workers", math.inf)
    for name, t in sorted(workers.items(), key=lambda kv: (-kv[1]["resources"].get("GPU", 0),
                                                          -kv[1]["resources"].get("CPU", 0), kv[0])):
        n = min(t.get("max_workers", budget), budget)
        budget -= n
        for key, value in t["resources"].items():
            total[key] += n * value
    return dict(total)


def trials_that_fit(resources: dict[str, float], cpus_per_trial: float, gpus_per_trial: float) -> int:
    """How many trials ``resources`` hold at once, by CPU and (for GPU trials) by GPU; at least 1,
    so a cluster that starts empty still runs."""
    fits = resources.get("CPU", 0) // cpus_per_trial
    if gpus_per_trial:
        fits = min(fits, resources.get("GPU", 0) // gpus_per_trial)
    return max(1, int(fits))


class _Identity:
    def __call__(self, batch):
        return batch


def pin_data_bookkeeping_here() -> None:
    """Puts Ray Data's detached bookkeeping actors (its stats actor, autoscaling coordinator and
    actor-location tracker) on this process's node.

    Ray Data pins them, for the cluster's lifetime, to the node of the first process that runs a
    dataset. In a sweep that is a trial on a GPU node, which then never goes idle and is never
    given back (seen on the fake multi-node cluster of tests/test_scale_out.py). One zero-CPU
    dataset run from the sweep's driver, on the head, creates them there first."""
    import ray.data

    ray.data.from_items([{"x": 0}]).map_batches(_Identity, concurrency=1, num_cpus=0).materialize()


# --------------------------------------------------------------------------------------------
# Storage every node reaches
# --------------------------------------------------------------------------------------------


def local_path(location: str) -> str | None:
    """The local file-system path behind a storage location or MLflow URI (``sqlite:///…``,
    ``file:…`` or a bare path), or None where it is a service or object storage (``s3://``,
    ``http://``, ``databricks`` …), which every node reaches by itself."""
    if location.startswith("sqlite:///"):
        return os.path.dirname(location[len("sqlite:///"):]) or "."
    if location.startswith("file://"):
        return location[len("file://"):]
    if location.startswith("file:"):
        return location[len("file:"):]
    if "://" in location or location in ("databricks", "databricks-uc"):
        return None
    return location


def filesystem_type(path: str, mounts: str | None = None) -> str:
    """The type of the file system holding ``path``: the longest mount point above it in
    ``/proc/mounts`` (``mounts`` for tests)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return "unknown"
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def check_shared_storage(locations: dict[str, str], autoscaler: dict[str, Any] | None,
                         nodes_seeing: Callable[[list[str]], dict[str, list[bool]]],
                         mounts: str | None = None) -> None:
    """Fails at start-up, naming the key and the path, where a run's local storage (checkpoints,
    Tune state, the MLflow store) is out of reach of a node that may run its trials, instead of at
    the first checkpoint a worker writes there.

    ``locations`` maps config keys to their resolved locations. For the nodes alive now, each
    local path is checked on each node by ``nodes_seeing`` (a marker file written here must be
    visible there). For the nodes an autoscaler may add later on other machines, a local path
    must be on a network file system (NFS, Lustre, a FUSE mount of object storage, …);
    object storage and tracking servers pass as they are."""
    paths = {key: p for key, loc in locations.items() if (p := local_path(loc)) is not None}
    if not paths:
        return
    markers = {}
    for key, path in paths.items():
        Path(path).mkdir(parents=True, exist_ok=True)
        marker = Path(path) / f".alignlab-shared-{uuid.uuid4().hex}"
        marker.write_text("written by the sweep driver to check every node sees this folder\n")
        markers[key] = str(marker)
    try:
        seen = nodes_seeing(list(markers.values()))
    finally:
        for marker in markers.values():
            Path(marker).unlink(missing_ok=True)
    for node, flags in seen.items():
        for (key, path), ok in zip(paths.items(), flags):
            if not ok:
                raise StorageNotShared(
                    f"{key} = {locations[key]!r} is a local path that node {node} cannot see: put it on storage "
                    f"every node reaches (s3://… for tracking.storage_path, an MLflow server for "
                    f"tracking.mlflow_uri, or a shared mount)")
    if not autoscaler or autoscaler.get("provider", {}).get("type") in SAME_HOST_PROVIDERS:
        return
    workers = [name for name, t in autoscaler["available_node_types"].items()
               if name != autoscaler.get("head_node_type") and t.get("max_workers", 0) > 0]
    if not workers:
        return
    for key, path in paths.items():
        kind = filesystem_type(path, mounts)
        if kind not in NETWORK_FILESYSTEMS:
            raise StorageNotShared(
                f"{key} = {locations[key]!r} is on this machine's local disk ({kind}), but the autoscaler may add "
                f"nodes of type {', '.join(sorted(workers))} on other machines, which cannot see it: use s3://… for "
                f"tracking.storage_path and an MLflow server for tracking.mlflow_uri (as cluster.yaml sets up), or a "
                f"shared mount")


def ray_nodes_seeing(paths: list[str]) -> dict[str, list[bool]]:
    """For each alive Ray node, whether each of ``paths`` exists there (a task pinned to the node)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def exists(ps: list[str]) -> list[bool]:
        return [os.path.exists(p) for p in ps]

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = {f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})":
            exists.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(paths)
            for n in nodes}
    seen = {}
    for node, ref in refs.items():
        try:
            seen[node] = ray.get(ref, timeout=120)
        except (ray.exceptions.RayError, TimeoutError) as e:  # the autoscaler took the node away meanwhile
            logger.info("storage check skipped node %s, which went away: %s", node, e)
    return seen
