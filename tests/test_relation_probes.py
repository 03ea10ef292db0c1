"""experiments/relation_probes.py's sets. The oracle set: each region's relational bag is the
generator's own relation rule on the scene's boxes, the original features are kept, and the
shards still validate with the manifest's new width (what a run then reads). The shape set: each
region's shape before its box. (The geometry term the probes used is MVPTR's now: test_mvptr.py.)"""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from alignlab.platform.shards import read_manifest, validate_shards
from alignlab.platform.synth import OPPOSITE, REGION_DIM, SHAPES, SynthConfig, generate
from conftest import experiment_script


def test_oracle_set_appends_each_regions_relational_bag(tmp_path):
    src, dst = tmp_path / "synth", tmp_path / "relbag"
    generate(str(src), SynthConfig(n_train_images=24, n_test_images=8, min_concept_count=1))
    width = experiment_script("relation_probes").oracle_set(src, dst)
    tags = [t for t in (src / "tags.txt").read_text().split("\n") if t]
    assert sorted(tags) == sorted(SHAPES) and width == REGION_DIM + 4 * len(tags) == 78
    assert read_manifest(str(dst))["region_dim"] == width
    relations = list(OPPOSITE)
    for split in ("train", "test", "compositional"):
        validate_shards(str(dst / split))
        before, after = pq.read_table(src / split).to_pylist(), pq.read_table(dst / split).to_pylist()
        assert len(before) == len(after) > 0
        flags = 0
        for old, new in zip(before, after):
            assert {k: v for k, v in old.items() if k != "region_features"} == \
                   {k: v for k, v in new.items() if k != "region_features"}
            # box centres; the relation is read along the axis where two centres differ most
            centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in old["boxes"]]
            for i, feats in enumerate(new["region_features"]):
                np.testing.assert_allclose(feats[:REGION_DIM], old["region_features"][i], rtol=0, atol=0)
                bag = np.asarray(feats[REGION_DIM:]).reshape(len(tags), len(relations))
                expected = np.zeros_like(bag)
                for j, shape in enumerate(old["tags"]):
                    if j != i:
                        dx, dy = centres[j][0] - centres[i][0], centres[j][1] - centres[i][1]
                        where = (("left of" if dx < 0 else "right of") if abs(dx) >= abs(dy)
                                 else ("above" if dy < 0 else "below"))  # where object j stands from region i
                        expected[tags.index(shape), relations.index(where)] = 1
                np.testing.assert_array_equal(bag, expected)
                flags += int(bag.sum())
        assert flags > 0  # scenes with several objects, so the bags are not all empty


def test_shape_set_puts_each_regions_shape_before_its_box(tmp_path):
    src, dst = tmp_path / "synth", tmp_path / "shape"
    generate(str(src), SynthConfig(n_train_images=24, n_test_images=8, min_concept_count=1))
    width = experiment_script("relation_probes").shape_set(src, dst)
    tags = [t for t in (src / "tags.txt").read_text().split("\n") if t]
    assert width == REGION_DIM + len(tags) == 60 and read_manifest(str(dst))["region_dim"] == width
    for split in ("train", "test", "compositional"):
        validate_shards(str(dst / split))
        for old, new in zip(pq.read_table(src / split).to_pylist(), pq.read_table(dst / split).to_pylist(),
                            strict=True):
            for i, feats in enumerate(new["region_features"]):
                assert feats[:REGION_DIM - 6] + feats[-6:] == old["region_features"][i]
                assert feats[REGION_DIM - 6:-6] == [float(t == old["tags"][i]) for t in tags]

