"""The synthetic downstream task sets (issue #14): schema-valid and deterministic, their answers and
referents true of their images, read back here independently of the generator (tags and boxes,
the colours the pixels show), their vocabularies the pre-training set's, and their baselines."""
from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from test_synth import _claims
from alignlab.platform.shards import TASKS, read_manifest, read_vocab_file, validate_shards
from alignlab.platform.synth import (COLOURS, COUNT_WORDS, PLURALS, SHAPES, SIZES, TASK_MAKERS, SceneObject,
                                     SynthConfig, build_vocab, classification_baselines, compositional_candidates,
                                     generate, generate_task, grammar_tokens, grounding_baselines, holds,
                                     object_referents, refcoco_expression, render, snli_entailment, task_vocabularies)

PRETRAIN = dict(n_train_images=40, n_test_images=8, rows_per_file=100, min_concept_count=2)
SMALL = dict(n_train_images=60, n_test_images=20, captions_per_image=3, rows_per_file=100)
GENERATED = tuple(TASK_MAKERS)


@pytest.fixture(scope="module")
def pretraining(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(str(out), SynthConfig(**PRETRAIN))
    return out


@pytest.fixture(scope="module")
def task_sets(tmp_path_factory, pretraining) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("tasks")
    return {t: (root / t, generate_task(str(root / t), t, SynthConfig(**SMALL), str(pretraining))) for t in GENERATED}


def _rows(out: Path, split: str) -> list[dict]:
    return pq.read_table(out / split).to_pylist()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# Reading a scene and its texts without the generator
# --------------------------------------------------------------------------------------------

RELATIONS = {"to the left of": "left of", "to the right of": "right of", "above": "above", "below": "below"}
SAID = "|".join(RELATIONS)
SIDES = {"left": "left of", "right": "right of", "upper": "above", "lower": "below"}
SINGULAR = {p: s for s, p in PLURALS.items()}


def _scene(row: dict, suffix: str = "") -> list[dict]:
    """The objects of a row's image: shape from its tag, colour from the pixels at its box
    centre, size from its box side."""
    pixels = np.asarray(Image.open(io.BytesIO(row["image" + suffix])).convert("RGB")).astype(int)
    h, w, _ = pixels.shape
    out = []
    for tag, box in zip(row["tags" + suffix], row["boxes" + suffix]):
        x1, y1, x2, y2 = np.round(np.asarray(box) * [w, h, w, h]).astype(int)
        colour = next(c for c, rgb in COLOURS.items() if (pixels[(y1 + y2 - 1) // 2, (x1 + x2 - 1) // 2] == rgb).all())
        size = min(SIZES, key=lambda s: abs(SIZES[s] * w - max(x2 - x1, y2 - y1)))
        out.append(dict(shape=tag, colour=colour, size=size, box=np.asarray(box)))
    return out


def _hand(objects: list[SceneObject]) -> list[dict]:
    return [dict(shape=o.shape, colour=o.colour, size=o.size, box=np.asarray(o.box, float)) for o in objects]


def _relation(a: dict, b: dict) -> str:
    (sx, sy), (ox, oy) = (a["box"][:2] + a["box"][2:]) / 2, (b["box"][:2] + b["box"][2:]) / 2
    if abs(sx - ox) >= abs(sy - oy):
        return "left of" if sx < ox else "right of"
    return "above" if sy < oy else "below"


def _picks(objs: list[dict], words: str) -> list[dict]:
    """The objects a look ("large red circle", "blue shapes") picks."""
    look = {}
    for w in words.split():
        if w in COLOURS:
            look["colour"] = w
        elif w in SIZES:
            look["size"] = w
        elif w in SHAPES or w in SINGULAR:
            look["shape"] = SINGULAR.get(w, w)
        else:
            assert w in ("shape", "shapes"), words
    return [o for o in objs if all(o[k] == v for k, v in look.items())]


def _standing(objs: list[dict], head: list[dict], said: str, anchor: list[dict]) -> list[dict]:
    """The head's objects (the anchor's aside) that stand so to every anchor object; each must
    stand in one relation to the anchor, else the phrase would be unclear."""
    out = []
    for o in head:
        if any(o is a for a in anchor):
            continue
        rels = {_relation(o, a) for a in anchor}
        assert len(rels) == 1, "a relational phrase whose candidates straddle the anchor"
        if rels == {RELATIONS[said]}:
            out.append(o)
    return out


def _kind_referent(objs: list[dict], phrase: str) -> list[dict]:
    """'the red circles' (all of one kind) or 'the shape to the left of the large shape' (of one
    kind, standing so to all of one kind)."""
    m = re.fullmatch(rf"the shapes? ({SAID}) the (.+)", phrase)
    named = _picks(objs, m[2] if m else phrase.removeprefix("the "))
    assert named and named == _picks(objs, named[0]["shape"]), phrase  # a whole kind
    if not m:
        return named
    found = _standing(objs, objs, m[1], named)
    assert len({o["shape"] for o in found}) == 1, phrase
    return found


def _one(values) -> str:
    (value,) = set(values)
    return value


def vqa_answer(objs: list[dict], q: str) -> str:
    if m := re.fullmatch(r"what (colour|size) (?:is|are) the (.+)\?", q):
        return _one(o[m[1]] for o in _picks(objs, m[2]))
    if m := re.fullmatch(r"which shapes? (?:is|are) (\w+)\?", q):
        return _one(o["shape"] for o in _picks(objs, m[1]))
    if m := re.fullmatch(r"how many (.+) are there\?", q):
        return COUNT_WORDS[len(_picks(objs, m[1])) - 1]
    if m := re.fullmatch(rf"what shape is ({SAID}) the (.+)\?", q):
        (found,) = _standing(objs, objs, m[1], _picks(objs, m[2]))
        return found["shape"]
    m = re.fullmatch(r"is there an? (.+)\?", q)
    return "yes" if _picks(objs, m[1]) else "no"


def gqa_answer(objs: list[dict], q: str) -> str:
    if m := re.fullmatch(r"what (colour|size) (?:is|are) (the .+)\?", q):
        return _one(o[m[1]] for o in _kind_referent(objs, m[2]))
    if m := re.fullmatch(rf"which shapes? (?:is|are) ({SAID}) the (.+)\?", q):
        return _one(o["shape"] for o in _kind_referent(objs, f"the shape {m[1]} the {m[2]}"))
    if m := re.fullmatch(r"(?:is|are) (the .+) (\w+) or (\w+)\?", q):
        found = _kind_referent(objs, m[1])
        attribute = "colour" if m[2] in COLOURS else "size"
        assert m[2] != m[3] and (m[3] in COLOURS) == (attribute == "colour")
        return _one(o[attribute] for o in found)
    if m := re.fullmatch(r"(?:is|are) (the .+) (\w+)\?", q):
        if m[2] in COLOURS or m[2] in SIZES:
            found = _kind_referent(objs, m[1])
            return "yes" if _one(o["colour" if m[2] in COLOURS else "size"] for o in found) == m[2] else "no"
    m = re.fullmatch(rf"(?:is|are) (the .+?) ({SAID}) (the .+)\?", q)
    a, b = _kind_referent(objs, m[1]), _kind_referent(objs, m[3])
    return "yes" if _one(_relation(x, y) for x in a for y in b) == RELATIONS[m[2]] else "no"


def refer(objs: list[dict], text: str) -> list[dict]:
    """What a referring expression refers to."""
    if m := re.fullmatch(rf"the (.+?) ({SAID}) the (.+)", text):
        (anchor,) = _picks(objs, m[3])
        return _standing(objs, _picks(objs, m[1]), m[2], [anchor])
    if m := re.fullmatch(r"the (larger|smaller) of the two (.+)", text):
        small, large = sorted(_picks(objs, m[2]), key=lambda o: SIZES[o["size"]])
        assert small["size"] != large["size"]
        return [large if m[1] == "larger" else small]
    side, _, look = text.removeprefix("the ").partition(" ")
    if side in SIDES:
        group = _picks(objs, look)
        return [o for o in group if all(_relation(o, p) == SIDES[side] for p in group if p is not o)]
    return _picks(objs, text.removeprefix("the "))


def snli_label(objs: list[dict], text: str, phrases: list[list[str]]) -> str:
    """A caption is entailed when it names every kind as it is and its relations hold for every
    pair; a motion statement is neutral when the kinds it names are as named."""
    kinds, triples = _claims(phrases)
    truth: dict[str, dict] = {}
    for o in objs:
        truth.setdefault(o["shape"], {"colour": o["colour"], "size": o["size"], "count": 0})["count"] += 1
    if " moving" in text:
        return "neutral" if all(truth.get(s) == k for s, k in kinds.items()) else "contradiction"
    holds = kinds == truth and all(_relation(a, b) == rel for s, rel, t in triples
                                   for a in _picks(objs, s) for b in _picks(objs, t))
    return "entailment" if holds else "contradiction"


def nlvr2_label(left: list[dict], right: list[dict], text: str) -> str:
    quantifiers = {"the left image contains": lambda a, b: a, "the right image contains": lambda a, b: b,
                   "both images contain": lambda a, b: a and b, "exactly one image contains": lambda a, b: a != b}
    (q,) = [q for q in quantifiers if text.startswith(q + " ")]
    claim = text[len(q) + 1:]

    def test(objs):
        if m := re.fullmatch(rf"an? (\w+) ({SAID}) an? (\w+)", claim):
            return any(_relation(a, b) == RELATIONS[m[2]] for a in _picks(objs, m[1]) for b in _picks(objs, m[3]))
        if m := re.fullmatch(r"(\w+) (\w+)", claim):
            return len(_picks(objs, m[2])) == COUNT_WORDS.index(m[1]) + 1
        m = re.fullmatch(r"an? (\w+ \w+)", claim)
        return bool(_picks(objs, m[1]))

    return "true" if quantifiers[q](test(left), test(right)) else "false"


# --------------------------------------------------------------------------------------------
# Hand-made scenes
# --------------------------------------------------------------------------------------------

# A large red circle left of two small blue squares (one high, one low) and a medium green star
# below the circle: the star is below the high square but left of the low one.
SCENE = [SceneObject("circle", "red", "large", (2, 20, 25, 43)),
         SceneObject("square", "blue", "small", (40, 5, 51, 16)),
         SceneObject("square", "blue", "small", (40, 40, 51, 51)),
         SceneObject("star", "green", "medium", (5, 46, 22, 62))]
VQA_TRUTH = {
    "what colour is the circle?": "red", "what colour are the squares?": "blue", "what colour is the star?": "green",
    "which shape is red?": "circle", "which shapes are blue?": "square", "which shape is green?": "star",
    "what size is the circle?": "large", "what size are the squares?": "small", "what size is the star?": "medium",
    "how many circles are there?": "one", "how many squares are there?": "two", "how many stars are there?": "one",
    "how many red shapes are there?": "one", "how many blue shapes are there?": "two",
    "how many green shapes are there?": "one", "how many shapes are there?": "four",
    # Right of the circle stand two objects and above the star two shapes: not asked. Nothing is
    # asked about the squares' position, since the star is below one and left of the other.
    "what shape is below the red circle?": "star", "what shape is to the right of the green star?": "square",
    "is there a red circle?": "yes", "is there a blue square?": "yes", "is there a green star?": "yes",
    **{f"is there a {c} {s}?": "no" for s, cs in (("circle", "blue green"), ("square", "red green"),
                                                   ("star", "red blue")) for c in cs.split()},
}
# Two red shapes of different sizes and two blue squares, one right of the circle, one below it.
REF_SCENE = [SceneObject("circle", "red", "large", (2, 2, 25, 25)),
             SceneObject("triangle", "red", "small", (5, 45, 16, 56)),
             SceneObject("square", "blue", "small", (40, 5, 51, 16)),
             SceneObject("square", "blue", "small", (42, 44, 53, 55))]
REF_TRUTH = {"the circle": 0, "the large shape": 0, "the larger of the two red shapes": 0,
             "the smaller of the two red shapes": 1, "the triangle": 1, "the upper square": 2,
             "the lower blue square": 3, "the square to the right of the red circle": 2,
             "the square below the circle": 3}
CFG = SynthConfig()


def _asked(maker, scene, seeds: int = 200) -> dict[str, str]:
    return {i.text: i.answer for i in (maker(scene, np.random.default_rng(s), CFG) for s in range(seeds)) if i}


def test_vqa_questions_of_a_hand_made_scene_have_its_answers():
    asked = {}
    for maker in TASK_MAKERS["vqa"]:
        asked.update(_asked(maker, SCENE))
    assert asked == VQA_TRUTH  # every question asked, each with its answer, and no other
    assert all(vqa_answer(_hand(SCENE), q) == a for q, a in asked.items())


def test_gqa_questions_of_a_hand_made_scene_have_its_answers():
    asked = {}
    for maker in TASK_MAKERS["gqa"]:
        asked.update(_asked(maker, SCENE))
    for q, a in asked.items():
        assert gqa_answer(_hand(SCENE), q) == a, q
    # By hand: the squares are right of the circle, the star below it; the low square is the one
    # shape right of the star.
    assert asked["what colour is the shape below the large shape?"] == "green"
    assert asked["what size are the shapes to the right of the red circle?"] == "small"
    assert asked["which shape is to the right of the medium shape?"] == "square"
    # Two kinds stand in one relation unless one is the squares and the other the star.
    relations = {("circle", "square"): "left of", ("square", "circle"): "right of", ("circle", "star"): "above",
                 ("star", "circle"): "below"}
    verified = Counter()
    for q, a in asked.items():
        if (m := re.fullmatch(rf"(?:is|are) (the .+?) ({SAID}) (the .+)\?", q)) and a in ("yes", "no") \
                and q.split()[-1][:-1] not in {*COLOURS, *SIZES}:  # not "is the shape below the star red?"
            kinds = tuple(_kind_referent(_hand(SCENE), p)[0]["shape"] for p in (m[1], m[3]))
            assert a == ("yes" if relations[kinds] == RELATIONS[m[2]] else "no"), q
            verified[kinds, a] += 1
    assert {k for k, _ in verified} == set(relations) and {a for _, a in verified} == {"yes", "no"}
    assert not [q for q in asked if re.search(rf"the shapes? ({SAID}) the (blue|small|square)", q)]


def test_referring_expressions_of_a_hand_made_scene_pick_their_object():
    found = {r.words: REF_SCENE.index(r.objects[0]) for rs in object_referents(REF_SCENE).values() for r in rs}
    assert {t: found.get(t) for t in REF_TRUTH} == REF_TRUTH
    assert "the square" not in found and "the larger of the two blue squares" not in found  # two alike
    objs = _hand(REF_SCENE)
    for text, k in found.items():
        (referent,) = refer(objs, text)
        assert referent is objs[k], text
    for s in range(100):
        item = refcoco_expression(REF_SCENE, np.random.default_rng(s), CFG)
        (referent,) = refer(objs, item.text)
        assert referent is objs[REF_SCENE.index(item.target)], item.text


def test_snli_ve_statements_of_a_hand_made_scene():
    for maker, label in zip(TASK_MAKERS["snli_ve"], ("entailment", "contradiction", "neutral")):
        for s in range(60):
            item = maker(SCENE, np.random.default_rng(s), CFG)
            assert item.answer == label and snli_label(_hand(SCENE), item.text, item.phrases) == label, item.text
    # The entailed statements are the compositional split's true captions, which `holds`.
    for s in range(60):
        (_, true), *_ = compositional_candidates(SCENE, np.random.default_rng(s), CFG.max_count)
        assert holds(true, SCENE) and snli_entailment(SCENE, np.random.default_rng(s), CFG).text == render(true)[0]
    assert _asked(TASK_MAKERS["snli_ve"][2], SCENE, 60).keys() >= {
        "a large red circle is moving towards two small blue squares",
        "two small blue squares are moving towards a medium green star"}


# --------------------------------------------------------------------------------------------
# The written sets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", GENERATED)
def test_each_task_writes_a_valid_shard_set(task_sets, pretraining, task):
    out, summary = task_sets[task]
    for split in ("train", "test"):
        assert validate_shards(str(out / split))
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["test", "train"]
    manifest = read_manifest(str(out))
    assert manifest["task"] == task and manifest["source"] == "alignlab.platform.synth"
    assert manifest["config"]["n_train_images"] == 60 and manifest["baselines"] == summary["baselines"]
    assert manifest["splits"] == summary["splits"] == {"train": {"images": 60, "rows": 180},
                                                       "test": {"images": 20, "rows": 60}}
    assert manifest["rows_written"] == 240 and len(manifest["files"]) == summary["files"] == 3
    for name in ("vocab.txt", "tags.txt", "concepts.txt"):
        assert (out / name).read_bytes() == (pretraining / name).read_bytes()

    train, test = _rows(out, "train"), _rows(out, "test")
    rows = train + test
    assert len({r["caption_id"] for r in rows}) == len(rows)
    images: dict[str, bytes] = {}
    for r in rows:
        for suffix in ("", "_b") if task == "nlvr2" else ("",):
            assert images.setdefault(r["image_id" + suffix], r["image" + suffix]) == r["image" + suffix]
            assert set(r["tags" + suffix]) <= set(SHAPES)  # one region per object, no whole-image region
            assert len(r["tags" + suffix]) == len(r["boxes" + suffix]) == len(r["region_features" + suffix]) >= 2
        assert r["image_id"].startswith(f"{task}-{r['split']}-")
        assert all(p[-1] in SHAPES and 1 <= len(p) <= 3 for p in r["phrases"])
    if task == "refcoco":
        assert "question" not in train[0] and not (out / "answers.txt").exists() and summary["answers"] == 0
        return
    assert all(r["question"] == r["caption"] and r["answer"] for r in rows)
    assert ("human_answers" in train[0]) == (task == "vqa")
    if task == "vqa":
        assert all(r["human_answers"] == [r["answer"]] * 10 for r in rows)
    # answers.txt: the train split's answers, most frequent first, ties by name.
    counts = Counter(r["answer"] for r in train)
    assert read_vocab_file(str(out), "answers.txt") == sorted(counts, key=lambda a: (-counts[a], a))
    assert summary["answers"] == len(counts)


@pytest.mark.parametrize("task", GENERATED)
def test_texts_tokenise_with_the_pretraining_vocab(task_sets, pretraining, task):
    from transformers import BertTokenizerFast

    out, _ = task_sets[task]
    tok = BertTokenizerFast.from_pretrained(str(pretraining / "vocab.txt"))
    for r in _rows(out, "train"):
        tokens = re.findall(r"\w+|[^\w\s]", r["caption"])
        assert set(tokens) <= grammar_tokens(task), r["caption"]
        ids = tok(r["caption"])["input_ids"][1:-1]
        assert ids == tok.convert_tokens_to_ids(tokens) and tok.unk_token_id not in ids, r["caption"]
        assert r.get("answer") is None or r["answer"] in grammar_tokens(task)
    assert grammar_tokens() <= set(build_vocab())


def test_vqa_and_gqa_answers_are_true_of_their_images(task_sets):
    for task, answer in (("vqa", vqa_answer), ("gqa", gqa_answer)):
        out, summary = task_sets[task]
        rows = _rows(out, "train") + _rows(out, "test")
        for r in rows:
            assert answer(_scene(r), r["question"]) == r["answer"], (r["image_id"], r["question"])
        counts = Counter(r["answer"] for r in rows)
        assert 0.4 <= counts["yes"] / (counts["yes"] + counts["no"]) <= 0.6
        assert max(counts.values()) / len(rows) < 0.3 and summary["baselines"]["majority"] < 0.3


def test_snli_ve_labels_are_true_of_their_images(task_sets):
    out, _ = task_sets["snli_ve"]
    rows = _rows(out, "train") + _rows(out, "test")
    for r in rows:
        assert snli_label(_scene(r), r["caption"], r["phrases"]) == r["answer"], r["caption"]
    # One statement of each class per image.
    per_image = Counter((r["image_id"], r["answer"]) for r in rows)
    assert set(per_image.values()) == {1} and len(per_image) == len(rows)


def test_nlvr2_rows_hold_a_pair_and_balanced_true_labels(task_sets):
    out, _ = task_sets["nlvr2"]
    rows = _rows(out, "train") + _rows(out, "test")
    pairs = Counter((r["image_id"], r["image_id_b"]) for r in rows)
    for (a, b), n in pairs.items():
        assert a != b and pairs[(b, a)] == n == 3  # both orders of a pair, three statements each
    for r in rows:
        assert r["image"] != r["image_b"]
        assert nlvr2_label(_scene(r), _scene(r, "_b"), r["caption"]) == r["answer"], r["caption"]
    labels = Counter(r["answer"] for r in rows)
    assert labels.keys() == {"true", "false"} and 0.4 <= labels["true"] / len(rows) <= 0.6
    quantifiers = ("the left", "the right", "both", "exactly one")
    assert all(any(r["caption"].startswith(q) for r in rows) for q in quantifiers)


def test_refcoco_targets_are_one_of_the_boxes_and_the_only_referent(task_sets):
    out, _ = task_sets["refcoco"]
    for r in _rows(out, "train") + _rows(out, "test"):
        boxes = [tuple(b) for b in r["boxes"]]
        assert boxes.count(tuple(r["target_box"])) == 1
        objs = _scene(r)
        (found,) = refer(objs, r["caption"])
        assert tuple(found["box"]) == tuple(r["target_box"]), r["caption"]


def test_baselines_on_a_hand_made_case(task_sets):
    assert classification_baselines(["yes", "no", "red", "two"], ["no", "yes", "yes", "blue", "yes"]) == \
        {"chance": 0.25, "majority": 0.6}
    target = [0.0, 0.0, 0.5, 0.5]
    rows = [(np.array([target, [0.6, 0.6, 1.0, 1.0]]), np.array(target)),  # 1 of 2 regions
            # IoU 0.8 counts, 0.4 does not.
            (np.array([target, [0.0, 0.0, 0.5, 0.4], [0.0, 0.0, 0.5, 0.2]]), np.array(target)),
            (np.array([[0.5, 0.5, 1.0, 1.0]] * 3 + [target]), np.array(target))]  # 1 of 4
    assert grounding_baselines(rows)["chance"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 4) / 3)
    # The written sets' baselines are these of their own files.
    for task in ("vqa", "snli_ve", "nlvr2"):
        out, summary = task_sets[task]
        answers = read_vocab_file(str(out), "answers.txt")
        test = [r["answer"] for r in _rows(out, "test")]
        assert summary["baselines"] == {"chance": 1 / len(answers), "majority": test.count(answers[0]) / len(test)}
    out, summary = task_sets["refcoco"]
    rows = [(np.array(r["boxes"]), np.array(r["target_box"])) for r in _rows(out, "test")]
    assert summary["baselines"]["chance"] == pytest.approx(np.mean([1 / len(b) for b, _ in rows]))  # no overlaps


@pytest.mark.parametrize("task", GENERATED)
def test_same_seed_same_files_and_images_apart_from_pretraining(task, pretraining, tmp_path):
    cfg = dict(SMALL, n_train_images=6, n_test_images=2)
    generate_task(str(tmp_path / "a"), task, SynthConfig(**cfg), str(pretraining))
    generate_task(str(tmp_path / "b"), task, SynthConfig(**cfg), str(pretraining))
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    generate_task(str(tmp_path / "c"), task, SynthConfig(**cfg, seed=1), str(pretraining))
    assert _rows(tmp_path / "a", "train") != _rows(tmp_path / "c", "train")
    pretraining_images = {r["image"] for r in _rows(pretraining, "train") + _rows(pretraining, "test")}
    assert not pretraining_images & {r["image"] for r in _rows(tmp_path / "a", "train")}


def test_an_old_vocabulary_is_refused_naming_the_missing_words(pretraining, tmp_path):
    old = tmp_path / "old"
    generate(str(old), SynthConfig(**{**PRETRAIN, "n_train_images": 4, "n_test_images": 1}))
    words = (old / "vocab.txt").read_text().splitlines()
    (old / "vocab.txt").write_text("\n".join(w for w in words if w not in ("moving", "towards", "?")) + "\n")
    with pytest.raises(ValueError, match=r"old/vocab.txt has no token for 'moving' 'towards', which the snli_ve task"
                                         r".*`alignlab data synth --out .*old`"):
        generate_task(str(tmp_path / "out"), "snli_ve", SynthConfig(**SMALL), str(old))
    assert not (tmp_path / "out").exists()  # refused before anything is written
    with pytest.raises(ValueError, match=r"'\?'"):
        generate_task(str(tmp_path / "out"), "vqa", SynthConfig(**SMALL), str(old))
    generate_task(str(tmp_path / "out"), "refcoco", SynthConfig(**{**SMALL, "n_train_images": 2, "n_test_images": 1}),
                  str(old))  # uses neither
    (old / "tags.txt").unlink()
    with pytest.raises(ValueError, match="tags.txt does not exist"):
        generate_task(str(tmp_path / "out"), "refcoco", SynthConfig(**SMALL), str(old))


def test_without_a_pretraining_set_the_default_one_s_vocabularies(tmp_path):
    generate(str(tmp_path / "default"))
    texts = task_vocabularies("nlvr2")
    assert texts == {n: (tmp_path / "default" / n).read_text() for n in ("vocab.txt", "tags.txt", "concepts.txt")}
    assert texts["vocab.txt"].splitlines() == build_vocab() and texts["tags.txt"].split() == list(SHAPES)


def test_unknown_tasks_are_refused_and_regeneration_drops_stale_answers(pretraining, tmp_path):
    assert set(GENERATED) == set(TASKS) - {"retrieval"}
    with pytest.raises(ValueError, match="retrieval fine-tunes on the pre-training set itself"):
        generate_task(str(tmp_path), "retrieval", vocab_from=str(pretraining))
    tiny = SynthConfig(**{**SMALL, "n_train_images": 3, "n_test_images": 1, "rows_per_file": 2})
    generate_task(str(tmp_path), "vqa", tiny, str(pretraining))
    summary = generate_task(str(tmp_path), "refcoco", SynthConfig(**{**SMALL, "n_train_images": 1, "n_test_images": 1}),
                            str(pretraining))
    assert not (tmp_path / "answers.txt").exists()
    assert len(validate_shards(str(tmp_path))) == summary["files"] == 2  # the vqa set's extra parts are gone
