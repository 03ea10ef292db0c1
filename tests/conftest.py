"""Shared fixtures: one local Ray instance per test session (starting Ray costs seconds), and the
location of the real data beside the project."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("ALIGNLAB_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_data(sub: str) -> Path:
    """A folder of ../shared/data, or skip the test saying what is missing."""
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"real data {path} is absent (set ALIGNLAB_SHARED_DATA to its folder)")
    return path


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster for the whole session. Four logical CPUs on a 2-core machine leave room
    for two train workers beside the Ray Data CPU stage."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, configure_logging=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()
