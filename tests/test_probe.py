"""experiments/probe.py: the training rows are a seeded sample of the prepared split, each row read
once; the probe trains exactly --steps steps and scores the first --eval-images images (and the
compositional split where the preset has one)."""
from __future__ import annotations

import json

import pytest
import torch

from alignlab.platform.config import load_config
from alignlab.platform.synth import SynthConfig, generate
from alignlab.platform.train import prepare
from conftest import experiment_script


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe") / "synth"
    generate(str(root), SynthConfig(n_train_images=40, n_test_images=12, min_concept_count=1))
    return root


def rows(synth, steps: int, seed: int, batch: int = 8):
    cfg = load_config("mvptr_demo", [f"data.shards={synth}", f"data.batch_size={batch}"])
    spec = prepare(cfg).spec.input_spec(cfg.model, cfg.objectives)
    return experiment_script("probe").training_rows(cfg, spec, steps, seed)


def test_training_rows_are_a_seeded_sample_read_once(synth):
    a, again, other = rows(synth, 5, seed=0), rows(synth, 5, seed=0), rows(synth, 5, seed=1)
    assert len(a) == 5 and all(len(b["caption_key"]) == 8 for b in a)
    keys = torch.cat([b["caption_key"] for b in a])
    assert len(set(keys.tolist())) == 40  # no row twice
    assert torch.equal(keys, torch.cat([b["caption_key"] for b in again]))  # the same rows, same order
    assert not torch.equal(keys, torch.cat([b["caption_key"] for b in other]))
    # masking seeded too: two probes with one seed see the same masked inputs
    assert torch.equal(torch.cat([b["mlm_input_ids"] for b in a]), torch.cat([b["mlm_input_ids"] for b in again]))


def test_more_rows_than_the_split_holds_is_refused_naming_the_split(synth):
    with pytest.raises(SystemExit, match="has 80"):  # 40 images x 2 captions
        rows(synth, 11, seed=0)


def test_probe_trains_its_steps_and_scores_the_first_images(synth, tmp_path):
    out = tmp_path / "probes.jsonl"
    result = experiment_script("probe").main(
        ["mvptr_demo", f"data.shards={synth}", "data.batch_size=8", "--steps", "3", "--eval-images", "6",
         "--out", str(out)])
    assert result["steps"] == 3  # the runner's own count
    assert result["overrides"] == [f"data.shards={synth}", "data.batch_size=8"]
    assert result["eval/eval_images"] == 6 and result["eval/eval_captions"] == 12
    assert 0 <= result["eval/uni_rsum"] <= 600 and "eval/compo/itm_acc_mean" in result
    assert all(k in result for k in ("loss/vsc", "loss/itm", "loss/mlm"))
    assert json.loads(out.read_text().splitlines()[-1]) == result
