"""Fault injection (issue #17): each probe of experiments/fault_table.py, which prints the same
probes as a table, is one test here. A probe checks the good outcome itself and raises when it
sees another; the kills run on the session's Ray cluster, the other probes need no Ray."""
from __future__ import annotations

import pytest

from conftest import experiment_script

pytestmark = pytest.mark.slow


fault_table = experiment_script("fault_table")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return fault_table.Lab(tmp_path_factory.mktemp("faults"))


@pytest.mark.parametrize("probe", fault_table.PROBES, ids=[p.key for p in fault_table.PROBES])
def test_probe(probe, lab, request):
    if probe.needs_ray:
        request.getfixturevalue("ray_session")
    found = probe.run(lab)
    assert found.outcome and found.message


def test_every_probe_of_the_issue_is_in_the_table():
    keys = {p.key for p in fault_table.PROBES}
    assert {"crafted_checkpoint", "crafted_dvae", "cluster_doors", "split_typo", "shards_typo", "non_finite_rows",
            "non_finite_loss", "latin1_caption", "truncated_parquet", "garbage_checkpoint", "optim.lr=.nan",
            "optim.lr=-1", "data.batch_size=0", "tracking.checkpoint_every=0", "optim.learning_rate=1e-4",
            "resume_in_process", "counted_per_row", "rerun_finished", "working_dir_jobs", "build_line_without_tab",
            "build_latin1_line", "build_manifest", "kill_driver", "kill_data_actor_then_worker"} == keys
