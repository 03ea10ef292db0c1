"""``alignlab data build``: a caption corpus in any understood layout -> Parquet shards, as a Ray Data
job.

The driver reads the captions (text only), drops bad rows with a counted reason, groups captions
by image and plans *units*: consecutive images of one split holding at most ``rows_per_file``
captions, each written as one ``ROOT/<split>/part-NNNNN.parquet``. The downstream task layouts
plan their texts as captions, each with its label columns (see :mod:`alignlab.platform.shards`):
VQA, GQA, SNLI-VE and NLVR2 rows are classification rows (``question``, ``answer``; VQA v2 adds
``human_answers``), RefCOCO rows carry ``target_box``; an NLVR2 statement is planned with its
image pair, whose second image gets the ``*_b`` columns and its own regions. A Ray Data
``map_batches`` over the units runs :class:`UnitBuilder` actors, which load the spaCy parser
(MVPTR §3.1 phrase concepts), the region source and the feature backbone (MVPTR §3.1, SemVLP
§3.1.1) once, then per unit: parse its captions with ``nlp.pipe``, decode / detect / pool each
image once, and write the file. The manifest records every finished unit, so a re-run does only
what is missing. Finally the concept vocabulary (tuples in >= ``min_count`` training
sentences), the tag vocabulary and, for classification shards, the answer vocabulary (answers of
>= ``min_answer_count`` training rows) are computed from the written shards' columns, so they are
right for resumed builds too. The manifest names the reader's task (``"task"``).

``--vocab-from DIR`` takes the vocabularies of another shard set instead of counting them: a test
set built later maps to its training set's ids, and a task set keeps its pre-training set's
``vocab.txt``, ``tags.txt`` and ``concepts.txt``. ``answers.txt`` is inherited only when ``DIR``
has one (a VQA test set built from the VQA train set); otherwise (``DIR`` a caption set) a
classification set counts its own from its train split, as a task's classes are its own.

No bad input stops a build: a malformed line or record, a mis-encoded string, an empty or
duplicate caption, a missing or undecodable image is skipped and counted by reason
(``rows_skipped``), and the first :data:`MAX_LISTED` of them are listed in ``skipped_rows`` with
where they were (``file:line``, a JSON file's record, or the image file) and why.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from alignlab.platform.databuild.config import BuildConfig
from alignlab.platform.databuild.phrases import build_vocab
from alignlab.platform.databuild.readers import ImageRef, Reader, Record, Skipped, open_reader
from alignlab.platform.databuild.regions import (POSITION_DIM, VINVL_DIM, Featurizer, grid_boxes,
                                                 make_region_source, normalise_boxes, position_features, select)
from alignlab.platform.shards import (PAIR_SUFFIX, SCHEMA_VERSION, VOCABULARY_FILES, WHOLE_IMAGE_TAG, child_uri,
                                      claim_folder, filesystem, read_manifest, read_text, rows_to_table,
                                      write_manifest, write_text)

log = logging.getLogger(__name__)

PRODUCER = "alignlab data build"  # the manifest's producer: the builder writes only into its own sets

# Skip reasons recorded in the manifest.
EMPTY_CAPTION = "empty_caption"
CAPTION_TOO_LONG = "caption_too_long"
DUPLICATE_CAPTION_ID = "duplicate_caption_id"
CONFLICTING_IMAGE_ID = "conflicting_image_id"  # one image_id naming two different images / splits
NO_SPLIT = "no_split"
MISSING_IMAGE = "missing_image"
UNDECODABLE_IMAGE = "undecodable_image"
MISSING_ANSWER = "missing_answer"  # a task layout's text without a label (its test sets)
INVALID_UTF8 = "invalid_utf8"  # a byte of the record's text that is not UTF-8 (Latin-1 text, say)

MAX_LISTED = 1000  # skipped rows listed with their place in the manifest; all are counted


class BuildError(RuntimeError):
    """The build cannot proceed (e.g. resuming into shards built with other options)."""


@dataclass
class Skips:
    """Rows left out of the shards: how many per reason, and the first :data:`MAX_LISTED` of them,
    each with where it was and why."""

    counts: Counter = field(default_factory=Counter)
    listed: list[dict[str, str]] = field(default_factory=list)

    def add(self, reason: str, where: str, detail: str = "", rows: int = 1) -> None:
        self.counts[reason] += rows
        if len(self.listed) < MAX_LISTED:
            self.listed.append({"reason": reason, "where": where, "detail": detail})

    def merge(self, counts: dict[str, int], listed: list[dict[str, str]]) -> None:
        self.counts.update(counts)
        self.listed.extend(listed[: MAX_LISTED - len(self.listed)])


def mis_encoded(rec: Record) -> str | None:
    """What in the record is not UTF-8, or None. Readers decode with ``surrogateescape``, so each
    undecodable byte is a lone surrogate U+DC80..U+DCFF standing for it."""
    texts = [(name, getattr(rec, name) or "") for name in ("caption", "answer", "image_id", "caption_id", "split",
                                                           "image_id_b")]
    texts += [(f"human_answers[{k}]", h) for k, h in enumerate(rec.human_answers or ())]
    for name, text in texts:
        bad = next((k for k, ch in enumerate(text) if "\udc80" <= ch <= "\udcff"), None)
        if bad is not None:
            return f"{name} has byte 0x{ord(text[bad]) - 0xDC00:02x} at character {bad}, not UTF-8: {text[:60]!r}"
    for image in (rec.image, rec.image_b):
        if image is not None and any("\udc80" <= ch <= "\udcff" for ch in image.path):
            return f"image path is not UTF-8: {image.path!r}"
    return None


# --------------------------------------------------------------------------------------------
# Driver: planning
# --------------------------------------------------------------------------------------------


def plan_units(reader: Reader, cfg: BuildConfig, hints: dict[str, Any]) -> tuple[list[dict], Skips]:
    """Group the reader's records by image (an NLVR2 pair: by its two images) and cut them into
    units; returns (units, skipped). A unit's image holds its ``captions`` as ``[caption_id,
    caption]``, or ``[caption_id, caption, labels]`` with the row's label columns by name."""
    skipped = Skips()
    images: dict[tuple[str, str | None], dict] = {}
    caption_ids: set[str] = set()
    for rec in reader.records():
        if isinstance(rec, Skipped):
            skipped.add(rec.reason, rec.where, rec.detail)
            continue
        problem = mis_encoded(rec)
        if problem:
            skipped.add(INVALID_UTF8, rec.where, problem)
            continue
        caption = " ".join(rec.caption.split())
        if not rec.split:
            skipped.add(NO_SPLIT, rec.where, f"image {rec.image_id} belongs to no split")
            continue
        if not caption:
            skipped.add(EMPTY_CAPTION, rec.where, f"caption_id {rec.caption_id}")
            continue
        if len(caption.split()) > cfg.max_caption_words:
            skipped.add(CAPTION_TOO_LONG, rec.where,
                        f"caption_id {rec.caption_id}: {len(caption.split())} words > {cfg.max_caption_words}")
            continue
        if rec.caption_id in caption_ids:
            skipped.add(DUPLICATE_CAPTION_ID, rec.where, f"caption_id {rec.caption_id}")
            continue
        pair = {"": (rec.image_id, rec.image)}
        if rec.image_b is not None:
            pair[PAIR_SUFFIX] = (rec.image_id_b, rec.image_b)
        unknown = next((image_id for image_id, image in pair.values() if not image.path), None)
        if unknown is not None:
            skipped.add(MISSING_IMAGE, rec.where, f"no image file known for image {unknown}")
            continue
        # Whitespace-normalised like captions, which also keeps an answer on one line of answers.txt.
        answer = None if rec.answer is None else " ".join(rec.answer.split())
        if answer == "":
            skipped.add(MISSING_ANSWER, rec.where, f"{rec.caption_id} has no label")
            continue
        refs = {s: [image.path, image.offset, image.size] for s, (_, image) in pair.items()}
        item = images.get((rec.image_id, rec.image_id_b))
        if item is None:
            item = images[(rec.image_id, rec.image_id_b)] = {"split": rec.split, "captions": []}
            for s, (image_id, _) in pair.items():
                item.update({f"image_id{s}": image_id, f"ref{s}": refs[s], f"hint{s}": hints.get(image_id)})
        elif any(item[f"ref{s}"] != refs[s] for s in pair) or item["split"] != rec.split:
            skipped.add(CONFLICTING_IMAGE_ID, rec.where,
                        f"image_id {rec.image_id} names {item['ref'][0]} ({item['split']}) already")
            continue
        caption_ids.add(rec.caption_id)
        labels: dict[str, Any] = {}
        if answer is not None:
            labels["answer"] = answer
        if rec.human_answers is not None:
            labels["human_answers"] = [" ".join(h.split()) for h in rec.human_answers]
        if rec.target_box is not None:
            labels["target_box"] = list(rec.target_box)
        item["captions"].append([rec.caption_id, caption, labels] if labels else [rec.caption_id, caption])

    units: list[dict] = []
    open_unit: dict[str, dict] = {}
    counters: Counter[str] = Counter()
    for item in images.values():
        split = item["split"]
        unit = open_unit.get(split)
        if unit is None or unit["rows"] + len(item["captions"]) > cfg.rows_per_file and unit["images"]:
            unit = {"name": f"{split}/part-{counters[split]:05d}.parquet", "rows": 0, "images": []}
            counters[split] += 1
            open_unit[split] = unit
            units.append(unit)
        unit["images"].append(item)
        unit["rows"] += len(item["captions"])
    return units, skipped


# --------------------------------------------------------------------------------------------
# Workers: one unit -> one Parquet file
# --------------------------------------------------------------------------------------------


class UnitBuilder:
    """Ray Data callable class: the models load once per actor; each batch row is one unit."""

    def __init__(self, cfg: dict):
        import cv2
        import torch

        # One Ray CPU per actor: intra-op threads would only oversubscribe the cores.
        torch.set_num_threads(1)
        cv2.setNumThreads(1)
        self._cv2 = cv2
        self.cfg = BuildConfig(**cfg)
        self.phrases = None
        if self.cfg.phrases:
            from alignlab.platform.databuild.phrases import PhraseParser

            self.phrases = PhraseParser(self.cfg.spacy_model, self.cfg.phrase_batch_size)
        self.regions = make_region_source(self.cfg)
        self._featurizer: Featurizer | None = None
        self.sentences = None
        if self.cfg.text_features:
            from alignlab.platform.databuild.sentences import SentenceFeaturizer

            self.sentences = SentenceFeaturizer(self.cfg.text_features)

    def featurizer(self) -> Featurizer:
        if self._featurizer is None:  # VinVL TSVs that carry features never need the backbone
            self._featurizer = Featurizer(self.cfg.backbone, self.cfg.backbone_weights, self.cfg.feature_image_size)
        return self._featurizer

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"name": [], "rows": [], "images": [], "skipped": [], "skipped_rows": [],
                                "seconds": []}
        for payload in batch["unit"]:
            start = time.perf_counter()
            unit = json.loads(payload)
            rows, n_images, skipped = self.build_unit(unit)
            out["name"].append(unit["name"])
            out["rows"].append(rows)
            out["images"].append(n_images)
            out["skipped"].append(json.dumps(dict(skipped.counts)))
            out["skipped_rows"].append(json.dumps(skipped.listed))
            out["seconds"].append(time.perf_counter() - start)
        return out

    def decode(self, ref: list) -> tuple[bytes | None, np.ndarray | None, str | None]:
        try:
            data = ImageRef(*ref).read()
        except (OSError, ValueError):
            return None, None, MISSING_IMAGE
        bgr = self._cv2.imdecode(np.frombuffer(data, np.uint8), self._cv2.IMREAD_COLOR) if data else None
        if bgr is None or bgr.size == 0:
            return None, None, UNDECODABLE_IMAGE
        return data, self._cv2.cvtColor(bgr, self._cv2.COLOR_BGR2RGB), None

    def image_regions(self, rgb: np.ndarray, hint: Any) -> tuple[np.ndarray, list[str], np.ndarray]:
        """(normalised boxes, tags, features with position) of one image."""
        cfg = self.cfg
        found = select(self.regions.detect(rgb, hint), cfg.score_threshold,
                       cfg.max_regions - cfg.fixed_regions, cfg.max_tags)
        h, w = rgb.shape[:2]
        fixed = grid_boxes(w, h, cfg.grid_boxes)
        if cfg.whole_image_box:
            fixed = np.concatenate([np.array([[0, 0, w, h]], np.float32), fixed])
        pixel_boxes = np.concatenate([fixed, found.boxes]).astype(np.float32)
        tags = [WHOLE_IMAGE_TAG] * len(fixed) + list(found.tags)
        boxes = normalise_boxes(pixel_boxes, w, h)
        if found.features is not None:
            appearance = found.features
        elif len(boxes):
            appearance = self.featurizer()(rgb, pixel_boxes)
        else:
            appearance = np.zeros((0, self.appearance_dim()), np.float32)
        return boxes, tags, np.concatenate([appearance, position_features(boxes)], axis=1)

    def appearance_dim(self) -> int:
        if self.cfg.region_kind == "vinvl":
            return VINVL_DIM - POSITION_DIM
        return self.featurizer().dim

    def build_unit(self, unit: dict) -> tuple[int, int, Skips]:
        skipped = Skips()
        captions = [c for item in unit["images"] for c in item["captions"]]
        tuples = iter(self.phrases.parse([c[1] for c in captions])) if self.phrases else None
        features = iter(self.sentences([c[1] for c in captions])) if self.sentences else None
        rows: list[dict] = []
        n_images = 0
        for item in unit["images"]:
            # An NLVR2 pair's second image (PAIR_SUFFIX) is decoded and given regions as the first
            # is, so that the model reads both alike; either one failing skips the pair's rows.
            suffixes = ("", PAIR_SUFFIX) if f"ref{PAIR_SUFFIX}" in item else ("",)
            decoded = {s: self.decode(item[f"ref{s}"]) for s in suffixes}
            item_tuples = [next(tuples) for _ in item["captions"]] if tuples else None
            item_features = [next(features) for _ in item["captions"]] if features else None
            failed = next((s for s in suffixes if decoded[s][2]), None)
            if failed is not None:
                skipped.add(decoded[failed][2], item[f"ref{failed}"][0], f"image {item[f'image_id{failed}']}: its "
                            f"{len(item['captions'])} caption(s) skipped", rows=len(item["captions"]))
                continue
            n_images += len(suffixes)
            images: dict[str, Any] = {}
            for s in suffixes:
                data, rgb, _ = decoded[s]
                images.update({f"image{s}": data, f"image_id{s}": item[f"image_id{s}"]})
                if self.regions is not None:
                    boxes, tags, feats = self.image_regions(rgb, item[f"hint{s}"])
                    images.update({f"region_features{s}": feats, f"boxes{s}": boxes, f"tags{s}": tags})
            for k, (cid, caption, *labels) in enumerate(item["captions"]):
                row = {"caption": caption, "caption_id": cid, "split": item["split"], **images,
                       **(labels[0] if labels else {})}
                if "answer" in row:  # a classification row's text is its question too
                    row["question"] = caption
                if item_tuples is not None:
                    row["phrases"] = item_tuples[k]
                if item_features is not None:
                    row["text_feature"] = item_features[k]
                rows.append(row)
        if rows:
            dim = rows[0]["region_features"].shape[1] if self.regions is not None else None
            table = rows_to_table(rows, dim)
            fs, root = filesystem(self.cfg.out)
            path = posixpath.join(root, unit["name"])
            fs.create_dir(posixpath.dirname(path), recursive=True)
            pq.write_table(table, path, filesystem=fs, compression="zstd")
        return len(rows), n_images, skipped


# --------------------------------------------------------------------------------------------
# Driver: run, resume, vocabularies, manifest
# --------------------------------------------------------------------------------------------


def _split_files(out: str, split: str | None = None) -> list[str]:
    fs, root = filesystem(out)
    base = posixpath.join(root, split) if split else root
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return sorted(i.path for i in infos if i.path.endswith(".parquet"))


def _by_count(counts: Counter) -> list[str]:
    """Most frequent first, ties alphabetically (deterministic for any build order)."""
    return [k for k, _ in sorted(counts.items(), key=lambda kn: (-kn[1], kn[0]))]


def _inherited_vocabularies(source: str) -> dict[str, str]:
    """``--vocab-from``: the vocabulary files (by file name) of another shard set, read before
    anything is built so that a wrong folder fails at once."""
    files = {name: read_text(child_uri(source, name)) for name in VOCABULARY_FILES}
    if not any(files.values()):
        raise BuildError(f"--vocab-from {source}: no vocabulary there (none of {', '.join(VOCABULARY_FILES)}); "
                         f"name the training shard set's folder")
    return {name: text for name, text in files.items() if text is not None}


def _answer_vocabulary(cfg: BuildConfig, classes: tuple[str, ...] = ()) -> list[str] | None:
    """``answers`` of classification shards, by the number of training rows with that answer, kept
    from ``min_answer_count`` on; None for shards without answers. A task's fixed ``classes`` are
    all kept, those unseen in train after the rest, so the first line stays the most frequent
    train answer (the majority baseline's)."""
    fs, _ = filesystem(cfg.out)
    qa_files = [f for f in _split_files(cfg.out, "train") if "answer" in pq.read_schema(f, filesystem=fs).names]
    if not qa_files and not classes:
        return None
    answers = Counter(a for f in qa_files
                      for a in pq.read_table(f, columns=["answer"], filesystem=fs).column("answer").to_pylist()
                      if a is not None)
    counted = _by_count(Counter({a: n for a, n in answers.items() if n >= cfg.min_answer_count or a in classes}))
    return counted + [c for c in classes if c not in counted]


def _counted_vocabularies(cfg: BuildConfig, classes: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """The shard set's vocabularies by name (``<name>.txt``), from the written shards: ``concepts``
    from the train split's ``phrases`` (MVPTR §3.1), ``tags`` by the number of images (an NLVR2
    pair's second ones included) showing them, ``answers`` by :func:`_answer_vocabulary`."""
    fs, _ = filesystem(cfg.out)
    vocabs: dict[str, list[str]] = {}
    if cfg.phrases:
        sentences = []
        for f in _split_files(cfg.out, "train"):
            sentences.extend(pq.read_table(f, columns=["phrases"], filesystem=fs).column("phrases").to_pylist())
        vocabs["concepts"] = build_vocab(sentences, cfg.min_count)
    if cfg.region_kind != "none":
        per_image: dict[str, set[str]] = {}
        for f in _split_files(cfg.out):
            names = pq.read_schema(f, filesystem=fs).names
            for s in ("", PAIR_SUFFIX):
                if f"tags{s}" not in names:
                    continue
                t = pq.read_table(f, columns=[f"image_id{s}", f"tags{s}"], filesystem=fs)
                for image_id, image_tags in zip(t.column(0).to_pylist(), t.column(1).to_pylist()):
                    per_image.setdefault(image_id, set()).update(tag for tag in image_tags if tag != WHOLE_IMAGE_TAG)
        vocabs["tags"] = _by_count(Counter(tag for s in per_image.values() for tag in s))
    answers = _answer_vocabulary(cfg, classes)
    if answers is not None:
        vocabs["answers"] = answers
    return vocabs


def _run_units(units: list[dict], cfg: BuildConfig, on_done) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=cfg.workers or os.cpu_count(), include_dashboard=False, configure_logging=False)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = max(1, min(cfg.workers or cpus, cpus, len(units)))
    ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units], override_num_blocks=len(units))
    results = ds.map_batches(UnitBuilder, fn_constructor_kwargs={"cfg": cfg.__dict__}, batch_size=1,
                             compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1)
    for row in results.iter_rows():
        on_done(row)


def build(cfg: BuildConfig) -> dict:
    """Run the build; returns the manifest (also written to ``OUT/manifest.json``)."""
    cfg.validate()
    claim_folder(cfg.out, PRODUCER)  # before anything, --overwrite's deletions included
    started = time.time()
    reader = open_reader(cfg.source, cfg.layout, cfg.image_root, cfg.default_split)
    if reader.task == "refcoco" and cfg.region_kind == "none":
        raise BuildError(f"{cfg.source}: a RefCOCO set's model picks the referred object among the image's "
                         f"regions, so the build needs --regions (ssd, gt for the instances.json boxes, "
                         f"torchvision:<model> or vinvl:<features.tsv>)")
    region_source = make_region_source(cfg)
    hints = region_source.hints(reader) if region_source is not None else {}
    units, plan_skipped = plan_units(reader, cfg, hints)

    inherited = _inherited_vocabularies(cfg.vocab_from) if cfg.vocab_from else None
    fingerprint = cfg.fingerprint()
    manifest = read_manifest(cfg.out)
    if manifest and not cfg.overwrite:
        if manifest.get("build") != fingerprint:
            changed = sorted(k for k in fingerprint if (manifest.get("build") or {}).get(k) != fingerprint[k])
            raise BuildError(f"{child_uri(cfg.out, 'manifest.json')}: these shards were built with different "
                             f"options ({', '.join(changed) or 'unknown'}); pass --overwrite or a new --out")
    else:
        fs, _ = filesystem(cfg.out)
        for f in _split_files(cfg.out):  # an overwrite must not leave parts of the old build behind
            fs.delete_file(f)
        manifest = {}
    done: dict[str, dict] = {k: v for k, v in manifest.get("units", {}).items()
                             if k in {u["name"] for u in units}}
    manifest = {"schema_version": SCHEMA_VERSION, "layout": reader.name, "task": reader.task, "source": cfg.source,
                "build": fingerprint, "units": done}

    def save() -> None:
        skipped = Skips()
        skipped.merge(plan_skipped.counts, plan_skipped.listed)
        for name in sorted(done):
            skipped.merge(done[name]["skipped"], done[name].get("skipped_rows", []))
        manifest.update(
            rows_written=sum(u["rows"] for u in done.values()),
            images_written=sum(u["images"] for u in done.values()),
            rows_skipped=dict(sorted(skipped.counts.items())),
            skipped_rows=skipped.listed,
            files=sorted(k for k, u in done.items() if u["rows"]),
            complete=len(done) == len(units))
        write_manifest(cfg.out, manifest, PRODUCER)

    def on_done(row: dict) -> None:
        done[row["name"]] = {"rows": int(row["rows"]), "images": int(row["images"]),
                             "skipped": json.loads(row["skipped"])}
        if json.loads(row["skipped_rows"]):  # kept per unit for resumed builds; most units have none
            done[row["name"]]["skipped_rows"] = json.loads(row["skipped_rows"])
        log.info("wrote %s: %d rows in %.1fs", row["name"], row["rows"], row["seconds"])
        save()

    todo = [u for u in units if u["name"] not in done]
    manifest["units_skipped_as_done"] = len(units) - len(todo)
    if todo:
        _run_units(todo, cfg, on_done)
    if inherited is None:
        counted = _counted_vocabularies(cfg, reader.classes)
    else:
        # A task's classes are its own: without the source set's answers.txt they are counted here.
        answers = None if "answers.txt" in inherited else _answer_vocabulary(cfg, reader.classes)
        counted = {} if answers is None else {"answers": answers}
    vocabularies = {**{f"{name}.txt": "".join(e + "\n" for e in entries) for name, entries in counted.items()},
                    **(inherited or {})}
    for name, text in vocabularies.items():
        write_text(cfg.out, name, text, PRODUCER)
        manifest[name.removesuffix(".txt")] = len(text.splitlines())
    if cfg.vocab_from:
        manifest["vocab_from"] = cfg.vocab_from
    manifest["seconds"] = round(time.time() - started, 1)
    save()
    return manifest
