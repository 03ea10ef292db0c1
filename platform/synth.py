"""The embedded default data set: a seeded, multi-level, compositional synthetic image-text corpus.

``alignlab data synth --out DIR`` calls :func:`generate`, which writes a complete shard set (see
:mod:`alignlab.platform.shards`) that needs no download and exercises every level MVPTR, SemVLP
and SIMLA align: pixels, object regions with boxes and tags, phrase concepts and captions. It is
built so that binding matters: images that share their objects and differ only in which object
has which attribute, which stands where and how many there are, which a bag of words (or any
model that does not bind words to objects) cannot tell apart.

Scenes
    Each image (``image_size`` square, RGB, PNG) shows ``min_objects``..``max_objects`` filled
    shapes on a dark, lightly noisy background. The objects come in *kinds*: up to ``max_count``
    identical copies ("two large red circles") of one *shape* (:data:`SHAPES`, all kinds of one
    image different, so that every phrase names exactly one kind) with one *colour*
    (:data:`COLOURS`, may repeat across kinds) and one *size* (:data:`SIZES`, a fraction of the
    image side). With ``min_objects >= 2`` a scene holds at least two kinds. Objects are placed by
    rejection sampling with a gap between their boxes, so they never overlap. Only when ten whole
    random layouts fail is a kind shrunk (as a whole: copies share their size), and only at the
    small size are copies that do not fit left out; at the defaults this happens to about one image
    in 2000, and the stored scene is always what was drawn. Shapes are drawn without
    anti-aliasing, so every object pixel has exactly its colour's RGB value and the background
    never does.

Families
    Images come in families of ``family_size`` consecutive images. A family draws one bag of
    shapes, colours, sizes and counts (again, until the bag can be bound in ``family_size`` ways);
    each image binds them in its own way (a distinct assignment of the colours, sizes and counts to
    the shapes) and places its objects on its own. Every split, the retrieval gallery included, is
    made of families, so a caption's hardest competitors use the same words; training batches hold
    such hard negatives too. On the default 200-image test gallery, a scorer that knows every
    image's and caption's bag exactly but nothing of binding reaches a Uni-RSUM of about 440 of 600
    (random tie-breaks among a family); 330 with ``family_size = 8``.

Boxes, tags and regions
    One region per object (no whole-image region). ``boxes`` are the tight pixel bounding boxes
    of the drawn shapes, normalised to [0, 1] as (x1, y1, x2, y2) with x2, y2 exclusive; ``tags``
    are the shape names (repeated for copies). ``region_features`` have ``D = REGION_DIM = 54``
    dimensions: the box crop (RGB in [0, 1]) adaptively average-pooled to 4×4 cells, row-major,
    channels innermost (48 dims), followed by the position x1, y1, x2, y2, w, h (6 dims), the
    schema's convention.

Captions
    Lower-case sentences from a small grammar, rendered from a :class:`Description` (what the
    caption asserts). Every caption mentions every kind with its count, size and colour ("a large
    red circle", "two small blue squares"), so it is true of its image alone among the family's
    (unless a shrunk object made two bindings equal);
    the captions of one image use different templates and orders. The templates are a count list
    ("three objects: ..."), a picture frame ("an image of ..."), and relation clauses ("... to the
    left of ...", "there is ... above ...", "... is below ..."), which pair consecutive mentions;
    a pair whose relation is ambiguous (copies on both sides) is joined by "and", as is a kind
    left without a partner. The relation of two kinds is that of every pair of their objects,
    from the box centres along the axis where they differ most (image y grows downwards), so it is
    always true of the boxes stored beside it.

Phrases and concepts
    Each row's ``phrases`` hold, in order of mention, [shape], [colour, shape], [size, shape] and,
    for copies, [count, shape] for every kind, and [subject shape, relation, object shape] for
    every relation clause, the relation as one string ("left of", "right of", "above", "below").
    Shapes appear in their singular (lemma) form, as ``alignlab data build`` writes them.
    ``concepts.txt`` lists the tuples occurring in at least ``min_concept_count`` training
    captions, one per line with the tuple's words space-joined, as the shard format specifies; a
    row's tuple ``p`` is concept ``" ".join(p)``. A line cannot always be split back into its
    elements ("circle left of square"), and need not be: the concept's identity is the joined
    string, and tokenising the line gives the same token ids as tokenising its elements one by one.

The compositional split (ARO / Winoground style)
    ``compositional/`` holds, for each test image, a true caption (a relation template whose
    first clause has a relation where the scene has one) and one perturbation of it per kind in
    :data:`~alignlab.platform.shards.CANDIDATE_TYPES` that the scene allows, each changing exactly
    one thing: two kinds exchange their colour or size (``swap_attribute``), a relation turns into
    its opposite (``swap_relation``), a kind's count changes (``wrong_count``), a kind's shape is
    replaced by one absent from the image (``replace_object``). A perturbation is kept only if it
    is false of the scene (:func:`holds`). Rows are the test image's, with the candidate's caption
    and phrase tuples, and the columns of :data:`~alignlab.platform.shards.COMPOSITIONAL_COLUMNS`.

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
    (seed, crc32(s), i), and its family's bag from one seeded with (seed, crc32(s + "/family"),
    i // family_size), never from a global RNG: the same seed yields byte-identical files, an
    image does not change when the number of images changes, and nothing time-dependent is
    written.
"""
from __future__ import annotations

import dataclasses
import io
import itertools
import re
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, ImageDraw

from alignlab.platform.shards import (CANDIDATE_TYPES, ShardWriter, claim_folder, concept_key, filesystem, write_manifest,
                                     write_text)

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
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
# Relation (as in phrase tuples) -> how a caption says it, and its opposite.
RELATION_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
COUNT_WORDS = ("one", "two", "three", "four", "five", "six")
FRAMES = ("a picture of", "an image of", "a photo of")
TEMPLATES = ("count", "frame", "relation", "there", "is")
RELATION_TEMPLATES = ("relation", "there", "is")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PUNCTUATION = (",", ":", ".")

POOL = 4  # region crop pooled to POOL × POOL cells
REGION_DIM = POOL * POOL * 3 + 6
SPLITS = ("train", "test", "compositional")
PRODUCER = "alignlab data synth"  # the manifest's producer: this generator writes only into its own sets

_BACKGROUND = 48  # grey level; noise of ±_NOISE keeps it far from every colour
_NOISE = 8
_GAP = 2  # px kept free between object boxes
_PLACE_TRIES = 40
_LAYOUT_TRIES = 10  # whole random layouts tried before a kind is shrunk
_BINDING_TRIES = 64  # permutations drawn to find a bag's distinct bindings
_BAG_TRIES = 100


@dataclass
class SynthConfig:
    """Size and seed of the generated set; the defaults train a small model in minutes on 2 CPUs."""

    n_train_images: int = 2000
    n_test_images: int = 200
    captions_per_image: int = 2
    image_size: int = 64
    min_objects: int = 2
    max_objects: int = 4
    seed: int = 0
    rows_per_file: int = 2000
    min_concept_count: int = 5
    # Copies of one kind (same shape, colour and size) an image may hold; 1: every object unique.
    max_count: int = 2
    # Consecutive images sharing one bag of shapes, colours, sizes and counts, bound differently;
    # 1: every image draws its own objects.
    family_size: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= len(SHAPES) * self.max_count:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(SHAPES)} shapes x max_count, "
                             f"got {self.min_objects}..{self.max_objects} with max_count={self.max_count}")
        if self.max_objects > len(COUNT_WORDS):
            raise ValueError(f"max_objects must be <= {len(COUNT_WORDS)} (the grammar counts to "
                             f"'{COUNT_WORDS[-1]}'), got {self.max_objects}")
        if self.max_count < 1 or self.family_size < 1:
            raise ValueError(f"max_count and family_size must be >= 1, got {self.max_count}, {self.family_size}")
        if self.family_size > 1 and self.min_objects < 2:
            raise ValueError("family_size > 1 needs min_objects >= 2: a family's images differ in how two or more "
                             "kinds of object are bound, which one object cannot show")
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


@dataclass(frozen=True)
class Mention:
    """One kind of object as a scene holds it and a caption names it."""

    shape: str
    colour: str
    size: str
    count: int = 1

    def noun_phrase(self) -> str:
        if self.count > 1:
            return f"{COUNT_WORDS[self.count - 1]} {self.size} {self.colour} {PLURALS[self.shape]}"
        words = f"{self.size} {self.colour} {self.shape}"
        return ("an " if words[0] in "aeiou" else "a ") + words

    def phrases(self) -> list[list[str]]:
        out = [[self.shape], [self.colour, self.shape], [self.size, self.shape]]
        return out + [[COUNT_WORDS[self.count - 1], self.shape]] if self.count > 1 else out


@dataclass(frozen=True)
class Description:
    """What a caption asserts, from which :func:`render` writes it: the mentions in order and,
    for a relation template, the relation of each clause (mentions 2c and 2c + 1; None joins the
    pair by "and")."""

    template: str
    mentions: tuple[Mention, ...]
    relations: tuple[str | None, ...] = ()
    frame: str = ""


def relation(subject: SceneObject, obj: SceneObject) -> str:
    """Where ``subject`` is relative to ``obj``, along the axis where their centres differ most."""
    (sx, sy), (ox, oy) = subject.centre, obj.centre
    if abs(sx - ox) >= abs(sy - oy):
        return "left of" if sx < ox else "right of"
    return "above" if sy < oy else "below"


def kind_relation(objects: Sequence[SceneObject], subject: str, obj: str) -> str | None:
    """The relation of every object of shape ``subject`` to every one of shape ``obj``, or None
    when the pairs disagree (copies on both sides)."""
    found = {relation(a, b) for a in objects if a.shape == subject for b in objects if b.shape == obj}
    return found.pop() if len(found) == 1 else None


def kinds(objects: Sequence[SceneObject]) -> list[Mention]:
    """The scene's kinds of object, in order of first appearance."""
    counts: dict[str, int] = {}
    first: dict[str, SceneObject] = {}
    for o in objects:
        counts[o.shape] = counts.get(o.shape, 0) + 1
        first.setdefault(o.shape, o)
    return [Mention(s, first[s].colour, first[s].size, n) for s, n in counts.items()]


def holds(description: Description, objects: Sequence[SceneObject]) -> bool:
    """Whether a caption is true of a scene: it names every kind once with its exact count, size
    and colour, nothing else, and every relation it states holds between the kinds it relates."""
    truth = {m.shape: m for m in kinds(objects)}
    named = [m.shape for m in description.mentions]
    if sorted(named) != sorted(truth) or any(truth[m.shape] != m for m in description.mentions):
        return False
    ms = description.mentions
    return all(rel is None or kind_relation(objects, ms[2 * c].shape, ms[2 * c + 1].shape) == rel
               for c, rel in enumerate(description.relations))


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


def family_bindings(rng: np.random.Generator, cfg: SynthConfig) -> list[tuple[Mention, ...]]:
    """A family's kinds, one distinct binding per image: one bag of shapes, colours, sizes and
    counts, each binding assigning the colours, sizes and counts to the shapes in another order.
    A bag that allows fewer than ``family_size`` bindings (two red circles and two red squares
    allow one) is drawn again."""
    for _ in range(_BAG_TRIES):
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        # At least two kinds where two objects allow it (a single kind binds nothing), at most one
        # object per kind; the remaining objects become copies of kinds not yet full.
        n_kinds = int(rng.integers(max(min(2, n), -(-n // cfg.max_count)), min(n, len(SHAPES)) + 1))
        counts = np.ones(n_kinds, dtype=int)
        for _ in range(n - n_kinds):
            counts[rng.choice(np.flatnonzero(counts < cfg.max_count))] += 1
        shapes = [SHAPES[int(i)] for i in rng.choice(len(SHAPES), size=n_kinds, replace=False)]
        colours = [list(COLOURS)[int(i)] for i in rng.integers(len(COLOURS), size=n_kinds)]
        sizes = [list(SIZES)[int(i)] for i in rng.integers(len(SIZES), size=n_kinds)]
        bindings: list[tuple[Mention, ...]] = []
        for _ in range(_BINDING_TRIES):
            c, s, k = (rng.permutation(n_kinds) for _ in range(3))
            binding = tuple(Mention(shapes[j], colours[c[j]], sizes[s[j]], int(counts[k[j]])) for j in range(n_kinds))
            if binding not in bindings:
                bindings.append(binding)
                if len(bindings) == cfg.family_size:
                    return bindings
    raise ValueError(f"family_size={cfg.family_size} is more bindings than scenes of {cfg.min_objects}.."
                     f"{cfg.max_objects} objects (max_count={cfg.max_count}) allow; lower family_size")


def _layout(rng: np.random.Generator, px: int, scene_kinds: Sequence[Mention], shrink: bool):
    """[(kind, size, boxes)] of one random placement, or None when a kind does not fit at its
    size and ``shrink`` is off. With ``shrink``, a kind whose copies do not all fit is shrunk as a
    whole (copies share their size), and at the small size the copies that fit stay."""
    size_names = list(SIZES)
    taken: list[tuple[int, int, int, int]] = []
    out = []
    for kind in scene_kinds:
        start = size_names.index(kind.size)
        for s in range(start, -1 if shrink else start - 1, -1):
            side = round(SIZES[size_names[s]] * px)
            placed: list[tuple[int, int, int, int]] = []
            for _ in range(kind.count):
                corner = _place(rng, side, px, taken + placed)
                if corner is None:
                    break
                placed.append((corner[0], corner[1], corner[0] + side, corner[1] + side))
            if len(placed) == kind.count:
                break
        if len(placed) < kind.count and not shrink:
            return None
        taken += placed
        out.append((kind, size_names[s], placed))
    return out


def make_scene(rng: np.random.Generator, cfg: SynthConfig, scene_kinds: Sequence[Mention]
               ) -> tuple[np.ndarray, list[SceneObject]]:
    """(H×W×3 uint8 pixels, objects) of one scene holding ``scene_kinds``, randomly placed. Only
    when no random layout of the kinds at their sizes fits is a kind shrunk (or left out)."""
    px = cfg.image_size
    pixels = (_BACKGROUND + rng.integers(-_NOISE, _NOISE + 1, size=(px, px, 3))).astype(np.uint8)
    layout = None
    for _ in range(_LAYOUT_TRIES):
        layout = _layout(rng, px, scene_kinds, shrink=False)
        if layout is not None:
            break
    objects: list[SceneObject] = []
    for kind, size, boxes in layout or _layout(rng, px, scene_kinds, shrink=True):
        for left, top, right, _ in boxes:
            mask = Image.new("L", (px, px), 0)
            _draw_shape(ImageDraw.Draw(mask), kind.shape, left, top, right - left)
            pixels[np.asarray(mask) > 0] = COLOURS[kind.colour]
            objects.append(SceneObject(kind.shape, kind.colour, size, mask.getbbox()))
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


def describe(objects: Sequence[SceneObject], template: str, order: Sequence[int], rng: np.random.Generator
             ) -> Description:
    """The true description of a scene with ``template``, naming its kinds in ``order``."""
    ms = [kinds(objects)[i] for i in order]
    relations = tuple(kind_relation(objects, ms[i].shape, ms[i + 1].shape) for i in range(0, len(ms) - 1, 2)) \
        if template in RELATION_TEMPLATES else ()
    frame = FRAMES[int(rng.integers(len(FRAMES)))] if template == "frame" else ""
    return Description(template, tuple(ms), relations, frame)


def render(d: Description) -> tuple[str, list[list[str]]]:
    """(caption, phrase tuples) of a description."""
    nps = [m.noun_phrase() for m in d.mentions]
    ms = d.mentions
    phrases = [p for m in ms for p in m.phrases()]
    plural = ms[0].count > 1
    if d.template == "count":
        total = sum(m.count for m in ms)
        return f"{COUNT_WORDS[total - 1]} object{'s' if total > 1 else ''}: {_join(nps)}", phrases
    if d.template == "frame":
        return f"{d.frame} {_join(nps)}", phrases
    if len(ms) == 1:
        # No partner for a relation: a distinct sentence per template keeps the captions apart.
        return {"relation": nps[0], "there": f"there {'are' if plural else 'is'} {nps[0]}",
                "is": f"{nps[0]} {'are the only objects' if plural else 'is the only object'}"}[d.template], phrases
    # Relation templates: consecutive pairs become "subject relation object" clauses.
    clauses, phrases = [], []
    for c, rel in enumerate(d.relations):
        subj, obj = ms[2 * c], ms[2 * c + 1]
        phrases += subj.phrases() + obj.phrases()
        if rel is None:
            clauses.append(f"{nps[2 * c]} and {nps[2 * c + 1]}")
            continue
        verb = (" are" if subj.count > 1 else " is") if d.template == "is" else ""
        clauses.append(f"{nps[2 * c]}{verb} {RELATION_WORDS[rel]} {nps[2 * c + 1]}")
        phrases.append([subj.shape, rel, obj.shape])
    text = ", and ".join(clauses)
    if len(ms) % 2:
        text += f" and {nps[-1]}"
        phrases += ms[-1].phrases()
    return (f"there {'are' if plural else 'is'} {text}" if d.template == "there" else text), phrases


def describe_scene(objects: Sequence[SceneObject], n_captions: int, rng: np.random.Generator) -> list[Description]:
    """``n_captions`` true descriptions of one scene: different templates (cycling when more are
    asked for than exist), each naming the kinds in its own random order."""
    templates = [TEMPLATES[int(t)] for t in rng.permutation(len(TEMPLATES))]
    n_kinds = len(kinds(objects))
    return [describe(objects, templates[k % len(templates)], [int(i) for i in rng.permutation(n_kinds)], rng)
            for k in range(n_captions)]


def perturb(d: Description, kind: str, rng: np.random.Generator, max_count: int) -> Description | None:
    """``d`` with exactly one thing changed (``kind``, one of CANDIDATE_TYPES[1:]), or None when
    ``d`` offers nothing to change that way:

    swap_attribute: two mentions exchange their colour or their size (both differ before);
    swap_relation:  one clause's relation becomes its opposite;
    wrong_count:    one mention's count becomes another in 1..max(2, max_count);
    replace_object: one mention's shape becomes one the description does not name.
    """
    ms = list(d.mentions)
    if kind == "swap_attribute":
        options = [(a, i, j) for a in ("colour", "size") for i, j in itertools.combinations(range(len(ms)), 2)
                   if getattr(ms[i], a) != getattr(ms[j], a)]
        if not options:
            return None
        a, i, j = options[int(rng.integers(len(options)))]
        ms[i], ms[j] = (dataclasses.replace(ms[i], **{a: getattr(ms[j], a)}),
                        dataclasses.replace(ms[j], **{a: getattr(ms[i], a)}))
        return dataclasses.replace(d, mentions=tuple(ms))
    if kind == "swap_relation":
        options = [c for c, rel in enumerate(d.relations) if rel is not None]
        if not options:
            return None
        c = options[int(rng.integers(len(options)))]
        relations = list(d.relations)
        relations[c] = OPPOSITE[relations[c]]
        return dataclasses.replace(d, relations=tuple(relations))
    if kind == "wrong_count":
        i = int(rng.integers(len(ms)))
        others = [n for n in range(1, max(2, max_count) + 1) if n != ms[i].count]
        ms[i] = dataclasses.replace(ms[i], count=others[int(rng.integers(len(others)))])
        return dataclasses.replace(d, mentions=tuple(ms))
    if kind == "replace_object":
        absent = [s for s in SHAPES if s not in {m.shape for m in ms}]
        if not absent:
            return None
        i = int(rng.integers(len(ms)))
        ms[i] = dataclasses.replace(ms[i], shape=absent[int(rng.integers(len(absent)))])
        return dataclasses.replace(d, mentions=tuple(ms))
    raise ValueError(f"unknown perturbation {kind!r}; expected one of {CANDIDATE_TYPES[1:]}")


def compositional_candidates(objects: Sequence[SceneObject], rng: np.random.Generator, max_count: int
                             ) -> list[tuple[int, Description]]:
    """(candidate type, description) pairs of one scene: its true description first (a relation
    template, its kinds ordered so that the first clause states a relation where one exists),
    then one perturbation per type the scene allows, each false of the scene."""
    n_kinds = len(kinds(objects))
    template = RELATION_TEMPLATES[int(rng.integers(len(RELATION_TEMPLATES)))]
    shapes = [m.shape for m in kinds(objects)]
    orders = [[int(i) for i in rng.permutation(n_kinds)] for _ in range(12)]
    order = next((o for o in orders if n_kinds > 1 and kind_relation(objects, shapes[o[0]], shapes[o[1]])), orders[0])
    true = describe(objects, template, order, rng)
    out = [(0, true)]
    for t, name in enumerate(CANDIDATE_TYPES[1:], start=1):
        p = perturb(true, name, rng, max_count)
        if p is not None and not holds(p, objects):
            out.append((t, p))
    return out


def grammar_words() -> list[str]:
    """Every word a caption can contain, sorted; the vocabulary is built from this."""
    text = " ".join([*SHAPES, *PLURALS.values(), *COLOURS, *SIZES, *RELATION_WORDS.values(), *COUNT_WORDS,
                     *FRAMES, "a an and there is are object objects the only"])
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


def split_rows(split: str, n_images: int, cfg: SynthConfig) -> Iterator[dict]:
    """Yields the rows (:class:`~alignlab.platform.shards.Row` fields) of one split,
    ``captions_per_image`` per image; for the test split also those of the compositional split,
    with its extra columns."""
    bindings: list[tuple[Mention, ...]] = []
    for i in range(n_images):
        family, member = divmod(i, cfg.family_size)
        if member == 0:
            bindings = family_bindings(image_rng(cfg.seed, f"{split}/family", family), cfg)
        rng = image_rng(cfg.seed, split, i)
        pixels, objects = make_scene(rng, cfg, bindings[member % len(bindings)])
        image, feats = encode_png(pixels), region_features(pixels, objects)
        h, w = pixels.shape[:2]
        boxes = np.array([[o.box[0] / w, o.box[1] / h, o.box[2] / w, o.box[3] / h] for o in objects],
                         dtype=np.float32)
        image_id = f"{split}-{i:06d}"
        shared = dict(image=image, image_id=image_id, region_features=feats, boxes=boxes, tags=[o.shape for o in objects])
        for k, d in enumerate(describe_scene(objects, cfg.captions_per_image, rng)):
            text, phrases = render(d)
            yield dict(shared, caption=text, caption_id=f"{image_id}-{k}", split=split, phrases=phrases)
        if split != "test":
            continue
        for t, d in compositional_candidates(objects, image_rng(cfg.seed, "compositional", i), cfg.max_count):
            text, phrases = render(d)
            yield dict(shared, caption=text, caption_id=f"{image_id}-{CANDIDATE_TYPES[t]}", split="compositional",
                       phrases=phrases, candidate_type=t, group_id=i)


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
    # The compositional split re-uses the test images.
    counts = {"train": cfg.n_train_images, "test": cfg.n_test_images, "compositional": cfg.n_test_images}
    concept_counts: dict[str, int] = {}
    rows_per_split = dict.fromkeys(SPLITS, 0)
    with ShardWriter(out, PRODUCER, rows_per_file=cfg.rows_per_file, region_dim=REGION_DIM) as writer:
        for split in ("train", "test"):
            for row in split_rows(split, counts[split], cfg):
                writer.write(row)
                rows_per_split[row["split"]] += 1
                if split == "train":
                    for concept in {concept_key(p) for p in row["phrases"]}:
                        concept_counts[concept] = concept_counts.get(concept, 0) + 1
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
