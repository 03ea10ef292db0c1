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

Hard negative captions
    Every caption row of ``train/`` and ``test/`` carries ``negative_caption`` and
    ``negative_phrases``: the caption with one relation clause reversed, where it states a
    relation whose reversal is false of the scene ("" and no tuples otherwise;
    :func:`relation_negative`), for a model that takes them as ITM negatives. They are drawn from
    a Generator of their own, so the rest of the set is as a set without them would be.

The compositional split (ARO / Winoground style)
    ``compositional/`` holds, for each test image, a true caption (a relation template whose
    first clause has a relation where the scene has one) and one perturbation of it per kind in
    :data:`~alignlab.platform.shards.CANDIDATE_TYPES` that the scene allows, each changing exactly
    one thing: two kinds exchange their colour or size (``swap_attribute``), a relation turns into
    its opposite (``swap_relation``), a kind's count changes (``wrong_count``), a kind's shape is
    replaced by one absent from the image (``replace_object``). A perturbation is kept only if it
    is false of the scene (:func:`holds`). The clause a relation swap reverses is said from
    whichever side keeps the split's true relation words balanced, each as often as its opposite
    (the one dependence between images). Rows are the test image's, with the candidate's caption
    and phrase tuples, and the columns of :data:`~alignlab.platform.shards.COMPOSITIONAL_COLUMNS`.

Downstream tasks
    :func:`generate_task` writes a small shard set of one task of
    :data:`~alignlab.platform.shards.TASKS` (``retrieval`` fine-tunes on the pre-training set
    itself), splits ``train`` and ``test``, its images drawn as above (families, one region per
    object, no whole-image region) from Generators keyed by task and split, so that none is a
    pre-training image. Every text is computed from the scene's objects and said only where its
    answer, or the object it refers to, is unique. The readings all tasks share: a relation is
    :func:`relation`'s, per pair of objects; "the shape to the left of X" means the objects that
    stand left of every object X names, and is not said when some object stands in no single
    relation to X's copies; a count is exact ("two circles": exactly two); a noun phrase of the
    captions' grammar ("a large red circle") names a kind with its count, size and colour.

    vqa      "what colour is the circle?", "which shape is red?", "what size are the squares?",
             "how many circles | red shapes | shapes are there?", "what shape is to the left of
             the blue square?", "is there a green triangle?" (yes / no, half each; a "no" binds a
             colour of the scene to one of its shapes); ten agreeing ``human_answers``.
    gqa      about a kind named by its look ("the large shape", "the red circles") or by its
             relation to one so named: "what colour | size is the shape to the left of the large
             shape?", "which shape is below the red circle?", "is the shape above the circle red or
             blue?", "is the red circle to the left of the square?", "is the shape below the star
             small?" (the last two yes / no, half each).
    snli_ve  entailment: a true caption (the compositional split's relation templates);
             contradiction: half the time a one-change perturbation of one, half the time a
             motion statement naming a kind the scene does not hold; neutral: a motion statement
             ("two small blue stars are moving towards a large red circle") whose kinds the scene
             holds exactly as named: a still image cannot show motion, so the statement neither
             holds nor is refuted. One of each per image, so the classes are balanced; the word
             "moving" tells neutral from entailment, so a text-only model can reach 2/3 (SNLI-VE's
             hypothesis-only baselines are well above chance too), and only the image tells a
             contradiction from either.
    nlvr2    per ordered pair of two consecutive images (left: the usual columns, right: the
             ``*_b`` columns), "{the left image contains | the right image contains | both
             images contain | exactly one image contains} {a red square | two circles | a circle
             above a square}" -> true / false, half each ("a circle above a square": some pair of
             their objects).
    refcoco  an expression that refers to one object (``target_box``: its box), by its look ("the
             red circle"), its relation to another object ("the circle to the left of the green
             triangle"), its place among the objects of one look ("the upper blue circle"), or its
             size among two ("the larger of the two red shapes").

    ``vocab.txt``, ``tags.txt`` and ``concepts.txt`` are those of a pre-training set
    (``vocab_from``; else the default set's), ``answers.txt`` the train split's answers, most
    frequent first. The manifest's ``baselines``: ``chance`` (1 / classes; refcoco: the accuracy of
    a uniformly picked region, right at IoU >= 0.5) and ``majority`` (the train split's most
    frequent answer, scored on the test split).

Vocabularies
    ``vocab.txt`` is a BERT WordPiece vocabulary: [PAD] (id 0), [UNK], [CLS], [SEP], [MASK], then
    every word of the grammar (the captions' and the downstream tasks' texts and answers), then
    the digits and the punctuation marks. Every caption and task text tokenises without [UNK],
    each word to one token. Load it with
    ``BertTokenizerFast.from_pretrained(ROOT or ROOT/vocab.txt)`` or ``BertTokenizerFast(vocab=
    path)``; transformers 5 silently ignores ``vocab_file=`` in the constructor and builds a
    five-token tokenizer that maps every word to [UNK]. ``tags.txt`` lists the shape names. ``manifest.json`` records the counts and the
    :class:`SynthConfig`.

Determinism
    Image ``i`` of split ``s`` (a task's split: ``task/s``) draws everything from its own
    ``numpy`` Generator seeded with (seed, crc32(s), i), and its family's bag from one seeded with
    (seed, crc32(s + "/family"), i // family_size), never from a global RNG: the same seed yields
    byte-identical files, an image does not change when the number of images changes, and nothing
    time-dependent is written.
"""
from __future__ import annotations

import dataclasses
import io
import itertools
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, ImageDraw

from alignlab.platform.databuild.phrases import build_vocab as build_concept_vocab
from alignlab.platform.shards import (CANDIDATE_TYPES, PAIR_SUFFIX, ShardWriter, child_uri, claim_folder, filesystem,
                                     read_text, write_manifest, write_text)

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
# The words of each downstream task's texts and answers beyond the captions' (see generate_task).
TASK_WORDS = {
    "vqa": "what which how many colour size shape shapes is are there the ? yes no",
    "gqa": "what which colour size shape shapes is are the or ? yes no",
    "snli_ve": "moving towards entailment neutral contradiction",
    "nlvr2": "the left right image images contains contain both exactly true false",
    "refcoco": "the left right upper lower larger smaller of two shape shapes",
}
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PUNCTUATION = (",", ":", ".", "?")

POOL = 4  # region crop pooled to POOL × POOL cells
REGION_DIM = POOL * POOL * 3 + 6
SPLITS = ("train", "test", "compositional")
PRODUCER = "alignlab data synth"  # the manifest's producer: this generator writes only into its own sets
# Raised whenever the same SynthConfig would write other rows, and recorded in the manifest, so a
# set written by an older generator is known as such (a manifest without it is version 1).
# 2: the compositional split balances its relation swaps' words (compositional_candidates).
# 3: caption rows carry a hard negative caption, a relation reversed (relation_negative).
GENERATOR_VERSION = 3

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
        return _a(f"{self.size} {self.colour} {self.shape}")

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


def _a(words: str) -> str:
    """``words`` with its indefinite article: 'a red circle', 'an orange star'."""
    return ("an " if words[0] in "aeiou" else "a ") + words


def relation(subject: SceneObject, obj: SceneObject) -> str:
    """Where ``subject`` is relative to ``obj``, along the axis where their centres differ most."""
    (sx, sy), (ox, oy) = subject.centre, obj.centre
    if abs(sx - ox) >= abs(sy - oy):
        return "left of" if sx < ox else "right of"
    return "above" if sy < oy else "below"


def group_relation(subjects: Sequence[SceneObject], objects: Sequence[SceneObject]) -> str | None:
    """The relation of every one of ``subjects`` to every one of ``objects``, or None when the
    pairs disagree (copies on both sides)."""
    found = {relation(a, b) for a in subjects for b in objects}
    return found.pop() if len(found) == 1 else None


def kind_relation(objects: Sequence[SceneObject], subject: str, obj: str) -> str | None:
    """The relation of every object of shape ``subject`` to every one of shape ``obj``, or None
    when the pairs disagree (copies on both sides)."""
    return group_relation([a for a in objects if a.shape == subject], [b for b in objects if b.shape == obj])


def kinds(objects: Sequence[SceneObject]) -> list[Mention]:
    """The scene's kinds of object, in order of first appearance."""
    counts: dict[str, int] = {}
    first: dict[str, SceneObject] = {}
    for o in objects:
        counts[o.shape] = counts.get(o.shape, 0) + 1
        first.setdefault(o.shape, o)
    return [Mention(s, first[s].colour, first[s].size, n) for s, n in counts.items()]


def present(mentions: Sequence[Mention], objects: Sequence[SceneObject]) -> bool:
    """Whether the scene holds every mentioned kind with exactly its count, size and colour."""
    truth = {m.shape: m for m in kinds(objects)}
    return all(truth.get(m.shape) == m for m in mentions)


def holds(description: Description, objects: Sequence[SceneObject]) -> bool:
    """Whether a caption is true of a scene: it names every kind once with its exact count, size
    and colour, nothing else, and every relation it states holds between the kinds it relates."""
    named = [m.shape for m in description.mentions]
    if sorted(named) != sorted(m.shape for m in kinds(objects)) or not present(description.mentions, objects):
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


def relation_negative(d: Description, objects: Sequence[SceneObject], rng: np.random.Generator, max_count: int
                      ) -> tuple[str, list[list[str]]]:
    """The shards' ``negative_caption`` and ``negative_phrases`` of a caption row: ``d`` with one
    clause's relation reversed (the compositional split's ``swap_relation``, drawn on training
    images), rendered, or ("", []) where ``d`` states no relation or the reversal is also true of
    the scene. A relation is the one thing a caption's words and the image's tags cannot settle,
    so this is the negative that asks a model to compare the regions' positions."""
    p = perturb(d, "swap_relation", rng, max_count)
    return render(p) if p is not None and not holds(p, objects) else ("", [])


def reverse_clause(d: Description, c: int) -> Description:
    """``d`` with clause ``c`` said from its object's side: "A above B" becomes "B below A", the
    same claim in the opposite relation word."""
    ms, relations = list(d.mentions), list(d.relations)
    ms[2 * c], ms[2 * c + 1] = ms[2 * c + 1], ms[2 * c]
    relations[c] = OPPOSITE[relations[c]]
    return dataclasses.replace(d, mentions=tuple(ms), relations=tuple(relations))


def swapped_clause(candidates: Sequence[tuple[int, Description]]) -> tuple[int, str] | None:
    """(clause, the true caption's relation there) of the clause that the ``swap_relation``
    candidate reverses, or None when the scene has no such candidate."""
    swap = dict(candidates).get(CANDIDATE_TYPES.index("swap_relation"))
    if swap is None:
        return None
    true = candidates[0][1]
    c = next(c for c, (a, b) in enumerate(zip(true.relations, swap.relations)) if a != b)
    return c, true.relations[c]


def compositional_candidates(objects: Sequence[SceneObject], rng: np.random.Generator, max_count: int,
                             stated: Counter | None = None) -> list[tuple[int, Description]]:
    """(candidate type, description) pairs of one scene: its true description first (a relation
    template, its kinds ordered so that the first clause states a relation where one exists),
    then one perturbation per type the scene allows, each false of the scene.

    ``stated`` (a Counter shared by a split's scenes) balances the relation swaps: the clause
    that ``swap_relation`` reverses is said from whichever side names the relation word counted
    less often than its opposite so far ("A above B" or "B below A"), and counted. Over a split
    each word is then the true one as often as its opposite, give or take one, so a scorer that
    merely prefers "below" to "above" scores chance. Left to the kinds' random order, the 156
    swap pairs of the default test split held a true "above" 54 times and "below" 33 times,
    "right of" 43 times and "left of" 26: such a scorer got anywhere from 0.38 to 0.62."""
    n_kinds = len(kinds(objects))
    template = RELATION_TEMPLATES[int(rng.integers(len(RELATION_TEMPLATES)))]
    shapes = [m.shape for m in kinds(objects)]
    orders = [[int(i) for i in rng.permutation(n_kinds)] for _ in range(12)]
    order = next((o for o in orders if n_kinds > 1 and kind_relation(objects, shapes[o[0]], shapes[o[1]])), orders[0])
    true = describe(objects, template, order, rng)
    before = rng.bit_generator.state
    out = _with_perturbations(true, objects, rng, max_count)
    swapped = swapped_clause(out) if stated is not None else None
    if swapped is not None:
        c, rel = swapped
        if stated[rel] > stated[OPPOSITE[rel]]:
            # The same draws again: the clause count is unchanged, so the same clause is swapped.
            rng.bit_generator.state = before
            out = _with_perturbations(reverse_clause(true, c), objects, rng, max_count)
            c, rel = swapped_clause(out)
        stated[rel] += 1
    return out


def _with_perturbations(true: Description, objects: Sequence[SceneObject], rng: np.random.Generator,
                        max_count: int) -> list[tuple[int, Description]]:
    out = [(0, true)]
    for t, name in enumerate(CANDIDATE_TYPES[1:], start=1):
        p = perturb(true, name, rng, max_count)
        if p is not None and not holds(p, objects):
            out.append((t, p))
    return out


def grammar_tokens(task: str = "") -> set[str]:
    """Every token (word or punctuation mark) a caption can contain and, with ``task``, that task's
    texts and answers; by default every task's."""
    text = " ".join([*SHAPES, *PLURALS.values(), *COLOURS, *SIZES, *RELATION_WORDS.values(), *COUNT_WORDS,
                     *FRAMES, "a an and there is are object objects the only , :",
                     *([TASK_WORDS[task]] if task else TASK_WORDS.values())])
    return set(text.split())


def grammar_words(task: str = "") -> list[str]:
    """The words of :func:`grammar_tokens`, sorted; the vocabulary is built from this."""
    return sorted(grammar_tokens(task) - set(PUNCTUATION))


def build_vocab() -> list[str]:
    """WordPiece vocabulary lines: special tokens (ids 0-4), the words of the captions and of every
    task, digits, punctuation."""
    return [*SPECIAL_TOKENS, *grammar_words(), *"0123456789", *PUNCTUATION]


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The Generator of one image: independent of every other image and of the set's size."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def scenes(key: str, n_images: int, cfg: SynthConfig
           ) -> Iterator[tuple[int, np.random.Generator, np.ndarray, list[SceneObject]]]:
    """(index, the image's Generator, pixels, objects) of ``n_images`` images drawn in families,
    all from Generators keyed by ``key`` (a split's name, or a task's split)."""
    bindings: list[tuple[Mention, ...]] = []
    for i in range(n_images):
        family, member = divmod(i, cfg.family_size)
        if member == 0:
            bindings = family_bindings(image_rng(cfg.seed, f"{key}/family", family), cfg)
        rng = image_rng(cfg.seed, key, i)
        pixels, objects = make_scene(rng, cfg, bindings[member % len(bindings)])
        yield i, rng, pixels, objects


def image_columns(pixels: np.ndarray, objects: Sequence[SceneObject], image_id: str) -> dict:
    """An image's columns: ``image``, ``image_id``, ``region_features``, ``boxes`` (normalised) and
    ``tags``, one region per object."""
    h, w = pixels.shape[:2]
    boxes = np.array([[o.box[0] / w, o.box[1] / h, o.box[2] / w, o.box[3] / h] for o in objects], dtype=np.float32)
    return dict(image=encode_png(pixels), image_id=image_id, region_features=region_features(pixels, list(objects)),
                boxes=boxes, tags=[o.shape for o in objects])


def split_rows(split: str, n_images: int, cfg: SynthConfig) -> Iterator[dict]:
    """Yields the rows (:class:`~alignlab.platform.shards.Row` fields) of one split,
    ``captions_per_image`` per image; for the test split also those of the compositional split,
    with its extra columns."""
    stated: Counter = Counter()  # the compositional split's relation words (compositional_candidates)
    for i, rng, pixels, objects in scenes(split, n_images, cfg):
        image_id = f"{split}-{i:06d}"
        shared = image_columns(pixels, objects, image_id)
        negative_rng = image_rng(cfg.seed, f"{split}/negative", i)  # leaves every other draw as it was
        for k, d in enumerate(describe_scene(objects, cfg.captions_per_image, rng)):
            text, phrases = render(d)
            negative, negative_phrases = relation_negative(d, objects, negative_rng, cfg.max_count)
            yield dict(shared, caption=text, caption_id=f"{image_id}-{k}", split=split, phrases=phrases,
                       negative_caption=negative, negative_phrases=negative_phrases)
        if split != "test":
            continue
        for t, d in compositional_candidates(objects, image_rng(cfg.seed, "compositional", i), cfg.max_count,
                                             stated):
            text, phrases = render(d)
            yield dict(shared, caption=text, caption_id=f"{image_id}-{CANDIDATE_TYPES[t]}", split="compositional",
                       phrases=phrases, candidate_type=t, group_id=i)


_PART = re.compile(r"part-\d{5}\.parquet")


def _remove_stale_files(root: str) -> None:
    """Delete part files a previous, larger generation left in our split folders: the writer
    numbers from 00000, so a stale part-00007 would silently join the new set; and the answers.txt
    of a previous task set, which a set without answers would otherwise appear to have."""
    fs, path = filesystem(root)
    answers = f"{path.rstrip('/')}/answers.txt"
    if fs.get_file_info(answers).type == pafs.FileType.File:
        fs.delete_file(answers)
    for split in SPLITS:
        directory = f"{path.rstrip('/')}/{split}"
        if fs.get_file_info(directory).type != pafs.FileType.Directory:
            continue
        for info in fs.get_file_info(pafs.FileSelector(directory)):
            if info.type == pafs.FileType.File and _PART.fullmatch(info.base_name):
                fs.delete_file(info.path)


def _by_count(counts: Counter) -> list[str]:
    """Most frequent first, ties by name: the order `alignlab data build` writes its vocabularies."""
    return [k for k, _ in sorted(counts.items(), key=lambda kn: (-kn[1], kn[0]))]


def _vocabulary_texts(vocab: list[str], concepts: list[str]) -> dict[str, str]:
    """The files vocab.txt, tags.txt and concepts.txt of a synthetic set, by name."""
    return {"vocab.txt": "\n".join(vocab) + "\n", "tags.txt": "\n".join(SHAPES) + "\n",
            "concepts.txt": "\n".join(concepts) + "\n"}


def _relative(files: Sequence[str]) -> list[str]:
    """The manifest's names of written files: split/part-NNNNN.parquet."""
    return [f.rsplit("/", 2)[-2] + "/" + f.rsplit("/", 1)[-1] for f in files]


def generate(out: str, cfg: SynthConfig | None = None) -> dict:
    """Write the synthetic shard set to ``out`` (local path or URI) and return a summary:
    images and rows per split, files, region dimension and vocabulary sizes."""
    cfg = cfg or SynthConfig()
    claim_folder(out, PRODUCER)  # before the stale parts go: a built set in `out` stays untouched
    _remove_stale_files(out)
    # The compositional split re-uses the test images.
    counts = {"train": cfg.n_train_images, "test": cfg.n_test_images, "compositional": cfg.n_test_images}
    train_phrases: list[list[list[str]]] = []
    rows_per_split = dict.fromkeys(SPLITS, 0)
    with ShardWriter(out, PRODUCER, rows_per_file=cfg.rows_per_file, region_dim=REGION_DIM) as writer:
        for split in ("train", "test"):
            for row in split_rows(split, counts[split], cfg):
                writer.write(row)
                rows_per_split[row["split"]] += 1
                if split == "train":
                    train_phrases.append(row["phrases"])
    vocab, concepts = build_vocab(), build_concept_vocab(train_phrases, cfg.min_concept_count)
    for name, lines in _vocabulary_texts(vocab, concepts).items():
        write_text(out, name, lines, PRODUCER)
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
        "generator": GENERATOR_VERSION,
        "config": dataclasses.asdict(cfg),
        "splits": summary["splits"],
        "rows_written": writer.rows_written,
        "files": _relative(writer.files),
        "region_dim": REGION_DIM,
        "vocab_size": len(vocab),
        "tags": len(SHAPES),
        "concepts": len(concepts),
    }, PRODUCER)
    return summary


# --------------------------------------------------------------------------------------------
# Downstream tasks: referring to objects
# --------------------------------------------------------------------------------------------

# How a referring expression names the one of a group that stands in the same relation to all
# the others ("the left circle", "the upper shape").
SIDES = {"left of": "left", "right of": "right", "above": "upper", "below": "lower"}


@dataclass(frozen=True)
class Ref:
    """The words of a noun phrase that pick objects by their look: a shape (None: any, said
    "shape"), a colour and a size (None: any)."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None

    def picks(self, objects: Sequence[SceneObject]) -> list[SceneObject]:
        return [o for o in objects if self.shape in (None, o.shape) and self.colour in (None, o.colour)
                and self.size in (None, o.size)]

    def noun(self, plural: bool = False) -> str:
        """'large red circle', 'red shapes'."""
        head = self.shape or "shape"
        return " ".join(w for w in (self.size, self.colour, PLURALS.get(head, head + "s") if plural else head) if w)

    def phrases(self) -> list[list[str]]:
        """Its phrase tuples, in a caption's order; a concept needs the shape it is about."""
        if self.shape is None:
            return []
        return [[self.shape], *([a, self.shape] for a in (self.colour, self.size) if a)]


def looks(o: SceneObject) -> list[Ref]:
    """Every Ref that picks ``o``: by none, one, two or all of its shape, colour and size."""
    return [Ref(*(v if keep else None for keep, v in zip(mask, (o.shape, o.colour, o.size))))
            for mask in itertools.product((False, True), repeat=3)]


@dataclass
class Referent:
    """A definite noun phrase of one scene and the objects it refers to: ``head`` picks them, and
    for "the shape to the left of the red circle" they stand ``relation`` to the ``anchor``."""

    words: str
    objects: tuple[SceneObject, ...]
    phrases: list[list[str]]
    head: Ref
    relation: str = ""
    anchor: Referent | None = None


def named(objects: Sequence[SceneObject], ref: Ref) -> Referent:
    """"the red circle" / "the red circles": what ``ref`` picks."""
    found = ref.picks(objects)
    return Referent(f"the {ref.noun(len(found) > 1)}", tuple(found), ref.phrases(), ref)


def naming_refs(objects: Sequence[SceneObject], target: Sequence[SceneObject]) -> list[Ref]:
    """The Refs that pick exactly ``target`` (objects of one look, in scene order)."""
    return [r for r in looks(target[0]) if r != Ref() and r.picks(objects) == list(target)]


def kind_referents(objects: Sequence[SceneObject]) -> list[Referent]:
    """Every way of naming one kind of the scene by its look: "the circle", "the red shapes"..."""
    return [named(objects, r) for m in kinds(objects) for r in naming_refs(objects, Ref(m.shape).picks(objects))]


def related(objects: Sequence[SceneObject], head: Ref, rel: str, anchor: Sequence[SceneObject]) -> list[SceneObject]:
    """The objects ``head`` picks (the anchor's own aside) that stand ``rel`` to every anchor
    object; none when one of them stands in no single relation to the anchor (its copies on two
    sides), since "the shape to the left of the squares" would then be unclear."""
    candidates = [o for o in head.picks(objects) if o not in anchor]
    relations = [group_relation([o], anchor) for o in candidates]
    if None in relations:
        return []
    return [o for o, r in zip(candidates, relations) if r == rel]


def related_referents(objects: Sequence[SceneObject], head: Ref, anchors: Sequence[Referent]) -> list[Referent]:
    """"the {head} {relation} {anchor}", for every anchor and relation where it refers to something."""
    out = []
    for anchor in anchors:
        for rel, said in RELATION_WORDS.items():
            found = related(objects, head, rel, anchor.objects)
            if found:
                triple = [[head.shape, rel, anchor.head.shape]] if head.shape and anchor.head.shape else []
                out.append(Referent(f"the {head.noun(len(found) > 1)} {said} {anchor.words}", tuple(found),
                                    head.phrases() + anchor.phrases + triple, head, rel, anchor))
    return out


def object_referents(objects: Sequence[SceneObject]) -> dict[str, list[Referent]]:
    """Every expression of these forms that refers to exactly one object of the scene, by form:

    attribute:   its look, in any words that pick it alone ("the red circle", "the large shape");
    relation:    "the {shape | shape name} {relation} {an object named by its look}", where it
                 alone of the head's objects stands so ("the circle to the left of the green
                 triangle" tells two red circles apart);
    position:    "the {left | right | upper | lower} {look}": of the two or more objects a look
                 picks, the one that stands in the same relation to all the others;
    comparative: "the {larger | smaller} of the two {look}s": of exactly two objects a look picks,
                 of different sizes.
    """
    singles = [named(objects, r) for o in objects for r in naming_refs(objects, [o])]
    heads = [Ref(), *(Ref(s) for s in dict.fromkeys(o.shape for o in objects))]
    relational = [r for head in heads for r in related_referents(objects, head, singles) if len(r.objects) == 1]
    groups = [(r, r.picks(objects)) for r in dict.fromkeys(r for o in objects for r in looks(o))]
    position, comparative = [], []
    for ref, picked in groups:
        if len(picked) < 2:
            continue
        for o in picked:
            sides = {relation(o, p) for p in picked if p is not o}
            if len(sides) == 1:
                position.append(Referent(f"the {SIDES[sides.pop()]} {ref.noun()}", (o,), ref.phrases(), ref))
        if len(picked) == 2 and picked[0].size != picked[1].size:
            small, large = sorted(picked, key=lambda p: SIZES[p.size])
            for word, o in (("smaller", small), ("larger", large)):
                comparative.append(Referent(f"the {word} of the two {ref.noun(True)}", (o,), ref.phrases(), ref))
    return {"attribute": singles, "relation": relational, "position": position, "comparative": comparative}


# --------------------------------------------------------------------------------------------
# Downstream tasks: the texts
# --------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One task row's text, its phrase tuples and its label: an answer, or the referred object."""

    text: str
    phrases: list[list[str]]
    answer: str = ""
    target: SceneObject | None = None


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _be(n: int) -> str:
    return "are" if n > 1 else "is"


def _other(rng: np.random.Generator, attribute: str, true: str, objects: Sequence[SceneObject]) -> str:
    """A value of ``attribute`` other than ``true``: one the scene shows where it has one, so that a
    wrong choice binds the scene's own words."""
    shown = [v for v in dict.fromkeys(getattr(o, attribute) for o in objects) if v != true]
    return _pick(rng, shown or [v for v in (COLOURS if attribute == "colour" else SIZES) if v != true])


def vqa_colour(objects: Sequence[SceneObject], rng: np.random.Generator, cfg: SynthConfig) -> Item:
    """"what colour is the circle?" / "what colour are the circles?" -> its colour."""
    m = _pick(rng, kinds(objects))
    ref = Ref(m.shape)
    return Item(f"what colour {_be(m.count)} the {ref.noun(m.count > 1)}?", ref.phrases(), m.colour)


def vqa_shape(objects: Sequence[SceneObject], rng: np.random.Generator, cfg: SynthConfig) -> Item | None:
    """"which shape is red?" / "which shapes are blue?" -> the shape of the scene's only kind of that
    colour (asked only then)."""
    options = [m for m in kinds(objects) if {o.shape for o in Ref(colour=m.colour).picks(objects)} == {m.shape}]
    if not options:
        return None
    m = _pick(rng, options)
    return Item(f"which {Ref().noun(m.count > 1)} {_be(m.count)} {m.colour}?", [], m.shape)


def vqa_size(objects: Sequence[SceneObject], rng: np.random.Generator, cfg: SynthConfig) -> Item:
    """"what size is the circle?" -> small / medium / large."""
    m = _pick(rng, kinds(objects))
    ref = Ref(m.shape)
    return Item(f"what size {_be(m.count)} the {ref.noun(m.count > 1)}?", ref.phrases(), m.size)


def vqa_count(objects: Sequence[SceneObject], rng: np.random.Generator, cfg: SynthConfig) -> Item:
    """"how many circles are there?" (a shape the scene holds), "how many red shapes are there?" (a
    colour it holds) or "how many shapes are there?", each form a third of the time -> a count word."""
    forms = ([Ref(m.shape) for m in kinds(objects)], [Ref(colour=c) for c in dict.fromkeys(o.colour for o in objects)],
             [Ref()])
    ref = _pick(rng, _pick(rng, forms))
    return Item(f"how many {ref.noun(True)} are there?", ref.phrases(), COUNT_WORDS[len(ref.picks(objects)) - 1])


def vqa_position(objects: Sequence[SceneObject], rng: np.random.Generator, cfg: SynthConfig) -> Item | None:
    """"what shape is to the left of the blue square?" -> the shape of the one object standing so
    (asked only where exactly one does)."""
    anchors = [named(objects, Ref(m.shape, m.colour)) for m in kinds(objects)]
    options = [r for r in related_referents(objects, Ref(), anchors) if len(r.objects) == 1]
    if not options:
        return None
    r = _pick(rng, options)
    return Item(f"what shape is {RELATION_WORDS[r.relation]} {r.anchor.words}?", r.anchor.phrases, r.objects[0].shape)


def vqa_exists(objects: Sequence[SceneObject], rng: np.random.Generator, cfg: SynthConfig) -> Item:
    """"is there a red circle?" -> yes / no, each half the time. A "no" names one of the scene's
    shapes with one of its colours that no object of that shape has, where there is such a pair
    (else another colour): binding, not a word's presence, decides it."""
    shapes = list(dict.fromkeys(o.shape for o in objects))
    if rng.integers(2):
        ref, answer = Ref(*_pick(rng, [(m.shape, m.colour) for m in kinds(objects)])), "yes"
    else:
        unbound = [Ref(s, c) for s in shapes for c in COLOURS if not Ref(s, c).picks(objects)]
        shown = {o.colour for o in objects}
        ref, answer = _pick(rng, [r for r in unbound if r.colour in shown] or unbound), "no"
    return Item(f"is there {_a(ref.noun())}?", ref.phrases(), answer)


def _one_kind(referents: Sequence[Referent]) -> list[Referent]:
    """Those referring to objects of one kind, whose attributes then have one answer."""
    return [r for r in referents if len({o.shape for o in r.objects}) == 1]


def _gqa_query(objects: Sequence[SceneObject], rng: np.random.Generator, attribute: str) -> Item | None:
    options = _one_kind(related_referents(objects, Ref(), kind_referents(objects)))
    if not options:
        return None
    r = _pick(rng, options)
    return Item(f"what {attribute} {_be(len(r.objects))} {r.words}?", r.phrases, getattr(r.objects[0], attribute))


def gqa_colour(objects: Sequence[SceneObject], rng: np.random.Generator, cfg: SynthConfig) -> Item | None:
    """"what colour is the shape to the left of the large shape?" -> a colour."""
    return _gqa_query(objects, rng, "colour")


def gqa_size(objects: Sequence[SceneObject], rng: np.random.Generator, cfg: SynthConfig) -> Item | None:
    """"what size are the shapes above the red circle?" -> a size."""
    return _gqa_query(objects, rng, "size")


def gqa_shape(objects: Sequence[SceneObject], rng: np.random.Generator, cfg: SynthConfig) -> Item | None:
    """"which shape is below the blue shape?" / "which shapes are ..." -> a shape."""
    options = _one_kind(related_referents(objects, Ref(), kind_referents(objects)))
    if not options:
        return None
    r = _pick(rng, options)
    n = len(r.objects)
    return Item(f"which {Ref().noun(n > 1)} {_be(n)} {RELATION_WORDS[r.relation]} {r.anchor.words}?", r.anchor.phrases,
                r.objects[0].shape)


def gqa_choose(objects: Sequence[SceneObject], rng: np.random.Generator, cfg: SynthConfig) -> Item:
    """"is the shape above the circle red or blue?" / "is the circle small or large?" -> the true one
    of the two, said first or second at random."""
    anchors = kind_referents(objects)
    r = _pick(rng, anchors + _one_kind(related_referents(objects, Ref(), anchors)))
    attribute = _pick(rng, ("colour", "size"))
    true = getattr(r.objects[0], attribute)
    pair = [true, _other(rng, attribute, true, objects)]
    first, second = pair if rng.integers(2) else pair[::-1]
    return Item(f"{_be(len(r.objects))} {r.words} {first} or {second}?", r.phrases, true)


def gqa_verify_relation(objects: Sequence[SceneObject], rng: np.random.Generator, cfg: SynthConfig) -> Item | None:
    """"is the red circle to the left of the large shape?" -> yes (the relation of the two kinds) or
    no (its opposite), each half the time; asked of two kinds that stand in one relation."""
    groups = [Ref(m.shape).picks(objects) for m in kinds(objects)]
    pairs = [(a, b) for a in groups for b in groups if a is not b and group_relation(a, b)]
    if not pairs:
        return None
    a, b = _pick(rng, pairs)
    ra, rb = (named(objects, _pick(rng, naming_refs(objects, g))) for g in (a, b))
    rel, answer = (group_relation(a, b), "yes") if rng.integers(2) else (OPPOSITE[group_relation(a, b)], "no")
    triple = [[ra.head.shape, rel, rb.head.shape]] if ra.head.shape and rb.head.shape else []
    return Item(f"{_be(len(a))} {ra.words} {RELATION_WORDS[rel]} {rb.words}?", ra.phrases + rb.phrases + triple, answer)


def gqa_verify_attribute(objects: Sequence[SceneObject], rng: np.random.Generator, cfg: SynthConfig) -> Item | None:
    """"is the shape to the left of the red circle blue?" -> yes (its colour or size) or no
    (another), each half the time."""
    options = _one_kind(related_referents(objects, Ref(), kind_referents(objects)))
    if not options:
        return None
    r = _pick(rng, options)
    attribute = _pick(rng, ("colour", "size"))
    true = getattr(r.objects[0], attribute)
    value, answer = (true, "yes") if rng.integers(2) else (_other(rng, attribute, true, objects), "no")
    return Item(f"{_be(len(r.objects))} {r.words} {value}?", r.phrases, answer)


def _motion(objects: Sequence[SceneObject], rng: np.random.Generator) -> Description:
    """One or two of the scene's kinds, as a motion statement names them: exactly as they are."""
    ms = kinds(objects)
    return Description("moving", tuple(ms[int(i)] for i in rng.permutation(len(ms))[:2]))


def say_motion(d: Description) -> tuple[str, list[list[str]]]:
    """(statement, phrase tuples) of a motion statement: "a large red circle is moving towards two
    small blue squares", or "... is moving" when it names one kind."""
    subject, *goal = d.mentions
    text = f"{subject.noun_phrase()} {_be(subject.count)} moving"
    text += f" towards {goal[0].noun_phrase()}" if goal else ""
    return text, [p for m in d.mentions for p in m.phrases()]


def snli_entailment(objects: Sequence[SceneObject], rng: np.random.Generator, cfg: SynthConfig) -> Item:
    """A true caption of the scene (the relation template of the compositional split)."""
    _, d = compositional_candidates(objects, rng, cfg.max_count)[0]
    return Item(*render(d), "entailment")


def snli_contradiction(objects: Sequence[SceneObject], rng: np.random.Generator, cfg: SynthConfig) -> Item:
    """Half the time a one-change perturbation of a true caption (the compositional split's:
    attribute swap, relation swap, wrong count or replaced object), half the time a motion
    statement one of whose kinds the scene does not hold as named (attribute swap, wrong count or
    replaced object): false either way."""
    if rng.integers(2):
        _, d = _pick(rng, compositional_candidates(objects, rng, cfg.max_count)[1:])
        return Item(*render(d), "contradiction")
    true = _motion(objects, rng)
    # A wrong count is always possible, so there is always a false one.
    false = [p for p in (perturb(true, kind, rng, cfg.max_count) for kind in ("swap_attribute", "wrong_count",
                                                                            "replace_object"))
             if p is not None and not present(p.mentions, objects)]
    return Item(*say_motion(_pick(rng, false)), "contradiction")


def snli_neutral(objects: Sequence[SceneObject], rng: np.random.Generator, cfg: SynthConfig) -> Item:
    """A motion statement about kinds the scene holds exactly as named: a still image cannot show
    motion, so it neither holds nor is refuted."""
    return Item(*say_motion(_motion(objects, rng)), "neutral")


@dataclass(frozen=True)
class Claim:
    """What an NLVR2 statement says one image contains: a {colour} {shape}; exactly ``count``
    {shape}s (``count`` > 0); or a {shape} {relation} an {other} (some pair of their objects)."""

    shape: str
    colour: str = ""
    count: int = 0
    relation: str = ""
    other: str = ""

    def words(self) -> str:
        if self.relation:
            return f"{_a(self.shape)} {RELATION_WORDS[self.relation]} {_a(self.other)}"
        if self.count:
            return f"{COUNT_WORDS[self.count - 1]} {Ref(self.shape).noun(self.count > 1)}"
        return _a(f"{self.colour} {self.shape}")

    def phrases(self) -> list[list[str]]:
        if self.relation:
            return [[self.shape], [self.other], [self.shape, self.relation, self.other]]
        if self.count:
            return [[self.shape]] + ([[COUNT_WORDS[self.count - 1], self.shape]] if self.count > 1 else [])
        return Ref(self.shape, self.colour).phrases()

    def test(self, objects: Sequence[SceneObject]) -> bool:
        if self.relation:
            return any(relation(a, b) == self.relation for a in Ref(self.shape).picks(objects)
                       for b in Ref(self.other).picks(objects))
        if self.count:
            return len(Ref(self.shape).picks(objects)) == self.count
        return bool(Ref(self.shape, self.colour).picks(objects))


# An NLVR2 statement's subject -> whether its claim is true of the pair, from the claim's truth of
# the left and of the right image.
QUANTIFIERS = {
    "the left image contains": lambda left, right: left,
    "the right image contains": lambda left, right: right,
    "both images contain": lambda left, right: left and right,
    "exactly one image contains": lambda left, right: left != right,
}


def claims(left: Sequence[SceneObject], right: Sequence[SceneObject], max_count: int) -> dict[str, list[Claim]]:
    """The claims a statement about a pair may make, by form, from the shapes and colours either
    image shows: a false one binds words the pair itself shows."""
    shapes = list(dict.fromkeys(o.shape for o in [*left, *right]))
    colours = list(dict.fromkeys(o.colour for o in [*left, *right]))
    return {"has": [Claim(s, c) for s in shapes for c in colours],
            "count": [Claim(s, count=n) for s in shapes for n in range(1, max(2, max_count) + 1)],
            "relation": [Claim(s, relation=r, other=t) for s in shapes for t in shapes if s != t
                         for r in RELATION_WORDS]}


def nlvr2_statement(left: Sequence[SceneObject], right: Sequence[SceneObject], rng: np.random.Generator,
                    cfg: SynthConfig) -> Item:
    """"{quantifier} {claim}" -> true / false, each half the time: a claim form and a quantifier
    drawn among those that can make a statement with the drawn label, then such a claim."""
    label = bool(rng.integers(2))
    forms = claims(left, right, cfg.max_count)
    choices = [(f, q) for f in forms for q in QUANTIFIERS]
    # A count claim about the left image alone can be made true or false: some choice always fits.
    options, q = next((fit, q) for f, q in (choices[int(i)] for i in rng.permutation(len(choices)))
                      if (fit := [c for c in forms[f] if QUANTIFIERS[q](c.test(left), c.test(right)) == label]))
    c = _pick(rng, options)
    return Item(f"{q} {c.words()}", c.phrases(), "true" if label else "false")


def refcoco_expression(objects: Sequence[SceneObject], rng: np.random.Generator, cfg: SynthConfig) -> Item:
    """An expression that refers to one object, drawn uniformly: the object, then one of the forms
    of :func:`object_referents` that can refer to it, then one such expression."""
    target = _pick(rng, objects)
    forms = [[r for r in rs if r.objects == (target,)] for rs in object_referents(objects).values()]
    r = _pick(rng, _pick(rng, [f for f in forms if f]))
    return Item(r.words, r.phrases, target=target)


# Each task's text makers: a scene (an NLVR2 pair: two), its Generator and the config -> an Item,
# or None where the scene offers the maker nothing to ask.
TASK_MAKERS = {
    "vqa": (vqa_colour, vqa_shape, vqa_size, vqa_count, vqa_position, vqa_exists),
    "gqa": (gqa_colour, gqa_size, gqa_shape, gqa_choose, gqa_verify_relation, gqa_verify_attribute),
    "snli_ve": (snli_entailment, snli_contradiction, snli_neutral),
    "nlvr2": (nlvr2_statement,),
    "refcoco": (refcoco_expression,),
}


# --------------------------------------------------------------------------------------------
# Downstream tasks: generation
# --------------------------------------------------------------------------------------------

TASK_SPLITS = ("train", "test")
# A task set's default size: SynthConfig(**TASK_SIZES), a few thousand rows per task.
TASK_SIZES = dict(n_train_images=1500, n_test_images=300, captions_per_image=3)
VQA_ANNOTATORS = 10  # VQA v2 asks ten; the synthetic ones agree


def _items(makers: Sequence, n: int, rng: np.random.Generator, cfg: SynthConfig, *scene) -> list[Item]:
    """Up to ``n`` items of distinct text from the makers, taken in a random order so that an
    image's rows are of different kinds while there are kinds left, then again; the tries are
    bounded, since a scene may offer fewer than ``n`` distinct texts."""
    order = [makers[int(i)] for i in rng.permutation(len(makers))]
    items: list[Item] = []
    for make in itertools.islice(itertools.cycle(order), 4 * n * len(makers)):
        item = make(*scene, rng, cfg)
        if item is not None and item.text not in {i.text for i in items}:
            items.append(item)
            if len(items) == n:
                break
    return items


def _task_row(task: str, columns: dict, item: Item, objects: Sequence[SceneObject]) -> dict:
    """A task row: the image's columns, the text in ``caption`` and the label in the task's columns."""
    row = dict(columns, caption=item.text, phrases=item.phrases)
    if task == "refcoco":
        return dict(row, target_box=columns["boxes"][list(objects).index(item.target)])
    row.update(question=item.text, answer=item.answer)
    return dict(row, human_answers=[item.answer] * VQA_ANNOTATORS) if task == "vqa" else row


def task_rows(task: str, split: str, n_images: int, cfg: SynthConfig) -> Iterator[dict]:
    """Yields the rows of one split of a task set, ``captions_per_image`` per image (NLVR2: per
    ordered pair, the images taken two by two, each once on the left; an odd count gets one more
    image). Images come from Generators keyed by task and split, so none is a pre-training image."""
    key = f"{task}/{split}"
    if task == "nlvr2":
        images = scenes(key, n_images + n_images % 2, cfg)
        for first, second in zip(images, images):
            pair = [(objects, rng, image_columns(pixels, objects, f"{task}-{split}-{i:06d}"))
                    for i, rng, pixels, objects in (first, second)]
            for (left, rng, columns), (right, _, columns_b) in (pair, pair[::-1]):
                shared = dict(columns, **{name + PAIR_SUFFIX: v for name, v in columns_b.items()}, split=split)
                for k, item in enumerate(_items(TASK_MAKERS[task], cfg.captions_per_image, rng, cfg, left, right)):
                    yield _task_row(task, dict(shared, caption_id=f"{columns['image_id']}-{k}"), item, left)
        return
    for i, rng, pixels, objects in scenes(key, n_images, cfg):
        image_id = f"{task}-{split}-{i:06d}"
        shared = dict(image_columns(pixels, objects, image_id), split=split)
        for k, item in enumerate(_items(TASK_MAKERS[task], cfg.captions_per_image, rng, cfg, objects)):
            yield _task_row(task, dict(shared, caption_id=f"{image_id}-{k}"), item, objects)


def classification_baselines(answers: Sequence[str], test_answers: Sequence[str]) -> dict[str, float]:
    """``chance``: a class of answers.txt drawn uniformly; ``majority``: the test accuracy of always
    answering the train split's most frequent answer, answers.txt's first line."""
    return {"chance": 1 / len(answers), "majority": sum(a == answers[0] for a in test_answers) / len(test_answers)}


def grounding_baselines(test_rows: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """``chance``: the accuracy of picking one of a row's regions uniformly, a pick being right
    when its box has IoU >= 0.5 with the target box (the grounding objective's positives), averaged
    over the (boxes, target_box) of the test rows."""
    import torch

    from alignlab.models.objectives import box_iou

    hits = [(box_iou(torch.as_tensor(np.asarray(boxes)), torch.as_tensor(np.asarray(target))) >= 0.5).float().mean()
            for boxes, target in test_rows]
    return {"chance": float(torch.stack(hits).mean())}


def task_vocabularies(task: str, vocab_from: str = "") -> dict[str, str]:
    """vocab.txt, tags.txt and concepts.txt of a task set (file name -> text): ``vocab_from``'s, a
    synthetic pre-training set, copied byte for byte so that a model fine-tuned from it keeps its
    rows of them; without one, those the default ``alignlab data synth`` set has. A vocab.txt
    without a token of the task's texts is refused, naming the tokens."""
    if not vocab_from:
        default = SynthConfig()
        concepts = build_concept_vocab((row["phrases"] for row in split_rows("train", default.n_train_images, default)),
                                       default.min_concept_count)
        return _vocabulary_texts(build_vocab(), concepts)
    texts = {}
    for name in ("vocab.txt", "tags.txt", "concepts.txt"):
        text = read_text(child_uri(vocab_from, name))
        if text is None:
            raise ValueError(f"{child_uri(vocab_from, name)} does not exist: the vocabularies of a synthetic task set "
                             f"come from a set written by `alignlab data synth`")
        texts[name] = text
    missing = sorted(grammar_tokens(task) - set(texts["vocab.txt"].splitlines()))
    if missing:
        raise ValueError(f"{child_uri(vocab_from, 'vocab.txt')} has no token for {' '.join(repr(w) for w in missing)}, "
                         f"which the {task} task's texts use: the set was generated before the synthetic vocabulary "
                         f"grew. Regenerate it with `alignlab data synth --out {vocab_from}` (its token ids change, so "
                         f"pre-train on it again)")
    return texts


def generate_task(out: str, task: str, cfg: SynthConfig | None = None, vocab_from: str = "") -> dict:
    """Write the synthetic shard set of one downstream task (``vqa``, ``gqa``, ``snli_ve``,
    ``nlvr2``, ``refcoco``; see the module's "Downstream tasks") to ``out``, splits ``train`` and
    ``test`` of ``cfg``'s image counts (default ``SynthConfig(**TASK_SIZES)``), with the
    vocabularies of ``vocab_from`` (:func:`task_vocabularies`) and the task's own answers.txt. Returns
    a summary: images and rows per split, files, the number of answers and the task's baselines
    (also in the manifest): ``chance`` and ``majority`` for a classification, ``chance`` for
    refcoco."""
    if task not in TASK_MAKERS:
        raise ValueError(f"no synthetic {task!r} task; expected one of {', '.join(TASK_MAKERS)} (retrieval "
                         f"fine-tunes on the pre-training set itself)")
    cfg = cfg or SynthConfig(**TASK_SIZES)
    if cfg.n_train_images < 1 or cfg.n_test_images < 1:
        raise ValueError(f"a task set needs train and test images, got {cfg.n_train_images} and {cfg.n_test_images}")
    vocabularies = task_vocabularies(task, vocab_from)  # refused before anything is written
    claim_folder(out, PRODUCER)
    _remove_stale_files(out)
    images = {s: set() for s in TASK_SPLITS}
    rows = dict.fromkeys(TASK_SPLITS, 0)
    train_answers, test_labels = Counter(), []
    with ShardWriter(out, PRODUCER, rows_per_file=cfg.rows_per_file, region_dim=REGION_DIM) as writer:
        for split, n_images in zip(TASK_SPLITS, (cfg.n_train_images, cfg.n_test_images)):
            for row in task_rows(task, split, n_images, cfg):
                writer.write(row)
                rows[split] += 1
                images[split].update(row[c] for c in ("image_id", "image_id" + PAIR_SUFFIX) if c in row)
                if split == "test":
                    test_labels.append((row["boxes"], row["target_box"]) if task == "refcoco" else row["answer"])
                elif task != "refcoco":
                    train_answers[row["answer"]] += 1
    answers = [] if task == "refcoco" else _by_count(train_answers)
    baselines = grounding_baselines(test_labels) if task == "refcoco" else \
        classification_baselines(answers, test_labels)
    for name, text in vocabularies.items():
        write_text(out, name, text, PRODUCER)
    if answers:
        write_text(out, "answers.txt", "\n".join(answers) + "\n", PRODUCER)
    counts = {"vocab_size": len(vocabularies["vocab.txt"].splitlines()),
              "tags": len(vocabularies["tags.txt"].splitlines()),
              "concepts": len(vocabularies["concepts.txt"].splitlines()),
              "answers": len(answers), "baselines": baselines}
    splits = {s: {"images": len(images[s]), "rows": rows[s]} for s in TASK_SPLITS}
    summary = {"out": out, "task": task, "splits": splits, "files": len(writer.files), "region_dim": REGION_DIM,
               **counts}
    write_manifest(out, {"source": "alignlab.platform.synth", "task": task, "config": dataclasses.asdict(cfg),
                         "vocab_from": vocab_from, "splits": splits, "rows_written": writer.rows_written,
                         "files": _relative(writer.files), "region_dim": REGION_DIM, **counts}, PRODUCER)
    return summary
