"""experiments/relation_probes.py's sets and geometry term. The oracle set: each region's
relational bag is the generator's own relation rule on the scene's boxes, the original features
are kept, and the shards still validate with the manifest's new width (what a run then reads).
The shape set: each region's shape before its box. The geometry term: zero at the start, a
directional slope makes a head look one way, and placed tags take their regions' boxes."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

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


def test_geometry_term_starts_at_zero_and_a_directional_slope_looks_one_way():
    import torch

    from alignlab.models.registry import build_model
    from alignlab.models.base import Vocab
    from alignlab.platform.config import load_config

    probes = experiment_script("relation_probes")
    cfg = load_config("mvptr_demo")
    torch.manual_seed(0)
    vocab = Vocab(size=30, pad_id=0, cls_id=1, sep_id=2, mask_id=3, tags=tuple(SHAPES), concepts=((5,), (6, 5)))
    model = build_model(cfg.model, cfg.objectives, vocab).eval()
    feats = torch.rand(2, 3, REGION_DIM)
    boxes = torch.tensor([[0.1, 0.4, 0.3, 0.6], [0.4, 0.4, 0.6, 0.6], [0.7, 0.4, 0.9, 0.6]])  # left to right
    feats[..., -6:] = torch.cat([boxes, boxes[:, 2:] - boxes[:, :2]], -1)
    batch = {"region_features": feats, "region_mask": torch.ones(2, 3, dtype=torch.bool),
             "tag_ids": torch.ones(2, 3, dtype=torch.long), "tag_mask": torch.ones(2, 3, dtype=torch.bool)}
    before = model.encode_image(batch)[0]
    probes.with_geometry_bias(model, cfg.model.num_heads)
    torch.testing.assert_close(model.encode_image(batch)[0], before)  # the term starts at zero
    assert {"geometry_bias.mlp.0.weight", "geometry_bias.slopes"} <= set(model.state_dict())
    # Heads 0-3 look left, right, up and down: region 1, in the middle, sees its left neighbour
    # 0.3 away at +3 in head 0 and -3 in head 1, its right one the reverse; no vertical offsets.
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.objectives, vocab).eval()
    probes.with_geometry_bias(model, cfg.model.num_heads, directional=10.0)
    bias = model.geometry_bias(feats[..., -6:])
    assert bias.shape == (2, 4, 3, 3)
    torch.testing.assert_close(bias[0, :, 1], torch.tensor([[3.0, 0.0, -3.0], [-3.0, 0.0, 3.0],
                                                            [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    regions_only = model.encode_image(batch)[0]
    assert not torch.allclose(regions_only, before)
    # Placed tags: tag i takes region i's box, so the term now also reaches the tag positions.
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.objectives, vocab).eval()
    probes.with_geometry_bias(model, cfg.model.num_heads, directional=10.0, placed_tags=True)
    placed = model.encode_image(batch)[0]
    assert not torch.allclose(placed[:, 1:4], regions_only[:, 1:4])
    with pytest.raises(ValueError, match="one tag a region"):
        model.encode_image({**batch, "tag_ids": batch["tag_ids"][:, :2], "tag_mask": batch["tag_mask"][:, :2]})
