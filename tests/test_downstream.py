"""Downstream fine-tuning (#14): the task heads over each architecture, their losses and the
metrics, on hand-made batches and hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch

from alignlab.models import downstream
from alignlab.models.base import CONCEPT_OFFSET, IGNORE, Vocab
from alignlab.models.inputs import vqa_accuracy
from alignlab.models.objectives import box_iou, grounding_loss, soft_target_loss
from alignlab.models.registry import get_spec
from alignlab.platform.config import ConfigError, load_config

ANSWERS = ("red", "blue", "two", "yes", "no")
B, K = 4, 3


def _cfg(arch: str, task: str):
    if arch == "simla":
        return load_config(overrides=[f"finetune.task={task}"], data={
            "model": {"architecture": "simla", "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                      "intermediate_size": 64, "embed_dim": 16, "dropout": 0.0,
                      "image": {"timm_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8,
                                "embed_dim": 32, "depth": 1, "num_heads": 2},
                      "simla": {"queue_size": 8, "codebook_size": 16}},
            "data": {"image_size": 32, "batch_size": B}})
    extra = {"mvptr": ["model.mvptr.text_layers=1", "model.mvptr.visual_layers=1", "model.mvptr.fusion_layers=1"],
             "semvlp": ["model.num_layers=2", "model.semvlp.cross_layer=1"]}[arch]
    return load_config(None, [f"model.architecture={arch}", "model.image.kind=regions", "model.image.region_dim=8",
                              "model.hidden_size=16", "model.num_heads=2", "model.intermediate_size=32",
                              "model.dropout=0.0", f"finetune.task={task}", *extra])


def _vocab(arch: str) -> Vocab:
    size = 120 if arch == "simla" else 30
    return Vocab(size=size, pad_id=0, cls_id=101 if arch == "simla" else 1, sep_id=102 if arch == "simla" else 2,
                 mask_id=103 if arch == "simla" else 3, tags=("circle", "square", "triangle"),
                 concepts=((5,), (6, 5)), answers=ANSWERS)


def _image(g: torch.Generator, suffix: str = "") -> dict[str, torch.Tensor]:
    tags = torch.randint(CONCEPT_OFFSET, CONCEPT_OFFSET + 3, (B, K), generator=g)
    region_mask = torch.ones(B, K, dtype=torch.bool)
    region_mask[0, 2] = False
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0]]).expand(B, K, 4)
    image = dict(region_features=torch.randn(B, K, 8, generator=g), region_mask=region_mask, boxes=boxes.clone(),
                 tag_ids=tags, tag_mask=tags >= CONCEPT_OFFSET,
                 pixels=torch.randint(0, 256, (B, 3, 32, 32), generator=g, dtype=torch.uint8))
    return {k + suffix: v for k, v in image.items()}


def _batch(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lo, hi = (110, 120) if arch == "simla" else (4, 30)
    ids = torch.randint(lo, hi, (B, 6), generator=g)
    phrases = torch.tensor([[2, 3]] * B)
    scores = torch.zeros(B, len(ANSWERS))
    scores[torch.arange(B), torch.arange(B) % 3] = 1.0
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), phrase_ids=phrases,
                phrase_mask=phrases >= CONCEPT_OFFSET, image_key=torch.arange(B), caption_key=torch.arange(B),
                answer_labels=torch.tensor([0, 1, 2, IGNORE]), answer_scores=scores,
                target_box=torch.tensor([[0.0, 0.0, 0.5, 0.5]] * B), **_image(g), **_image(g, "_b"))


CASES = [(arch, task) for arch in ("mvptr", "semvlp", "simla") for task in get_spec(arch).tasks if task != "retrieval"]


@pytest.mark.parametrize("arch,task", CASES)
def test_every_supported_task_trains_its_head_and_the_pretrained_encoder(arch, task):
    cfg = _cfg(arch, task)
    torch.manual_seed(0)
    model = downstream.build(task, get_spec(arch), cfg.model, cfg.objectives, _vocab(arch))
    batch = _batch(arch)
    out = model(batch)
    assert set(out.losses) == {task} and torch.isfinite(out.losses[task])
    out.losses[task].backward()
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "backbone" in trained and ("head" in trained or "log_scale" in trained)
    predicted = model.predict(batch)
    assert predicted.shape == (B,)
    assert predicted.max() < (len(ANSWERS) if task != "refcoco" else K)


def test_nlvr2_reads_both_images_of_the_pair():
    cfg = _cfg("mvptr", "nlvr2")
    torch.manual_seed(0)
    model = downstream.build("nlvr2", get_spec("mvptr"), cfg.model, cfg.objectives, _vocab("mvptr")).eval()
    batch = _batch("mvptr")
    before = model.logits(batch)
    changed = dict(batch, region_features_b=batch["region_features_b"] + 1.0)
    assert not torch.allclose(before, model.logits(changed))
    assert model.head[0].in_features == 2 * cfg.model.hidden_size


def test_grounding_never_picks_a_padded_region():
    cfg = _cfg("mvptr", "refcoco")
    model = downstream.build("refcoco", get_spec("mvptr"), cfg.model, cfg.objectives, _vocab("mvptr"))
    scores = model.logits(_batch("mvptr"))
    assert scores[0, 2] == float("-inf") and torch.isfinite(scores[1:]).all()


def test_an_unsupported_pair_fails_at_start_up_naming_the_supported_tasks():
    with pytest.raises(ConfigError, match="'simla' does not support it; its tasks: 'vqa', 'gqa'"):
        _cfg("simla", "refcoco")
    with pytest.raises(ConfigError, match="'dual_encoder' does not support it; its tasks: 'retrieval'"):
        load_config("dual_encoder_demo", ["finetune.task=vqa"])


def test_retrieval_fine_tuning_is_the_architecture_itself():
    cfg = _cfg("mvptr", "retrieval")
    model = downstream.build("retrieval", get_spec("mvptr"), cfg.model, cfg.objectives, _vocab("mvptr"))
    assert type(model).__name__ == "MVPTR"


def test_the_backbone_is_built_with_its_pretraining_answers_not_the_tasks():
    cfg = _cfg("semvlp", "vqa")
    cfg.model.semvlp.num_answers = 2
    vocab = Vocab(**{**_vocab("semvlp").__dict__, "pretrained_answers": ("a", "b")})
    model = downstream.build("vqa", get_spec("semvlp"), cfg.model, cfg.objectives, vocab)
    assert model.backbone.qa_head.decoder.out_features == 2 and model.head[-1].out_features == len(ANSWERS)


# --------------------------------------------------------------------------------------------
# Metrics and losses by hand
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("matches,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_with_ten_human_answers(matches, expected):
    # Leave one of 10 out, min(#matches among the other 9 / 3, 1), averaged: with 3 matches,
    # 3 subsets hold 2 (2/3) and 7 hold 3 (1): (3 * 2/3 + 7) / 10 = 0.9.
    assert vqa_accuracy(matches) == pytest.approx(expected)


def test_iou_at_the_half_boundary():
    a = torch.tensor([0.0, 0.0, 1.0, 1.0])
    # Half of a inside b, b the same size as that half: IoU = 0.5 exactly, which counts.
    assert box_iou(a, torch.tensor([0.0, 0.0, 1.0, 0.5])).item() == pytest.approx(0.5)
    assert box_iou(a, torch.tensor([0.0, 0.0, 1.0, 0.49])).item() < 0.5
    assert box_iou(a, torch.tensor([2.0, 2.0, 3.0, 3.0])).item() == 0.0
    batch = {"boxes": torch.tensor([[[0.0, 0.0, 1.0, 0.5], [0.0, 0.0, 1.0, 0.49]]] * 2),
             "target_box": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)}
    assert downstream.task_scores("refcoco", torch.tensor([0, 1]), batch).tolist() == [1.0, 0.0]


def test_soft_target_loss_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    scores = torch.tensor([[0.9, 0.3], [0.0, 0.0]])  # row 2: no answer in the answer set
    # Targets (0.75, 0.25); log-softmax of (0, log 3) = (log 1/4, log 3/4).
    expected = -(0.75 * math.log(0.25) + 0.25 * math.log(0.75))
    assert soft_target_loss(logits, scores).item() == pytest.approx(expected, rel=1e-6)


def test_grounding_loss_by_hand():
    scores = torch.tensor([[2.0, -1.0, 5.0]])
    positive = torch.tensor([[True, False, True]])
    mask = torch.tensor([[True, True, False]])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = -(math.log(sig(2.0)) + math.log(1 - sig(-1.0))) / 2
    assert grounding_loss(scores, positive, mask).item() == pytest.approx(expected, rel=1e-6)


def test_task_scores_and_baselines_on_known_predictions():
    batch = {"answer_labels": torch.tensor([0, 2, IGNORE, 0]), "input_ids": torch.zeros(4, 3, dtype=torch.long)}
    assert downstream.task_scores("snli_ve", torch.tensor([0, 1, 0, 0]), batch).tolist() == [1, 0, 0, 1]
    assert downstream.baseline_scores("gqa", batch)["majority"].tolist() == [1, 0, 0, 1]
    scores = torch.tensor([[1.0, 0.3], [0.0, 0.9]])
    assert downstream.task_scores("vqa", torch.tensor([1, 1]), {"answer_scores": scores}).tolist() == \
        pytest.approx([0.3, 0.9])
    grounding = {"boxes": torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.1, 0.1], [0, 0, 1.0, 0.9]]]),
                 "region_mask": torch.tensor([[True, True, False]]), "target_box": torch.tensor([[0.0, 0.0, 1.0, 1.0]])}
    base = downstream.baseline_scores("refcoco", grounding)
    assert base["chance"].tolist() == [0.5] and base["oracle"].tolist() == [1.0]
