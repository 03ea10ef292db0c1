"""The image-text shard format (schema version 1).

A shard set is a directory (local path or any pyarrow filesystem URI) laid out as::

    ROOT/
      train/part-00000.parquet ...   one sub-directory per split
      test/part-00000.parquet ...
      vocab.txt        optional WordPiece vocabulary built for this corpus (synthetic set)
      tags.txt         optional tag (object-class) vocabulary, one per line
      concepts.txt     optional phrase-concept vocabulary, one tuple per line, words space-joined
      answers.txt      optional image-QA answer vocabulary, one answer per line, most frequent first
      manifest.json    build manifest (rows written / skipped by reason, files) and its ``producer``,
                       the writer that made the set: no other writer ever writes into the folder

Each Parquet file has these columns (``alignlab.schema_version = 1`` in the file metadata):

=================  ========================================  ==========================================
column             Arrow type                                meaning
=================  ========================================  ==========================================
image              binary                                    encoded image bytes (JPEG / PNG)
image_id           string                                    unique per image
caption            string                                    one caption; an image may have several rows
caption_id         string                                    unique per caption
split              string                                    train / val / test ...
region_features*   list<fixed_size_list<float32>[D]>         N×D pooled region features, position-aware
                                                             (last 6 = x1, y1, x2, y2, w, h normalised,
                                                             as VinVL's 2054 = 2048 + 6)
boxes*             list<fixed_size_list<float32>[4]>         N×4 boxes x1, y1, x2, y2 normalised to [0, 1]
tags*              list<string>                              N object-class names, one per box
phrases*           list<list<string>>                        phrase-concept tuples from the caption:
                                                             [obj], [attr, obj], [subj, rel, obj]
question*          string                                    non-null on an image-QA row (VQA, GQA):
                                                             the question, which ``caption`` repeats;
                                                             null on a caption row
answer*            string                                    the answer of an image-QA row, null on a
                                                             caption row
text_feature*      fixed_size_list<float32>[D]               a frozen sentence encoder's unit-norm
                                                             embedding of the caption (data build
                                                             ``--text-features``)
human_answers*     list<string>                              VQA v2: every annotator's answer to the
                                                             question (10), for VQA accuracy
image_b*           binary                                    NLVR2: the pair's second image (the
                                                             first is ``image``)
image_id_b*        string                                    NLVR2: the second image's id
region_features_b*, boxes_b*, tags_b*                        NLVR2: the second image's regions, typed
                                                             as their counterparts
target_box*        fixed_size_list<float32>[4]               RefCOCO+: the referred object's box,
                                                             x1, y1, x2, y2 normalised to [0, 1]
negative_caption*  string                                    a caption false of the image that differs
                                                             from a true one in one thing ("" where
                                                             the row has none): a hard negative
negative_phrases*  list<list<string>>                        its phrase tuples, as ``phrases``
=================  ========================================  ==========================================

Columns marked * are optional; when present, ``region_features``, ``boxes`` and ``tags`` have one
entry per region. A region tagged ``""`` is no detected object: ``alignlab data build`` puts the
whole image (box 0, 0, 1, 1) first in every image, with that empty tag. ``question`` and ``answer`` come together. An image-QA row keeps its question
in ``caption`` as well, so that every row has text for the caption objectives (MLM, ITM) and
readers that know nothing of QA still work; the QA objective reads ``answer``, mapped to its
line in ``answers.txt`` (an answer outside it gets no QA loss). The files of one split carry the
QA columns all or none, since the training read asks every file of a split for the same columns.
Extra columns are allowed and passed through.

A downstream task's shard set (``alignlab finetune``) is a shard set of that task's rows; its
manifest names the task (``"task"``: one of :data:`TASKS`). Its rows hold the task's text in
``caption``, and its label:

* ``vqa``, ``gqa``, ``snli_ve``, ``nlvr2`` are classifications over ``answers.txt`` (most frequent
  first): ``question`` repeats the text (a question, an SNLI-VE hypothesis, an NLVR2 statement)
  and ``answer`` is the class (an answer; ``entailment`` / ``neutral`` / ``contradiction``;
  ``true`` / ``false``). VQA v2 rows add ``human_answers``; NLVR2 rows add the ``*_b`` columns of
  their second image.
* ``refcoco`` rows (a referring expression in ``caption``) carry ``target_box``; the model scores
  the image's regions, so the set has ``region_features`` and ``boxes``.
* ``retrieval`` rows are caption rows, as in pre-training.

A task set's ``tags.txt`` and ``concepts.txt`` (and the tokenizer) are those of the pre-training
set (``alignlab data build --vocab-from``, or the synthetic tasks' own copy): a fine-tuned model
keeps the pre-trained rows of those vocabularies. Its ``answers.txt`` is the task's own.

A compositional split (ARO / Winoground style; the synthetic set writes ``compositional/``) holds
candidate captions of its images: each row carries one candidate in ``caption`` and ``phrases``
and two more int64 columns, :data:`COMPOSITIONAL_COLUMNS`: ``candidate_type``, an index into
:data:`CANDIDATE_TYPES` (0 = the true caption), and ``group_id``, shared by an image's true
caption and its perturbations, which are false of the image.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
SCHEMA_VERSION_KEY = b"alignlab.schema_version"


class ShardSchemaError(ValueError):
    """A shard file does not follow the schema; the message names the file and the column."""


class ShardFolderError(ValueError):
    """A writer was pointed at a folder holding a shard set another writer made; nothing was
    written. The message names the folder and both writers."""


REQUIRED_COLUMNS: dict[str, pa.DataType] = {
    "image": pa.binary(),
    "image_id": pa.string(),
    "caption": pa.string(),
    "caption_id": pa.string(),
    "split": pa.string(),
}

OPTIONAL_COLUMNS = ("region_features", "boxes", "tags", "phrases", "question", "answer", "text_feature",
                    "human_answers", "image_b", "image_id_b", "region_features_b", "boxes_b", "tags_b", "target_box",
                    "negative_caption", "negative_phrases")
# A caption false of the row's image that differs from a true caption in one thing ("" where the
# row has none), and its phrase tuples: a hard negative for a model that trains on them.
NEGATIVE_COLUMNS = ("negative_caption", "negative_phrases")
# The downstream tasks a shard set's manifest may name (``"task"``).
from alignlab.models.inputs import TASKS  # noqa: E402,F401  (torch-free)
# An NLVR2 row's second image: each column is typed as the one it suffixes.
PAIR_SUFFIX = "_b"
PAIR_COLUMNS = ("image_b", "image_id_b", "region_features_b", "boxes_b", "tags_b")
QA_COLUMNS = ("question", "answer")
# The tag of a region that is no detected object: the whole-image box that `alignlab data build`
# puts first (``--whole-image-box``). It belongs to no tag vocabulary.
WHOLE_IMAGE_TAG = ""
# The vocabularies a shard set may carry beside its files (``alignlab data build --vocab-from``
# copies them).
VOCABULARY_FILES = ("vocab.txt", "tags.txt", "concepts.txt", "answers.txt")
COMPOSITIONAL_COLUMNS = ("candidate_type", "group_id")
CANDIDATE_TYPES = ("true", "swap_attribute", "swap_relation", "wrong_count", "replace_object")


def region_features_type(dim: int) -> pa.DataType:
    return pa.list_(pa.list_(pa.float32(), dim))


BOXES_TYPE = pa.list_(pa.list_(pa.float32(), 4))
TAGS_TYPE = pa.list_(pa.string())
PHRASES_TYPE = pa.list_(pa.list_(pa.string()))


def _check_optional(name: str, tp: pa.DataType) -> str | None:
    """None if ``tp`` is acceptable for optional column ``name``, else the expected type."""
    if name in PAIR_COLUMNS:
        base = name[: -len(PAIR_SUFFIX)]
        if base in REQUIRED_COLUMNS:
            want = REQUIRED_COLUMNS[base]
            ok = tp == want or (want == pa.string() and tp == pa.large_string()) \
                or (want == pa.binary() and tp == pa.large_binary())
            return None if ok else str(want)
        name = base
    if name == "human_answers":
        ok = pa.types.is_list(tp) and (pa.types.is_string(tp.value_type) or pa.types.is_large_string(tp.value_type))
        return None if ok else "list<string>"
    if name == "target_box":
        ok = pa.types.is_fixed_size_list(tp) and tp.list_size == 4 and pa.types.is_floating(tp.value_type)
        return None if ok else "fixed_size_list<float32>[4]"
    if name == "region_features":
        ok = (pa.types.is_list(tp) or pa.types.is_large_list(tp)) and pa.types.is_fixed_size_list(tp.value_type) \
            and pa.types.is_floating(tp.value_type.value_type)
        return None if ok else "list<fixed_size_list<float32>[D]>"
    if name == "boxes":
        ok = (pa.types.is_list(tp) or pa.types.is_large_list(tp)) and pa.types.is_fixed_size_list(tp.value_type) \
            and tp.value_type.list_size == 4 and pa.types.is_floating(tp.value_type.value_type)
        return None if ok else "list<fixed_size_list<float32>[4]>"
    if name == "tags":
        ok = pa.types.is_list(tp) and (pa.types.is_string(tp.value_type) or pa.types.is_large_string(tp.value_type))
        return None if ok else "list<string>"
    if name in ("phrases", "negative_phrases"):
        ok = pa.types.is_list(tp) and pa.types.is_list(tp.value_type) and pa.types.is_string(tp.value_type.value_type)
        return None if ok else "list<list<string>>"
    if name == "text_feature":
        ok = pa.types.is_fixed_size_list(tp) and pa.types.is_floating(tp.value_type)
        return None if ok else "fixed_size_list<float32>[D]"
    if name in QA_COLUMNS or name == "negative_caption":
        return None if pa.types.is_string(tp) or pa.types.is_large_string(tp) else "string"
    return None


def validate_schema(schema: pa.Schema, where: str) -> None:
    """Raise :class:`ShardSchemaError` naming ``where`` and the offending column."""
    names = set(schema.names)
    for col, tp in REQUIRED_COLUMNS.items():
        if col not in names:
            raise ShardSchemaError(
                f"{where}: missing required column '{col}' ({tp}); found columns {sorted(names)}. "
                f"See alignlab.platform.shards for the schema.")
        got = schema.field(col).type
        if not (got == tp or (tp == pa.string() and got == pa.large_string())
                or (tp == pa.binary() and got == pa.large_binary())):
            raise ShardSchemaError(f"{where}: column '{col}' has type {got}, expected {tp}")
    for col in OPTIONAL_COLUMNS:
        if col in names:
            expected = _check_optional(col, schema.field(col).type)
            if expected:
                raise ShardSchemaError(
                    f"{where}: column '{col}' has type {schema.field(col).type}, expected {expected}")
    qa = [c for c in QA_COLUMNS if c in names]
    if qa and len(qa) < len(QA_COLUMNS):
        raise ShardSchemaError(f"{where}: has column '{qa[0]}' without its partner; image-QA rows need both "
                               f"{' and '.join(repr(c) for c in QA_COLUMNS)}")
    meta = schema.metadata or {}
    version = meta.get(SCHEMA_VERSION_KEY)
    if version is not None and int(version) > SCHEMA_VERSION:
        raise ShardSchemaError(
            f"{where}: written with shard schema version {int(version)}, this AlignLab reads up to "
            f"{SCHEMA_VERSION}; upgrade alignlab")


# --------------------------------------------------------------------------------------------
# Filesystems
# --------------------------------------------------------------------------------------------


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or any URI pyarrow understands (s3://, gs://, ...)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def list_parquet(uri: str) -> list[str]:
    """Parquet files under ``uri`` (a file or a directory, recursively), sorted."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no shards at {uri!r}")
    if info.type == pafs.FileType.File:
        return [path]
    files = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(f.path for f in files if f.type == pafs.FileType.File and f.path.endswith(".parquet"))


def child_uri(root: str, name: str) -> str:
    """``ROOT/name`` for a local path or a URI; a URI's query (``?endpoint_override=...``) stays
    at the end, where pyarrow reads it."""
    if "://" not in root:
        return os.path.join(root, name)
    base, sep, query = root.partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def read_text(uri: str) -> str | None:
    """A small text file next to the shards, or None when absent."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def write_text(root: str, name: str, text: str, producer: str) -> None:
    """Write ``ROOT/name`` on behalf of ``producer`` (see :func:`claim_folder`)."""
    claim_folder(root, producer)
    fs, path = filesystem(child_uri(root, name))
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode("utf-8"))


def concept_key(concept: Iterable[str]) -> str:
    """A phrase-concept tuple's line in concepts.txt (its words space-joined): how the builders
    write the vocabulary and how the data stage and the tokenizer look tuples up in it."""
    return " ".join(map(str, concept))


def read_vocab_file(root: str, name: str) -> list[str]:
    """One entry per line of ``ROOT/name`` (tags.txt, concepts.txt, answers.txt), or [] when absent."""
    text = read_text(child_uri(root, name))
    return [line for line in text.splitlines() if line.strip()] if text else []


def validate_shards(uri: str) -> list[str]:
    """Check every file's footer and schema (cheap: footers only), so that a truncated or
    unreadable file fails at start-up, named, instead of in a Ray Data read. Returns the files."""
    files = list_parquet(uri)
    if not files:
        raise FileNotFoundError(f"no .parquet files under {uri!r}")
    fs, _ = filesystem(uri)
    for f in files:
        try:
            schema = pq.read_schema(f, filesystem=fs)
        except (pa.ArrowException, OSError) as e:
            raise ShardSchemaError(f"{f}: not a readable Parquet file ({e}); it may be truncated or still being "
                                   f"written. Rebuild it, or remove it from the shard set") from e
        validate_schema(schema, f)
    return files


def has_qa_rows(uri: str) -> bool:
    """Whether the files under ``uri`` (one split) carry the image-QA columns (footers only). A
    split mixing files with and without them is an error naming one of each: a Parquet read asks
    every file for the same columns."""
    fs, _ = filesystem(uri)
    with_qa, without = [], []
    for f in list_parquet(uri):
        (with_qa if QA_COLUMNS[0] in pq.read_schema(f, filesystem=fs).names else without).append(f)
    if with_qa and without:
        raise ShardSchemaError(f"{without[0]}: has no '{QA_COLUMNS[0]}' / '{QA_COLUMNS[1]}' columns, which "
                               f"{with_qa[0]} of the same split has; a split's files carry them all or none")
    return bool(with_qa)


@dataclass(frozen=True)
class SplitSummary:
    """What a run records of a split it reads (MLflow's dataset of the run): where it is, a digest
    of its data, its Arrow schema (the first file's; :func:`validate_shards` holds every file to
    the same columns), its rows and files."""

    uri: str
    digest: str
    schema: pa.Schema
    rows: int
    files: int


def describe_split(uri: str) -> SplitSummary:
    """A :class:`SplitSummary` of the split at ``uri``, from the Parquet footers alone (two small
    reads per file, as :func:`validate_shards` does).

    The digest is a SHA-256 over each file's path within the split and its raw footer bytes. A
    footer holds every row group's row count, byte sizes and column statistics, so rewriting any
    file with other rows changes it, while the same files copied elsewhere (to S3, another disk)
    keep it. The manifest is no source for it: it covers the whole set, not a split, records no
    checksums, and a resumed ``alignlab data build`` rewrites it (its timings) over the same files.
    Raw bytes rather than pyarrow's parsed metadata, so a pyarrow upgrade keeps the digest."""
    files = list_parquet(uri)
    if not files:
        raise FileNotFoundError(f"no .parquet files under {uri!r}")
    fs, base = filesystem(uri)
    digest = hashlib.sha256()
    rows = 0
    schema = None
    for f in files:
        with fs.open_input_file(f) as handle:
            size = handle.size()
            tail = handle.read_at(8, size - 8) if size >= 12 else b""
            if tail[4:] != b"PAR1":
                raise ShardSchemaError(f"{f}: not a readable Parquet file (no Parquet footer); it may be truncated "
                                       f"or still being written. Rebuild it, or remove it from the shard set")
            length = int.from_bytes(tail[:4], "little")
            footer = handle.read_at(length, size - 8 - length)
        name = posixpath.relpath(f, base) if f != base else posixpath.basename(f)
        digest.update(f"{name}\0{len(footer)}\0".encode() + footer)
        # The footer parses as a Parquet file of its own: the magic, the footer, its length, the magic.
        meta = pq.read_metadata(pa.BufferReader(b"PAR1" + footer + tail))
        rows += meta.num_rows
        schema = schema or meta.schema.to_arrow_schema()
    return SplitSummary(uri=uri, digest=digest.hexdigest()[:16], schema=schema, rows=rows, files=len(files))


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One image-caption pair; ``None`` optional fields are left out of the file."""

    image: bytes
    image_id: str
    caption: str
    caption_id: str
    split: str
    region_features: np.ndarray | None = None  # (N, D) float32
    boxes: np.ndarray | None = None  # (N, 4) float32 in [0, 1]
    tags: list[str] | None = None
    phrases: list[list[str]] | None = None
    question: str | None = None  # set on an image-QA row, whose caption is the same question
    answer: str | None = None


def rows_to_table(rows: list[dict[str, Any]], region_dim: int | None = None) -> pa.Table:
    """Rows (dicts with the schema's keys; arrays as numpy) -> a schema-conformant table."""
    if not rows:
        raise ValueError("rows_to_table needs at least one row")
    keys = rows[0].keys()
    fields = [pa.field(c, t) for c, t in REQUIRED_COLUMNS.items()]
    arrays = [pa.array([r[c] for r in rows], type=t) for c, t in REQUIRED_COLUMNS.items()]
    for suffix in ("", PAIR_SUFFIX):
        if suffix and f"image{suffix}" in keys and rows[0][f"image{suffix}"] is not None:
            for c in (f"image{suffix}", f"image_id{suffix}"):
                t = REQUIRED_COLUMNS[c[: -len(suffix)]]
                arrays.append(pa.array([r[c] for r in rows], type=t))
                fields.append(pa.field(c, t))
        feats, boxes, tags = f"region_features{suffix}", f"boxes{suffix}", f"tags{suffix}"
        if feats in keys and rows[0][feats] is not None:
            dim = region_dim or int(np.asarray(rows[0][feats]).reshape(len(rows[0][boxes]), -1).shape[1])
            values = [np.asarray(r[feats], dtype=np.float32).reshape(-1, dim) for r in rows]
            arrays.append(_nested_fixed(values, dim))
            fields.append(pa.field(feats, region_features_type(dim)))
        if boxes in keys and rows[0][boxes] is not None:
            values = [np.asarray(r[boxes], dtype=np.float32).reshape(-1, 4) for r in rows]
            arrays.append(_nested_fixed(values, 4))
            fields.append(pa.field(boxes, BOXES_TYPE))
        if tags in keys and rows[0][tags] is not None:
            arrays.append(pa.array([list(r[tags]) for r in rows], type=TAGS_TYPE))
            fields.append(pa.field(tags, TAGS_TYPE))
    if "human_answers" in keys and rows[0]["human_answers"] is not None:
        arrays.append(pa.array([list(r["human_answers"]) for r in rows], type=TAGS_TYPE))
        fields.append(pa.field("human_answers", TAGS_TYPE))
    if "target_box" in keys and rows[0]["target_box"] is not None:
        values = np.stack([np.asarray(r["target_box"], dtype=np.float32) for r in rows])
        arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), 4))
        fields.append(pa.field("target_box", pa.list_(pa.float32(), 4)))
    for c in ("phrases", "negative_phrases"):
        if c in keys and rows[0][c] is not None:
            arrays.append(pa.array([[list(p) for p in r[c]] for r in rows], type=PHRASES_TYPE))
            fields.append(pa.field(c, PHRASES_TYPE))
    if "negative_caption" in keys and rows[0]["negative_caption"] is not None:
        arrays.append(pa.array([r["negative_caption"] for r in rows], type=pa.string()))
        fields.append(pa.field("negative_caption", pa.string()))
    if "text_feature" in keys and rows[0]["text_feature"] is not None:
        values = np.stack([np.asarray(r["text_feature"], dtype=np.float32) for r in rows])
        arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1]))
        fields.append(pa.field("text_feature", pa.list_(pa.float32(), values.shape[1])))
    # Unlike the region columns, a QA column is null on caption rows, so any QA row in the file
    # brings it in (typed, since a column of nulls alone would not infer string).
    for c in QA_COLUMNS:
        if any(r.get(c) is not None for r in rows):
            arrays.append(pa.array([r.get(c) for r in rows], type=pa.string()))
            fields.append(pa.field(c, pa.string()))
    extra = [k for k in keys if k not in REQUIRED_COLUMNS and k not in OPTIONAL_COLUMNS]
    for k in extra:
        arr = pa.array([r[k] for r in rows])
        arrays.append(arr)
        fields.append(pa.field(k, arr.type))
    schema = pa.schema(fields, metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()})
    return pa.Table.from_arrays(arrays, schema=schema)


def _nested_fixed(values: list[np.ndarray], dim: int) -> pa.Array:
    """list<fixed_size_list<float32>[dim]> from per-row (N_i, dim) arrays, without Python loops
    over elements."""
    counts = np.array([len(v) for v in values], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    flat = np.concatenate([v.reshape(-1) for v in values]) if values else np.zeros(0, np.float32)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.astype(np.float32)), dim)
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


class ShardWriter:
    """Writes rows into ``ROOT/<split>/<prefix>-NNNNN.parquet`` files of at most
    ``rows_per_file`` rows each, on behalf of ``producer`` (see :func:`claim_folder`, checked
    before anything is written). Use as a context manager; ``files`` lists what was written."""

    def __init__(self, root: str, producer: str, rows_per_file: int = 10_000, prefix: str = "part",
                 region_dim: int | None = None):
        if rows_per_file < 1:
            raise ValueError("rows_per_file must be >= 1")
        claim_folder(root, producer)
        self.root = root
        self.rows_per_file = rows_per_file
        self.prefix = prefix
        self.region_dim = region_dim
        self.fs, self.path = filesystem(root)
        self._buffers: dict[str, list[dict]] = {}
        self._counters: dict[str, int] = {}
        self.files: list[str] = []
        self.rows_written = 0

    def write(self, row: Row | dict) -> None:
        r = row.__dict__ if isinstance(row, Row) else row
        split = r["split"]
        buf = self._buffers.setdefault(split, [])
        buf.append(r)
        if len(buf) >= self.rows_per_file:
            self._flush(split)

    def write_all(self, rows: Iterable[Row | dict]) -> None:
        for r in rows:
            self.write(r)

    def _flush(self, split: str) -> None:
        buf = self._buffers.get(split)
        if not buf:
            return
        table = rows_to_table(buf, self.region_dim)
        n = self._counters.get(split, 0)
        self._counters[split] = n + 1
        directory = posixpath.join(self.path, split)
        self.fs.create_dir(directory, recursive=True)
        path = posixpath.join(directory, f"{self.prefix}-{n:05d}.parquet")
        pq.write_table(table, path, filesystem=self.fs, compression="zstd")
        self.files.append(path)
        self.rows_written += len(buf)
        self._buffers[split] = []

    def close(self) -> None:
        for split in list(self._buffers):
            self._flush(split)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()


MANIFEST = "manifest.json"


def write_manifest(root: str, manifest: dict, producer: str) -> None:
    """``ROOT/manifest.json``, stamped with its ``producer``, the writer that owns the folder."""
    write_text(root, MANIFEST, json.dumps({**manifest, "producer": producer}, indent=2, sort_keys=True), producer)


def read_manifest(root: str) -> dict:
    text = read_text(child_uri(root, MANIFEST))
    return json.loads(text) if text else {}


def data_digest(root: str) -> str:
    """A digest of a shard set's manifest ("" where it has none), standing for its content in
    the names of runs and sweeps: rebuilt the same, a set keeps its digest; rebuilt otherwise (a
    newer generator, other options), its runs are new runs, never the old set's finished ones."""
    text = read_text(child_uri(root, MANIFEST))
    return hashlib.sha1(text.encode()).hexdigest()[:10] if text else ""


# Manifests written before the ``producer`` key: the synthetic generator's names its module as
# the source, the corpus builder's records its options under ``build``.
_LEGACY_PRODUCERS = (("alignlab data synth", lambda m: m.get("source") == "alignlab.platform.synth"),
                     ("alignlab data build", lambda m: "build" in m))


def producer_of(manifest: dict) -> str | None:
    """The writer that made a shard set, from its manifest; None when it does not say."""
    if "producer" in manifest:
        return str(manifest["producer"])
    return next((name for name, made in _LEGACY_PRODUCERS if made(manifest)), None)


def claim_folder(root: str, producer: str) -> None:
    """Raise :class:`ShardFolderError` unless ``ROOT`` holds no manifest.json or one that
    ``producer`` wrote. Every shard writer calls this before writing anything, so a mistyped path
    (a split name, an output folder) can never overwrite a shard set another writer built."""
    try:
        text = read_text(child_uri(root, MANIFEST))
    except (OSError, UnicodeDecodeError) as e:
        raise ShardFolderError(f"{root}: its {MANIFEST} cannot be read ({e}), so it may hold another writer's "
                               f"shard set; {producer} writes nothing there") from e
    if text is None:
        return
    try:
        manifest = json.loads(text)
        owner = producer_of(manifest) if isinstance(manifest, dict) else None
    except json.JSONDecodeError:
        owner = None
    if owner != producer:
        raise ShardFolderError(
            f"{root}: holds a shard set made by {owner or 'an unknown writer'} (its {MANIFEST} says so), and "
            f"{producer} never writes into another writer's folder; nothing was written. Choose another output "
            f"folder, or delete {root} first if you mean to replace that set")
