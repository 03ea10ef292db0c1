"""End-to-end ``alignlab data build`` runs through Ray Data: manifest counts, resume, object storage
(moto S3 on loopback), the CLI with ``stats``, and the real COCO mini set."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import test_databuild_fixtures as fx
from alignlab.platform.cli import main
from alignlab.platform.databuild.builder import BuildError, build
from alignlab.platform.databuild.config import BuildConfig
from alignlab.platform.shards import filesystem, list_parquet, read_manifest, read_vocab_file, validate_shards
from conftest import shared_data


def _table(out) -> dict:
    return pq.read_table(str(out), columns=["image_id", "caption", "caption_id", "split", "phrases"]).to_pydict()


def test_build_counts_skips_and_resumes(ray_session, tmp_path):
    src, out = fx.flickr(str(tmp_path / "flickr")), tmp_path / "shards"
    cfg = BuildConfig(source=src, out=str(out), min_count=2, workers=2)
    m = build(cfg)
    assert (m["rows_written"], m["images_written"]) == (3, 2)
    assert m["rows_skipped"] == {"empty_caption": 1, "missing_image": 2, "no_split": 2}
    assert m["files"] == ["train/part-00000.parquet"] and m["complete"]
    validate_shards(str(out))
    t = _table(out / "train")
    assert t["caption_id"] == ["img0#0", "img0#1", "img1#0"]
    assert t["phrases"][0] == fx.KNOWN_TUPLES
    # The dog caption is 2 of the 3 training sentences (min_count=2); the man caption only one.
    concepts = read_vocab_file(str(out), "concepts.txt")
    assert set(concepts) == {"dog", "two dog", "ball", "red ball", "grass", "dog play with ball", "ball on grass"}

    mtime = os.path.getmtime(out / "train" / "part-00000.parquet")
    again = build(cfg)
    assert again["units_skipped_as_done"] == 2
    assert {k: again[k] for k in ("rows_written", "rows_skipped", "files")} == \
        {k: m[k] for k in ("rows_written", "rows_skipped", "files")}
    assert os.path.getmtime(out / "train" / "part-00000.parquet") == mtime
    with pytest.raises(BuildError, match="max_caption_words"):
        build(BuildConfig(source=src, out=str(out), max_caption_words=5))


def test_build_to_s3(ray_session, tmp_path, s3_root):
    uri = s3_root("wds")
    m = build(BuildConfig(source=fx.webdataset(str(tmp_path / "wds")), out=uri, phrases=False))
    assert (m["rows_written"], m["rows_skipped"]) == (2, {"missing_image": 1})
    assert read_manifest(uri)["files"] == ["train/part-00000.parquet"]
    (path,) = validate_shards(uri)
    fs, _ = filesystem(uri)
    t = pq.read_table(path, filesystem=fs).to_pydict()
    assert t["image_id"] == ["000000000", "000000001"] and t["image"][1] == fx.jpeg(1)


def test_cli_build_gt_regions_then_stats(ray_session, tmp_path, capsys):
    src, out, report = fx.coco(str(tmp_path / "coco")), tmp_path / "shards", tmp_path / "report"
    main(["data", "build", src, "--out", str(out), "--regions", "gt", "--min-count", "1",
          "--feature-image-size", "64"])
    assert '"rows_written": 3' in capsys.readouterr().out
    t = pq.read_table(str(out / "train")).to_pydict()
    boxes = np.concatenate([np.array(b).reshape(-1, 4) for b in t["boxes"]])
    assert boxes.min() >= 0 and boxes.max() <= 1 and t["tags"][2] == ["", "dog"]
    assert read_vocab_file(str(out), "tags.txt") == ["dog", "person"]  # dog is on 2 images, person on 1

    main(["data", "stats", str(out), "--out", str(report)])
    md = (report / "stats.md").read_text()
    assert "| train | 3 | 2 |" in md and "| man | 2 |" in md and "| dog | 2 |" in md
    assert "Detected regions per image: mean 1.5" in md  # the whole-image box is not counted
    assert (report / "stats.png").stat().st_size > 1000

    # A set built later takes the first one's vocabularies, whatever its own data would count.
    later = tmp_path / "later"
    main(["data", "build", fx.flickr(str(tmp_path / "flickr")), "--out", str(later), "--vocab-from", str(out)])
    for name in ("tags.txt", "concepts.txt"):
        assert (later / name).read_text() == (out / name).read_text()
    assert read_manifest(str(later))["vocab_from"] == str(out)
    with pytest.raises(BuildError, match=r"--vocab-from .*nowhere: no vocabulary there"):
        build(BuildConfig(source=fx.flickr(str(tmp_path / "flickr")), out=str(tmp_path / "x"),
                          vocab_from=str(tmp_path / "nowhere")))


def test_cli_rejects_bad_option_before_running(tmp_path):
    with pytest.raises(SystemExit, match=r"invalid max_regions=0: must be an integer >= 1"):
        main(["data", "build", str(tmp_path), "--out", str(tmp_path / "o"), "--max-regions", "0"])


@pytest.mark.slow
def test_real_coco_mini_with_ground_truth_boxes(ray_session, tmp_path):
    root = shared_data("coco_mini")
    out = tmp_path / "coco"
    m = build(BuildConfig(source=str(root), out=str(out), regions="gt", min_count=5, rows_per_file=400,
                          feature_image_size=224))
    assert m["layout"] == "coco" and (m["rows_written"], m["images_written"]) == (795, 159)
    assert m["rows_skipped"] == {}
    cols = ["image_id", "split", "boxes", "tags", "region_features"]
    t = pa.concat_tables([pq.read_table(f, columns=cols) for f in list_parquet(str(out))]).to_pydict()
    assert set(t["split"]) == {"train", "val"}
    n_regions = {i: len(b) for i, b in zip(t["image_id"], t["boxes"])}
    assert 0 < max(n_regions.values()) <= 50
    boxes = np.concatenate([np.array(b).reshape(-1, 4) for b in t["boxes"] if b])
    assert boxes.min() >= 0 and boxes.max() <= 1 and (boxes[:, 2] > boxes[:, 0]).all()
    assert len(t["region_features"][0][0]) == 1280 + 6
    assert "person" in read_vocab_file(str(out), "tags.txt")
    assert len(read_vocab_file(str(out), "concepts.txt")) > 10
