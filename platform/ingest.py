"""Ray Data ingest: stream Parquet shards through CPU workers that decode, augment, tokenize and
mask, so that the Ray Train workers only compute.

``read_parquet`` streams from a local path or any pyarrow filesystem URI. A row that cannot be
used (an undecodable image, an empty caption or one that is not UTF-8, missing or non-finite
regions for a region model) is skipped, logged with its file and caption id, and counted by
reason in a :class:`DataQuality` actor, which the trainer reads to log ``data/skipped_*``
metrics. Nothing crashes on bad rows. A row kept with a flaw (an image-QA answer outside
answers.txt: no QA loss, the other objectives still train on it) is counted as a note, logged as
``data/<note>``. Each row counts once however often it is read (epochs, evaluation passes).

The text columns (:data:`TEXT_COLUMNS`) are read as bytes and decoded here, row by row: Arrow
turns a string column holding one invalid UTF-8 byte into an ``ArrowException`` that fails the
whole read, naming no file.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import zlib
from collections import Counter
from dataclasses import replace
from functools import partial
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from alignlab.models.inputs import CONCEPT_MASK, CONCEPT_OFFSET, IGNORE, InputSpec, vqa_accuracy
from alignlab.platform import shards
from alignlab.platform.config import DataConfig, ObjectivesConfig
from alignlab.platform.masking import bert_mask, block_mask, chain_mask, object_mask, random_phrase_mask

log = logging.getLogger(__name__)


def _ray():
    import ray
    return ray


MAX_EXAMPLES = 20


class DataQuality:
    """Skipped and noted rows, each counted once per ``(reason, caption_id)`` however often it is
    read: every epoch and every evaluation pass reads a bad row again. Skips of the training read
    are also kept per epoch: a skip in the stream's pass ``p`` belongs to epoch ``p``.

    It is also where the trainer tells the data stage where the next training stream starts
    (:meth:`begin_stream`): the one actor both sides already hold, and the stream's read tasks
    are made when its execution starts, after the trainer has resumed (:func:`stream_source`)."""

    def __init__(self):
        self.skipped: set[tuple[str, str]] = set()
        self.noted: set[tuple[str, str]] = set()
        self.start = (0, 0)
        self.train_epochs: dict[int, set[tuple[str, str]]] = {}
        self.examples: list[str] = []

    def begin_stream(self, first_pass: int, rows_read: int = 0) -> None:
        """The next training stream starts at pass ``first_pass`` (the trainer's epoch), past the
        first ``rows_read`` rows of that pass's order: those its steps have already trained on."""
        self.start = (first_pass, rows_read)

    def stream_start(self) -> tuple[int, int]:
        """(first pass, rows of it already read) for the next training stream."""
        return self.start

    def add(self, skipped: list[tuple[str, str, str, int]], notes: list[tuple[str, str]], train: bool) -> None:
        """``skipped``: (reason, caption_id, example, pass of the read) per skipped row of one
        batch; ``notes``: (note, caption_id) per kept row with a flaw; ``train``: whether the
        batch is of the training read."""
        for reason, caption_id, example, pass_index in skipped:
            key = (reason, caption_id)
            if key not in self.skipped:
                self.skipped.add(key)
                if len(self.examples) < MAX_EXAMPLES:
                    self.examples.append(example)
            if train:
                self.train_epochs.setdefault(pass_index, set()).add(key)
        self.noted.update(notes)

    def epoch_counts(self, epoch: int) -> dict[str, int]:
        """Distinct rows skipped by ``epoch``'s training read, by reason."""
        return _by_reason(self.train_epochs.get(epoch, set()))

    def snapshot(self) -> dict[str, Any]:
        """``counts`` (distinct skipped rows by reason), ``notes`` (distinct noted rows by kind),
        ``train_epochs`` ({epoch: distinct rows skipped by reason in that epoch's training read})
        and ``examples`` (the first skipped rows, with file and caption id)."""
        return {"counts": _by_reason(self.skipped), "notes": _by_reason(self.noted),
                "train_epochs": {e: self.epoch_counts(e) for e in sorted(self.train_epochs)},
                "examples": list(self.examples)}


def _by_reason(keys: set[tuple[str, str]]) -> dict[str, int]:
    return dict(Counter(reason for reason, _ in keys))


def make_counter():
    """A :class:`DataQuality` actor (``num_cpus=0``: it only counts)."""
    return _ray().remote(num_cpus=0)(DataQuality).remote()


# --------------------------------------------------------------------------------------------
# Image transforms (PIL on the CPU stage)
# --------------------------------------------------------------------------------------------


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], rng: np.random.Generator,
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box sampling (10 tries, then the whole image)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
            return x, y, x + w, y + h
    return 0, 0, width, height


# ALBEF's RandAugment op list (SIMLA §2.5 follows it): colour-changing ops (Color, Solarize,
# Posterize, Invert, Contrast) removed, since captions name colours.
RANDAUGMENT_OPS = ("identity", "autocontrast", "equalize", "brightness", "sharpness", "shear_x", "shear_y",
                   "translate_x", "translate_y", "rotate")


def rand_augment(im, rng: np.random.Generator, n: int = 2, magnitude: int = 7):
    """RandAugment (Cubuk et al., 2020) as ALBEF applies it: ``n`` ops drawn from
    ``RANDAUGMENT_OPS``, each applied with probability 0.5 at ``magnitude`` of 10 with a random
    sign for the geometric ones."""
    from PIL import Image, ImageEnhance, ImageOps

    m = magnitude / 10.0
    for name in rng.choice(RANDAUGMENT_OPS, size=n):
        if rng.random() < 0.5:
            continue
        sign = 1.0 if rng.random() < 0.5 else -1.0
        w, h = im.size
        if name == "autocontrast":
            im = ImageOps.autocontrast(im)
        elif name == "equalize":
            im = ImageOps.equalize(im)
        elif name == "brightness":
            im = ImageEnhance.Brightness(im).enhance(1.0 + sign * 0.9 * m)
        elif name == "sharpness":
            im = ImageEnhance.Sharpness(im).enhance(1.0 + sign * 0.9 * m)
        elif name in ("shear_x", "shear_y"):
            s = sign * 0.3 * m
            coeffs = (1, s, 0, 0, 1, 0) if name == "shear_x" else (1, 0, 0, s, 1, 0)
            im = im.transform(im.size, Image.AFFINE, coeffs, fillcolor=(128, 128, 128))
        elif name in ("translate_x", "translate_y"):
            t = sign * 0.45 * m
            coeffs = (1, 0, t * w, 0, 1, 0) if name == "translate_x" else (1, 0, 0, 0, 1, t * h)
            im = im.transform(im.size, Image.AFFINE, coeffs, fillcolor=(128, 128, 128))
        elif name == "rotate":
            im = im.rotate(sign * 30.0 * m, fillcolor=(128, 128, 128))
    return im


def decode_image(data: bytes, size: int, train: bool, scale: tuple[float, float], hflip: bool,
                 rng: np.random.Generator, randaugment: bool = False) -> np.ndarray:
    """Encoded bytes -> uint8 (3, size, size). Raises on undecodable data."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if train and scale != (1.0, 1.0):
            im = im.resize((size, size), Image.BICUBIC, box=random_resized_crop_box(*im.size, scale, rng))
        else:
            im = im.resize((size, size), Image.BICUBIC)
        if train and hflip and rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        if train and randaugment:
            im = rand_augment(im, rng)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def image_key(identifier: str) -> int:
    """A stable 63-bit integer per image (or caption) id, so the train step can tell captions of
    the same image apart from true negatives without strings on the device."""
    return zlib.crc32(identifier.encode()) | (zlib.adler32(identifier.encode()) << 31)


# --------------------------------------------------------------------------------------------
# The CPU stage
# --------------------------------------------------------------------------------------------

# Free-text columns, read as bytes (see the module docstring) and decoded by :func:`decode_text`.
TEXT_COLUMNS = ("caption", "question", "answer", "negative_caption")

# The training stream's column naming each row's pass over the split, which is the run's epoch
# (a resumed stream starts at its checkpoint's): the trainer reads its epoch boundaries from it,
# the data counters their epochs, the Preprocessor its per-batch seed.
PASS_COLUMN = "pass"


def decode_text(column, name: str, skip) -> list[str | None]:
    """One text column of a batch as str (None stays None, so a caption row's null question
    stays null), calling ``skip(i, "invalid_utf8_<name>", detail)`` for a value that is not
    UTF-8 and giving it ""."""
    out: list[str | None] = []
    for i, v in enumerate(column):
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError as e:
                skip(i, f"invalid_utf8_{name}", f"(byte 0x{v[e.start]:02x} at offset {e.start}: {v[:60]!r})")
                v = ""
        out.append(v)
    return out



class Preprocessor:
    """Callable class for ``Dataset.map_batches``: one instance per Ray Data actor, so the
    tokenizer loads once. Input: a numpy batch of shard columns. Output: fixed-shape arrays."""

    def __init__(self, data: DataConfig, objectives: ObjectivesConfig, spec: InputSpec, train: bool, counter=None,
                 seed: int = 0, id_columns: tuple[str, ...] = ()):
        from alignlab.platform.tokenization import load_tokenizer

        self.data, self.objectives, self.spec = data, objectives, spec
        self.train = train
        self.counter = counter
        # Integer columns passed through as int64 (a compositional split's candidate type and group).
        self.id_columns = tuple(id_columns)
        self.tokenizer = load_tokenizer(self.data.tokenizer, self.data.shards)
        # Random replacements are drawn from the whole vocabulary, as BERT's and Hugging Face's
        # MLM collators do.
        self.random_range = (0, len(self.tokenizer))
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        # Tag and phrase-concept vocabularies of the shard set (ids: models.base CONCEPT_*).
        self.tag_index = {t: i for i, t in enumerate(shards.read_vocab_file(self.data.shards, "tags.txt"))} \
            if self.spec.tags or self.spec.objects else {}
        # Each tag's word pieces, for a model that reads tags as words (InputSpec.tag_words).
        self.tag_pieces = {t: self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in self.tag_index} \
            if self.spec.tag_words else {}
        concepts = shards.read_vocab_file(self.data.shards, "concepts.txt") if self.spec.phrases else []
        self.concept_index = {c: i for i, c in enumerate(concepts)}
        # Each concept's token ids, for chain masking (tokenised as vocab_info does for the model).
        self.concept_tokens = [frozenset(self.tokenizer(c, add_special_tokens=False)["input_ids"])
                               for c in self.concept_index]
        self.answer_index = {a: i for i, a in enumerate(shards.read_vocab_file(self.data.shards, "answers.txt"))} \
            if self.spec.qa else {}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["caption"])
        keep = np.ones(n, dtype=bool)
        passes = batch.get(PASS_COLUMN, np.zeros(n, dtype=np.int64))
        if self.train and PASS_COLUMN in batch and n:
            # A training stream's batch draws from (seed, pass, its first row), not from the
            # actor's running state: which of several actors prepares a batch varies from run to
            # run, and actors seeded alike would draw the same masks for their k-th batches.
            self.rng = np.random.default_rng([self.seed, int(passes[0]),
                                              zlib.crc32(str(batch["caption_id"][0]).encode())])
        skipped: list[tuple[str, str, str, int]] = []
        notes: list[tuple[str, str]] = []

        def skip(i: int, reason: str, detail: str = "") -> None:
            if not keep[i]:  # one reason per row: the first found
                return
            keep[i] = False
            where = f"{batch['path'][i]} caption_id={batch['caption_id'][i]}" if "path" in batch \
                else f"caption_id={batch['caption_id'][i]}"
            skipped.append((reason, str(batch["caption_id"][i]), f"{reason}: {where} {detail}".strip(), int(passes[i])))

        def note(i: int, kind: str) -> None:
            notes.append((kind, str(batch["caption_id"][i])))

        # The question only needs to be told from null: it repeats the caption, decoded here.
        text = {c: decode_text(batch[c], c, skip) for c in ("caption", "answer") if c in batch}
        captions = [(c or "").strip() for c in text["caption"]]
        for i, c in enumerate(captions):
            if keep[i] and not c:
                skip(i, "empty_caption")
        out: dict[str, Any] = self._image_inputs(batch, keep, skip)
        if self.spec.image_pair:
            # NLVR2's second image, through the same stage, its inputs suffixed as its columns.
            second = {**batch, **{k[: -len(shards.PAIR_SUFFIX)]: v for k, v in batch.items()
                                  if k.endswith(shards.PAIR_SUFFIX)}}
            out.update({k + shards.PAIR_SUFFIX: v for k, v in self._image_inputs(second, keep, skip).items()})
        if self.spec.target_box:
            out["target_box"] = self._target_boxes(batch, keep, skip)
        if self.spec.text_features:
            out["text_features"] = self._text_features(batch, keep, skip)

        tok = self.tokenizer([c or "." for c in captions], padding="max_length", truncation=True,
                             max_length=self.data.max_text_len, return_tensors="np")
        out["input_ids"] = tok["input_ids"].astype(np.int64)
        out["attention_mask"] = tok["attention_mask"].astype(np.int64)
        if self.spec.mlm:
            special = np.isin(out["input_ids"], self.tokenizer.all_special_ids)
            out["mlm_input_ids"], out["mlm_labels"] = bert_mask(
                out["input_ids"], ~special & (out["attention_mask"] > 0), self.objectives.mlm_prob,
                self.tokenizer.mask_token_id, self.random_range, self.rng)
        if self.spec.tags and self.spec.mcr and self.spec.tag_words:
            # Tags written as words are masked as the words are (the official MVPTR's random_word
            # on its tag sequence): labels are word ids.
            out["mcr_tag_ids"], out["mcr_labels"] = bert_mask(
                out["tag_ids"], out["tag_mask"], self.objectives.mlm_prob, self.tokenizer.mask_token_id,
                self.random_range, self.rng)
        elif self.spec.tags and self.spec.mcr:
            # MCR (§3.2): BERT's recipe at mcr_prob over the real tags, random replacements
            # drawn from the tag vocabulary; labels are tag classes for the MCR head.
            out["mcr_tag_ids"], labels = bert_mask(
                out["tag_ids"], out["tag_mask"], self.objectives.mcr_prob, CONCEPT_MASK,
                (CONCEPT_OFFSET, CONCEPT_OFFSET + len(self.tag_index)), self.rng)
            out["mcr_labels"] = np.where(labels != IGNORE, labels - CONCEPT_OFFSET, IGNORE)
        if self.spec.phrases:
            out["phrase_ids"] = self._concept_ids(batch["phrases"], shards.concept_key, self.concept_index,
                                                  self.data.max_phrases, unique=True)
            out["phrase_mask"] = out["phrase_ids"] >= CONCEPT_OFFSET
            if self.spec.mlm:
                out["mlm_phrase_ids"] = chain_mask(out["phrase_ids"], self.concept_tokens, out["input_ids"],
                                                   out["mlm_labels"] != IGNORE, CONCEPT_MASK, CONCEPT_OFFSET)
                if self.spec.random_phrases:
                    out["mlm_phrase_ids"] = random_phrase_mask(out["phrase_ids"], out["mlm_phrase_ids"],
                                                               self.objectives.mlm_prob, len(self.concept_index),
                                                               self.rng)
        if self.spec.negative_captions:
            out.update(self._negative_captions(batch, out, skip))
        if self.spec.objects:
            # SemVLP's masked object prediction: features zeroed, labels = the region's own tag.
            selected = object_mask(out["region_mask"], self.objectives.object_mask_prob, self.rng)
            out["object_mask"] = selected
            out["masked_region_features"] = np.where(selected[..., None], 0.0, out["region_features"]).astype(np.float32)
            labels = self._region_labels(batch["tags"], out["region_mask"].shape[1])
            out["object_labels"] = np.where(selected, labels, IGNORE)
        if self.spec.mim:
            # SIMLA's MIM: BEiT block-wise patch masks, drawn here so the train step only computes.
            out["mim_mask"] = block_mask(n, self.spec.mim_grid, self.spec.mim_ratio, self.rng,
                                         min_block=self.spec.mim_min_block)
        if self.spec.qa and "answer" in batch:  # last: notes are counted on kept rows only
            out["answer_labels"] = self._answer_labels(batch["question"], text["answer"], keep, note)
        if self.spec.answer_scores:
            out["answer_scores"] = self._answer_scores(batch, text.get("answer"), keep)
        for c in self.id_columns:
            out[c] = np.asarray(batch[c], dtype=np.int64)
        if PASS_COLUMN in batch:
            out[PASS_COLUMN] = passes.astype(np.int64)
        out["image_key"] = np.array([image_key(str(x)) for x in batch["image_id"]], dtype=np.int64)
        out["caption_key"] = np.array([image_key(str(x)) for x in batch["caption_id"]], dtype=np.int64)

        for _, _, e, _ in skipped[:5]:
            log.warning("skipped row: %s", e)
        if (skipped or notes) and self.counter is not None:
            self.counter.add.remote(skipped, notes, self.train)
        return {k: v[keep] for k, v in out.items()}

    def _negative_captions(self, batch, caption: dict[str, np.ndarray], skip) -> dict[str, np.ndarray]:
        """Each row's hard negative caption (InputSpec.negative_captions), tokenised as the caption
        is (``caption``: the row's own inputs). ``has_negative`` is False for a row without one
        ("", then a placeholder) and for one that data.max_text_len and data.max_phrases cut back
        to the caption's own inputs (its change lay past the cut): a negative label there would
        contradict the positive one."""
        negatives = [(c or "").strip() for c in decode_text(batch["negative_caption"], "negative_caption", skip)]
        tok = self.tokenizer([c or "." for c in negatives], padding="max_length", truncation=True,
                             max_length=self.data.max_text_len, return_tensors="np")
        out = {"negative_input_ids": tok["input_ids"].astype(np.int64),
               "negative_attention_mask": tok["attention_mask"].astype(np.int64)}
        differs = (out["negative_input_ids"] != caption["input_ids"]).any(1)
        if self.spec.phrases:
            out["negative_phrase_ids"] = self._concept_ids(batch["negative_phrases"], shards.concept_key,
                                                           self.concept_index, self.data.max_phrases, unique=True)
            out["negative_phrase_mask"] = out["negative_phrase_ids"] >= CONCEPT_OFFSET
            differs |= (out["negative_phrase_ids"] != caption["phrase_ids"]).any(1)
        out["has_negative"] = np.array([bool(c) for c in negatives]) & differs
        return out

    def _image_inputs(self, batch, keep: np.ndarray, skip) -> dict[str, np.ndarray]:
        """One image's inputs per row (pixels, regions, tags), from ``batch``'s image columns."""
        n = len(batch["caption"])
        if self.spec.regions and "region_features" not in batch:
            raise shards.ShardSchemaError(
                f"{self.data.shards}: the model needs region features but the shards have no "
                f"'region_features' column; build them with `alignlab data build --regions ...`")
        out: dict[str, np.ndarray] = {}
        if self.spec.pixels:
            pixels = np.zeros((n, 3, self.data.image_size, self.data.image_size), dtype=np.uint8)
            for i in np.flatnonzero(keep):
                try:
                    pixels[i] = decode_image(batch["image"][i], self.data.image_size, self.train,
                                             self.data.crop_scale, self.data.hflip, self.rng,
                                             self.data.randaugment)
                except Exception as e:  # any decoder failure is a bad row, not a crashed job
                    skip(i, "undecodable_image", f"({type(e).__name__}: {e})")
            out["pixels"] = pixels
        if self.spec.regions:
            feats, mask, boxes = self._regions(batch, keep, skip)
            out.update(region_features=feats, region_mask=mask, boxes=boxes)
            if self.spec.whole_image:
                self._check_whole_image(batch, boxes, keep)
        if self.spec.tags and self.spec.tag_words:
            out["tag_ids"] = self._tag_piece_ids(batch["tags"], self.data.max_tags)
            out["tag_mask"] = out["tag_ids"] != self.tokenizer.pad_token_id
        elif self.spec.tags:
            out["tag_ids"] = self._concept_ids(batch["tags"], str, self.tag_index, self.data.max_tags)
            out["tag_mask"] = out["tag_ids"] >= CONCEPT_OFFSET
        if self.spec.tags_by_region:
            self._check_tags_by_region(batch, out["tag_mask"], out["region_mask"], keep)
        return out

    def _answer_scores(self, batch, answers: list[str | None] | None, keep: np.ndarray) -> np.ndarray:
        """VQA v2's soft targets: per row and answer of answers.txt, its VQA accuracy among the
        row's ``human_answers`` (0 for an answer no human gave). Without that column (a set built
        before it, GQA-style rows) the row's one answer scores 1."""
        scores = np.zeros((len(batch["caption"]), len(self.answer_index)), dtype=np.float32)
        humans = batch.get("human_answers")
        for i in np.flatnonzero(keep):
            given = [str(a) for a in humans[i]] if humans is not None and humans[i] is not None else []
            if not given and answers is not None and answers[i]:
                given = [answers[i]]
            for answer, count in Counter(" ".join(a.split()) for a in given).items():
                k = self.answer_index.get(answer)
                if k is not None:
                    scores[i, k] = vqa_accuracy(count, len(given))
        return scores

    def _target_boxes(self, batch, keep: np.ndarray, skip) -> np.ndarray:
        """RefCOCO+'s referred box per row; a row without a finite one is skipped."""
        boxes = np.zeros((len(batch["caption"]), 4), dtype=np.float32)
        for i in np.flatnonzero(keep):
            box = batch["target_box"][i]
            box = np.asarray(list(box), dtype=np.float32) if box is not None else np.full(4, np.nan, np.float32)
            if not np.isfinite(box).all():
                skip(i, "no_target_box")
            else:
                boxes[i] = box
        return boxes

    def _answer_labels(self, questions, answers: list[str], keep: np.ndarray, note) -> np.ndarray:
        """Per row, its answer's index in answers.txt; IGNORE on a caption row (null question) and
        on an answer outside answers.txt, which is noted (``note(i, kind)``), not skipped: the
        build leaves rare answers out of answers.txt on purpose (``min_answer_count``)."""
        labels = np.full(len(answers), IGNORE, dtype=np.int64)
        for i in np.flatnonzero(keep):
            if questions[i] is None:
                continue
            k = self.answer_index.get(answers[i])
            if k is None:
                note(i, "answer_not_in_vocab")
            else:
                labels[i] = k
        return labels

    @staticmethod
    def _concept_ids(column, key, index: dict[str, int], length: int, unique: bool = False) -> np.ndarray:
        """Per row, the ids of the entries of ``column`` found in ``index`` (others are dropped:
        MVPTR keeps only frequent concepts, §3.1), in order, padded / cut to ``length``."""
        ids = np.zeros((len(column), length), dtype=np.int64)
        for i, entries in enumerate(column):
            row: list[int] = []
            for e in entries if entries is not None else ():
                k = index.get(key(e))
                if k is not None and not (unique and k + CONCEPT_OFFSET in row):
                    row.append(k + CONCEPT_OFFSET)
            ids[i, : min(length, len(row))] = row[:length]
        return ids

    def _tag_piece_ids(self, column, length: int) -> np.ndarray:
        """Per row, the word pieces of its tags found in tags.txt (the tags both readings see), in
        box order, concatenated and padded / cut to ``length`` pieces, as the official MVPTR
        tokenises its tag string and cuts it to max_tag_length."""
        ids = np.full((len(column), length), self.tokenizer.pad_token_id, dtype=np.int64)
        for i, entries in enumerate(column):
            row = [p for e in (entries if entries is not None else ()) for p in self.tag_pieces.get(str(e), ())]
            ids[i, : min(length, len(row))] = row[:length]
        return ids

    def _region_labels(self, column, length: int) -> np.ndarray:
        """Per region, its tag's index in tags.txt (the shard format stores one tag per box, in box
        order), IGNORE for a tag outside tags.txt or past the row's regions."""
        labels = np.full((len(column), length), IGNORE, dtype=np.int64)
        for i, entries in enumerate(column):
            for j, tag in enumerate(list(entries if entries is not None else ())[:length]):
                labels[i, j] = self.tag_index.get(str(tag), IGNORE)
        return labels

    def _check_whole_image(self, batch, boxes: np.ndarray, keep: np.ndarray) -> None:
        """The model reads the whole image's feature at region 0; shards built without the
        whole-image box would silently feed it one detection instead."""
        bad = keep & ~np.all(np.isclose(boxes[:, 0], (0.0, 0.0, 1.0, 1.0), atol=1e-4), axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise shards.ShardSchemaError(
                f"{self.data.shards}: caption_id={batch['caption_id'][i]}: region 0 is the box "
                f"{[round(float(v), 3) for v in boxes[i, 0]]}, not the whole image [0, 0, 1, 1] this model reads; rebuild the "
                f"shards with `alignlab data build` (its whole-image box is on unless --no-whole-image-box)")

    def _check_tags_by_region(self, batch, tag_mask: np.ndarray, region_mask: np.ndarray, keep: np.ndarray) -> None:
        """The model places tag i at region i's box; a row whose tags and regions differ in number
        would place a tag at another object's box, silently."""
        bad = keep & (tag_mask != region_mask).any(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise shards.ShardSchemaError(
                f"{self.data.shards}: caption_id={batch['caption_id'][i]}: {int(tag_mask[i].sum())} tags of tags.txt "
                f"for {int(region_mask[i].sum())} regions, where the model places tag i at region i's box "
                f"(its placed tags, InputSpec.tags_by_region): it needs one tag a region, in box order, every "
                f"tag in tags.txt, and data.max_tags equal to data.max_regions")

    def _text_features(self, batch, keep, skip) -> np.ndarray:
        if "text_feature" not in batch:
            raise shards.ShardSchemaError(
                f"{self.data.shards}: the model reads cached sentence features but the shards have no "
                f"'text_feature' column; build them with `alignlab data build --text-features <checkpoint>`")
        column = batch["text_feature"]
        dim = next((len(v) for v in column if v is not None), 1)
        feats = np.stack([np.full(dim, np.nan, np.float32) if v is None else v for v in column]).astype(np.float32)
        bad = keep & ~np.isfinite(feats).all(axis=1)  # a null feature is NaN here
        for i in np.flatnonzero(bad):
            skip(i, "non_finite_text_feature")
        feats[~keep | bad] = 0.0
        return feats

    def _regions(self, batch, keep, skip):
        n, k = len(batch["caption"]), self.data.max_regions
        first = next((np.asarray(list(r)) for r in batch["region_features"] if r is not None and len(r)), None)
        dim = first.shape[-1] if first is not None else 1
        feats = np.zeros((n, k, dim), dtype=np.float32)
        boxes = np.zeros((n, k, 4), dtype=np.float32)
        mask = np.zeros((n, k), dtype=bool)
        for i, r in enumerate(batch["region_features"]):
            if not keep[i]:
                continue
            if r is None or len(r) == 0:
                skip(i, "no_regions")
                continue
            arr = np.stack(list(r)).astype(np.float32)
            b = np.stack(list(batch["boxes"][i])).astype(np.float32) \
                if "boxes" in batch and batch["boxes"][i] is not None and len(batch["boxes"][i]) else None
            # One NaN feature turns every loss and embedding it touches into NaN.
            if not np.isfinite(arr).all() or (b is not None and not np.isfinite(b).all()):
                skip(i, "non_finite_regions", f"({(~np.isfinite(arr)).sum()} feature values, "
                                               f"{0 if b is None else (~np.isfinite(b)).sum()} box values)")
                continue
            arr = arr[:k]
            feats[i, : len(arr)] = arr
            mask[i, : len(arr)] = True
            if b is not None:
                b = b[:k]
                boxes[i, : len(b)] = b
        return feats, mask, boxes


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------

_COLUMNS = ["image_id", "caption", "caption_id"]


def columns_for(spec: InputSpec) -> list[str]:
    cols = list(_COLUMNS)
    if spec.pixels:
        cols.append("image")
    if spec.regions:
        cols += ["region_features", "boxes"]
    if spec.tags or spec.mcr or spec.objects:
        cols.append("tags")
    if spec.phrases:
        cols.append("phrases")
    if spec.qa:
        cols += list(shards.QA_COLUMNS)
    if spec.answer_scores:
        cols.append("human_answers")
    if spec.image_pair:
        cols += [c + shards.PAIR_SUFFIX for c in cols if c + shards.PAIR_SUFFIX in shards.PAIR_COLUMNS]
    if spec.target_box:
        cols.append("target_box")
    if spec.text_features:
        cols.append("text_feature")
    if spec.negative_captions:
        cols += list(shards.NEGATIVE_COLUMNS) if spec.phrases else ["negative_caption"]
    return cols


def file_rows(uri: str, files: list[str]) -> list[int]:
    """Rows in each of a split's ``files``, from their Parquet footers alone."""
    fs, _ = shards.filesystem(uri)
    return [pq.read_metadata(f, filesystem=fs).num_rows for f in files]


def count_rows(uri: str) -> int:
    """Rows in a split."""
    return sum(file_rows(uri, shards.list_parquet(uri)))


def read_schema(files: list[str], columns: list[str], uri: str) -> pa.Schema:
    """The Arrow schema to read ``columns`` with: the first file's types (every file's are
    validated alike), the :data:`TEXT_COLUMNS` as bytes, so no string is decoded by Arrow."""
    fs, _ = shards.filesystem(uri)
    schema = pq.read_schema(files[0], filesystem=fs)
    fields = []
    for c in columns:
        if c not in schema.names:
            continue
        tp = schema.field(c).type
        if c in TEXT_COLUMNS:
            tp = pa.large_binary() if pa.types.is_large_string(tp) else pa.binary()
        fields.append(pa.field(c, tp))
    return pa.schema(fields)


def split_inputs(spec: InputSpec, uri: str, train: bool, id_columns: tuple[str, ...] = ()
                 ) -> tuple[InputSpec, list[str]]:
    """The inputs to prepare for one split and its files, after validating their footers and
    schemas (a bad file fails at start-up naming the file and column; so does a file without one
    of ``id_columns``). Evaluation reads clean inputs: masking for the pre-training objectives
    would only cost CPU and ship unused columns."""
    files = shards.validate_shards(uri)
    fs, _ = shards.filesystem(uri)
    # A downstream task's label columns (its human answers are optional: VQA falls back to the answer).
    task_columns = ["target_box"] if spec.target_box else []
    if train and spec.negative_captions:
        task_columns += [c for c in columns_for(spec) if c in shards.NEGATIVE_COLUMNS]
    if spec.image_pair:
        task_columns += [c + shards.PAIR_SUFFIX for c in columns_for(replace(spec, image_pair=False))
                         if c + shards.PAIR_SUFFIX in shards.PAIR_COLUMNS]
    for f in files:
        names = pq.read_schema(f, filesystem=fs).names
        absent = [c for c in id_columns if c not in names]
        if absent:
            raise shards.ShardSchemaError(f"{f}: no column {absent[0]!r}; reading this split needs the "
                                          f"integer columns {list(id_columns)}")
        absent = [c for c in task_columns if c not in names]
        if absent:
            what = "the model trains on hard negative captions (`alignlab data synth` writes them)" \
                if absent[0] in shards.NEGATIVE_COLUMNS else \
                f"the task reads {'image pairs (NLVR2)' if spec.image_pair else 'referred boxes (RefCOCO+)'}"
            raise shards.ShardSchemaError(f"{f}: no column {absent[0]!r}; {what}, from the columns "
                                          f"{task_columns} (see alignlab.platform.shards)")
    if not train:  # the labels stay: a downstream evaluation scores them
        spec = spec.unmasked()
    if spec.qa and not shards.has_qa_rows(uri):
        # a caption-only split: no QA columns to read, no answer_labels
        spec = replace(spec, qa=False, answer_scores=False)
    return spec, files


def local_eval_batches(data: DataConfig, objectives: ObjectivesConfig, spec: InputSpec, split: str,
                       batch_size: int, id_columns: tuple[str, ...] = (), counter=None) -> Iterator[dict[str, Any]]:
    """One split's evaluation rows as torch batches, prepared in this process by the same CPU
    stage as on Ray Data (files in name order, rows in file order): for scoring a checkpoint
    without a cluster. Bad rows are skipped and logged as in training, and counted in ``counter``
    when given (anything with ``add.remote``, as a :class:`DataQuality` actor)."""
    return local_batches(data, objectives, spec, split, batch_size, train=False, id_columns=id_columns,
                         counter=counter)


def local_batches(data: DataConfig, objectives: ObjectivesConfig, spec: InputSpec, split: str, batch_size: int,
                  train: bool, id_columns: tuple[str, ...] = (), counter=None, seed: int = 0
                  ) -> Iterator[dict[str, Any]]:
    """:func:`build_dataset`'s rows without Ray: pyarrow reads the files in name order and one
    :class:`Preprocessor` in this process prepares them, ``train`` choosing augmentation and
    masking as there. :func:`local_eval_batches` scores with it; ``alignlab bench`` times the Ray
    pipeline against it (the same work on the same rows, in one process)."""
    import torch

    uri = shards.child_uri(data.shards, split)
    spec, files = split_inputs(spec, uri, train=train, id_columns=id_columns)
    pre = Preprocessor(data, objectives, spec, train=train, counter=counter, seed=seed, id_columns=id_columns)
    fs, _ = shards.filesystem(uri)
    schema = read_schema(files, columns_for(spec) + list(id_columns), uri)
    columns = schema.names  # the optional columns the split has
    pending: dict[str, list[np.ndarray]] = {}
    for path in files:
        table = pq.read_table(path, columns=columns, schema=schema, filesystem=fs)
        for record_batch in table.to_batches(max_chunksize=data.preprocess_batch_size):
            batch = {c: record_batch.column(c).to_numpy(zero_copy_only=False) for c in record_batch.schema.names}
            batch["path"] = np.array([path] * record_batch.num_rows, dtype=object)
            for k, v in pre(batch).items():
                pending.setdefault(k, []).append(v)
            while pending and sum(len(v) for v in pending["image_key"]) >= batch_size:
                merged = {k: np.concatenate(v) for k, v in pending.items()}
                yield {k: torch.from_numpy(v[:batch_size]) for k, v in merged.items()}
                pending = {k: [v[batch_size:]] for k, v in merged.items()}
    if pending and sum(len(v) for v in pending["image_key"]):
        yield {k: torch.from_numpy(np.concatenate(v)) for k, v in pending.items()}


FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
RAY_FOOTER_ACTORS = 32  # Ray Data's default
FOOTER_FILES_PER_CALL = 10  # RAY_DATA_PARQUET_FOOTER_BATCH_SIZE's default: files per footer-reading call


def footer_actors(files: int) -> int:
    """Footer-reading actors for a split of ``files`` Parquet files: one per call's worth of
    files, at most Ray's default."""
    return max(1, min(RAY_FOOTER_ACTORS, math.ceil(files / FOOTER_FILES_PER_CALL)))


@contextlib.contextmanager
def footer_pool(files: int) -> Iterator[None]:
    """Ray Data's Parquet read lists its files anew on every execution (every evaluation; the
    training stream reads its files through :func:`stream_source`), on a pool of
    ``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`` footer-reading actors (32 by default, sized for object
    stores holding thousands of files). For a split of a few files, starting 32 Python processes
    was most of an epoch boundary's wait when training read that way: 26 s against 8 s with one
    actor on the synthetic set's 2 files, 2 shared cores (``alignlab bench --ray``, side by side).
    The read takes the pool size from the environment when it is created, so it is set around
    that call only: :func:`footer_actors` of the split's files, unless the user set it."""
    if FOOTER_ACTORS_ENV in os.environ:
        yield
        return
    os.environ[FOOTER_ACTORS_ENV] = str(footer_actors(files))
    try:
        yield
    finally:
        os.environ.pop(FOOTER_ACTORS_ENV, None)


def pass_files(files: list[str], rows: list[int], passes: int, seed: int, limit: int = 0,
               start: tuple[int, int] = (0, 0)) -> list[tuple[int, str, int, int]]:
    """The training stream's reads, in stream order: per pass, every file once, in an order
    drawn from ``(seed, pass)`` (so each pass is shuffled anew, reproducibly), as (pass, file,
    first row, rows to read); ``limit`` > 0 caps a pass at that many rows. The stream holds
    ``passes`` passes from ``start`` = (first pass, rows of it already read): a resumed run's
    stream skips the files and rows its checkpoint's steps read, in the order the run read them."""
    first_pass, done = start
    reads = []
    for p in range(first_pass, first_pass + passes):
        left = limit or sum(rows)
        skip = done if p == first_pass else 0
        for i in np.random.default_rng([seed, p]).permutation(len(files)):
            if left <= 0:
                break
            n = min(rows[i], left)
            left -= n
            if skip >= n:
                skip -= n
                continue
            reads.append((p, files[i], skip, n - skip))
            skip = 0
    return reads


def read_pass(uri: str, schema: pa.Schema, pass_index: int, path: str, first: int, rows: int) -> list[pa.Table]:
    """One read of the training stream: ``rows`` rows of ``path`` from row ``first``, as Arrow,
    with the path (for skip messages) and the pass."""
    fs, _ = shards.filesystem(uri)
    table = pq.read_table(path, columns=schema.names, schema=schema, filesystem=fs).slice(first, rows)
    return [table.append_column("path", pa.array([path] * len(table), pa.string()))
            .append_column(PASS_COLUMN, pa.array(np.full(len(table), pass_index, dtype=np.int64)))]


def stream_source(uri: str, schema: pa.Schema, reads: Callable[[tuple[int, int]], list[tuple[int, str, int, int]]],
                  counter=None):
    """:func:`pass_files`' reads as a Ray Data source, one read task each, its rows declared:
    the Preprocessor's map bundles inputs up to ``preprocess_batch_size`` rows by that count, so
    each task prepares one read and hands its rows over when done (reads declared as one-row
    items were gathered, every pass of the stream, into a single task).

    ``reads(start)`` gives the reads of a stream starting at ``start``, which comes from
    ``counter`` (:meth:`DataQuality.stream_start`) each time Ray Data asks for the read tasks:
    it does so when an execution starts, in the coordinator that splits the stream among the
    trainers, once they ask for their first batch, after they have resumed and said where. So a
    stream started again (a restarted worker group, a new run of a killed driver) starts where
    the checkpoint's steps stopped, not at the first pass."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class PassStream(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context=None) -> list[ReadTask]:
            start = tuple(_ray().get(counter.stream_start.remote())) if counter is not None else (0, 0)
            return [ReadTask(partial(read_pass, uri, schema, p, path, first, rows),
                             BlockMetadata(num_rows=rows, size_bytes=None, exec_stats=None, input_files=(path,)))
                    for p, path, first, rows in reads(start)]

    return PassStream()


def build_dataset(data: DataConfig, objectives: ObjectivesConfig, spec: InputSpec, split: str, train: bool,
                  counter=None, seed: int = 0, id_columns: tuple[str, ...] = (), passes: int = 1):
    """A lazily executed Ray Dataset of model-ready rows for one split. Footers and schemas are
    validated first, so a bad file fails at start-up, naming the file and column.
    ``id_columns`` (integer columns, such as shards.COMPOSITIONAL_COLUMNS) pass through unchanged.

    A training read is one stream of ``passes`` passes over the split (each in its own file
    order, its rows tagged with :data:`PASS_COLUMN`), from where ``counter`` says the trainer
    stands (:func:`stream_source`), so one execution serves every epoch: Ray
    Data re-executes a dataset at each iteration, and a new execution per epoch cost 5-8 s at
    every boundary (new read tasks, a new Preprocessor actor, the first block; ``alignlab bench
    --ray``, epochs). The Preprocessor actor lives through the stream; each batch draws its
    augmentation and masking from (seed, pass, its first row), so they differ from pass to pass
    and not with the actor that prepares the batch. The stream keeps its order
    (``preserve_order``), so every pass's rows reach the trainer before the next pass's."""
    ray = _ray()
    uri = shards.child_uri(data.shards, split)
    spec, files = split_inputs(spec, uri, train, id_columns)
    schema = read_schema(files, columns_for(spec) + list(id_columns), uri)
    if train:
        reads = partial(pass_files, files, file_rows(uri, files), passes, seed, data.max_train_rows)
        # As many reads at a time as Preprocessor actors: a read takes a fraction of the time its
        # rows take to prepare, so they keep ahead, and a read task per file of every pass at
        # once would start a worker process for each, on cores the actors need.
        ds = ray.data.read_datasource(stream_source(uri, schema, reads, counter),
                                      override_num_blocks=len(reads((0, 0))), concurrency=data.preprocess_concurrency)
    else:
        with footer_pool(len(files)):
            ds = ray.data.read_parquet(uri, columns=schema.names, schema=schema,
                                       file_extensions=["parquet"], include_paths=True)
    ds = ds.map_batches(
        Preprocessor,
        fn_constructor_kwargs=dict(data=data, objectives=objectives, spec=spec, train=train, counter=counter,
                                   seed=seed, id_columns=tuple(id_columns)),
        batch_size=data.preprocess_batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=data.preprocess_concurrency),
    )
    if train:
        ds.context.execution_options.preserve_order = True
    from alignlab.platform.loop_pacing import pace

    pace(ds.context)
    return ds
