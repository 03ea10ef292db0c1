"""The repository layout must never shadow the stdlib ``platform`` module."""
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_import_platform_from_repo_root_is_stdlib():
    out = subprocess.run([sys.executable, "-c", "import platform; print(platform.system()); print(platform.__file__)"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "Linux" or out[0] in ("Darwin", "Windows")
    assert Path(out[1]).resolve().parent == Path(sysconfig.get_paths()["stdlib"]).resolve()


def test_namespace_folders_have_no_init():
    for folder in ("platform", "models"):
        assert not (REPO / folder / "__init__.py").exists(), f"{folder}/__init__.py would shadow or clash"
    assert not (REPO / "alignlab").exists()


def test_alignlab_imports_from_repo_root_with_torch_and_ray():
    # torch, ray and mlflow import the stdlib platform module; with the repo root first on the
    # path (as in a Ray worker of `ray job submit --working-dir .`) they must still work.
    code = ("import sys; sys.path.insert(0, '.'); import torch, ray, mlflow; "
            "import alignlab.platform.config, alignlab.models.blocks; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
