"""The embedded synthetic set: deterministic, schema-valid, and true to its own pixels (boxes,
colours, relations), with vocabularies that cover every caption and concept."""
from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from alignlab.platform import cli
from alignlab.platform.shards import read_manifest, read_vocab_file, validate_shards
from alignlab.platform.synth import COLOURS, REGION_DIM, SHAPES, SIZES, SynthConfig, generate

SMALL = dict(n_train_images=120, n_test_images=30, rows_per_file=100, min_concept_count=2)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    return out, generate(str(out), SynthConfig(**SMALL))


@pytest.fixture(scope="module")
def rows(synth) -> list[dict]:
    out, _ = synth
    return pq.read_table(out / "train").to_pylist() + pq.read_table(out / "test").to_pylist()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _objects(row: dict) -> dict[str, dict]:
    """shape -> {box, colour, size} for one row, read back from its tags, boxes and phrases."""
    objs = {tag: {"box": np.asarray(box)} for tag, box in zip(row["tags"], row["boxes"])}
    for p in row["phrases"]:
        if len(p) == 2:
            objs[p[1]]["colour" if p[0] in COLOURS else "size"] = p[0]
    return objs


def test_same_seed_gives_identical_files_and_other_seed_differs(synth, tmp_path):
    out, _ = synth
    generate(str(tmp_path / "again"), SynthConfig(**SMALL))
    assert _files(out) == _files(tmp_path / "again")

    generate(str(tmp_path / "other"), SynthConfig(**{**SMALL, "seed": 1}))
    a, b = pq.read_table(out / "train"), pq.read_table(tmp_path / "other" / "train")
    assert a.num_rows == b.num_rows and not a.equals(b)
    assert a.column("caption").to_pylist() != b.column("caption").to_pylist()


def test_an_image_does_not_depend_on_the_set_size(synth, tmp_path):
    out, _ = synth
    generate(str(tmp_path / "few"), SynthConfig(**{**SMALL, "n_train_images": 10, "n_test_images": 3}))
    few = pq.read_table(tmp_path / "few" / "test").to_pylist()
    many = pq.read_table(out / "test").to_pylist()[:len(few)]
    assert few == many


def test_layout_schema_and_summary(synth):
    out, summary = synth
    files = validate_shards(str(out))
    assert [Path(f).relative_to(out).as_posix() for f in files] == [
        "test/part-00000.parquet", "train/part-00000.parquet", "train/part-00001.parquet", "train/part-00002.parquet"]
    captions = SynthConfig().captions_per_image
    assert summary["splits"] == {"train": {"images": 120, "rows": 120 * captions},
                                 "test": {"images": 30, "rows": 30 * captions}}
    assert summary["files"] == 4 and summary["region_dim"] == REGION_DIM == 54
    manifest = read_manifest(str(out))
    assert manifest["config"]["n_train_images"] == 120 and manifest["rows_written"] == 150 * captions
    assert manifest["vocab_size"] == summary["vocab_size"] and manifest["concepts"] == summary["concepts"]


def test_rows_are_well_formed(rows):
    ids = Counter(r["image_id"] for r in rows)
    assert set(ids.values()) == {SynthConfig().captions_per_image}
    assert len({r["caption_id"] for r in rows}) == len(rows)
    n_objects = Counter()
    for r in rows:
        assert len(r["tags"]) == len(set(r["tags"])) == len(r["boxes"]) == len(r["region_features"])
        n_objects[len(r["tags"])] += 1
        assert r["caption"] == r["caption"].lower()
        feats, boxes = np.asarray(r["region_features"]), np.asarray(r["boxes"])
        assert feats.shape == (len(boxes), REGION_DIM)
        np.testing.assert_allclose(feats[:, -6:-2], boxes, atol=1e-6)
        np.testing.assert_allclose(feats[:, -2:], boxes[:, 2:] - boxes[:, :2], atol=1e-6)
        assert feats[:, :-6].min() >= 0 and feats[:, :-6].max() <= 1
    assert set(n_objects) == {1, 2, 3, 4}
    # The captions of one image differ.
    by_image: dict[str, set[str]] = {}
    for r in rows:
        by_image.setdefault(r["image_id"], set()).add(r["caption"])
    assert all(len(c) == SynthConfig().captions_per_image for c in by_image.values())


def test_boxes_match_the_drawn_shapes(rows):
    for r in rows[::2]:  # both captions of an image share its pixels
        pixels = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")).astype(int)
        h, w, _ = pixels.shape
        covered = np.zeros((h, w), bool)
        for tag, obj in _objects(r).items():
            box = obj["box"]
            assert np.all((box >= 0) & (box <= 1)) and box[0] < box[2] and box[1] < box[3]
            x1, y1, x2, y2 = np.round(box * [w, h, w, h]).astype(int)
            inside = pixels[y1:y2, x1:x2]
            colour = np.array(COLOURS[obj["colour"]])
            # Filled at the centre, and every edge of the box touches the shape (a tight box).
            assert (pixels[(y1 + y2 - 1) // 2, (x1 + x2 - 1) // 2] == colour).all(), (r["image_id"], tag)
            hit = (inside == colour).all(-1)
            assert hit[0].any() and hit[-1].any() and hit[:, 0].any() and hit[:, -1].any(), (r["image_id"], tag)
            covered[y1:y2, x1:x2] = True
        # Outside the boxes there is only the grey background.
        outside = pixels[~covered]
        assert (np.ptp(outside, axis=-1) <= 16).all() and (outside.max(-1) < 80).all(), r["image_id"]


def test_relations_agree_with_box_centres(rows):
    checked = 0
    for r in rows:
        objs = _objects(r)
        for p in r["phrases"]:
            if len(p) != 3:
                continue
            (sx, sy), (ox, oy) = ((objs[t]["box"][:2] + objs[t]["box"][2:]) / 2 for t in (p[0], p[2]))
            dx, dy = sx - ox, sy - oy
            expected = {"left of": dx < 0 and abs(dx) >= abs(dy), "right of": dx > 0 and abs(dx) >= abs(dy),
                        "above": dy < 0 and abs(dy) > abs(dx), "below": dy > 0 and abs(dy) > abs(dx)}
            assert expected[p[1]], (r["image_id"], p)
            said = {"left of": "to the left of", "right of": "to the right of"}.get(p[1], p[1])
            assert f"{p[0]} {said} a" in r["caption"] or f"{p[0]} is {said} a" in r["caption"]
            checked += 1
    assert checked > 50


def test_every_caption_names_every_object_with_size_and_colour(rows):
    for r in rows:
        for tag, obj in _objects(r).items():
            assert obj["size"] in SIZES and obj["colour"] in COLOURS
            assert f"{obj['size']} {obj['colour']} {tag}" in r["caption"], (r["caption"], tag)
            assert [tag] in r["phrases"]


def test_vocab_tokenizes_every_caption_and_concept_without_unk(synth, rows):
    from transformers import BertTokenizerFast

    out, summary = synth
    tok = BertTokenizerFast.from_pretrained(str(out / "vocab.txt"))
    assert tok.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 1, 2, 3, 4]
    assert tok.vocab_size == summary["vocab_size"]
    assert BertTokenizerFast(vocab=str(out / "vocab.txt")).get_vocab() == tok.get_vocab()
    concepts = read_vocab_file(str(out), "concepts.txt")
    for text in [r["caption"] for r in rows] + concepts:
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids, text
        # One token per word: no word is split into word pieces.
        assert len(ids) == len(text.replace(",", " ,").replace(":", " :").split()) + 2, text


def test_tags_and_concepts_files_match_the_rows(synth, rows):
    out, summary = synth
    tags = read_vocab_file(str(out), "tags.txt")
    assert tags == list(SHAPES) and summary["tags"] == len(tags)
    assert {t for r in rows for t in r["tags"]} <= set(tags)

    counts = Counter(c for r in rows if r["split"] == "train" for c in {" ".join(p) for p in r["phrases"]})
    concepts = read_vocab_file(str(out), "concepts.txt")
    assert set(concepts) == {c for c, n in counts.items() if n >= SMALL["min_concept_count"]}
    assert len(concepts) == len(set(concepts)) == summary["concepts"]
    assert {len(c.split()) for c in concepts} >= {1, 2, 3, 4}  # objects, attributes, relations


def test_regeneration_removes_stale_parts(tmp_path):
    generate(str(tmp_path), SynthConfig(**{**SMALL, "rows_per_file": 20, "n_test_images": 1}))
    summary = generate(str(tmp_path), SynthConfig(**{**SMALL, "n_test_images": 1}))
    assert len(validate_shards(str(tmp_path))) == summary["files"] == 4


def test_config_is_checked():
    with pytest.raises(ValueError, match="max_objects"):
        SynthConfig(max_objects=len(SHAPES) + 1)
    with pytest.raises(ValueError, match="image_size"):
        SynthConfig(image_size=16)


def test_cli_prints_the_summary(tmp_path, capsys):
    cli.main(["data", "synth", "--out", str(tmp_path), "--train-images", "4", "--test-images", "2",
              "--image-size", "48", "--seed", "3"])
    printed = capsys.readouterr().out
    assert "'train': {'images': 4, 'rows': 8}" in printed and "'test': {'images': 2, 'rows': 4}" in printed
    image = pq.read_table(tmp_path / "train").column("image")[0].as_py()
    assert Image.open(io.BytesIO(image)).size == (48, 48)
