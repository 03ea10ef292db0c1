"""Ray Data ingest: stream Parquet shards through CPU workers that decode, augment, tokenize and
mask, so that the Ray Train workers only compute.

``read_parquet`` streams from a local path or any pyarrow filesystem URI. A row that cannot be
used (an undecodable image, an empty caption, missing regions for a region model) is skipped,
logged with its file and caption id, and counted by reason in a :class:`DataQualityCounter`
actor, which the trainer reads to log ``data/skipped_*`` metrics. Nothing crashes on bad rows.
A row kept with a flaw (an image-QA answer outside answers.txt: no QA loss, the other
objectives still train on it) is counted as a note, logged as ``data/<note>``.
"""
from __future__ import annotations

import io
import logging
import zlib
from collections import Counter
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from alignlab.models.base import CONCEPT_MASK, CONCEPT_OFFSET, InputSpec
from alignlab.platform import shards
from alignlab.platform.config import DataConfig, ObjectivesConfig
from alignlab.platform.masking import IGNORE, bert_mask, block_mask, chain_mask, object_mask

log = logging.getLogger(__name__)


def _ray():
    import ray
    return ray


def make_counter():
    """An actor holding skip counts by reason and note counts by kind (``num_cpus=0``: it only
    counts)."""
    ray = _ray()

    @ray.remote(num_cpus=0)
    class DataQualityCounter:
        def __init__(self):
            self.counts: Counter = Counter()
            self.notes: Counter = Counter()
            self.examples: list[str] = []

        def add(self, counts: dict[str, int], examples: list[str], notes: dict[str, int] | None = None) -> None:
            self.counts.update(counts)
            self.notes.update(notes or {})
            self.examples.extend(examples[: max(0, 20 - len(self.examples))])

        def snapshot(self) -> dict[str, Any]:
            return {"counts": dict(self.counts), "notes": dict(self.notes), "examples": list(self.examples)}

    return DataQualityCounter.remote()


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


class Preprocessor:
    """Callable class for ``Dataset.map_batches``: one instance per Ray Data actor, so the
    tokenizer loads once. Input: a numpy batch of shard columns. Output: fixed-shape arrays."""

    def __init__(self, data: dict, objectives: dict, spec: dict, train: bool, counter=None, seed: int = 0,
                 id_columns: tuple[str, ...] = ()):
        from alignlab.platform.tokenization import load_tokenizer

        self.data = DataConfig(**{**data, "crop_scale": tuple(data["crop_scale"])})
        self.objectives = ObjectivesConfig(**objectives)
        self.spec = InputSpec(**spec)
        self.train = train
        self.counter = counter
        # Integer columns passed through as int64 (a compositional split's candidate type and group).
        self.id_columns = tuple(id_columns)
        self.tokenizer = load_tokenizer(self.data.tokenizer, self.data.shards)
        # Random replacements are drawn from the whole vocabulary, as BERT's and Hugging Face's
        # MLM collators do.
        self.random_range = (0, len(self.tokenizer))
        self.rng = np.random.default_rng(seed)
        # Tag and phrase-concept vocabularies of the shard set (ids: models.base CONCEPT_*).
        self.tag_index = {t: i for i, t in enumerate(shards.read_vocab_file(self.data.shards, "tags.txt"))} \
            if self.spec.tags or self.spec.objects else {}
        concepts = shards.read_vocab_file(self.data.shards, "concepts.txt") if self.spec.phrases else []
        self.concept_index = {c.replace(" | ", " "): i for i, c in enumerate(concepts)}
        # Each concept's token ids, for chain masking (tokenised as vocab_info does for the model).
        self.concept_tokens = [frozenset(self.tokenizer(c, add_special_tokens=False)["input_ids"])
                               for c in self.concept_index]
        self.answer_index = {a: i for i, a in enumerate(shards.read_vocab_file(self.data.shards, "answers.txt"))} \
            if self.spec.qa else {}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["caption"])
        keep = np.ones(n, dtype=bool)
        reasons: Counter = Counter()
        notes: Counter = Counter()
        examples: list[str] = []

        def skip(i: int, reason: str, detail: str = "") -> None:
            keep[i] = False
            reasons[reason] += 1
            where = f"{batch['path'][i]} caption_id={batch['caption_id'][i]}" if "path" in batch \
                else f"caption_id={batch['caption_id'][i]}"
            examples.append(f"{reason}: {where} {detail}".strip())

        captions = [str(c).strip() if c is not None else "" for c in batch["caption"]]
        for i, c in enumerate(captions):
            if not c:
                skip(i, "empty_caption")
        if self.spec.regions and "region_features" not in batch:
            raise shards.ShardSchemaError(
                f"{self.data.shards}: the model needs region features but the shards have no "
                f"'region_features' column; build them with `alignlab data build --regions ...`")
        out: dict[str, Any] = {}
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

        tok = self.tokenizer([c or "." for c in captions], padding="max_length", truncation=True,
                             max_length=self.data.max_text_len, return_tensors="np")
        out["input_ids"] = tok["input_ids"].astype(np.int64)
        out["attention_mask"] = tok["attention_mask"].astype(np.int64)
        if self.spec.mlm:
            special = np.isin(out["input_ids"], self.tokenizer.all_special_ids)
            out["mlm_input_ids"], out["mlm_labels"] = bert_mask(
                out["input_ids"], ~special & (out["attention_mask"] > 0), self.objectives.mlm_prob,
                self.tokenizer.mask_token_id, self.random_range, self.rng)
        if self.spec.tags:
            out["tag_ids"] = self._concept_ids(batch["tags"], str, self.tag_index, self.data.max_tags)
            out["tag_mask"] = out["tag_ids"] >= CONCEPT_OFFSET
            if self.spec.mcr:
                # MCR (§3.2): BERT's recipe at mcr_prob over the real tags, random replacements
                # drawn from the tag vocabulary; labels are tag classes for the MCR head.
                out["mcr_tag_ids"], labels = bert_mask(
                    out["tag_ids"], out["tag_mask"], self.objectives.mcr_prob, CONCEPT_MASK,
                    (CONCEPT_OFFSET, CONCEPT_OFFSET + len(self.tag_index)), self.rng)
                out["mcr_labels"] = np.where(labels != IGNORE, labels - CONCEPT_OFFSET, IGNORE)
        if self.spec.phrases:
            out["phrase_ids"] = self._concept_ids(batch["phrases"], lambda p: " ".join(map(str, p)), self.concept_index,
                                                  self.data.max_phrases, unique=True)
            out["phrase_mask"] = out["phrase_ids"] >= CONCEPT_OFFSET
            if self.spec.mlm:
                out["mlm_phrase_ids"] = chain_mask(out["phrase_ids"], self.concept_tokens, out["input_ids"],
                                                   out["mlm_labels"] != IGNORE, CONCEPT_MASK, CONCEPT_OFFSET)
        if self.spec.objects:
            # SemVLP's masked object prediction: features zeroed, labels = the region's own tag.
            selected = object_mask(out["region_mask"], self.objectives.object_mask_prob, self.rng)
            out["object_mask"] = selected
            out["masked_region_features"] = np.where(selected[..., None], 0.0, out["region_features"]).astype(np.float32)
            labels = self._region_labels(batch["tags"], out["region_mask"].shape[1])
            out["object_labels"] = np.where(selected, labels, IGNORE)
        if self.spec.mim:
            # SIMLA's MIM: BEiT block-wise patch masks, drawn here so the train step only computes.
            out["mim_mask"] = block_mask(n, self.spec.mim_grid, self.spec.mim_ratio, self.rng)
        if self.spec.qa and "answer" in batch:  # last: notes are counted on kept rows only
            out["answer_labels"] = self._answer_labels(batch["question"], batch["answer"], keep, notes)
        for c in self.id_columns:
            out[c] = np.asarray(batch[c], dtype=np.int64)
        out["image_key"] = np.array([image_key(str(x)) for x in batch["image_id"]], dtype=np.int64)
        out["caption_key"] = np.array([image_key(str(x)) for x in batch["caption_id"]], dtype=np.int64)

        for e in examples[:5]:
            log.warning("skipped row: %s", e)
        if (reasons or notes) and self.counter is not None:
            self.counter.add.remote(dict(reasons), examples, dict(notes))
        return {k: v[keep] for k, v in out.items()}

    def _answer_labels(self, questions, answers, keep: np.ndarray, notes: Counter) -> np.ndarray:
        """Per row, its answer's index in answers.txt; IGNORE on a caption row (null question) and
        on an answer outside answers.txt, which is counted as a note, not skipped: the build
        leaves rare answers out of answers.txt on purpose (``min_answer_count``)."""
        labels = np.full(len(answers), IGNORE, dtype=np.int64)
        for i in np.flatnonzero(keep):
            if questions[i] is None:
                continue
            k = self.answer_index.get(answers[i])
            if k is None:
                notes["answer_not_in_vocab"] += 1
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

    def _region_labels(self, column, length: int) -> np.ndarray:
        """Per region, its tag's index in tags.txt (the shard format stores one tag per box, in box
        order), IGNORE for a tag outside tags.txt or past the row's regions."""
        labels = np.full((len(column), length), IGNORE, dtype=np.int64)
        for i, entries in enumerate(column):
            for j, tag in enumerate(list(entries if entries is not None else ())[:length]):
                labels[i, j] = self.tag_index.get(str(tag), IGNORE)
        return labels

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
            arr = np.stack(list(r)).astype(np.float32)[:k]
            feats[i, : len(arr)] = arr
            mask[i, : len(arr)] = True
            if "boxes" in batch and batch["boxes"][i] is not None:
                b = np.stack(list(batch["boxes"][i])).astype(np.float32)[:k]
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
    return cols


def count_rows(uri: str) -> int:
    """Rows in a split, from the Parquet footers alone."""
    fs, _ = shards.filesystem(uri)
    return sum(pq.read_metadata(f, filesystem=fs).num_rows for f in shards.list_parquet(uri))


def build_dataset(data: DataConfig, objectives: ObjectivesConfig, spec: InputSpec, split: str, train: bool,
                  counter=None, seed: int = 0, id_columns: tuple[str, ...] = ()):
    """A lazily executed Ray Dataset of model-ready rows for one split. Schemas are validated
    first (Parquet footers only), so a bad file fails at start-up, naming the file and column.
    ``id_columns`` (integer columns, such as shards.COMPOSITIONAL_COLUMNS) pass through unchanged."""
    ray = _ray()
    if not train:
        # Evaluation reads clean inputs: masking for the pre-training objectives would only
        # cost CPU and ship unused columns.
        spec = replace(spec, mlm=False, mcr=False, objects=False, mim=False, qa=False)
    uri = shards.child_uri(data.shards, split)
    shards.validate_shards(uri)
    if id_columns:
        fs, _ = shards.filesystem(uri)
        for f in shards.list_parquet(uri):
            absent = [c for c in id_columns if c not in pq.read_schema(f, filesystem=fs).names]
            if absent:
                raise shards.ShardSchemaError(f"{f}: no column {absent[0]!r}; reading split '{split}' needs the "
                                              f"integer columns {list(id_columns)}")
    if spec.qa and not shards.has_qa_rows(uri):
        spec = replace(spec, qa=False)  # a caption-only split: no QA columns to read, no answer_labels
    ds = ray.data.read_parquet(uri, columns=columns_for(spec) + list(id_columns), file_extensions=["parquet"],
                               include_paths=True)
    if train:
        ds = ds.randomize_block_order(seed=seed)
        if data.max_train_rows:
            ds = ds.limit(data.max_train_rows)
    data_dict = asdict(data)
    return ds.map_batches(
        Preprocessor,
        fn_constructor_kwargs=dict(data=data_dict, objectives=asdict(objectives), spec=asdict(spec), train=train,
                                   counter=counter, seed=seed, id_columns=tuple(id_columns)),
        batch_size=data.preprocess_batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=data.preprocess_concurrency),
    )
