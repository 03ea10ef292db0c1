"""The embedded default data set: a seeded, multi-level synthetic image-text corpus.

``alignlab data synth --out DIR`` calls :func:`generate`, which writes a complete shard set (see
:mod:`alignlab.platform.shards`) that needs no download and exercises every level MVPTR, SemVLP
and SIMLA align: pixels, object regions with boxes and tags, phrase concepts and captions.

Scenes
    Each image (``image_size`` square, RGB, PNG) shows ``min_objects``..``max_objects`` filled
    shapes on a dark, lightly noisy background. An object has a *shape* (:data:`SHAPES`, all
    different within one image so that every phrase names exactly one object), a *colour*
    (:data:`COLOURS`, may repeat) and a *size* (:data:`SIZES`, a fraction of the image side).
    Objects are placed by rejection sampling with a gap between their boxes, so they never
    overlap; an object that does not fit is shrunk, and dropped only if even the small size does
    not fit. Shapes are drawn without anti-aliasing, so every object pixel has exactly its
    colour's RGB value and the background never does.

Boxes, tags and regions
    One region per object (no whole-image region). ``boxes`` are the tight pixel bounding boxes
    of the drawn shapes, normalised to [0, 1] as (x1, y1, x2, y2) with x2, y2 exclusive; ``tags``
    are the shape names. ``region_features`` have ``D = REGION_DIM = 54`` dimensions: the box crop
    (RGB in [0, 1]) adaptively average-pooled to 4×4 cells, row-major, channels innermost
    (48 dims), followed by the position x1, y1, x2, y2, w, h (6 dims), the schema's convention.

Captions
    Lower-case sentences from a small grammar. Every caption mentions every object with its size
    and colour ("a large red circle"), so any caption identifies its image; the captions of one
    image use different templates and object orders. The templates are a count list ("three
    objects: a ..., a ... and a ..."), a picture frame ("an image of ..."), and relation clauses
    ("a ... to the left of a ...", "there is a ... above a ...", "a ... is below a ..."); objects
    left without a partner are appended with "and". Relations are computed from the box centres
    along the axis where the centres differ most (image y grows downwards), so they are always
    true of the boxes stored beside them.

Phrases and concepts
    Each row's ``phrases`` hold, in order of mention, [shape], [colour, shape] and [size, shape]
    for every object and [subject shape, relation, object shape] for every relation clause, the
    relation as one string ("left of", "right of", "above", "below"). ``concepts.txt`` lists the
    tuples occurring in at least ``min_concept_count`` training captions, one per line with the
    tuple's words space-joined, as the shard format specifies; a row's tuple ``p`` is concept
    ``" ".join(p)``. A line cannot always be split back into its elements ("circle left of
    square"), and need not be: the concept's identity is the joined string, and tokenising the
    line gives the same token ids as tokenising its elements one by one.

Vocabularies
    ``vocab.txt`` is a BERT WordPiece vocabulary: [PAD] (id 0), [UNK], [CLS], [SEP], [MASK], then
    every word of the grammar, then the digits and the punctuation marks. Every caption tokenises
    without [UNK], each word to one token. Load it with
    ``BertTokenizerFast.from_pretrained(ROOT or ROOT/vocab.txt)`` or ``BertTokenizerFast(vocab=
    path)``; transformers 5 silently ignores ``vocab_file=`` in the constructor and builds a
    five-token tokenizer that maps every word to [UNK]. ``tags.txt`` lists the shape names. ``manifest.json`` records the counts and the
    :class:`SynthConfig`.

Determinism
    Image ``i`` of split ``s`` draws everything from its own ``numpy`` Generator seeded with
    (seed, crc32(s), i), never from a global RNG: the same seed yields byte-identical files, an
    image does not change when the number of images changes, and nothing time-dependent is
    written.
"""
from __future__ import annotations

import dataclasses
import io
import re
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, ImageDraw

from alignlab.platform.shards import Row, ShardWriter, claim_folder, filesystem, write_manifest, write_text

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
# Shape side as a fraction of the image side: 11 / 17 / 23 px at the default 64 px, distinct
# enough to be told apart after resizing, small enough for four objects to fit.
SIZES: dict[str, float] = {"small": 0.17, "medium": 0.26, "large": 0.36}
# Relation (as in phrase tuples) -> how a caption says it.
RELATION_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
COUNT_WORDS = ("one", "two", "three", "four", "five", "six")
FRAMES = ("a picture of", "an image of", "a photo of")
TEMPLATES = ("count", "frame", "relation", "there", "is")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PUNCTUATION = (",", ":", ".")

POOL = 4  # region crop pooled to POOL × POOL cells
REGION_DIM = POOL * POOL * 3 + 6
SPLITS = ("train", "test")
PRODUCER = "alignlab data synth"  # the manifest's producer: this generator writes only into its own sets

_BACKGROUND = 48  # grey level; noise of ±_NOISE keeps it far from every colour
_NOISE = 8
_GAP = 2  # px kept free between object boxes
_PLACE_TRIES = 40


@dataclass
class SynthConfig:
    """Size and seed of the generated set; the defaults train a small model in minutes on 2 CPUs."""

    n_train_images: int = 2000
    n_test_images: int = 200
    captions_per_image: int = 2
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    seed: int = 0
    rows_per_file: int = 2000
    min_concept_count: int = 5

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= len(SHAPES):
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(SHAPES)} (one shape per object), "
                             f"got {self.min_objects}..{self.max_objects}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 for the small shapes to stay recognisable, "
                             f"got {self.image_size}")
        if self.captions_per_image < 1:
            raise ValueError("captions_per_image must be >= 1")


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # tight pixel box: left, top, right (excl.), bottom (excl.)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    def noun_phrase(self) -> str:
        words = f"{self.size} {self.colour} {self.shape}"
        return ("an " if words[0] in "aeiou" else "a ") + words


def relation(subject: SceneObject, obj: SceneObject) -> str:
    """Where ``subject`` is relative to ``obj``, along the axis where their centres differ most."""
    (sx, sy), (ox, oy) = subject.centre, obj.centre
    if abs(sx - ox) >= abs(sy - oy):
        return "left of" if sx < ox else "right of"
    return "above" if sy < oy else "below"


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, side: int) -> None:
    x1, y1 = x0 + side - 1, y0 + side - 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    elif shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, (side - 1) / 2, 0.45 * (side - 1) / 2)
        draw.polygon(list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles))), fill=255)
    elif shape == "cross":
        arm = max(1, side // 6)
        draw.rectangle((x0, round(cy) - arm, x1, round(cy) + arm), fill=255)
        draw.rectangle((round(cx) - arm, y0, round(cx) + arm, y1), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _place(rng: np.random.Generator, side: int, image_px: int, taken: list[tuple[int, int, int, int]]):
    """Top-left corner of a free ``side`` square inside the image, or None after a few tries."""
    for _ in range(_PLACE_TRIES):
        x0, y0 = (int(v) for v in rng.integers(1, image_px - side, size=2))
        if all(x0 >= r + _GAP or x0 + side + _GAP <= l or y0 >= b + _GAP or y0 + side + _GAP <= t
               for (l, t, r, b) in taken):
            return x0, y0
    return None


def make_scene(rng: np.random.Generator, cfg: SynthConfig) -> tuple[np.ndarray, list[SceneObject]]:
    """(H×W×3 uint8 pixels, objects) of one random scene."""
    px = cfg.image_size
    pixels = (_BACKGROUND + rng.integers(-_NOISE, _NOISE + 1, size=(px, px, 3))).astype(np.uint8)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    shapes = rng.choice(len(SHAPES), size=n, replace=False)
    colours = rng.integers(len(COLOURS), size=n)
    sizes = rng.integers(len(SIZES), size=n)
    size_names, colour_names = list(SIZES), list(COLOURS)
    taken: list[tuple[int, int, int, int]] = []
    objects: list[SceneObject] = []
    for shape_i, colour_i, size_i in zip(shapes, colours, sizes):
        # Shrink an object that does not fit rather than overlap it with another.
        for s in range(int(size_i), -1, -1):
            side = round(SIZES[size_names[s]] * px)
            corner = _place(rng, side, px, taken)
            if corner is not None:
                break
        else:
            continue  # not even the small size fits: leave the object out
        taken.append((corner[0], corner[1], corner[0] + side, corner[1] + side))
        mask = Image.new("L", (px, px), 0)
        _draw_shape(ImageDraw.Draw(mask), SHAPES[shape_i], corner[0], corner[1], side)
        colour = colour_names[colour_i]
        pixels[np.asarray(mask) > 0] = COLOURS[colour]
        objects.append(SceneObject(SHAPES[shape_i], colour, size_names[s], mask.getbbox()))
    return pixels, objects


def region_features(pixels: np.ndarray, objects: list[SceneObject]) -> np.ndarray:
    """(N, REGION_DIM) float32: each box crop average-pooled to POOL×POOL RGB cells + position."""
    h, w = pixels.shape[:2]
    image = pixels.astype(np.float32) / 255.0
    feats = np.empty((len(objects), REGION_DIM), dtype=np.float32)
    for k, o in enumerate(objects):
        left, top, right, bottom = o.box
        crop = image[top:bottom, left:right]
        ch, cw = crop.shape[:2]
        # Adaptive average pooling bins (as torch's): cell i covers [floor(i*n/P), ceil((i+1)*n/P)).
        rows = [(i * ch // POOL, -(-(i + 1) * ch // POOL)) for i in range(POOL)]
        cols = [(j * cw // POOL, -(-(j + 1) * cw // POOL)) for j in range(POOL)]
        pooled = np.array([[crop[r0:r1, c0:c1].mean(axis=(0, 1)) for c0, c1 in cols] for r0, r1 in rows])
        x1, y1, x2, y2 = left / w, top / h, right / w, bottom / h
        feats[k, :-6] = pooled.reshape(-1)
        feats[k, -6:] = (x1, y1, x2, y2, x2 - x1, y2 - y1)
    return feats


def encode_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def _join(parts: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _object_phrases(o: SceneObject) -> list[list[str]]:
    return [[o.shape], [o.colour, o.shape], [o.size, o.shape]]


def caption(template: str, objects: list[SceneObject], rng: np.random.Generator) -> tuple[str, list[list[str]]]:
    """(caption, phrase tuples) describing ``objects`` in this order with ``template``."""
    nps = [o.noun_phrase() for o in objects]
    phrases = [p for o in objects for p in _object_phrases(o)]
    if template == "count":
        return f"{COUNT_WORDS[len(objects) - 1]} object{'s' if len(objects) > 1 else ''}: {_join(nps)}", phrases
    if template == "frame":
        return f"{FRAMES[int(rng.integers(len(FRAMES)))]} {_join(nps)}", phrases
    if len(objects) == 1:
        # No partner for a relation: a distinct sentence per template keeps the captions apart.
        return {"relation": nps[0], "there": f"there is {nps[0]}",
                "is": f"{nps[0]} is the only object"}[template], phrases
    # Relation templates: consecutive pairs become "subject relation object" clauses.
    clauses, phrases = [], []
    verb = " is" if template == "is" else ""
    for i in range(0, len(objects) - 1, 2):
        subj, obj = objects[i], objects[i + 1]
        rel = relation(subj, obj)
        clauses.append(f"{nps[i]}{verb} {RELATION_WORDS[rel]} {nps[i + 1]}")
        phrases += _object_phrases(subj) + _object_phrases(obj) + [[subj.shape, rel, obj.shape]]
    text = ", and ".join(clauses)
    if len(objects) % 2:
        text += f" and {nps[-1]}"
        phrases += _object_phrases(objects[-1])
    return ("there is " + text if template == "there" else text), phrases


def describe(objects: list[SceneObject], n_captions: int, rng: np.random.Generator) -> list[tuple[str, list[list[str]]]]:
    """``n_captions`` captions of one scene: different templates (cycling when more are asked
    for than exist) and each with its own random object order."""
    templates = [TEMPLATES[int(t)] for t in rng.permutation(len(TEMPLATES))]
    out = []
    for k in range(n_captions):
        order = [objects[int(i)] for i in rng.permutation(len(objects))]
        out.append(caption(templates[k % len(templates)], order, rng))
    return out


def grammar_words() -> list[str]:
    """Every word a caption can contain, sorted; the vocabulary is built from this."""
    text = " ".join([*SHAPES, *COLOURS, *SIZES, *RELATION_WORDS.values(), *COUNT_WORDS, *FRAMES,
                     "a an and there is object objects the only"])
    return sorted(set(text.split()))


def build_vocab() -> list[str]:
    """WordPiece vocabulary lines: special tokens (ids 0-4), grammar words, digits, punctuation."""
    return [*SPECIAL_TOKENS, *grammar_words(), *"0123456789", *PUNCTUATION]


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The Generator of one image: independent of every other image and of the set's size."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def split_rows(split: str, n_images: int, cfg: SynthConfig):
    """Yields the rows of one split, ``captions_per_image`` per image."""
    for i in range(n_images):
        rng = image_rng(cfg.seed, split, i)
        pixels, objects = make_scene(rng, cfg)
        image, feats = encode_png(pixels), region_features(pixels, objects)
        h, w = pixels.shape[:2]
        boxes = np.array([[o.box[0] / w, o.box[1] / h, o.box[2] / w, o.box[3] / h] for o in objects],
                         dtype=np.float32)
        tags = [o.shape for o in objects]
        image_id = f"{split}-{i:06d}"
        for k, (text, phrases) in enumerate(describe(objects, cfg.captions_per_image, rng)):
            yield Row(image=image, image_id=image_id, caption=text, caption_id=f"{image_id}-{k}", split=split,
                      region_features=feats, boxes=boxes, tags=tags, phrases=phrases)


_PART = re.compile(r"part-\d{5}\.parquet")


def _remove_stale_parts(root: str) -> None:
    """Delete part files a previous, larger generation left in our split folders: the writer
    numbers from 00000, so a stale part-00007 would silently join the new set."""
    fs, path = filesystem(root)
    for split in SPLITS:
        directory = f"{path.rstrip('/')}/{split}"
        if fs.get_file_info(directory).type != pafs.FileType.Directory:
            continue
        for info in fs.get_file_info(pafs.FileSelector(directory)):
            if info.type == pafs.FileType.File and _PART.fullmatch(info.base_name):
                fs.delete_file(info.path)


def generate(out: str, cfg: SynthConfig | None = None) -> dict:
    """Write the synthetic shard set to ``out`` (local path or URI) and return a summary:
    images and rows per split, files, region dimension and vocabulary sizes."""
    cfg = cfg or SynthConfig()
    claim_folder(out, PRODUCER)  # before the stale parts go: a built set in `out` stays untouched
    _remove_stale_parts(out)
    counts = {"train": cfg.n_train_images, "test": cfg.n_test_images}
    concept_counts: dict[str, int] = {}
    rows_per_split = {}
    with ShardWriter(out, PRODUCER, rows_per_file=cfg.rows_per_file, region_dim=REGION_DIM) as writer:
        for split in SPLITS:
            n_rows = 0
            for row in split_rows(split, counts[split], cfg):
                writer.write(row)
                n_rows += 1
                if split == "train":
                    for concept in {" ".join(p) for p in row.phrases}:
                        concept_counts[concept] = concept_counts.get(concept, 0) + 1
            rows_per_split[split] = n_rows
    # Most frequent first, ties by name: the order `alignlab data build` writes.
    concepts = [c for c, n in sorted(concept_counts.items(), key=lambda cn: (-cn[1], cn[0]))
                if n >= cfg.min_concept_count]
    vocab = build_vocab()
    write_text(out, "vocab.txt", "\n".join(vocab) + "\n", PRODUCER)
    write_text(out, "tags.txt", "\n".join(SHAPES) + "\n", PRODUCER)
    write_text(out, "concepts.txt", "\n".join(concepts) + "\n", PRODUCER)
    summary = {
        "out": out,
        "splits": {s: {"images": counts[s], "rows": rows_per_split[s]} for s in SPLITS},
        "files": len(writer.files),
        "region_dim": REGION_DIM,
        "vocab_size": len(vocab),
        "tags": len(SHAPES),
        "concepts": len(concepts),
    }
    write_manifest(out, {
        "source": "alignlab.platform.synth",
        "config": dataclasses.asdict(cfg),
        "splits": summary["splits"],
        "rows_written": writer.rows_written,
        "files": [f.rsplit("/", 2)[-2] + "/" + f.rsplit("/", 1)[-1] for f in writer.files],
        "region_dim": REGION_DIM,
        "vocab_size": len(vocab),
        "tags": len(SHAPES),
        "concepts": len(concepts),
    }, PRODUCER)
    return summary
