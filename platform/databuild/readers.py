"""Readers for the caption-corpus layouts researchers arrive with.

Every layout is one :class:`Reader` that yields :class:`Record` s — (image source, image_id,
caption, caption_id, split) — in a deterministic order, so a resumed build plans the same shards.
The image-QA layouts (VQA v2, GQA) yield one record per question, the question as its caption and
its answer alongside.
Images are never read here: a record carries an :class:`ImageRef` (a file, or a byte range inside
a WebDataset tar) that a Ray worker reads once per image. Readers that know ground-truth boxes
(COCO ``instances_*.json``) also return them per image for the ``gt`` region source.

A bad line or record never stops a build: the reader yields a :class:`Skipped` in its place (a
line without the layout's fields, a JSON line that does not parse, a record lacking a key), which
the builder counts and lists in the manifest with its file and line. Text is decoded as UTF-8 with
``surrogateescape``, so a mis-encoded byte (Latin-1 text, say) reaches the builder as a lone
surrogate in the record's strings, where it is found, counted and listed the same way; only a
file that is not the layout at all (the wrong top-level JSON structure) is an error.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from alignlab.platform.shards import filesystem

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class LayoutError(ValueError):
    """The input cannot be read as any (or the requested) layout; the message names the file."""


# Skip reasons of the readers (the builder adds its own).
MALFORMED_LINE = "malformed_line"  # a text line without the layout's fields, a JSON line that does not parse
MALFORMED_RECORD = "malformed_record"  # a record of a JSON file lacking a key the layout needs


@dataclass(frozen=True)
class ImageRef:
    """Where an image's encoded bytes live: a whole file, or ``size`` bytes at ``offset`` (a tar
    member, read without scanning the tar again)."""

    path: str
    offset: int = 0
    size: int = -1

    def read(self) -> bytes:
        fs, path = filesystem(self.path)
        with fs.open_input_file(path) as f:
            if self.size < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


@dataclass(frozen=True)
class Record:
    image: ImageRef
    image_id: str
    caption: str
    caption_id: str
    split: str
    # Set on an image-QA record, whose caption is the question ("" where the layout gives the
    # question no answer); None on a caption record.
    answer: str | None = None
    where: str = ""  # the record's place in the input: "file:line", or the file and the record's index


@dataclass(frozen=True)
class Skipped:
    """A line or record of the input that cannot be read, yielded in place of its :class:`Record`."""

    reason: str
    where: str
    detail: str = ""


@dataclass(frozen=True)
class GroundTruthBox:
    """A box in pixels (x1, y1, x2, y2) with its class name."""

    box: tuple[float, float, float, float]
    label: str


class Reader:
    """One input layout. ``records()`` yields every caption; ``ground_truth()`` maps image_id to its
    boxes where the layout has them."""

    name = ""
    description = ""

    def __init__(self, source: str, image_root: str | None = None, default_split: str = "train"):
        self.source = source
        self.image_root = image_root
        self.default_split = default_split

    @classmethod
    def matches(cls, source: str) -> bool:
        raise NotImplementedError

    def records(self) -> Iterator[Record | Skipped]:
        raise NotImplementedError

    def ground_truth(self) -> dict[str, list[GroundTruthBox]]:
        return {}

    def _image_path(self, name: str, default_root: str) -> str:
        if os.path.isabs(name) or "://" in name:
            return name
        return os.path.join(self.image_root or default_root, name)


def _open_text(path: str):
    """A text file whose mis-encoded bytes become lone surrogates, found per record by the builder."""
    return open(path, encoding="utf-8", errors="surrogateescape", newline="")


def _load_json(path: str) -> object:
    try:
        with _open_text(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise LayoutError(f"{path}: not valid JSON ({e})") from e


def _text(value: object) -> str:
    """A caption field as text: a missing or non-string value is an empty caption (counted)."""
    return value if isinstance(value, str) else ""


def _stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


# --------------------------------------------------------------------------------------------
# Flickr8k / Flickr30k token files
# --------------------------------------------------------------------------------------------

_FLICKR_TOKEN = re.compile(r"^(?P<image>[^\t#]+)#(?P<n>\d+)\t(?P<caption>.*)$")
_FLICKR_SPLITS = {"train": "train", "dev": "val", "val": "val", "test": "test"}


class FlickrReader(Reader):
    """``<image>#<n>\\t<caption>`` token files (Flickr8k.token.txt, Flickr30k results_*.token) with
    optional ``*_<split>Images.txt`` split files; without split files every image is ``train``."""

    name = "flickr"
    description = "Flickr8k/30k token file (<image>#<n>\\t<caption>) + *trainImages.txt split files"

    @classmethod
    def _token_file(cls, source: str) -> str | None:
        if os.path.isfile(source):
            return source if ".token" in os.path.basename(source) else None
        hits = sorted(glob.glob(os.path.join(source, "*.token*")))
        return hits[0] if hits else None

    @classmethod
    def matches(cls, source: str) -> bool:
        return cls._token_file(source) is not None

    def _image_dir(self, base: str) -> str:
        for name in ("images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", "flickr30k_images"):
            if os.path.isdir(os.path.join(base, name)):
                return os.path.join(base, name)
        return base

    def _splits(self, base: str) -> dict[str, str]:
        split_of: dict[str, str] = {}
        for path in sorted(glob.glob(os.path.join(base, "*Images.txt"))):
            m = re.search(r"(train|dev|val|test)Images\.txt$", os.path.basename(path))
            if not m:
                continue
            with _open_text(path) as f:
                for line in f:
                    if line.strip():
                        split_of[line.strip()] = _FLICKR_SPLITS[m.group(1)]
        return split_of

    def records(self) -> Iterator[Record | Skipped]:
        token = self._token_file(self.source)
        base = os.path.dirname(token)
        image_dir = self._image_dir(base)
        split_of = self._splits(base)
        with _open_text(token) as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                m = _FLICKR_TOKEN.match(line)
                if m is None:
                    yield Skipped(MALFORMED_LINE, f"{token}:{lineno}",
                                  f"expected '<image>#<n>\\t<caption>', got {line[:80]!r}")
                    continue
                image = m.group("image")
                # With split files, an image listed in none of them belongs to no requested split
                # (e.g. the Flickr8k test images); the builder counts it as skipped ("no_split").
                split = split_of.get(image, "" if split_of else self.default_split)
                yield Record(ImageRef(self._image_path(image, image_dir)), _stem(image), m.group("caption"),
                             f"{_stem(image)}#{m.group('n')}", split, where=f"{token}:{lineno}")


# --------------------------------------------------------------------------------------------
# COCO captions (+ instances)
# --------------------------------------------------------------------------------------------


class CocoReader(Reader):
    """COCO ``captions_<split><year>.json`` (a file, or a folder holding them, e.g. ``annotations/``);
    images in the sibling ``<split><year>/`` folder; boxes from ``instances_<split><year>.json``."""

    name = "coco"
    description = "COCO captions_*.json (+ instances_*.json for ground-truth boxes)"

    @classmethod
    def _caption_files(cls, source: str) -> list[str]:
        if os.path.isfile(source):
            return [source] if os.path.basename(source).startswith("captions_") else []
        for folder in (source, os.path.join(source, "annotations")):
            hits = sorted(glob.glob(os.path.join(folder, "captions_*.json")))
            if hits:
                return hits
        return []

    @classmethod
    def matches(cls, source: str) -> bool:
        return bool(cls._caption_files(source))

    @staticmethod
    def _split_tag(path: str) -> str:
        return os.path.basename(path)[len("captions_"):-len(".json")]  # e.g. train2017

    def _image_dir(self, captions_file: str) -> str:
        tag = self._split_tag(captions_file)
        ann_dir = os.path.dirname(os.path.abspath(captions_file))
        for cand in (os.path.join(os.path.dirname(ann_dir), tag), os.path.join(ann_dir, tag),
                     os.path.join(os.path.dirname(ann_dir), "images", tag)):
            if os.path.isdir(cand):
                return cand
        return os.path.dirname(ann_dir)

    def records(self) -> Iterator[Record | Skipped]:
        for path in self._caption_files(self.source):
            data = _load_json(path)
            if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
                raise LayoutError(f"{path}: a COCO captions file needs top-level 'images' and 'annotations'")
            split = re.sub(r"\d+$", "", self._split_tag(path)) or self.default_split
            image_dir = self._image_dir(path)
            files = {}
            for i, im in enumerate(data["images"]):
                try:
                    files[im["id"]] = im["file_name"]
                except (KeyError, TypeError) as e:
                    # Its captions find no file and are counted as missing images.
                    yield Skipped(MALFORMED_RECORD, f"{path} images[{i}]", f"lacks key {e}: {im!r:.120}")
            for i, ann in enumerate(data["annotations"]):
                try:
                    image_id, caption, cap_id = ann["image_id"], ann["caption"], ann["id"]
                except (KeyError, TypeError) as e:
                    yield Skipped(MALFORMED_RECORD, f"{path} annotations[{i}]", f"lacks key {e}: {ann!r:.120}")
                    continue
                # A caption whose image_id is not in 'images' cannot be located; it reaches the
                # builder with an empty path and is counted as a missing image.
                file_name = files.get(image_id)
                ref = ImageRef(self._image_path(file_name, image_dir) if file_name else "")
                yield Record(ref, str(image_id), _text(caption), str(cap_id), split, where=f"{path} annotations[{i}]")

    def ground_truth(self) -> dict[str, list[GroundTruthBox]]:
        boxes: dict[str, list[GroundTruthBox]] = {}
        for captions in self._caption_files(self.source):
            path = os.path.join(os.path.dirname(captions), f"instances_{self._split_tag(captions)}.json")
            if not os.path.isfile(path):
                continue
            data = _load_json(path)
            names = {c["id"]: c["name"] for c in data.get("categories", [])}
            for ann in data.get("annotations", []):
                x, y, w, h = ann["bbox"]
                if w <= 0 or h <= 0:
                    continue
                label = names.get(ann["category_id"], str(ann["category_id"]))
                boxes.setdefault(str(ann["image_id"]), []).append(GroundTruthBox((x, y, x + w, y + h), label))
        return boxes


# --------------------------------------------------------------------------------------------
# Karpathy split JSON
# --------------------------------------------------------------------------------------------


class KarpathyReader(Reader):
    """``dataset_coco.json`` / ``dataset_flickr30k.json``: ``images[*]`` with ``filename``, optional
    ``filepath``, ``split`` and ``sentences[*].raw``. ``restval`` is folded into ``train``, as the
    COCO pre-training corpora do. Images resolve under ``image_root`` (default: the JSON's folder)."""

    name = "karpathy"
    description = "Karpathy split JSON (dataset_coco.json / dataset_flickr30k.json)"

    @classmethod
    def _file(cls, source: str) -> str | None:
        if os.path.isfile(source):
            return source if re.match(r"dataset_.*\.json$", os.path.basename(source)) else None
        hits = sorted(glob.glob(os.path.join(source, "dataset_*.json")))
        return hits[0] if hits else None

    @classmethod
    def matches(cls, source: str) -> bool:
        return cls._file(source) is not None

    def records(self) -> Iterator[Record | Skipped]:
        path = self._file(self.source)
        data = _load_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise LayoutError(f"{path}: a Karpathy split file needs a top-level 'images' list")
        base = os.path.dirname(os.path.abspath(path))
        for i, im in enumerate(data["images"]):
            if not isinstance(im, dict) or "filename" not in im or not isinstance(im.get("sentences"), list):
                yield Skipped(MALFORMED_RECORD, f"{path} images[{i}]", f"lacks 'filename' or 'sentences': {im!r:.120}")
                continue
            name = os.path.join(im.get("filepath", ""), im["filename"])
            # COCO's own id, else the file stem (Flickr30k's id, the key VinVL/Oscar features use).
            image_id = str(im.get("cocoid", _stem(im["filename"])))
            split = {"restval": "train"}.get(im.get("split", self.default_split), im.get("split", self.default_split))
            for j, s in enumerate(im["sentences"]):
                where = f"{path} images[{i}].sentences[{j}]"
                if not isinstance(s, dict):
                    yield Skipped(MALFORMED_RECORD, where, f"not an object: {s!r:.120}")
                    continue
                yield Record(ImageRef(self._image_path(name, base)), image_id, _text(s.get("raw")),
                             str(s.get("sentid", f"{image_id}#{j}")), split, where=where)


# --------------------------------------------------------------------------------------------
# CSV / JSONL tables
# --------------------------------------------------------------------------------------------

_IMAGE_KEYS = ("image", "image_path", "filepath", "file_name", "filename", "path")
_CAPTION_KEYS = ("caption", "text", "sentence", "raw")


class TableReader(Reader):
    """A CSV (with header) or JSONL file of image path + caption. Recognised keys: image column one
    of ``image, image_path, filepath, file_name, filename, path``; caption one of ``caption, text,
    sentence, raw``; optional ``image_id``, ``caption_id``, ``split``."""

    name = "table"
    description = "CSV / JSONL with an image-path column and a caption column"

    def __init__(self, source: str, image_root: str | None = None, default_split: str = "train",
                 fmt: str | None = None):
        super().__init__(source, image_root, default_split)
        self.fmt = fmt or ("jsonl" if source.endswith((".jsonl", ".json")) else "csv")

    @classmethod
    def matches(cls, source: str) -> bool:
        return os.path.isfile(source) and source.endswith((".csv", ".tsv", ".jsonl"))

    def _rows(self) -> Iterator[tuple[int, dict | Skipped]]:
        with _open_text(self.source) as f:
            if self.fmt == "jsonl":
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{self.source}:{lineno}"
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        yield lineno, Skipped(MALFORMED_LINE, where, f"not valid JSON ({e})")
                        continue
                    yield lineno, row if isinstance(row, dict) else \
                        Skipped(MALFORMED_LINE, where, f"not a JSON object: {line.strip()[:80]!r}")
            else:
                reader = csv.DictReader(f, delimiter="\t" if self.source.endswith(".tsv") else ",")
                for lineno, row in enumerate(reader, 2):
                    # DictReader files surplus fields under None and fills missing ones with None.
                    surplus = row.pop(None, None)
                    if surplus or None in row.values():
                        n = len(row) + len(surplus) if surplus else sum(v is not None for v in row.values())
                        yield lineno, Skipped(MALFORMED_LINE, f"{self.source}:{lineno}",
                                              f"{n} fields where the header has {len(row)}")
                        continue
                    yield lineno, row

    def records(self) -> Iterator[Record | Skipped]:
        base = os.path.dirname(os.path.abspath(self.source))
        image_key = caption_key = None
        for lineno, row in self._rows():
            if isinstance(row, Skipped):
                yield row
                continue
            if image_key is None:
                image_key = next((k for k in _IMAGE_KEYS if k in row), None)
                caption_key = next((k for k in _CAPTION_KEYS if k in row), None)
                if image_key is None or caption_key is None:
                    raise LayoutError(
                        f"{self.source}:{lineno}: need an image column (one of {', '.join(_IMAGE_KEYS)}) and a "
                        f"caption column (one of {', '.join(_CAPTION_KEYS)}); found {sorted(row)}")
            name = str(row.get(image_key) or "")
            image_id = str(row.get("image_id") or _stem(name))
            yield Record(ImageRef(self._image_path(name, base) if name else ""), image_id,
                         _text(row.get(caption_key)), str(row.get("caption_id") or f"{image_id}#{lineno}"),
                         str(row.get("split") or self.default_split), where=f"{self.source}:{lineno}")


# --------------------------------------------------------------------------------------------
# WebDataset tar shards (img2dataset)
# --------------------------------------------------------------------------------------------


class WebDatasetReader(Reader):
    """img2dataset output: ``*.tar`` files whose members share a key: ``KEY.jpg`` (or png/webp),
    ``KEY.txt`` (caption) and optionally ``KEY.json`` (its ``caption`` is used when no .txt).
    Images are referenced by byte range so workers read them without rescanning the tar."""

    name = "webdataset"
    description = "WebDataset *.tar shards as written by img2dataset (KEY.jpg + KEY.txt/KEY.json)"

    @classmethod
    def _tars(cls, source: str) -> list[str]:
        if os.path.isfile(source):
            return [source] if source.endswith(".tar") else []
        return sorted(glob.glob(os.path.join(source, "*.tar")))

    @classmethod
    def matches(cls, source: str) -> bool:
        return bool(cls._tars(source))

    def records(self) -> Iterator[Record | Skipped]:
        for tar_path in self._tars(self.source):
            samples: dict[str, dict] = {}
            try:
                with tarfile.open(tar_path) as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        key, ext = os.path.splitext(member.name)
                        ext = ext.lower()
                        entry = samples.setdefault(key, {})
                        if ext in IMAGE_EXTENSIONS:
                            entry["image"] = ImageRef(tar_path, member.offset_data, member.size)
                        elif ext == ".txt":
                            entry["txt"] = tar.extractfile(member).read().decode("utf-8", "surrogateescape")
                        elif ext == ".json":
                            text = tar.extractfile(member).read().decode("utf-8", "surrogateescape")
                            try:
                                entry["json"] = json.loads(text or "{}")
                                if not isinstance(entry["json"], dict):
                                    raise ValueError("not a JSON object")
                            except ValueError as e:  # JSONDecodeError included
                                entry["bad_json"] = f"{member.name}: {e}"
            except tarfile.TarError as e:
                raise LayoutError(f"{tar_path}: not a readable tar file ({e})") from e
            for key, s in samples.items():
                if "image" not in s and "txt" not in s and "json" not in s:
                    continue
                where = f"{tar_path}:{key}"
                if "bad_json" in s:
                    yield Skipped(MALFORMED_RECORD, where, s["bad_json"])
                    continue
                meta = s.get("json") or {}
                caption = s.get("txt", _text(meta.get("caption")))
                image_id = str(meta.get("key") or os.path.basename(key))
                yield Record(s.get("image", ImageRef("")), image_id, caption, image_id,
                             self.default_split, where=where)


# --------------------------------------------------------------------------------------------
# Image QA: VQA v2 and GQA
# --------------------------------------------------------------------------------------------


def _json_files(source: str, word: str) -> list[str]:
    """``source`` itself, or the ``*<word>*.json`` files directly inside the folder ``source``."""
    if os.path.isfile(source):
        return [source] if word in os.path.basename(source) and source.endswith(".json") else []
    return sorted(glob.glob(os.path.join(source, f"*{word}*.json")))


def _qa_image_dir(base: str, tag: str = "") -> str:
    """Where a QA layout's images are, given the questions' folder ``base``: ``<tag>/`` (VQA's
    train2014) inside it, beside it or under ``../images/``; else ``images/`` inside it,
    ``../images/<folder name>/`` (the vl_fixtures layout: ``vqav2/`` beside ``images/vqav2/``) or
    ``../images/``. Falls back to ``base``; ``--image-root`` overrides all of this."""
    up = os.path.dirname(base)
    candidates = [os.path.join(base, tag), os.path.join(up, tag), os.path.join(up, "images", tag)] if tag else []
    candidates += [os.path.join(base, "images"), os.path.join(up, "images", os.path.basename(base)),
                   os.path.join(up, "images")]
    return next((c for c in candidates if os.path.isdir(c)), base)


class VqaReader(Reader):
    """VQA v2: a folder with the questions file(s) (``questions.json`` or
    ``v2_OpenEnded_mscoco_<subtype>_questions.json``: ``questions[*]`` with ``image_id``,
    ``question``, ``question_id``) and the annotation file(s) (``annotations[*]`` with
    ``question_id`` and ``multiple_choice_answer`` or the ten ``answers``). The answer is
    ``multiple_choice_answer``, else the most common of the ten (the first seen on a tie). Split and
    image names come from ``data_subtype`` (train2014 -> train, ``COCO_train2014_<id:012>.jpg``)."""

    name = "vqa"
    description = "VQA v2 questions + annotations JSON (image QA: question rows with answers)"

    @classmethod
    def matches(cls, source: str) -> bool:
        return os.path.isdir(source) and bool(_json_files(source, "questions")) \
            and bool(_json_files(source, "annotations"))

    @staticmethod
    def _answer(ann: dict) -> str:
        if ann.get("multiple_choice_answer"):
            return ann["multiple_choice_answer"]
        votes = Counter(a["answer"] for a in ann.get("answers", []) if a.get("answer"))
        return votes.most_common(1)[0][0] if votes else ""

    def records(self) -> Iterator[Record | Skipped]:
        answers: dict[int, str] = {}
        for path in _json_files(self.source, "annotations"):
            data = _load_json(path)
            if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
                raise LayoutError(f"{path}: a VQA annotation file needs a top-level 'annotations' list")
            for i, ann in enumerate(data["annotations"]):
                try:
                    answers[ann["question_id"]] = self._answer(ann)
                except (KeyError, TypeError) as e:
                    # Its question finds no answer and is counted as missing_answer.
                    yield Skipped(MALFORMED_RECORD, f"{path} annotations[{i}]", f"lacks key {e}: {ann!r:.120}")
        base = os.path.abspath(self.source)
        for path in _json_files(self.source, "questions"):
            data = _load_json(path)
            if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
                raise LayoutError(f"{path}: a VQA questions file needs a top-level 'questions' list")
            subtype = str(data.get("data_subtype", ""))
            split = re.sub(r"\d+$", "", subtype) or self.default_split
            image_dir = _qa_image_dir(base, subtype)
            for i, q in enumerate(data["questions"]):
                where = f"{path} questions[{i}]"
                try:
                    image_id, question, qid = q["image_id"], q["question"], q["question_id"]
                    name = f"COCO_{subtype}_{int(image_id):012d}.jpg" if subtype else f"{image_id}.jpg"
                except (KeyError, TypeError, ValueError) as e:
                    yield Skipped(MALFORMED_RECORD, where, f"lacks key or has a bad image_id ({e}): {q!r:.120}")
                    continue
                # A question without an annotation (the test sets) has no answer: the builder
                # counts it as skipped.
                yield Record(ImageRef(self._image_path(name, image_dir)), str(image_id), _text(question), str(qid),
                             split, _text(answers.get(qid)), where=where)


class GqaReader(Reader):
    """GQA: question files that map a question id to ``imageId``, ``question`` and ``answer``
    (``questions.json``, ``train_balanced_questions.json``, or a folder of them such as
    ``train_all_questions/``). A file passed directly, or the ``*questions*.json`` directly inside
    a folder, are read; the split is the file name's train / val / test(dev) prefix, else the
    default. Images are ``<imageId>.jpg``."""

    name = "gqa"
    description = "GQA questions JSON ({question id: {imageId, question, answer}}; image QA)"

    @classmethod
    def matches(cls, source: str) -> bool:
        return bool(_json_files(source, "questions")) and not _json_files(source, "annotations")

    def records(self) -> Iterator[Record | Skipped]:
        for path in _json_files(self.source, "questions"):
            data = _load_json(path)
            if not isinstance(data, dict):
                raise LayoutError(f"{path}: a GQA questions file maps question ids to questions (a JSON object)")
            if isinstance(data.get("questions"), list):
                raise LayoutError(f"{path}: a VQA questions file; pass the folder holding it and its annotations "
                                  f"file (--layout vqa)")
            m = re.match(r"(train|val|test)", os.path.basename(path))
            split = m.group(1) if m else self.default_split
            image_dir = _qa_image_dir(os.path.dirname(os.path.abspath(path)))
            for qid, q in data.items():
                where = f"{path} question {qid}"
                try:
                    image_id, question = str(q["imageId"]), q["question"]
                except (KeyError, TypeError) as e:
                    yield Skipped(MALFORMED_RECORD, where, f"lacks key {e}: {q!r:.120}")
                    continue
                # The test questions come without answers: the builder counts them as skipped.
                yield Record(ImageRef(self._image_path(f"{image_id}.jpg", image_dir)), image_id, _text(question),
                             str(qid), split, _text(q.get("answer")), where=where)


READERS: dict[str, type[Reader]] = {
    "flickr": FlickrReader,
    "coco": CocoReader,
    "karpathy": KarpathyReader,
    "csv": TableReader,
    "jsonl": TableReader,
    "webdataset": WebDatasetReader,
    "vqa": VqaReader,
    "gqa": GqaReader,
}
_DETECTION_ORDER = (CocoReader, KarpathyReader, VqaReader, GqaReader, FlickrReader, WebDatasetReader, TableReader)


def understood_layouts() -> str:
    return "; ".join(f"{r.name if r is not TableReader else 'csv/jsonl'}: {r.description}"
                     for r in _DETECTION_ORDER)


def open_reader(source: str, layout: str = "auto", image_root: str | None = None,
                default_split: str = "train") -> Reader:
    """The reader for ``source``; ``layout='auto'`` recognises it from file names and contents."""
    if not os.path.exists(source):
        raise LayoutError(f"{source}: no such file or directory")
    if layout == "auto":
        cls = next((r for r in _DETECTION_ORDER if r.matches(source)), None)
        if cls is None:
            raise LayoutError(f"{source}: cannot recognise the input layout. Layouts understood: "
                              f"{understood_layouts()}. Pass --layout to choose one explicitly.")
    else:
        cls = READERS[layout]
        if not cls.matches(source):
            raise LayoutError(f"{source}: does not look like layout '{layout}' ({cls.description})")
    if cls is TableReader:
        fmt = layout if layout in ("csv", "jsonl") else None
        return TableReader(source, image_root, default_split, fmt=fmt)
    return cls(source, image_root, default_split)
