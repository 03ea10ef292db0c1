"""Readers for the caption-corpus layouts researchers arrive with.

Every layout is one :class:`Reader` that yields :class:`Record` s — (image source, image_id,
caption, caption_id, split) — in a deterministic order, so a resumed build plans the same shards.
A reader names the downstream task its rows serve (``Reader.task``, written into the manifest):
the caption layouts serve ``retrieval``; the task layouts yield one record per labelled text, the
text as its caption and its label alongside (:mod:`alignlab.platform.shards` has the columns):

* VQA v2, GQA: a question and its answer (VQA v2 adds its ten annotators' answers);
* SNLI-VE: a hypothesis about a Flickr30k image and its gold label;
* NLVR2: a statement about a pair of images (:attr:`Record.image_b`) and true / false;
* RefCOCO/+/g: a referring expression and its object's box.
Images are never read here: a record carries an :class:`ImageRef` (a file, or a byte range inside
a WebDataset tar) that a Ray worker reads once per image. Readers that know ground-truth boxes
(COCO ``instances_*.json``, RefCOCO's ``instances.json``) also return them per image for the ``gt``
region source.

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

import numpy as np

from alignlab.platform.shards import filesystem

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class LayoutError(ValueError):
    """The input cannot be read as any (or the requested) layout; the message names the file."""


# Skip reasons of the readers (the builder adds its own).
MALFORMED_LINE = "malformed_line"  # a text line without the layout's fields, a JSON line that does not parse
MALFORMED_RECORD = "malformed_record"  # a record of a JSON file lacking a key the layout needs
INVALID_LABEL = "invalid_label"  # a label outside the task's classes (SNLI's "-": no annotator majority)


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
    # Set on a classification record (VQA, GQA, SNLI-VE, NLVR2), whose caption is the question,
    # hypothesis or statement ("" where the layout gives it no label); None on a caption record.
    answer: str | None = None
    where: str = ""  # the record's place in the input: "file:line", or the file and the record's index
    human_answers: tuple[str, ...] | None = None  # VQA v2: every annotator's answer
    image_b: ImageRef | None = None  # NLVR2: the pair's second image
    image_id_b: str | None = None
    target_box: tuple[float, float, float, float] | None = None  # RefCOCO: x1, y1, x2, y2 in [0, 1]


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
    task = "retrieval"  # the manifest's "task" (alignlab.platform.shards.TASKS)
    # A classification with a fixed set of classes (SNLI-VE's three, NLVR2's two): every class is
    # in answers.txt, even one a small or train-less build never saw.
    classes: tuple[str, ...] = ()

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


def _json_lines(path: str) -> Iterator[tuple[int, dict | Skipped]]:
    """(line number, object) per non-blank line of a JSON-lines file; a line that does not parse,
    or is not an object, comes as a :class:`Skipped`."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, Skipped(MALFORMED_LINE, where, f"not valid JSON ({e})")
                continue
            yield lineno, row if isinstance(row, dict) else \
                Skipped(MALFORMED_LINE, where, f"not a JSON object: {line.strip()[:80]!r}")


def _json_lines_files(source: str, keys: tuple[str, ...]) -> list[str]:
    """``source`` itself, or the ``*.json`` / ``*.jsonl`` files directly inside the folder
    ``source``, whose first line is a JSON object with all of ``keys``: how a JSON-lines layout
    is told from the others. Only the first 64 KiB are read, so a large single-line JSON file
    (COCO's) is rejected without being loaded."""
    paths = [source] if os.path.isfile(source) else \
        sorted(glob.glob(os.path.join(source, "*.json")) + glob.glob(os.path.join(source, "*.jsonl")))
    found = []
    for path in paths:
        if not path.endswith((".json", ".jsonl")):
            continue
        with _open_text(path) as f:
            line = f.readline(1 << 16)
        try:
            first = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(first, dict) and all(k in first for k in keys):
            found.append(path)
    return found


# --------------------------------------------------------------------------------------------
# Flickr8k / Flickr30k token files
# --------------------------------------------------------------------------------------------

_FLICKR_TOKEN = re.compile(r"^(?P<image>[^\t#]+)#(?P<n>\d+)\t(?P<caption>.*)$")
# The split names of the layouts' files and identifiers (NLVR2's public test is test1).
_SPLIT_NAMES = {"train": "train", "dev": "val", "val": "val", "test": "test", "test1": "test"}


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
                        split_of[line.strip()] = _SPLIT_NAMES[m.group(1)]
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
            if os.path.isfile(path):
                _instance_boxes(_load_json(path), boxes)
        return boxes


def _instance_boxes(data: dict, boxes: dict[str, list[GroundTruthBox]]) -> None:
    """Adds a COCO ``instances`` file's boxes (``bbox`` x, y, w, h in pixels) to ``boxes``, by image id."""
    names = {c["id"]: c["name"] for c in data.get("categories", [])}
    for ann in data.get("annotations", []):
        x, y, w, h = ann["bbox"]
        if w <= 0 or h <= 0:
            continue
        label = names.get(ann["category_id"], str(ann["category_id"]))
        boxes.setdefault(str(ann["image_id"]), []).append(GroundTruthBox((x, y, x + w, y + h), label))


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
        if self.fmt == "jsonl":
            yield from _json_lines(self.source)
            return
        with _open_text(self.source) as f:
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


def _task_image_dir(base: str, tag: str = "") -> str:
    """Where a task layout's images are, given its text files' folder ``base``: ``<tag>/`` (VQA's
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
    ``multiple_choice_answer``, else the most common of the ten (the first seen on a tie); the ten
    are the record's ``human_answers``, which VQA accuracy counts. Split and image names come from
    ``data_subtype`` (train2014 -> train, ``COCO_train2014_<id:012>.jpg``)."""

    name = "vqa"
    task = "vqa"
    description = "VQA v2 questions + annotations JSON (image QA: question rows with answers)"

    @classmethod
    def matches(cls, source: str) -> bool:
        return os.path.isdir(source) and bool(_json_files(source, "questions")) \
            and bool(_json_files(source, "annotations"))

    @staticmethod
    def _answers(ann: dict) -> tuple[str, tuple[str, ...]]:
        """(the answer, every annotator's answer)."""
        humans = tuple(_text(a["answer"]) for a in ann.get("answers", []))
        if ann.get("multiple_choice_answer"):
            return ann["multiple_choice_answer"], humans
        votes = Counter(h for h in humans if h)
        return (votes.most_common(1)[0][0] if votes else ""), humans

    def records(self) -> Iterator[Record | Skipped]:
        answers: dict[int, tuple[str, tuple[str, ...]]] = {}
        for path in _json_files(self.source, "annotations"):
            data = _load_json(path)
            if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
                raise LayoutError(f"{path}: a VQA annotation file needs a top-level 'annotations' list")
            for i, ann in enumerate(data["annotations"]):
                try:
                    answers[ann["question_id"]] = self._answers(ann)
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
            image_dir = _task_image_dir(base, subtype)
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
                answer, humans = answers.get(qid, ("", None))
                yield Record(ImageRef(self._image_path(name, image_dir)), str(image_id), _text(question), str(qid),
                             split, _text(answer), where=where, human_answers=humans)


class GqaReader(Reader):
    """GQA: question files that map a question id to ``imageId``, ``question`` and ``answer``
    (``questions.json``, ``train_balanced_questions.json``, or a folder of them such as
    ``train_all_questions/``). A file passed directly, or the ``*questions*.json`` directly inside
    a folder, are read; the split is the file name's train / val / test(dev) prefix, else the
    default. Images are ``<imageId>.jpg``."""

    name = "gqa"
    task = "gqa"
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
            image_dir = _task_image_dir(os.path.dirname(os.path.abspath(path)))
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


# --------------------------------------------------------------------------------------------
# SNLI-VE, NLVR2, RefCOCO
# --------------------------------------------------------------------------------------------

SNLI_VE_LABELS = ("entailment", "neutral", "contradiction")


class SnliVeReader(Reader):
    """SNLI-VE: ``snli_ve_<train|dev|test>.jsonl`` (or any JSON-lines file of its records), one
    record per (Flickr30k image, hypothesis): ``Flickr30K_ID``, ``sentence2`` (the hypothesis),
    ``gold_label``, ``pairID``. The split is the file name's, else the default; images are
    ``<Flickr30K_ID>.jpg`` (``--image-root``: Flickr30k's image folder)."""

    name = "snli_ve"
    task = "snli_ve"
    classes = SNLI_VE_LABELS
    description = "SNLI-VE JSON lines (Flickr30K_ID, sentence2, gold_label; visual entailment)"
    KEYS = ("Flickr30K_ID", "sentence2")

    @classmethod
    def matches(cls, source: str) -> bool:
        return bool(_json_lines_files(source, cls.KEYS))

    def records(self) -> Iterator[Record | Skipped]:
        for path in _json_lines_files(self.source, self.KEYS):
            m = re.search(r"snli_ve_(train|dev|test)\.jsonl$", os.path.basename(path))
            split = _SPLIT_NAMES[m.group(1)] if m else self.default_split
            image_dir = _task_image_dir(os.path.dirname(os.path.abspath(path)))
            for lineno, row in _json_lines(path):
                if isinstance(row, Skipped):
                    yield row
                    continue
                where = f"{path}:{lineno}"
                try:
                    image_id, hypothesis, pair_id = str(row["Flickr30K_ID"]), row["sentence2"], str(row["pairID"])
                except KeyError as e:
                    yield Skipped(MALFORMED_RECORD, where, f"lacks key {e}: {row!r:.120}")
                    continue
                # A record without a gold label reaches the builder as unanswered (missing_answer).
                label = _text(row.get("gold_label"))
                if label and label not in SNLI_VE_LABELS:
                    yield Skipped(INVALID_LABEL, where, f"gold_label {label!r} is none of {', '.join(SNLI_VE_LABELS)} "
                                  f"(SNLI writes '-' where its annotators reached no majority)")
                    continue
                yield Record(ImageRef(self._image_path(f"{image_id}.jpg", image_dir)), image_id, _text(hypothesis),
                             pair_id, split, label, where=where)


# <split>-<set>-<pair>-<sentence>: the pair's images are <split>-<set>-<pair>-img0.png and -img1.png.
_NLVR2_IDENTIFIER = re.compile(r"^(?P<pair>(?P<split>[a-z]+\d*)-\d+-\d+)-\d+$")


class Nlvr2Reader(Reader):
    """NLVR2: JSON-lines files (``train.json``, ``dev.json``, ``test1.json``) of ``identifier``,
    ``sentence`` and ``label`` (True / False), one statement about a pair of images. The images
    are named from the identifier as the official release names them (``dev-850-0-0`` ->
    ``dev-850-0-img0.png`` / ``-img1.png``), in the image folder's ``<split>/`` sub-folder (and the
    record's ``directory`` within it: the train images) when it has one, else in the folder itself;
    a ``left_url`` / ``right_url`` that is a local path (relative to the image folder) names its
    file instead. The split is the identifier's (dev -> val, test1 -> test)."""

    name = "nlvr2"
    task = "nlvr2"
    classes = ("true", "false")
    description = "NLVR2 JSON lines (identifier, sentence, label; a statement about an image pair)"
    KEYS = ("identifier", "sentence")

    @classmethod
    def matches(cls, source: str) -> bool:
        return bool(_json_lines_files(source, cls.KEYS))

    def _image(self, url: object, derived: str, root: str) -> ImageRef:
        # The official URLs are the web pages the images were scraped from (many are gone, and
        # the build reads no network): the released files are named after the identifier.
        if isinstance(url, str) and url and not url.startswith(("http://", "https://")):
            return ImageRef(self._image_path(url, root))
        return ImageRef(derived)

    def records(self) -> Iterator[Record | Skipped]:
        for path in _json_lines_files(self.source, self.KEYS):
            root = self.image_root or _task_image_dir(os.path.dirname(os.path.abspath(path)))
            for lineno, row in _json_lines(path):
                if isinstance(row, Skipped):
                    yield row
                    continue
                where = f"{path}:{lineno}"
                m = _NLVR2_IDENTIFIER.match(str(row.get("identifier")))
                if m is None:
                    yield Skipped(MALFORMED_RECORD, where, f"identifier {row.get('identifier')!r} is not "
                                  f"<split>-<set>-<pair>-<sentence>: {row!r:.120}")
                    continue
                # The release has True / False as strings; a bool reads the same. An absent label
                # (a hidden test set) reaches the builder as unanswered (missing_answer).
                label = "" if row.get("label") is None else str(row["label"]).lower()
                if label not in ("", *self.classes):
                    yield Skipped(INVALID_LABEL, where, f"label {row['label']!r} is neither True nor False")
                    continue
                folder = os.path.join(root, m.group("split"))
                folder = os.path.join(folder, str(row.get("directory", ""))) if os.path.isdir(folder) else root
                left, right = (self._image(row.get(f"{side}_url"),
                                           os.path.join(folder, f"{m.group('pair')}-img{k}.png"), root)
                               for k, side in enumerate(("left", "right")))
                yield Record(left, _stem(left.path), _text(row.get("sentence")), m.group(0),
                             _SPLIT_NAMES.get(m.group("split"), m.group("split")), label, where=where,
                             image_b=right, image_id_b=_stem(right.path))


class RefcocoReader(Reader):
    """RefCOCO / RefCOCO+ / RefCOCOg as the refer toolkit lays them out: a list of refs (``ref_id``,
    ``ann_id``, ``image_id``, ``split``, ``sentences[*].sent``) in ``refs(<split by>).json`` (or
    ``refs.json``, or the file given) beside COCO's ``instances.json`` (``annotations[*]`` with
    ``id`` and ``bbox``; ``images[*]`` with ``id``, ``file_name``, ``width``, ``height``). One record
    per sentence, its target the ref's annotation box normalised by the image size. The toolkit
    ships the refs as a pickle (``refs(unc).p``), which is refused: loading a pickle runs whatever
    code it names. The instance boxes are the ``gt`` region source; images are COCO train2014."""

    name = "refcoco"
    task = "refcoco"
    description = "RefCOCO/+/g refs(unc).json + instances.json (referring expressions with their boxes)"

    @classmethod
    def _refs_files(cls, source: str) -> list[str]:
        if os.path.isfile(source):
            return [source] if re.match(r"refs.*\.(json|p)$", os.path.basename(source)) else []
        return sorted(glob.glob(os.path.join(source, "refs*.json"))) or \
            sorted(glob.glob(os.path.join(source, "refs*.p")))

    @classmethod
    def matches(cls, source: str) -> bool:
        return bool(cls._refs_files(source))

    def _refs_file(self) -> str:
        files = self._refs_files(self.source)
        if len(files) > 1:
            raise LayoutError(f"{self.source}: holds several refs files ({', '.join(map(os.path.basename, files))}); "
                              f"pass the one to build")
        path = files[0]
        if path.endswith(".p"):
            target = path[:-2] + ".json"
            raise LayoutError(
                f"{path}: a pickle, which AlignLab never loads (unpickling runs whatever code the file names). "
                f"Give it the refs as JSON instead: write the refer toolkit's REFER(...).data['refs'] list with "
                f"json.dump to {target} (the toolkit, which you trust to unpickle its own file, reads it), and "
                f"pass {target} (or its folder)")
        return path

    def _instances(self) -> tuple[str, dict]:
        path = os.path.join(os.path.dirname(os.path.abspath(self._refs_file())), "instances.json")
        if not os.path.isfile(path):
            raise LayoutError(f"{path}: no such file; the refs need COCO's instances.json beside them for the "
                              f"boxes and image sizes")
        data = _load_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list) \
                or not isinstance(data.get("images"), list):
            raise LayoutError(f"{path}: a COCO instances file needs top-level 'images' and 'annotations' lists")
        return path, data

    def ground_truth(self) -> dict[str, list[GroundTruthBox]]:
        boxes: dict[str, list[GroundTruthBox]] = {}
        _instance_boxes(self._instances()[1], boxes)
        return boxes

    def records(self) -> Iterator[Record | Skipped]:
        # The regions module imports this one (for Reader), so its box normalisation is imported here.
        from alignlab.platform.databuild.regions import normalise_boxes

        path = self._refs_file()
        refs = _load_json(path)
        if not isinstance(refs, list):
            raise LayoutError(f"{path}: a refs file is a list of refs (the refer toolkit's refs, dumped as JSON)")
        instances_path, instances = self._instances()
        boxes = {a.get("id"): a.get("bbox") for a in instances["annotations"] if isinstance(a, dict)}
        images = {im.get("id"): im for im in instances["images"] if isinstance(im, dict)}
        image_dir = _task_image_dir(os.path.dirname(os.path.abspath(path)), "train2014")
        for i, ref in enumerate(refs):
            where = f"{path} [{i}]"
            try:
                ann_id, image_id, split, sentences = ref["ann_id"], ref["image_id"], ref["split"], ref["sentences"]
            except (KeyError, TypeError) as e:
                yield Skipped(MALFORMED_RECORD, where, f"lacks key {e}: {ref!r:.120}")
                continue
            try:
                x, y, w, h = map(float, boxes[ann_id])
                image = images[image_id]
                name, width, height = image["file_name"], float(image["width"]), float(image["height"])
            except (KeyError, TypeError, ValueError) as e:
                yield Skipped(MALFORMED_RECORD, where, f"ann_id {ann_id} / image_id {image_id}: not in "
                              f"{instances_path}, or without an [x, y, w, h] bbox / a file_name, width and height "
                              f"({e!r})")
                continue
            if w <= 0 or h <= 0 or width <= 0 or height <= 0 or not isinstance(sentences, list):
                yield Skipped(MALFORMED_RECORD, where, f"ann {ann_id}'s bbox {[x, y, w, h]} or image {image_id}'s size "
                              f"{width}x{height} ({instances_path}) has no area, or its sentences are no list")
                continue
            target = tuple(normalise_boxes(np.array([[x, y, x + w, y + h]], np.float32), width, height)[0].tolist())
            ref_id = ref.get("ref_id", i)
            for j, sentence in enumerate(sentences):
                # A sentence that is no object has no text: the builder counts it as an empty caption.
                sentence = sentence if isinstance(sentence, dict) else {}
                yield Record(ImageRef(self._image_path(name, image_dir)), str(image_id), _text(sentence.get("sent")),
                             str(sentence.get("sent_id", f"{ref_id}#{j}")), str(split),
                             where=f"{where}.sentences[{j}]", target_box=target)


READERS: dict[str, type[Reader]] = {
    "flickr": FlickrReader,
    "coco": CocoReader,
    "karpathy": KarpathyReader,
    "csv": TableReader,
    "jsonl": TableReader,
    "webdataset": WebDatasetReader,
    "vqa": VqaReader,
    "gqa": GqaReader,
    "snli_ve": SnliVeReader,
    "nlvr2": Nlvr2Reader,
    "refcoco": RefcocoReader,
}
# The JSON-lines task layouts are told apart by their records' keys, before the generic table.
_DETECTION_ORDER = (CocoReader, KarpathyReader, VqaReader, GqaReader, RefcocoReader, SnliVeReader, Nlvr2Reader,
                    FlickrReader, WebDatasetReader, TableReader)


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
