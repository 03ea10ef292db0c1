import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignlab.platform import shards as S
from alignlab.platform.ingest import count_rows

WRITER = "tests"  # the producer these tests write shard sets as


def _row(i, split="train", regions=True):
    return S.Row(image=b"\x89PNG", image_id=f"img{i // 2}", caption=f"caption {i}", caption_id=f"c{i}", split=split,
                 region_features=np.full((3, 8), i, np.float32) if regions else None,
                 boxes=np.array([[0, 0, .5, .5]] * 3, np.float32) if regions else None,
                 tags=["dog", "cat", "man"] if regions else None,
                 phrases=[["man"], ["green", "shirt"], ["man", "in", "shirt"]] if regions else None)


def test_writer_bounds_rows_per_file_and_splits(tmp_path):
    with S.ShardWriter(str(tmp_path), WRITER, rows_per_file=4) as w:
        w.write_all(_row(i) for i in range(10))
        w.write_all(_row(i, "test") for i in range(3))
    train = S.validate_shards(str(tmp_path / "train"))
    assert len(train) == 3 and [pq.read_metadata(f).num_rows for f in train] == [4, 4, 2]
    assert count_rows(str(tmp_path / "test")) == 3
    t = pq.read_table(train[0])
    assert t.schema.metadata[S.SCHEMA_VERSION_KEY] == b"1"
    assert np.asarray(t.column("region_features")[1].as_py()).shape == (3, 8)
    assert t.column("phrases")[0].as_py() == [["man"], ["green", "shirt"], ["man", "in", "shirt"]]


def test_optional_columns_are_optional(tmp_path):
    with S.ShardWriter(str(tmp_path), WRITER) as w:
        w.write(_row(0, regions=False))
    (f,) = S.validate_shards(str(tmp_path))
    assert "region_features" not in pq.read_schema(f).names


def _write(path, table):
    pq.write_table(table, str(path))
    return str(path)


def test_missing_column_names_file_and_column(tmp_path):
    table = S.rows_to_table([_row(0).__dict__]).drop_columns(["caption_id"])
    f = _write(tmp_path / "bad.parquet", table)
    with pytest.raises(S.ShardSchemaError) as e:
        S.validate_shards(str(tmp_path))
    assert f in str(e.value) and "caption_id" in str(e.value)


def test_mistyped_column_names_expected_type(tmp_path):
    good = S.rows_to_table([_row(0).__dict__])
    bad = good.set_column(good.schema.get_field_index("boxes"), "boxes",
                          pa.array([[1.0, 2.0]], type=pa.list_(pa.float64())))
    _write(tmp_path / "bad.parquet", bad)
    with pytest.raises(S.ShardSchemaError, match=r"column 'boxes' has type .* expected list<fixed_size_list<float32>\[4\]>"):
        S.validate_shards(str(tmp_path))
    bad = good.set_column(good.schema.get_field_index("caption"), "caption", pa.array([3]))
    _write(tmp_path / "bad.parquet", bad)
    with pytest.raises(S.ShardSchemaError, match="column 'caption' has type int64, expected string"):
        S.validate_shards(str(tmp_path))


def test_newer_schema_version_is_refused(tmp_path):
    t = S.rows_to_table([_row(0).__dict__])
    t = t.replace_schema_metadata({S.SCHEMA_VERSION_KEY: b"99"})
    _write(tmp_path / "new.parquet", t)
    with pytest.raises(S.ShardSchemaError, match="version 99"):
        S.validate_shards(str(tmp_path))


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards at"):
        S.validate_shards(str(tmp_path / "nope"))


def test_qa_columns_are_typed_checked_and_uniform_per_split(tmp_path):
    caption, question = _row(0, regions=False), _row(1, regions=False)
    question.question, question.answer = question.caption, "yes"
    with S.ShardWriter(str(tmp_path / "mixed"), WRITER, prefix="a") as w:  # a caption row beside a QA row: nulls
        w.write_all([caption, question])
    (f,) = S.validate_shards(str(tmp_path / "mixed"))
    t = pq.read_table(f)
    assert t.column("question").to_pylist() == [None, "caption 1"] and t.column("answer").to_pylist() == [None, "yes"]
    assert S.has_qa_rows(str(tmp_path / "mixed"))
    with S.ShardWriter(str(tmp_path / "captions"), WRITER) as w:
        w.write(caption)
    assert not S.has_qa_rows(str(tmp_path / "captions"))
    # A split whose files disagree cannot be read with one column list: named at start-up.
    with S.ShardWriter(str(tmp_path / "mixed"), WRITER, prefix="b") as w:
        w.write(caption)
    with pytest.raises(S.ShardSchemaError, match=r"b-00000.parquet: has no 'question' / 'answer' columns"):
        S.has_qa_rows(str(tmp_path / "mixed"))

    bad = t.set_column(t.schema.get_field_index("answer"), "answer", pa.array([None, 3], type=pa.int64()))
    f = _write(tmp_path / "bad.parquet", bad)
    with pytest.raises(S.ShardSchemaError, match=f"{f}: column 'answer' has type int64, expected string"):
        S.validate_schema(bad.schema, f)
    with pytest.raises(S.ShardSchemaError, match="has column 'question' without its partner"):
        S.validate_schema(t.drop_columns(["answer"]).schema, f)


@pytest.mark.parametrize("damage", ["truncated", "empty", "not_parquet"])
def test_unreadable_file_is_named_at_start_up(tmp_path, damage):
    with S.ShardWriter(str(tmp_path), WRITER) as w:
        w.write_all(_row(i) for i in range(4))
    (f,) = S.list_parquet(str(tmp_path))
    data = open(f, "rb").read()
    damaged = {"truncated": data[: len(data) // 2], "empty": b"", "not_parquet": b"caption\tx\n" * 20}
    open(f, "wb").write(damaged[damage])
    with pytest.raises(S.ShardSchemaError, match=rf"{f}: not a readable Parquet file \(.+\); it may be truncated"):
        S.validate_shards(str(tmp_path))


def _md5s(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_no_writer_writes_into_another_writers_set(tmp_path):
    with S.ShardWriter(str(tmp_path), "alignlab data build") as w:
        w.write_all(_row(i) for i in range(3))
    S.write_text(str(tmp_path), "tags.txt", "dog\n", "alignlab data build")
    S.write_manifest(str(tmp_path), {"rows_written": 3}, "alignlab data build")
    before = _md5s(tmp_path)
    assert S.read_manifest(str(tmp_path))["producer"] == "alignlab data build" and len(before) == 3
    refused = rf"{tmp_path}: holds a shard set made by alignlab data build .* nothing was written"
    with pytest.raises(S.ShardFolderError, match=refused):
        S.ShardWriter(str(tmp_path), "alignlab data synth")
    with pytest.raises(S.ShardFolderError, match=refused):
        S.write_text(str(tmp_path), "tags.txt", "cat\n", "alignlab data synth")
    with pytest.raises(S.ShardFolderError, match=refused):
        S.write_manifest(str(tmp_path), {"rows_written": 0}, "alignlab data synth")
    assert _md5s(tmp_path) == before
    with S.ShardWriter(str(tmp_path), "alignlab data build", prefix="more") as w:  # its own set: allowed
        w.write(_row(9))
    assert len(_md5s(tmp_path)) == 4


@pytest.mark.parametrize("manifest, owner", [
    ({"source": "alignlab.platform.synth", "rows_written": 4}, "alignlab data synth"),  # before the producer key
    ({"build": {"phrases": True}, "rows_written": 4}, "alignlab data build"),
    ({"rows_written": 4}, None),  # hand-written: no writer may assume it is theirs
    ("{not json", None),
])
def test_manifest_owner_of_older_and_foreign_sets(tmp_path, manifest, owner):
    (tmp_path / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    for producer in ("alignlab data synth", "alignlab data build"):
        if producer == owner:
            S.claim_folder(str(tmp_path), producer)
        else:
            with pytest.raises(S.ShardFolderError, match=f"made by {owner or 'an unknown writer'}"):
                S.claim_folder(str(tmp_path), producer)


def test_a_split_digest_follows_its_data_not_its_place(tmp_path):
    import shutil

    with S.ShardWriter(str(tmp_path / "a"), WRITER, rows_per_file=4) as w:
        w.write_all(_row(i) for i in range(6))
    summary = S.describe_split(str(tmp_path / "a" / "train"))
    assert (summary.rows, summary.files) == (6, 2)
    assert summary.schema.field("region_features").type == S.region_features_type(8)
    shutil.copytree(tmp_path / "a", tmp_path / "copy")  # the same files elsewhere: the same digest
    assert S.describe_split(str(tmp_path / "copy" / "train")).digest == summary.digest
    with S.ShardWriter(str(tmp_path / "b"), WRITER, rows_per_file=4) as w:  # one caption differs
        w.write_all(_row(i) if i != 5 else S.Row(**{**_row(i).__dict__, "caption": "another"}) for i in range(6))
    assert S.describe_split(str(tmp_path / "b" / "train")).digest != summary.digest
    (tmp_path / "a" / "train" / "part-00001.parquet").write_bytes(b"PAR1 cut short")
    with pytest.raises(S.ShardSchemaError, match="part-00001.parquet: not a readable Parquet file"):
        S.describe_split(str(tmp_path / "a" / "train"))
