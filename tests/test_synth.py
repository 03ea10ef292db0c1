"""The embedded synthetic set: deterministic, schema-valid, and true to its own pixels (boxes,
colours, counts, relations), built of families that differ only in binding, with vocabularies that
cover every caption and concept; and its compositional split, whose perturbations each change one
thing and are false of their image."""
from __future__ import annotations

import dataclasses
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from alignlab.platform import cli
from alignlab.platform.shards import CANDIDATE_TYPES, read_manifest, read_vocab_file, validate_shards
from alignlab.platform.synth import (COLOURS, COUNT_WORDS, OPPOSITE, PLURALS, REGION_DIM, SHAPES, SIZES, Description,
                                     Mention, SceneObject, SynthConfig, generate, holds, perturb, render,
                                     reverse_clause)

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


def _claims(phrases: list[list[str]]) -> tuple[dict[str, dict], list[tuple[str, str, str]]]:
    """What a caption's phrase tuples say: shape -> {colour, size, count} and the relation
    triples, read independently of the generator's own Description."""
    kinds = {}
    for p in phrases:
        if len(p) == 1:
            kinds.setdefault(p[0], {"count": 1})
        elif len(p) == 2:
            key = "colour" if p[0] in COLOURS else "size" if p[0] in SIZES else "count"
            kinds[p[1]][key] = COUNT_WORDS.index(p[0]) + 1 if key == "count" else p[0]
    return kinds, [tuple(p) for p in phrases if len(p) == 3]


def _objects(row: dict) -> dict[str, dict]:
    """shape -> {boxes, colour, size, count} for one true row, its boxes from the row's tags and
    boxes, the rest from its phrases."""
    kinds, _ = _claims(row["phrases"])
    for k in kinds.values():
        k["boxes"] = []
    for tag, box in zip(row["tags"], row["boxes"]):
        kinds[tag]["boxes"].append(np.asarray(box))
    return kinds


def _relation(a: np.ndarray, b: np.ndarray) -> str:
    (sx, sy), (ox, oy) = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
    dx, dy = sx - ox, sy - oy
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _true_of(row: dict, phrases: list[list[str]], pixels: np.ndarray) -> bool:
    """Whether phrase tuples describe the row's image: the same kinds with the colours the pixels
    show, the sizes the boxes have, the counts the tags have, and relations every pair of boxes
    agrees with."""
    kinds, relations = _claims(phrases)
    h, w, _ = pixels.shape
    truth: dict[str, dict] = {}
    for tag, box in zip(row["tags"], row["boxes"]):
        x1, y1, x2, y2 = np.round(np.asarray(box) * [w, h, w, h]).astype(int)
        colour = next(c for c, rgb in COLOURS.items() if (pixels[(y1 + y2 - 1) // 2, (x1 + x2 - 1) // 2] == rgb).all())
        size = min(SIZES, key=lambda s: abs(SIZES[s] * w - max(x2 - x1, y2 - y1)))
        k = truth.setdefault(tag, {"colour": colour, "size": size, "count": 0, "boxes": []})
        k["count"] += 1
        k["boxes"].append(np.asarray(box))
    if {s: {"colour": k["colour"], "size": k["size"], "count": k["count"]} for s, k in truth.items()} != kinds:
        return False
    return all(_relation(a, b) == rel for s, rel, o in relations for a in truth[s]["boxes"] for b in truth[o]["boxes"])


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
        "compositional/part-00000.parquet", "compositional/part-00001.parquet", "test/part-00000.parquet",
        "train/part-00000.parquet", "train/part-00001.parquet", "train/part-00002.parquet"]
    captions = SynthConfig().captions_per_image
    n_candidates = summary["splits"]["compositional"]["rows"]
    # The true caption and up to four perturbations per test image.
    assert 30 * 3 <= n_candidates <= 30 * len(CANDIDATE_TYPES)
    assert summary["splits"] == {"train": {"images": 120, "rows": 120 * captions},
                                 "test": {"images": 30, "rows": 30 * captions},
                                 "compositional": {"images": 30, "rows": n_candidates}}
    assert summary["files"] == 6 and summary["region_dim"] == REGION_DIM == 54
    manifest = read_manifest(str(out))
    assert manifest["config"]["n_train_images"] == 120
    assert manifest["rows_written"] == 150 * captions + n_candidates
    assert manifest["vocab_size"] == summary["vocab_size"] and manifest["concepts"] == summary["concepts"]


def test_rows_are_well_formed(rows):
    ids = Counter(r["image_id"] for r in rows)
    assert set(ids.values()) == {SynthConfig().captions_per_image}
    assert len({r["caption_id"] for r in rows}) == len(rows)
    n_objects, n_kinds, copies = Counter(), Counter(), Counter()
    for r in rows:
        assert len(r["tags"]) == len(r["boxes"]) == len(r["region_features"])
        n_objects[len(r["tags"])] += 1
        n_kinds[len(set(r["tags"]))] += 1
        copies.update(Counter(r["tags"]).values())
        assert r["caption"] == r["caption"].lower()
        feats, boxes = np.asarray(r["region_features"]), np.asarray(r["boxes"])
        assert feats.shape == (len(boxes), REGION_DIM)
        np.testing.assert_allclose(feats[:, -6:-2], boxes, atol=1e-6)
        np.testing.assert_allclose(feats[:, -2:], boxes[:, 2:] - boxes[:, :2], atol=1e-6)
        assert feats[:, :-6].min() >= 0 and feats[:, :-6].max() <= 1
    # 2..4 objects of at least two kinds (one kind would bind nothing), one or two of a kind.
    assert set(n_objects) == {2, 3, 4} and set(n_kinds) == {2, 3, 4} and set(copies) == {1, 2}
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
            assert len(obj["boxes"]) == obj["count"], (r["image_id"], tag)
            for box in obj["boxes"]:
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


def test_every_caption_is_true_of_its_image(rows):
    """Kinds, colours, sizes, counts and every relation, checked against the pixels and boxes."""
    for r in rows[::2]:
        pixels = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")).astype(int)
        assert _true_of(r, r["phrases"], pixels), r["caption"]


def test_relations_agree_with_box_centres_and_the_caption_says_them(rows):
    checked = 0
    for r in rows:
        objs = _objects(r)
        for s, rel, o in _claims(r["phrases"])[1]:
            # Every pair of a subject copy and an object copy: a relation of two kinds holds for all.
            assert {_relation(a, b) for a in objs[s]["boxes"] for b in objs[o]["boxes"]} == {rel}, (r["image_id"], rel)
            said = {"left of": "to the left of", "right of": "to the right of"}.get(rel, rel)
            subject = s if objs[s]["count"] == 1 else PLURALS[s]
            assert any(f"{subject}{verb} {said} " in r["caption"] for verb in ("", " is", " are")), r["caption"]
            checked += 1
    assert checked > 50


def test_every_caption_names_every_kind_with_count_size_and_colour(rows):
    for r in rows:
        for tag, obj in _objects(r).items():
            assert obj["size"] in SIZES and obj["colour"] in COLOURS
            words = f"{obj['size']} {obj['colour']}"
            said = f"{words} {tag}" if obj["count"] == 1 else f"{COUNT_WORDS[obj['count'] - 1]} {words} {PLURALS[tag]}"
            assert said in r["caption"], (r["caption"], tag)
            assert [tag] in r["phrases"]


def test_a_family_shares_its_words_and_differs_in_binding(rows):
    """Consecutive images of a family hold the same shapes and the same multisets of colours,
    sizes and counts, each bound to the shapes in its own way: the family's images share a bag of
    words, and each caption is true of its own image only."""
    images = {r["image_id"]: r for r in rows if r["split"] == "test"}
    ids = sorted(images)
    assert len(ids) == 30
    size = SynthConfig().family_size
    for f in range(0, len(ids) - size + 1, size):
        family = [_objects(images[i]) for i in ids[f:f + size]]
        bags = [(sorted(k), *(sorted(str(v[a]) for v in k.values()) for a in ("colour", "size", "count")))
                for k in family]
        assert all(b == bags[0] for b in bags), ids[f]
        bindings = [sorted((s, v["colour"], v["size"], v["count"]) for s, v in k.items()) for k in family]
        assert len({str(b) for b in bindings}) == size, ids[f]


# --------------------------------------------------------------------------------------------
# The compositional split and its perturbations
# --------------------------------------------------------------------------------------------


def _obj(shape, colour, size, box):
    return SceneObject(shape, colour, size, box)


# A large red circle left of two small blue squares (one high, one low) and a medium green star
# below the circle. The star is below the high square but left of the low one: no single relation.
SCENE = [_obj("circle", "red", "large", (2, 20, 25, 43)), _obj("square", "blue", "small", (40, 5, 51, 16)),
         _obj("square", "blue", "small", (40, 40, 51, 51)), _obj("star", "green", "medium", (5, 46, 22, 62))]
CIRCLE, SQUARES, STAR = Mention("circle", "red", "large"), Mention("square", "blue", "small", 2), \
    Mention("star", "green", "medium")


def test_holds_on_a_hand_made_scene():
    true = Description("is", (CIRCLE, SQUARES, STAR), ("left of",))
    assert render(true)[0] == ("a large red circle is to the left of two small blue squares and "
                               "a medium green star")
    assert holds(true, SCENE)
    assert holds(Description("is", (STAR, CIRCLE, SQUARES), ("below",)), SCENE)
    # Each single change makes it false.
    assert not holds(Description("is", (CIRCLE, SQUARES, STAR), ("right of",)), SCENE)
    assert not holds(Description("is", (CIRCLE, Mention("square", "blue", "small"), STAR), ("left of",)), SCENE)
    assert not holds(Description("is", (Mention("circle", "blue", "large"), Mention("square", "red", "small", 2),
                                        STAR), ("left of",)), SCENE)
    assert not holds(Description("frame", (CIRCLE, SQUARES), frame="an image of"), SCENE)  # leaves the star out
    assert holds(Description("relation", (STAR, SQUARES, CIRCLE), (None,)), SCENE)
    assert not holds(Description("relation", (STAR, SQUARES, CIRCLE), ("left of",)), SCENE)
    assert not holds(Description("relation", (STAR, SQUARES, CIRCLE), ("below",)), SCENE)


@pytest.mark.parametrize("kind", CANDIDATE_TYPES[1:])
def test_each_perturbation_changes_exactly_one_thing_and_is_false(kind):
    true = Description("there", (CIRCLE, SQUARES, STAR), ("left of",))
    for seed in range(20):
        p = perturb(true, kind, np.random.default_rng(seed), max_count=2)
        assert not holds(p, SCENE)
        changed = [(a, b) for a, b in zip(true.mentions, p.mentions) if a != b]
        if kind == "swap_attribute":
            (a1, b1), (a2, b2) = changed
            fields = [f for f in ("shape", "colour", "size", "count") if getattr(a1, f) != getattr(b1, f)]
            assert len(fields) == 1 and fields == [f for f in ("shape", "colour", "size", "count")
                                                   if getattr(a2, f) != getattr(b2, f)]
            f = fields[0]
            assert f in ("colour", "size") and getattr(b1, f) == getattr(a2, f) and getattr(b2, f) == getattr(a1, f)
            assert p.relations == true.relations
        elif kind == "swap_relation":
            assert not changed and p.relations == (OPPOSITE["left of"],)
        else:
            ((a, b),) = changed
            assert p.relations == true.relations
            if kind == "wrong_count":
                assert dataclasses.replace(b, count=a.count) == a and b.count != a.count
            else:
                assert dataclasses.replace(b, shape=a.shape) == a and b.shape not in {"circle", "square", "star"}


def test_a_clause_said_from_its_object_side_makes_the_same_claim_in_the_opposite_word():
    true = Description("there", (CIRCLE, SQUARES, STAR), ("left of",))
    turned = reverse_clause(true, 0)
    assert turned.mentions == (SQUARES, CIRCLE, STAR) and turned.relations == ("right of",)
    assert holds(turned, SCENE)
    assert render(turned)[0] == "there are two small blue squares to the right of a large red circle and a medium green star"


def test_perturbations_that_cannot_be_made_are_none():
    same = Description("frame", (Mention("circle", "red", "large"), Mention("square", "red", "large")), frame="a photo of")
    rng = np.random.default_rng(0)
    assert perturb(same, "swap_attribute", rng, 2) is None  # nothing differs to swap
    assert perturb(same, "swap_relation", rng, 2) is None  # no relation stated
    six = Description("count", tuple(Mention(s, "red", "small") for s in SHAPES))
    assert perturb(six, "replace_object", rng, 2) is None  # no shape left to bring in


@pytest.fixture(scope="module")
def candidates(synth) -> list[dict]:
    out, _ = synth
    return pq.read_table(out / "compositional").to_pylist()


def test_relation_swaps_hold_each_true_relation_word_as_often_as_its_opposite(candidates):
    """A scorer that only prefers one relation word to its opposite scores chance on the split's
    relation swaps: the true clauses a swap reverses say each word as often as its opposite (± 1)."""
    groups: dict[int, dict[int, dict]] = {}
    for c in candidates:
        groups.setdefault(c["group_id"], {})[c["candidate_type"]] = c
    swap = CANDIDATE_TYPES.index("swap_relation")
    said = Counter()
    for members in groups.values():
        if swap in members:
            (reversed_,) = set(_claims(members[0]["phrases"])[1]) - set(_claims(members[swap]["phrases"])[1])
            said[reversed_[1]] += 1
    assert sum(said.values()) >= 20
    for word in ("left of", "above"):
        assert abs(said[word] - said[OPPOSITE[word]]) <= 1, said


def test_compositional_rows_change_one_thing_and_are_false_of_their_image(candidates, rows):
    """Read independently of the generator: each group's true caption is true of the test image
    (pixels, boxes), every other candidate is false of it and differs from the true caption's
    phrase tuples in exactly the way its type says."""
    tests = {r["image_id"]: r for r in rows if r["split"] == "test"}
    groups: dict[int, dict[int, dict]] = {}
    for c in candidates:
        assert c["candidate_type"] not in groups.setdefault(c["group_id"], {}), "one candidate per type"
        groups[c["group_id"]][c["candidate_type"]] = c
    assert sorted(groups) == list(range(30))
    by_type = Counter()
    for g, members in groups.items():
        true = members[0]
        image = tests[true["image_id"]]
        assert true["image"] == image["image"] and true["tags"] == image["tags"] and true["boxes"] == image["boxes"]
        pixels = np.asarray(Image.open(io.BytesIO(true["image"])).convert("RGB")).astype(int)
        assert _true_of(true, true["phrases"], pixels), true["caption"]
        t_kinds, t_rels = _claims(true["phrases"])
        for t, c in members.items():
            assert c["image_id"] == true["image_id"] and c["caption_id"] == f"{true['image_id']}-{CANDIDATE_TYPES[t]}"
            if t == 0:
                continue
            by_type[CANDIDATE_TYPES[t]] += 1
            assert c["caption"] != true["caption"] and not _true_of(c, c["phrases"], pixels), c["caption"]
            kinds, rels = _claims(c["phrases"])
            name = CANDIDATE_TYPES[t]
            if name == "swap_attribute":
                diff = {s: [a for a in kinds[s] if kinds[s][a] != t_kinds[s][a]] for s in kinds if kinds[s] != t_kinds[s]}
                (s1, f1), (s2, f2) = diff.items()
                assert f1 == f2 and len(f1) == 1 and rels == t_rels
                assert (kinds[s1][f1[0]], kinds[s2][f1[0]]) == (t_kinds[s2][f1[0]], t_kinds[s1][f1[0]])
            elif name == "swap_relation":
                assert kinds == t_kinds and len(rels) == len(t_rels)
                ((old, new),) = [(a, b) for a, b in zip(t_rels, rels) if a != b]
                assert new == (old[0], OPPOSITE[old[1]], old[2])
            elif name == "wrong_count":
                ((s, k),) = [(s, k) for s, k in kinds.items() if k != t_kinds[s]]
                assert {**k, "count": t_kinds[s]["count"]} == t_kinds[s] and rels == t_rels
            else:
                (gone,), (new,) = set(t_kinds) - set(kinds), set(kinds) - set(t_kinds)
                assert new not in image["tags"] and kinds[new] == t_kinds[gone]
                rename = {gone: new}
                assert rels == [(rename.get(a, a), r, rename.get(b, b)) for a, r, b in t_rels]
    # Every type occurs; a relation swap needs a stated relation, an attribute swap two kinds that differ.
    assert set(by_type) == set(CANDIDATE_TYPES[1:]) and by_type["wrong_count"] == by_type["replace_object"] == 30


def test_a_rows_negative_caption_reverses_one_of_its_relations_and_is_false_of_its_image(rows):
    """Read independently of the generator: a caption row stating a relation carries a hard
    negative that differs from it in one word, that relation's opposite ("left" / "right",
    "above" / "below"), with the same tuple reversed in its phrases, and is false of the image;
    a row stating none carries "" and no tuples."""
    opposite_words = {("left", "right"), ("right", "left"), ("above", "below"), ("below", "above")}
    with_negative = 0
    for r in rows:
        kinds, rels = _claims(r["phrases"])
        assert bool(r["negative_caption"]) == bool(rels), r["caption"]
        if not rels:
            assert r["negative_phrases"] == []
            continue
        with_negative += 1
        words, negative_words = r["caption"].split(), r["negative_caption"].split()
        changed = [(a, b) for a, b in zip(words, negative_words, strict=True) if a != b]
        assert len(changed) == 1 and changed[0] in opposite_words, (r["caption"], r["negative_caption"])
        negative_kinds, negative_rels = _claims(r["negative_phrases"])
        ((old, new),) = [(a, b) for a, b in zip(rels, negative_rels, strict=True) if a != b]
        assert negative_kinds == kinds and new == (old[0], OPPOSITE[old[1]], old[2])
        pixels = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")).astype(int)
        assert not _true_of(r, r["negative_phrases"], pixels), r["negative_caption"]
    assert with_negative > 50


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
    # Three train parts, one test part, one compositional part.
    assert len(validate_shards(str(tmp_path))) == summary["files"] == 5


def test_config_is_checked():
    with pytest.raises(ValueError, match="max_objects"):
        SynthConfig(max_objects=len(SHAPES) + 1)
    with pytest.raises(ValueError, match="image_size"):
        SynthConfig(image_size=16)
    with pytest.raises(ValueError, match="family_size > 1 needs min_objects >= 2"):
        SynthConfig(min_objects=1)
    SynthConfig(min_objects=1, family_size=1)


def test_cli_prints_the_summary(tmp_path, capsys):
    cli.main(["data", "synth", "--out", str(tmp_path), "--train-images", "4", "--test-images", "2",
              "--image-size", "48", "--seed", "3"])
    printed = capsys.readouterr().out
    assert "'train': {'images': 4, 'rows': 8}" in printed and "'test': {'images': 2, 'rows': 4}" in printed
    image = pq.read_table(tmp_path / "train").column("image")[0].as_py()
    assert Image.open(io.BytesIO(image)).size == (48, 48)


def test_the_mvptr_demo_preset_keeps_every_phrase_concept_and_object_of_a_synthetic_caption(rows):
    """MVPTR's §4.1 limit of 5 phrases is sized for real captions; the demo's must not cut a
    synthetic one, whose relation triples come last (6-14 distinct phrase concepts a caption)."""
    from alignlab.platform.config import load_config

    data = load_config("mvptr_demo").data
    phrases = [len({" ".join(p) for p in r["phrases"]}) for r in rows]
    assert max(phrases) <= data.max_phrases and min(phrases) > 5
    assert max(len(r["tags"]) for r in rows) <= min(data.max_regions, data.max_tags)


def test_the_shard_sets_vocabulary_loads_without_leaving_a_copy(synth, tmp_path, monkeypatch):
    import tempfile

    from alignlab.platform.tokenization import load_tokenizer

    out, summary = synth
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    load_tokenizer.cache_clear()
    tok = load_tokenizer("auto", str(out))
    assert tok.vocab_size == summary["vocab_size"] and tok("red circle")["input_ids"][1:-1] == \
        tok.convert_tokens_to_ids(["red", "circle"])
    assert list(tmp_path.iterdir()) == []
    load_tokenizer.cache_clear()
