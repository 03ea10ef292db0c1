"""Downstream task sets from their public layouts (#14): VQA v2's human answers, SNLI-VE, NLVR2's
image pairs with both images' regions, RefCOCO+ from JSON refs (never the toolkit's pickle), the
manifest's task and ``--vocab-from`` for task sets. Builds run in this process (no Ray) and
without regions, or with ground-truth boxes or SSD on a few small images."""
from __future__ import annotations

import json
import os
import pickle
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import test_databuild_fixtures as fx
from alignlab.platform.cli import main
from alignlab.platform.databuild import builder
from alignlab.platform.databuild.builder import BuildError
from alignlab.platform.databuild.config import BuildConfig
from alignlab.platform.databuild.stats import collect
from alignlab.platform.databuild.readers import LayoutError, Record, Skipped, open_reader
from alignlab.platform.shards import list_parquet, read_vocab_file, validate_shards
from conftest import shared_data


def _plan(source: str, **kw):
    cfg = BuildConfig(source=source, out="/unused", **kw).validate()
    return builder.plan_units(open_reader(cfg.source, cfg.layout, cfg.image_root, cfg.default_split), cfg, {})


def _rows(out) -> dict:
    return pa.concat_tables([pq.read_table(f) for f in list_parquet(str(out))]).to_pydict()


# ---------------------------------------------------------------------------------------------- VQA v2


def test_vqa_rows_carry_every_annotators_answer(monkeypatch, tmp_path):
    root = shared_data("vl_fixtures")
    m = fx.build_in_process(monkeypatch, BuildConfig(source=str(root / "vqav2"), out=str(tmp_path / "vqa"),
                                                     phrases=False))
    assert m["task"] == "vqa"
    validate_shards(str(tmp_path / "vqa"))
    t = _rows(tmp_path / "vqa")
    assert [len(h) for h in t["human_answers"]] == [10, 10, 10]
    humans = t["human_answers"][t["caption_id"].index("458752000")]
    assert humans == ["net", "net", "net", "netting", "net", "net", "mesh", "net", "pitcher", "orange"]
    # VQA accuracy, min(#humans that gave it / 3, 1): 1 for "net" (6 of 10), 1/3 for "pitcher".
    assert [min(Counter(humans)[a] / 3, 1) for a in ("net", "pitcher", "ball")] == [1, pytest.approx(1 / 3), 0]

    # Whitespace-normalised as the answer is.
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "questions.json").write_bytes((root / "vqav2" / "questions.json").read_bytes())
    annotations = json.loads((root / "vqav2" / "annotations.json").read_text())
    annotations["annotations"][0]["answers"][3]["answer"] = "  fishing \t net "
    (tmp_path / "src" / "annotations.json").write_text(json.dumps(annotations))
    units, skipped = _plan(str(tmp_path / "src"))
    assert not skipped.counts
    cid, question, labels = units[0]["images"][0]["captions"][0]
    assert (cid, labels["answer"], labels["human_answers"][3]) == ("458752000", "net", "fishing net")


# ---------------------------------------------------------------------------------------------- SNLI-VE


def test_snli_ve_reader_on_the_real_sample():
    root = shared_data("vl_fixtures")
    reader = open_reader(str(root / "visual_entailment"))
    assert (reader.name, reader.task) == ("snli_ve", "snli_ve")
    records = list(reader.records())
    assert len(records) == 16 and all(isinstance(r, Record) for r in records)
    first = records[0]
    assert (first.image_id, first.caption, first.answer, first.caption_id, first.split) == (
        "2248275918", "A toddler sleeps outside.", "contradiction", "2248275918.jpg#2r1c", "train")
    assert first.image.path == str(root / "images" / "visual_entailment" / "2248275918.jpg")
    assert Counter(r.answer for r in records) == {"entailment": 6, "neutral": 6, "contradiction": 4}
    assert Counter(r.image_id for r in records) == {"2248275918": 15, "402978771": 1}
    assert open_reader(str(root / "visual_entailment" / "sample_pairs.jsonl")).name == "snli_ve"


def test_snli_ve_skips_a_gold_label_without_majority(tmp_path):
    root = shared_data("vl_fixtures")
    lines = (root / "visual_entailment" / "sample_pairs.jsonl").read_text().splitlines()[:3]
    no_majority, unlabelled = json.loads(lines[1]), json.loads(lines[2])
    no_majority["gold_label"] = "-"
    del unlabelled["gold_label"]
    path = tmp_path / "snli_ve_dev.jsonl"
    path.write_text("\n".join([lines[0], json.dumps(no_majority), json.dumps(unlabelled), '{"Flickr30K_ID": 1']) + "\n")
    units, skipped = _plan(str(path), image_root=str(root / "images" / "visual_entailment"))
    assert skipped.counts == {"invalid_label": 1, "missing_answer": 1, "malformed_line": 1}
    assert [(s["reason"], s["where"]) for s in skipped.listed] == [
        ("invalid_label", f"{path}:2"), ("missing_answer", f"{path}:3"), ("malformed_line", f"{path}:4")]
    assert "gold_label '-' is none of entailment, neutral, contradiction" in skipped.listed[0]["detail"]
    (unit,) = units
    assert unit["name"] == "val/part-00000.parquet"  # snli_ve_dev -> val
    assert unit["images"][0]["captions"] == [["2248275918.jpg#2r1c", "A toddler sleeps outside.",
                                              {"answer": "contradiction"}]]


# ---------------------------------------------------------------------------------------------- NLVR2


def test_nlvr2_reader_on_the_real_sample():
    root = shared_data("vl_fixtures")
    reader = open_reader(str(root / "nlvr2"))
    assert (reader.name, reader.task) == ("nlvr2", "nlvr2")
    records = list(reader.records())
    assert len(records) == 8 and {r.split for r in records} == {"val"}  # dev -> val
    first = records[0]
    assert (first.caption_id, first.answer, first.image_id, first.image_id_b) == (
        "dev-850-0-0", "false", "dev-850-0-img0", "dev-850-0-img1")
    assert first.caption == ("The right image shows a curving walkway of dark glass circles embedded in dirt and "
                             "flanked by foliage.")
    images = root / "images" / "nlvr2"
    assert (first.image.path, first.image_b.path) == (str(images / "dev-850-0-img0.png"),
                                                      str(images / "dev-850-0-img1.png"))
    assert Counter(r.answer for r in records) == {"true": 4, "false": 4}
    assert Counter((r.image_id, r.image_id_b) for r in records) == {
        (f"dev-850-{p}-img0", f"dev-850-{p}-img1"): 2 for p in range(4)}


def test_nlvr2_build_gives_both_images_regions(monkeypatch, tmp_path):
    root = shared_data("vl_fixtures")
    cfg = BuildConfig(source=str(root / "nlvr2"), out=str(tmp_path / "nlvr2"), phrases=False, regions="ssd",
                      feature_image_size=64)
    m = fx.build_in_process(monkeypatch, cfg)
    assert (m["task"], m["rows_written"], m["images_written"], m["rows_skipped"]) == ("nlvr2", 8, 8, {})
    validate_shards(cfg.out)
    t = _rows(cfg.out)
    assert t["split"] == ["val"] * 8 and t["question"] == t["caption"]
    k = t["caption_id"].index("dev-850-0-0")
    assert (t["answer"][k], t["image_id"][k], t["image_id_b"][k]) == ("false", "dev-850-0-img0", "dev-850-0-img1")
    assert t["image_b"][k] == (root / "images" / "nlvr2" / "dev-850-0-img1.png").read_bytes()
    for s in ("", "_b"):
        assert all(b[0] == [0, 0, 1, 1] and tags[0] == "" for b, tags in zip(t[f"boxes{s}"], t[f"tags{s}"]))
        assert all(len(f) == len(b) and len(f[0]) == 1280 + 6 for f, b in zip(t[f"region_features{s}"],
                                                                              t[f"boxes{s}"]))
    # The second image's regions are what the same detector and backbone give it as a first image.
    worker = builder.UnitBuilder(cfg.__dict__)
    _, rgb, _ = worker.decode([str(root / "images" / "nlvr2" / "dev-850-0-img1.png"), 0, -1])
    boxes, tags, feats = worker.image_regions(rgb, None)
    assert t["tags_b"][k] == tags and np.array(t["boxes_b"][k]) == pytest.approx(boxes)
    assert np.array(t["region_features_b"][k]) == pytest.approx(feats, abs=1e-5)
    assert not np.allclose(t["region_features"][k][0], t["region_features_b"][k][0])  # two images, two features
    assert set(read_vocab_file(cfg.out, "tags.txt")) == {tag for s in ("", "_b") for ts in t[f"tags{s}"]
                                                         for tag in ts if tag}
    assert any(len(tags) > 1 for tags in t["tags_b"])  # SSD found objects in second images too
    st = collect(cfg.out)  # data stats count both images of a pair
    assert st.rows == {"val": 8} and len(st.images["val"]) == 8 and len(st.regions_per_image) == 8
    # The sample is all dev: no train split to count answers in, but NLVR2's two classes are fixed.
    assert m["answers"] == 2 and read_vocab_file(cfg.out, "answers.txt") == ["true", "false"]


def _nlvr2_official(root) -> str:
    """NLVR2 as released: train.json records with ``directory``, images in images/train/<directory>/.
    Pair 0 has two statements; pair 1 lacks its right image, pair 2's left image is no image; pair 4
    names its left image by a local ``left_url``."""
    images = root / "images" / "train" / "7"
    fx.write_images(str(images), ["train-1-0-img0.png", "train-1-0-img1.png", "train-1-1-img0.png",
                                  "train-1-2-img1.png", "train-1-4-img1.png"])
    fx.write_images(str(root / "images" / "mine"), ["left.jpg"])
    (images / "train-1-2-img0.png").write_bytes(b"not a png")
    records = [{"identifier": "train-1-0-0", "sentence": "Two dogs.", "label": True, "directory": 7},
               {"identifier": "train-1-0-1", "sentence": "One dog.", "label": "False", "directory": 7},
               {"identifier": "train-1-1-0", "sentence": "A cat.", "label": "True", "directory": 7},
               {"identifier": "train-1-2-0", "sentence": "A bird.", "label": "True", "directory": 7},
               {"identifier": "train-1-3-0", "sentence": "A cow.", "label": "maybe", "directory": 7},
               {"identifier": "train-1-4-0", "sentence": "A hen.", "label": "False", "directory": 7,
                "left_url": "mine/left.jpg", "right_url": "https://example.com/gone.jpg"},
               {"identifier": "pair five", "sentence": "A fox.", "label": "True", "directory": 7}]
    (root / "train.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(root)


def test_nlvr2_pairs_with_a_missing_or_undecodable_image_are_skipped(monkeypatch, tmp_path):
    src = _nlvr2_official(tmp_path / "nlvr2")
    m = fx.build_in_process(monkeypatch, BuildConfig(source=src, out=str(tmp_path / "out"), phrases=False))
    assert (m["rows_written"], m["images_written"]) == (3, 4)
    assert m["rows_skipped"] == {"missing_image": 1, "undecodable_image": 1, "invalid_label": 1,
                                 "malformed_record": 1}
    listed = {s["reason"]: s for s in m["skipped_rows"]}
    images = os.path.join(src, "images", "train", "7")
    assert listed["missing_image"]["where"] == os.path.join(images, "train-1-1-img1.png")
    assert listed["undecodable_image"]["where"] == os.path.join(images, "train-1-2-img0.png")
    assert listed["invalid_label"]["where"] == f"{src}/train.json:5"
    assert "'pair five' is not <split>-<set>-<pair>-<sentence>" in listed["malformed_record"]["detail"]
    t = _rows(tmp_path / "out")
    assert (t["caption_id"], t["answer"]) == (["train-1-0-0", "train-1-0-1", "train-1-4-0"], ["true", "false", "false"])
    assert (t["image_id"][2], t["image_id_b"][2]) == ("left", "train-1-4-img1")
    assert t["image"][2] == (tmp_path / "nlvr2" / "images" / "mine" / "left.jpg").read_bytes()
    assert read_vocab_file(str(tmp_path / "out"), "answers.txt") == ["false", "true"]


# ---------------------------------------------------------------------------------------------- RefCOCO+


def _refcoco(root) -> str:
    """refs(unc).json + instances.json over two coco_mini images (640x427 and 640x426): ref 0's box
    is (64, 42.7, 320, 213.5) px = 0.1 .. 0.6 of its image; ref 1's overhangs the corner; ref 2
    names an annotation instances.json lacks."""
    root.mkdir()
    images = [{"id": 397133, "file_name": "000000397133.jpg", "width": 640, "height": 427},
              {"id": 349860, "file_name": "000000349860.jpg", "width": 640, "height": 426}]
    annotations = [{"id": 1, "image_id": 397133, "bbox": [64, 42.7, 320, 213.5], "category_id": 1},
                   {"id": 2, "image_id": 349860, "bbox": [600, 400, 100, 50], "category_id": 62},
                   {"id": 3, "image_id": 397133, "bbox": [400, 200, 100, 100], "category_id": 62}]
    categories = [{"id": 1, "name": "person"}, {"id": 62, "name": "chair"}]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                     "categories": categories}))
    refs = [{"ref_id": 0, "ann_id": 1, "image_id": 397133, "split": "train", "category_id": 1,
             "sentences": [{"sent": "man on the left", "sent_id": 10}, {"sent": "guy in white", "sent_id": 11}]},
            {"ref_id": 1, "ann_id": 2, "image_id": 349860, "split": "testA", "category_id": 62,
             "sentences": [{"sent": "chair in the corner", "sent_id": 12}]},
            {"ref_id": 2, "ann_id": 99, "image_id": 349860, "split": "testA", "category_id": 62,
             "sentences": [{"sent": "no such object", "sent_id": 13}]}]
    (root / "refs(unc).json").write_text(json.dumps(refs))
    return str(root)


def test_refcoco_target_box_is_the_refs_box_normalised_by_its_image(tmp_path):
    images = shared_data("coco_mini") / "val2017"
    reader = open_reader(_refcoco(tmp_path / "refcoco+"), image_root=str(images))
    assert (reader.name, reader.task) == ("refcoco", "refcoco")
    records = list(reader.records())
    assert [type(r) for r in records] == [Record, Record, Record, Skipped]
    assert [(r.caption, r.caption_id, r.image_id, r.split) for r in records[:3]] == [
        ("man on the left", "10", "397133", "train"), ("guy in white", "11", "397133", "train"),
        ("chair in the corner", "12", "349860", "testA")]
    assert records[0].target_box == pytest.approx((0.1, 0.1, 0.6, 0.6), abs=1e-6)
    # 700 / 640 and 450 / 426 overhang the image: clipped to its edge.
    assert records[2].target_box == pytest.approx((600 / 640, 400 / 426, 1.0, 1.0), abs=1e-6)
    assert os.path.isfile(records[0].image.path)
    assert records[3].reason == "malformed_record" and "ann_id 99" in records[3].detail
    assert reader.ground_truth()["397133"][0].box == pytest.approx((64, 42.7, 384, 256.2))


def test_refcoco_build_needs_regions_and_writes_target_boxes(monkeypatch, tmp_path):
    images = str(shared_data("coco_mini") / "val2017")
    src = _refcoco(tmp_path / "refcoco+")
    with pytest.raises(BuildError, match=r"needs --regions \(ssd, gt"):
        fx.build_in_process(monkeypatch, BuildConfig(source=src, out=str(tmp_path / "none"), image_root=images))
    cfg = BuildConfig(source=src, out=str(tmp_path / "out"), image_root=images, layout="refcoco", regions="gt",
                      feature_image_size=64, phrases=False)
    m = fx.build_in_process(monkeypatch, cfg)
    assert (m["task"], m["rows_written"], m["images_written"], m["rows_skipped"]) == (
        "refcoco", 3, 2, {"malformed_record": 1})
    validate_shards(cfg.out)
    train = pq.read_table(os.path.join(cfg.out, "train")).to_pydict()
    assert "question" not in train and "answer" not in train
    assert np.array(train["target_box"]) == pytest.approx(np.array([[0.1, 0.1, 0.6, 0.6]] * 2), abs=1e-6)
    # The candidates: the whole image, then the instance boxes, larger first.
    assert train["tags"][0] == ["", "person", "chair"]
    assert train["boxes"][0][1] == pytest.approx([0.1, 0.1, 0.6, 0.6], abs=1e-6)
    test_a = pq.read_table(os.path.join(cfg.out, "testA")).to_pydict()
    assert test_a["caption"] == ["chair in the corner"] and test_a["tags"] == [["", "chair"]]


def test_refcoco_pickle_is_refused_never_loaded(tmp_path):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")  # what loading this pickle would run

    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "refs(unc).p").write_bytes(pickle.dumps([Payload()]))
    reader = open_reader(str(tmp_path / "evil"))
    assert reader.name == "refcoco"
    with pytest.raises(LayoutError, match=r"refs\(unc\)\.p: a pickle, which AlignLab never loads") as e:
        list(reader.records())
    assert not marker.exists()

    # The message says how to give the refs as JSON, which then builds.
    assert "REFER(...).data['refs']" in str(e.value) and "refs(unc).json" in str(e.value)
    src = _refcoco(tmp_path / "refcoco+")
    assert sum(isinstance(r, Record) for r in open_reader(src).records()) == 3


# ---------------------------------------------------------------------------------------------- the task, vocabularies


def test_vocab_from_a_caption_set_keeps_its_vocabularies_but_counts_the_tasks_answers(monkeypatch, tmp_path):
    root = shared_data("vl_fixtures")
    captions = tmp_path / "captions"
    m = fx.build_in_process(monkeypatch, BuildConfig(source=fx.coco(str(tmp_path / "coco")), out=str(captions),
                                                     regions="gt", feature_image_size=64, min_count=1))
    assert m["task"] == "retrieval" and "answers" not in m
    assert (captions / "tags.txt").exists() and (captions / "concepts.txt").exists()

    snli = tmp_path / "snli_ve"
    m = fx.build_in_process(monkeypatch, BuildConfig(source=str(root / "visual_entailment"), out=str(snli),
                                                     phrases=False, vocab_from=str(captions)))
    assert (m["task"], m["rows_written"], m["images_written"]) == ("snli_ve", 16, 2)
    for name in ("tags.txt", "concepts.txt"):
        assert (snli / name).read_text() == (captions / name).read_text()
    assert read_vocab_file(str(snli), "answers.txt") == ["entailment", "neutral", "contradiction"]
    assert m["answers"] == 3

    # A set whose source has answers.txt takes it (a test set built from its task's train set).
    vqa, gqa = tmp_path / "vqa", tmp_path / "gqa"
    fx.build_in_process(monkeypatch, BuildConfig(source=str(root / "vqav2"), out=str(vqa), phrases=False))
    m = fx.build_in_process(monkeypatch, BuildConfig(source=str(root / "gqa"), out=str(gqa), phrases=False,
                                                     vocab_from=str(vqa)))
    assert m["task"] == "gqa"
    assert read_vocab_file(str(gqa), "answers.txt") == ["net", "orange", "pitcher"]  # not its own "picture"


def test_cli_builds_a_task_layout(monkeypatch, tmp_path, capsys):
    root = shared_data("vl_fixtures")
    fx.units_in_process(monkeypatch)
    main(["data", "build", str(root / "visual_entailment"), "--out", str(tmp_path / "ve"), "--layout", "snli_ve",
          "--no-phrases"])
    summary = json.loads(capsys.readouterr().out)
    assert (summary["task"], summary["rows_written"], summary["answers"]) == ("snli_ve", 16, 3)
    # Input the user has to fix ends the command with the message alone.
    with pytest.raises(SystemExit, match="alignlab data build: .*visual_entailment: does not look like layout 'nlvr2'"):
        main(["data", "build", str(root / "visual_entailment"), "--out", str(tmp_path / "x"), "--layout", "nlvr2"])
    with pytest.raises(SystemExit, match=r"alignlab data build: .*needs --regions"):
        main(["data", "build", _refcoco(tmp_path / "refcoco+"), "--out", str(tmp_path / "y"), "--layout", "refcoco"])
