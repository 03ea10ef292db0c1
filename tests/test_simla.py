"""SIMLA: weight sharing of the text and multi-modal encoder, the momentum model (EMA, never the
optimiser), the queues across steps, α's ramp, the ablation switches, PSL's pseudo-labels,
block-wise masking, the distillation objectives and the visual tokenizers. Queue behaviour across
DDP ranks is tested on FeatureQueue itself in test_global_batch.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alignlab.models.base import Vocab
from alignlab.models.objectives import distillation_loss, multilabel_bce, positive_targets, psl_targets
from alignlab.models.registry import build_model
from alignlab.models.simla import SIMLA, TABLE1
from alignlab.models.visual_tokenizers import DVAEEncoder, DVAEError, DVAETokenizer, RandomProjectionQuantizer
from alignlab.platform.config import ConfigError, load_config
from alignlab.platform.masking import bert_mask, block_mask
from alignlab.platform.train import param_groups
from conftest import save_tiny_bert

B, L, VOCAB, GRID = 4, 8, 120, 4


def tiny_cfg(overrides: tuple[str, ...] = (), **simla):
    return load_config(overrides=list(overrides), data={
        "model": {"architecture": "simla", "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                  "intermediate_size": 64, "embed_dim": 16, "dropout": 0.0,
                  "image": {"timm_name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "embed_dim": 32,
                            "depth": 1, "num_heads": 2},
                  "simla": {"queue_size": 8, "codebook_size": 16, **simla}},
        "data": {"image_size": 32, "batch_size": B}})


def tiny_model(**simla):
    torch.manual_seed(0)
    cfg = tiny_cfg(**simla)
    return build_model(cfg.model, cfg.objectives, Vocab(size=VOCAB))


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    ids = torch.randint(110, VOCAB, (B, L), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, -3:] = 0
    ids[0, -3:] = 0
    mlm_ids, mlm_labels = bert_mask(ids.numpy(), mask.numpy() > 0, 0.4, 103, (110, VOCAB), rng,
                                    selected=np.isin(np.arange(L), [2, 3])[None].repeat(B, 0))
    return dict(input_ids=ids, attention_mask=mask,
                pixels=torch.randint(0, 256, (B, 3, 32, 32), generator=g, dtype=torch.uint8),
                image_key=torch.arange(B) + 100 * seed, mlm_input_ids=torch.tensor(mlm_ids),
                mlm_labels=torch.tensor(mlm_labels), mim_mask=torch.tensor(block_mask(B, GRID, (0.25, 0.5), rng)))


def text_states(model, batch, momentum: bool = False) -> torch.Tensor:
    """E_l's states of the batch's captions, the online or the momentum model's."""
    mask = batch["attention_mask"].bool()
    x, x_m = model._text_inputs(batch["input_ids"], mask, momentum=momentum)
    return model._text(model.momentum if momentum else model._parts(False), x_m if momentum else x, mask)


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------


def _params_reached(model, loss) -> set[str]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_text_and_multimodal_encoder_share_every_non_cross_attention_weight():
    model = tiny_model()
    batch = make_batch()
    text_only = _params_reached(model, model.embed_texts(batch).sum())
    v = model.image(batch["pixels"]).detach()
    mask = batch["attention_mask"].bool()
    mm = model._fuse(model._parts(False), model._text_inputs(batch["input_ids"], mask)[0], mask, v)[0][:, 0]
    # A random read-out: the plain sum of a LayerNorm output has no gradient but to its bias.
    multimodal = _params_reached(model, (mm * torch.randn(mm.shape, generator=torch.Generator().manual_seed(0))).sum())
    stack = {n for n, _ in model.named_parameters() if n.startswith(("encoder.", "embeddings."))}
    cross = {n for n in stack if ".crossattention." in n}
    assert cross and len(cross) == 2 * 10  # 2 layers × (q, k, v, dense, LayerNorm) × (weight, bias)
    # The text encoder is the stack without its cross-attention; the multi-modal encoder is the
    # same tensors plus the cross-attention: no second copy of any weight exists.
    assert text_only - {"text_proj.weight", "text_proj.bias"} == stack - cross
    assert multimodal == stack
    # Behaviourally: a cross-attention-free layer weight moves both roles' outputs.
    with torch.no_grad():
        before_t, before_m = model.embed_texts(batch), model.match_scores(batch, batch)
        model.encoder.layers[1].intermediate.weight.mul_(1.5)
        assert not torch.allclose(model.embed_texts(batch), before_t)
        assert not torch.allclose(model.match_scores(batch, batch), before_m)
        # Re-ranking encodes each image and each caption once and fuses any pair of them.
        shift = torch.roll(torch.arange(len(batch["input_ids"])), 1)
        texts = {k: v[shift] for k, v in batch.items()}
        text_states = {k: v[shift] for k, v in model.match_text_states(batch).items()}
        torch.testing.assert_close(model.match_from_states(model.match_image_states(batch), text_states),
                                   model.match_scores(batch, texts))


def test_mim_and_psl_run_on_a_hybrid_vits_tokens():
    """A frozen MobileNetV2 trunk at 64 px: a 2x2 grid of 32-pixel patches, which the data stage
    masks (InputSpec.mim_grid) and MIM's targets tokenise."""
    hybrid = ("model.image.trunk=mobilenet_v2", "model.image.freeze_trunk=true", "model.image.img_size=64",
              "model.image.patch_size=32", "data.image_size=64")
    cfg = tiny_cfg(hybrid)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.objectives, Vocab(size=VOCAB)).train()
    assert model.input_spec(cfg.model, cfg.objectives).mim_grid == 2
    assert model.visual_tokenizer.patch_size == 32
    batch = make_batch()
    batch["pixels"] = torch.randint(0, 256, (B, 3, 64, 64), dtype=torch.uint8)
    batch["mim_mask"] = torch.tensor([[[1, 0], [0, 0]], [[0, 1], [1, 0]], [[0, 0], [0, 1]], [[1, 1], [0, 0]]]).bool()
    trunk_calls = []
    for owner, image in (("online", model.image), ("momentum", model.momentum["image"])):
        image.vit.patch_embed.backbone.register_forward_hook(lambda *_, owner=owner: trunk_calls.append(owner))
    out = model(batch)
    assert trunk_calls == ["online"]  # the frozen trunk's grid serves the momentum encoder too
    assert set(out.losses) == {"itc", "itm", "mlm", "mim", "psl"}
    assert all(torch.isfinite(v) for v in out.losses.values()) and out.metrics["psl_labels"] > 0
    sum(out.losses.values()).backward()
    assert model.mask_token.grad.abs().sum() > 0 and model.psl_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.image.vit.patch_embed.backbone.parameters())
    with pytest.raises(ConfigError, match="valid choices: '', 'mobilenet_v2'"):
        tiny_cfg((*hybrid, "model.image.trunk=resnet50"))


def test_mim_needs_equal_vit_and_text_widths():
    cfg = tiny_cfg()
    cfg.model.image.embed_dim = 48
    with pytest.raises(ValueError, match="must equal model.hidden_size"):
        build_model(cfg.model, cfg.objectives, Vocab(size=VOCAB))


# --------------------------------------------------------------------------------------------
# Momentum model, queues, α
# --------------------------------------------------------------------------------------------


def frozen_pair(tmp_path, k: int):
    """Two models from one saved BERT and seed, text-only below layer k: all layers trained, and
    the embeddings and first k layers frozen."""
    save_tiny_bert(tmp_path / "bert", layers=2, vocab_size=VOCAB, hidden=32, heads=2, intermediate=64)
    overrides = (f"model.text_init={tmp_path / 'bert'}",)
    models = []
    for frozen in (0, k):
        torch.manual_seed(0)
        cfg = tiny_cfg(overrides, cross_from=k, frozen_text_layers=frozen)
        models.append(build_model(cfg.model, cfg.objectives, Vocab(size=VOCAB)))
    return models


def test_frozen_text_layers_change_what_trains_not_what_the_model_computes(tmp_path):
    full, frozen = frozen_pair(tmp_path, 1)
    batch = make_batch()
    outputs = []
    for model in (full, frozen):
        model.begin_step(0, 10)
        torch.manual_seed(1)  # the same hard negatives drawn for both
        outputs.append(model(batch))
    assert set(outputs[0].losses) == {"itm", "itc", "mlm", "mim", "psl"}
    for name, loss in outputs[0].losses.items():
        torch.testing.assert_close(outputs[1].losses[name], loss, msg=name)
    with torch.no_grad():  # and the retrieval interface, re-ranking from states encoded once
        torch.testing.assert_close(frozen.embed_texts(batch), full.embed_texts(batch))
        torch.testing.assert_close(frozen.match_scores(batch, batch), full.match_scores(batch, batch))
    for model, out in zip((full, frozen), outputs):
        sum(out.losses.values()).backward()
    grads = dict(full.named_parameters())
    below = ("embeddings.", "encoder.layers.0.")
    for name, p in frozen.named_parameters():
        if name.startswith("momentum"):
            continue
        assert p.requires_grad != name.startswith(below) and (p.grad is None) == name.startswith(below), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[name].grad, msg=name)
    # A frozen weight is not averaged into the momentum model: its copy stays equal to it.
    moved = {id(m) for m in frozen._momentum_params()}
    for name, m in frozen.momentum.named_parameters():
        assert (id(m) in moved) != name.startswith(below), name


def test_frozen_text_layers_run_once_per_caption_for_both_models(tmp_path):
    """The saving: below layer k, a step runs the stack once for the caption and once for its MLM
    masking, without autograd, where the fully trained stack runs it for the text-encoder role,
    the positive and negative fused passes and MLM, online and momentum. MIM's image queries enter
    at layer k, as E_mm's, in both."""
    calls = []
    for model in frozen_pair(tmp_path, 1):
        seen = {}
        for owner, encoder in (("online", model.encoder), ("momentum", model.momentum["encoder"])):
            for i, layer in enumerate(encoder.layers):
                layer.register_forward_hook(
                    lambda module, args, out, key=(owner, i): seen.setdefault(key, []).append(out[0].requires_grad))
        model(make_batch())
        calls.append(seen)
    full, frozen = calls
    assert {k: len(v) for k, v in full.items()} == {("online", 0): 4, ("online", 1): 5,
                                                    ("momentum", 0): 2, ("momentum", 1): 3}
    assert {k: len(v) for k, v in frozen.items()} == {("online", 0): 2, ("online", 1): 5, ("momentum", 1): 3}
    # The caption's and the masked caption's frozen passes record no graph.
    assert frozen[("online", 0)] == [False, False]


@pytest.mark.parametrize("simla, extra, message", [
    ({"frozen_text_layers": 2, "cross_from": 2}, ("model.text_init=x",), "must be in \\[0, model.num_layers = 2\\)"),
    ({"frozen_text_layers": 1, "cross_from": 1}, (), "set 'model.text_init'"),
    ({"frozen_text_layers": 1}, ("model.text_init=x",), "exceeds model.simla.cross_from = 0.*set cross_from >= 1"),
])
def test_frozen_text_layers_are_checked_at_start_up(simla, extra, message):
    with pytest.raises(ConfigError, match=message):
        tiny_cfg(extra, **simla)


def test_momentum_model_moves_by_ema_only_never_by_the_optimiser():
    model = tiny_model()
    m = model.cfg.momentum
    momentum = dict(model.momentum.named_parameters())
    assert momentum and all(not p.requires_grad for p in momentum.values())
    assert not model.momentum_mask_token.requires_grad
    optimised = {id(p) for g in param_groups(model, 0.02) for p in g["params"]}
    assert not optimised & {id(p) for p in model._momentum_params()}

    opt = torch.optim.AdamW(param_groups(model, 0.02), lr=1e-2)
    model.begin_step(0, 10)  # θ_m = θ at initialisation, so the first EMA step is a no-op
    for name, p in model.momentum.named_parameters():
        torch.testing.assert_close(p, dict(model.named_parameters())[name])
    out = model(make_batch())
    sum(out.losses.values()).backward()
    before = {n: p.detach().clone() for n, p in momentum.items()}
    mask_before = model.momentum_mask_token.detach().clone()
    opt.step()
    # The optimiser changed the online weights but no momentum weight, and none has a gradient.
    assert all(torch.equal(before[n], p) for n, p in momentum.items())
    assert all(p.grad is None for p in momentum.values())
    online = dict(model.named_parameters())
    assert not torch.equal(online["encoder.layers.0.attention.query.weight"],
                           before["encoder.layers.0.attention.query.weight"])
    model.begin_step(1, 10)
    for n, p in momentum.items():
        expected = m * before[n] + (1 - m) * online[n].detach()
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(model.momentum_mask_token, m * mask_before + (1 - m) * model.mask_token.detach(),
                               rtol=0, atol=1e-7)
    # A second call for the same step (the trainer re-enters at an epoch boundary) adds nothing.
    snapshot = {n: p.detach().clone() for n, p in momentum.items()}
    model.begin_step(1, 10)
    assert all(torch.equal(snapshot[n], p) for n, p in momentum.items())


def test_alpha_ramps_linearly_over_the_first_epoch():
    model = tiny_model()
    got = []
    for step in (0, 25, 50, 100, 150, 1000):
        model.begin_step(step, 100)
        got.append(model.alpha)
    assert got == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.4, 0.4])
    model.cfg.alpha_ramp_epochs = 2.0
    model.begin_step(100, 100)
    assert model.alpha == pytest.approx(0.2)


def test_queues_take_each_steps_momentum_features_in_order_and_wrap():
    model = tiny_model()  # queue of 8, batch of 4
    seen = []
    for step in range(3):
        batch = make_batch(seed=step + 1)
        model.begin_step(step, 10)
        model(batch)
        with torch.no_grad():  # what the momentum encoders make of this batch
            p = model.momentum
            img = F.normalize(p["vision_proj"](p["image"](batch["pixels"])[:, 0]), dim=-1)
            txt = F.normalize(p["text_proj"](text_states(model, batch, momentum=True)[:, 0]), dim=-1)
        seen.append((img, txt, batch["image_key"]))
        q = model.queue
        assert int(q.ptr) == (4 * (step + 1)) % 8
    # Step 3 overwrote step 1's slots; step 2's are in the second half.
    order = [seen[2], seen[1]]
    torch.testing.assert_close(model.queue.image_queue, torch.cat([o[0] for o in order]))
    torch.testing.assert_close(model.queue.text_queue, torch.cat([o[1] for o in order]))
    assert model.queue.idx_queue.tolist() == torch.cat([o[2] for o in order]).tolist()


def test_queue_must_hold_the_global_batch():
    with pytest.raises(ConfigError, match="queue_size' = 16 must hold the global batch data.batch_size = 32"):
        load_config("simla_demo", ["model.simla.queue_size=16"])
    assert load_config("simla_demo", ["model.simla.queue_size=1000"]).model.simla.queue_size == 1000


# --------------------------------------------------------------------------------------------
# Ablation switches
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row,losses", [("a", {"itm"}), ("b", {"itm", "itc"}), ("c", {"itm", "itc", "mlm"}),
                                        ("e", {"itm", "itc", "mlm", "mim", "psl"})])
def test_table1_rows_produce_only_their_losses_and_heads(row, losses):
    model = tiny_model(row=row)
    out = model(make_batch())
    assert set(out.losses) == losses
    for head in ("itm_head", "mlm_head", "mim_head", "psl_head"):
        assert hasattr(model, head) == (head.split("_")[0] in losses), head
    assert hasattr(model, "queue") == ("itc" in losses)
    assert hasattr(model, "mask_token") == ("mim" in losses)
    if row == "a":  # ITM alone distils nothing: no momentum model at all
        assert not list(model.momentum.parameters())
    grads = _params_reached(model, sum(out.losses.values()))
    assert not [n for n, p in model.named_parameters() if p.requires_grad and n not in grads
                and not n.startswith(("text_proj", "vision_proj", "log_scale"))]


def test_flags_select_components_and_input_spec_follows():
    cfg = tiny_cfg(mim=False, psl=False)
    assert cfg.model.simla.components() == ("itm", "itc", "mlm")
    spec = build_model(cfg.model, cfg.objectives, Vocab(size=VOCAB)).input_spec(cfg.model, cfg.objectives)
    assert spec.pixels and spec.mlm and not spec.mim
    spec = tiny_cfg()
    full = build_model(spec.model, spec.objectives, Vocab(size=VOCAB)).input_spec(spec.model, spec.objectives)
    assert full.mim and full.mim_grid == 4 and full.mim_ratio == (0.35, 0.45)


def test_zero_weights_switch_off_mlm_mim_and_psl_as_retrieval_fine_tuning_does():
    """§3.3 fine-tunes retrieval with ITC and ITM alone: weighted 0, MLM, MIM and PSL are neither
    prepared by the data stage nor computed, their heads keep every parameter (a pre-trained
    checkpoint still loads) and get no gradient; ITC and ITM are those of the full model."""
    weights = ("objectives.weights.mlm=0", "objectives.weights.mim=0", "objectives.weights.psl=0")
    cfg = tiny_cfg(weights)
    spec = SIMLA.input_spec(cfg.model, cfg.objectives)
    assert spec.pixels and not spec.mlm and not spec.mim
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.objectives, Vocab(size=VOCAB))
    full = tiny_model()
    assert model.find_unused_parameters and model.state_dict().keys() == full.state_dict().keys()
    batch = {k: v for k, v in make_batch().items() if not k.startswith(("mlm_", "mim_"))}
    torch.manual_seed(1)
    out = model(batch)
    assert set(out.losses) == {"itc", "itm"}
    torch.manual_seed(1)
    want = full(make_batch())
    torch.testing.assert_close(out.losses["itc"], want.losses["itc"])
    torch.testing.assert_close(out.losses["itm"], want.losses["itm"])
    grads = _params_reached(model, sum(out.losses.values()))
    assert not any(n.startswith(("mlm_head", "mim_head", "psl_head", "mask_token")) for n in grads)
    assert any(n.startswith("itm_head") for n in grads) and any(n.startswith("image.") for n in grads)


# --------------------------------------------------------------------------------------------
# PSL, masking, objectives
# --------------------------------------------------------------------------------------------


def test_psl_targets_take_the_top_k_attended_non_special_tokens():
    #              [CLS]  red   cube  [SEP] [PAD]  (ids 101 11 12 102 0), second row: "a a b"
    row = torch.tensor([[0.50, 0.10, 0.15, 0.20, 0.05],
                        [0.40, 0.30, 0.20, 0.05, 0.05]])
    ids = torch.tensor([[101, 11, 12, 102, 0],
                        [101, 20, 20, 21, 102]])
    special = torch.tensor([[True, False, False, True, True],
                            [True, False, False, False, True]])
    y = psl_targets(row, ids, special, k=1, vocab_size=30)
    assert y.nonzero().tolist() == [[0, 12], [1, 20]]  # [CLS] and [SEP] rank higher but never count
    y = psl_targets(row, ids, special, k=2, vocab_size=30)
    assert y.nonzero().tolist() == [[0, 11], [0, 12], [1, 20]]  # "a" twice in the top 2: one label
    y = psl_targets(row, ids, special, k=4, vocab_size=30)  # fewer eligible tokens than k: all of them
    assert y.nonzero().tolist() == [[0, 11], [0, 12], [1, 20], [1, 21]]
    assert y.max() == 1.0


def test_model_psl_ignores_special_tokens_and_uses_k():
    model = tiny_model(psl_k=2)
    batch = make_batch()
    out = model(batch)
    assert out.metrics["psl_labels"] <= 2.0 and out.metrics["psl_labels"] > 0


@pytest.mark.parametrize("grid,ratio", [(8, (0.35, 0.45)), (14, (0.3, 0.5)), (4, (0.25, 0.5)), (16, (0.4, 0.4))])
def test_block_mask_ratio_stays_within_its_bounds(grid, ratio):
    masks = block_mask(300, grid, ratio, np.random.default_rng(grid))
    frac = masks.reshape(300, -1).mean(1)
    tol = 0.5 / grid ** 2  # rounding to whole patches
    assert frac.min() >= ratio[0] - tol and frac.max() <= ratio[1] + tol
    assert masks.shape == (300, grid, grid) and masks.dtype == bool
    if ratio[0] < ratio[1]:
        assert frac.std() > 0  # the ratio is drawn per image
    again = block_mask(300, grid, ratio, np.random.default_rng(grid))
    assert np.array_equal(masks, again)


def test_block_mask_is_blockwise():
    """Masked patches come in blocks: most masked patches have a masked 4-neighbour."""
    m = block_mask(200, 14, (0.4, 0.4), np.random.default_rng(1))
    pad = np.pad(m, ((0, 0), (1, 1), (1, 1)))
    neighbour = pad[:, :-2, 1:-1] | pad[:, 2:, 1:-1] | pad[:, 1:-1, :-2] | pad[:, 1:-1, 2:]
    assert (neighbour & m).sum() / m.sum() > 0.9


def test_simla_paper_masks_beits_forty_percent_in_blocks_of_at_least_16():
    """The reading simla_paper follows (#15): BEiT's 40% of the 256 patches of a 256 px crop, blocks
    of at least 16 patches; the official code's 75 of 256 would be 0.29."""
    from alignlab.models.simla import SIMLA

    cfg = load_config("simla_paper")
    spec = SIMLA.input_spec(cfg.model, cfg.objectives)
    assert (spec.mim_grid, spec.mim_ratio, spec.mim_min_block) == (16, (0.4, 0.4), 16)
    masks = block_mask(50, spec.mim_grid, spec.mim_ratio, np.random.default_rng(0), min_block=spec.mim_min_block)
    assert (masks.reshape(50, -1).sum(1) == round(0.4 * 256)).all()  # 102 patches, not 75
    with pytest.raises(ConfigError, match="model.simla.mim_min_block"):
        load_config("simla_paper", ["model.simla.mim_min_block=0"])


def test_distillation_loss_hand_computed():
    logits = torch.tensor([[math.log(3.0), 0.0]])  # p = (0.75, 0.25)
    hard = torch.tensor([[1.0, 0.0]])
    teacher = torch.tensor([[0.5, 0.5]])
    want = 0.7 * -math.log(0.75) + 0.3 * -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    assert distillation_loss(logits, hard, teacher, 0.3).item() == pytest.approx(want, rel=1e-6)
    assert distillation_loss(logits, hard, teacher, 0.0).item() == pytest.approx(-math.log(0.75), rel=1e-6)
    empty = torch.zeros(0, 2, requires_grad=True)
    assert distillation_loss(empty, torch.zeros(0, 2), torch.zeros(0, 2), 0.4).item() == 0.0


def test_multilabel_bce_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # σ = (0.5, 0.75)
    targets = torch.tensor([[1.0, 0.0]])
    want = -(math.log(0.5) + math.log(0.25)) / 2  # mean over V = 2
    assert multilabel_bce(logits, targets).item() == pytest.approx(want, rel=1e-6)
    soft = torch.tensor([[0.5, 0.5]])
    want = -(0.5 * math.log(0.5) + 0.5 * math.log(0.5) + 0.5 * math.log(0.75) + 0.5 * math.log(0.25)) / 2
    assert multilabel_bce(logits, soft).item() == pytest.approx(want, rel=1e-6)


def test_positive_targets_spread_over_every_copy_of_the_image():
    t = positive_targets(torch.tensor([7, 8]), torch.tensor([7, 8, 7, -1]))
    assert t.tolist() == [[0.5, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0]]


@pytest.mark.parametrize("pooling, image_pooling", [("cls", "cls"), ("mean", "cls"), ("cls", "mean")])
def test_itc_loss_at_alpha_zero_is_cross_entropy_against_the_positive_targets(pooling, image_pooling):
    """g_l reads E_l's [CLS] state (itc_text_pooling "cls", the paper and the default) or the mean
    of its states over the caption's real words ("mean"; row 0 has 3 padding positions); g_v reads
    E_v's [CLS] state or the mean of its patch states (itc_image_pooling); in the retrieval
    embeddings, in the ITC loss and in what the momentum model enqueues."""
    assert tiny_cfg().model.simla.itc_text_pooling == tiny_cfg().model.simla.itc_image_pooling == "cls"
    model = tiny_model(row="b", itc_text_pooling=pooling, itc_image_pooling=image_pooling)
    batch = make_batch()
    model.begin_step(0, 10)  # α = 0
    queue_img, queue_txt = model.queue.image_queue.clone(), model.queue.text_queue.clone()
    out = model(batch)
    with torch.no_grad():
        states = text_states(model, batch)
        pooled = states[:, 0] if pooling == "cls" else \
            torch.stack([states[0, :L - 3].mean(0), *(states[i].mean(0) for i in range(1, B))])
        txt = F.normalize(model.text_proj(pooled), dim=-1)
        v = model.image(batch["pixels"])
        assert v.shape[1] == 1 + GRID * GRID
        img = F.normalize(model.vision_proj(v[:, 0] if image_pooling == "cls" else v[:, 1:].mean(1)), dim=-1)
        scale = model.log_scale.exp()
        # A fresh momentum copy equals the online model; the initial queue holds random unit
        # vectors with id -1, so each row's only positive is its own pair: plain InfoNCE over
        # the batch's 4 columns and the queue's 8.
        cols_img, cols_txt = torch.cat([img, queue_img]), torch.cat([txt, queue_txt])
        labels = torch.arange(B)
        want = 0.5 * (F.cross_entropy(scale * img @ cols_txt.t(), labels)
                      + F.cross_entropy(scale * txt @ cols_img.t(), labels))
    torch.testing.assert_close(model.embed_texts(batch), txt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.embed_images(batch), img, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.losses["itc"], want, rtol=1e-5, atol=1e-5)
    # then the batch was enqueued
    torch.testing.assert_close(model.queue.image_queue[:B], img)
    torch.testing.assert_close(model.queue.text_queue[:B], txt, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Readings: the paper's text against the official code (#15)
# --------------------------------------------------------------------------------------------


def test_a_reading_sets_every_switch_and_an_explicit_switch_wins():
    from alignlab.models.simla import READINGS

    paper, official = tiny_cfg().model.simla, tiny_cfg(reading="official").model.simla
    assert {k: paper.switch(k) for k in READINGS["paper"]} == READINGS["paper"]
    assert {k: official.switch(k) for k in READINGS["official"]} == READINGS["official"]
    assert READINGS["paper"].keys() == READINGS["official"].keys()
    assert all(READINGS["paper"][k] != READINGS["official"][k] for k in READINGS["paper"])
    mixed = tiny_cfg(reading="official", itc_targets="same_image").model.simla
    assert mixed.switch("itc_targets") == "same_image" and mixed.switch("itm_exclude") == "own_pair"
    with pytest.raises(ConfigError, match="'diagonal'"):
        tiny_cfg(("model.simla.itc_targets=one_hot",))


def test_itc_targets_diagonal_is_the_own_pair_one_hot_where_same_image_spreads_over_copies():
    # Rows: two captions of image 7 on worker 1 (offset 2 in the global batch of 4), then a queue
    # column holding image 7 again.
    from alignlab.models.objectives import own_pair_mask

    rows, cols = torch.tensor([7, 7]), torch.tensor([5, 6, 7, 7, 7])
    torch.testing.assert_close(positive_targets(rows, cols), torch.tensor([[0, 0, 1 / 3, 1 / 3, 1 / 3]] * 2))
    assert own_pair_mask(2, 5, offset=2).float().tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 1, 0]]


def test_official_itc_loss_at_alpha_zero_is_cross_entropy_against_the_diagonal():
    """Two captions of one image in the batch: the paper's reading splits each row's target over
    both; the official code's puts it on the row's own pair only (hand-computed from the features)."""
    batch = make_batch()
    batch["image_key"] = torch.tensor([3, 3, 4, 5])  # rows 0 and 1 show the same image
    losses = {}
    for reading in ("paper", "official"):
        model = tiny_model(row="b", reading=reading)
        model.begin_step(0, 10)  # α = 0
        queue_img, queue_txt = model.queue.image_queue.clone(), model.queue.text_queue.clone()
        losses[reading] = model(batch).losses["itc"]
        with torch.no_grad():
            img, txt = model.embed_images(batch), model.embed_texts(batch)
            scale = model.log_scale.exp().clamp(2.0, 1000.0) if reading == "official" else model.log_scale.exp()
            i2t = (scale * img @ torch.cat([txt, queue_txt]).t()).log_softmax(-1)
            t2i = (scale * txt @ torch.cat([img, queue_img]).t()).log_softmax(-1)
        target = torch.zeros(B, B + 8)
        if reading == "official":
            target[torch.arange(B), torch.arange(B)] = 1.0
        else:
            target[:2, :2], target[2, 2], target[3, 3] = 0.5, 1.0, 1.0
        want = -0.5 * ((target * i2t).sum(-1).mean() + (target * t2i).sum(-1).mean())
        torch.testing.assert_close(losses[reading], want, rtol=1e-5, atol=1e-5)
    assert not torch.isclose(losses["paper"], losses["official"])


def test_official_temperature_clamp_bounds_tau_to_the_official_range():
    from alignlab.models.objectives import clamp_logit_scale
    from alignlab.models.simla import LOGIT_SCALE_BOUNDS

    for tau, paper, official in ((0.9, 1 / 0.9, 2.0), (0.0005, 100.0, 1000.0), (0.05, 20.0, 20.0)):
        log_scale = torch.tensor(math.log(1 / tau))
        got = [clamp_logit_scale(log_scale, max_scale=hi, min_scale=lo).item()
               for lo, hi in (LOGIT_SCALE_BOUNDS["clip"], LOGIT_SCALE_BOUNDS["official"])]
        assert got == pytest.approx([paper, official], rel=1e-5)


def test_official_itm_exclusion_can_draw_another_caption_of_the_same_image():
    from alignlab.models.objectives import global_hard_negatives

    # This worker's rows are global rows 2 and 3 (offset 2); rows 2 and 3 are both captions of image 7.
    ids = torch.tensor([7, 7])
    cols = torch.tensor([5, 6, 7, 7])
    logits = torch.tensor([[1.0, 2.0, 9.0, 8.0], [1.0, 3.0, 8.0, 9.0]])
    paper, ok_p = global_hard_negatives(logits, ids, cols, "hardest")
    official, ok_o = global_hard_negatives(logits, ids, cols, "hardest", exclude="own_pair", offset=2)
    assert paper.tolist() == [1, 1] and ok_p.all()  # the best column of another image
    assert official.tolist() == [3, 2] and ok_o.all()  # the other caption of image 7


def test_official_itm_similarity_takes_the_momentum_features_as_columns(monkeypatch):
    """The official code draws ITM negatives from the ITC sims (online against momentum): after the
    online model moves away from its momentum copy, the two readings see different similarities."""
    import alignlab.models.simla as simla_module

    seen = {}

    def spy(logits, row_ids, col_ids, mode="sample", generator=None, exclude="same_image", offset=0):
        seen.setdefault("logits", []).append(logits.clone())
        return torch.arange(len(row_ids)).roll(1), torch.ones(len(row_ids), dtype=torch.bool)

    monkeypatch.setattr(simla_module, "global_hard_negatives", spy)
    batch = make_batch()
    sims = {}
    for similarity in ("online", "momentum"):
        model = tiny_model(row="c", itm_similarity=similarity)  # ITC + ITM
        model.begin_step(0, 10)
        with torch.no_grad():
            # the online model leaves its momentum copy (a random step: a constant one would vanish
            # against the zero-mean LayerNorm output it projects)
            model.text_proj.weight.add_(torch.randn_like(model.text_proj.weight))
            img, txt = model.embed_images(batch), model.embed_texts(batch)
            p = model.momentum
            txt_m = F.normalize(p["text_proj"](text_states(model, batch, momentum=True)[:, 0]), dim=-1)
        seen.clear()
        model(batch)
        sims[similarity] = seen["logits"][0]
        scale = model.log_scale.exp()
        want = scale * img @ (txt_m if similarity == "momentum" else txt).t()
        torch.testing.assert_close(sims[similarity], want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(sims["online"], sims["momentum"], atol=1e-3)


def test_official_rerank_score_is_the_raw_match_logit(monkeypatch):
    """Pair A: logits (0, 2), p = 0.88; pair B: (-3, 1), p = 0.98. By probability B ranks first, by
    the raw match logit A does."""
    logits = torch.tensor([[0.0, 2.0], [-3.0, 1.0]])
    scores = {}
    for reading in ("paper", "official"):
        model = tiny_model(reading=reading)
        # Pair i's fused [CLS] is the unit vector e_i and the head's weight column i its logits.
        monkeypatch.setattr(model, "_fuse", lambda *a, **k: (torch.eye(2, 32)[:, None], None))
        with torch.no_grad():
            model.itm_head.weight.zero_()
            model.itm_head.weight[:, :2] = logits.t()
            model.itm_head.bias.zero_()
        scores[reading] = model.match_from_states({"image_states": None},
                                                  {"text_inputs": None, "attention_mask": torch.ones(2, 1)})
    torch.testing.assert_close(scores["paper"], logits.softmax(-1)[:, 1])
    torch.testing.assert_close(scores["official"], logits[:, 1])
    assert scores["paper"].argmax() == 1 and scores["official"].argmax() == 0


@pytest.mark.parametrize("reading", ["paper", "official"])
def test_mim_inputs_under_each_reading(monkeypatch, reading):
    """Paper: E_mm takes the masked image's E_v states as queries and the caption's E_l states as
    context. Official: both through the text stack's embedding layer (the patches as
    inputs_embeds; the caption's word-embedding output, the online model's for both copies)."""
    from alignlab.models.simla import SIMLA

    model = tiny_model(row="d", reading=reading)
    model.begin_step(0, 10)
    calls = []
    real = SIMLA._fuse_image_queries

    def spy(self, p, image_states, text_states, text_mask):
        calls.append((image_states.detach().clone(), text_states.detach().clone()))
        return real(self, p, image_states, text_states, text_mask)

    monkeypatch.setattr(SIMLA, "_fuse_image_queries", spy)
    batch = make_batch()
    model(batch)
    (queries, context), (queries_m, context_m) = calls  # online, then momentum
    with torch.no_grad():
        ids = batch["input_ids"]
        patch_mask = batch["mim_mask"].flatten(1).bool()
        v_hat = model.image.encode(model.image.patch_embeddings(batch["pixels"]), patch_mask, model.mask_token)
        if reading == "official":
            want_q, want_c = model.embeddings(None, extra=v_hat), model.embeddings(ids)
            torch.testing.assert_close(context_m, want_c)  # the online embeddings for the momentum copy too
        else:
            want_q, want_c = v_hat, text_states(model, batch)
    torch.testing.assert_close(queries, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(context, want_c, rtol=1e-5, atol=1e-5)
    if reading == "official":  # the embedding layer really changed the queries
        assert not torch.allclose(queries, v_hat)


def test_official_psl_labels_are_head_votes_with_only_cls_removed():
    """Two heads over [CLS] w1 w2 w3 w4 [SEP]. Paper: the mean row's top 2 non-special positions.
    Official: each head's top 2 positions vote; the 3 most voted give their tokens; [SEP] can be
    one, [CLS] never."""
    from alignlab.models.objectives import psl_vote_targets

    ids = torch.tensor([[101, 7, 8, 9, 10, 102]])
    heads = torch.tensor([[[0.9, 0.5, 0.2, 0.1, 0.1, 0.1],     # votes [CLS], w1
                           [0.0, 0.4, 0.05, 0.3, 0.0, 0.35]]])  # votes w1, [SEP]
    official = psl_vote_targets(heads, ids, per_head=2, positions=3, vocab_size=120, cls_id=101)
    # votes: w1 2, [CLS] 1, [SEP] 1 -> positions w1, [CLS], [SEP] -> labels w1 and [SEP] ([CLS] removed)
    assert official[0].nonzero().flatten().tolist() == [7, 102]
    special = torch.isin(ids, torch.tensor([0, 101, 102, 103]))
    paper = psl_targets(heads.mean(1), ids, special, 2, 120)
    # mean row: w1 .45, w3 .2, w2 .125, w4 .05 -> w1 and w3
    assert paper[0].nonzero().flatten().tolist() == [7, 9]


def test_official_psl_head_reads_the_itc_feature_and_trains():
    paper, official = tiny_model(row="e"), tiny_model(row="e", reading="official")
    assert paper.psl_head.in_features == 32 and official.psl_head.in_features == 16  # ViT width, embed_dim
    official.begin_step(0, 10)
    out = official(make_batch())
    assert torch.isfinite(out.losses["psl"]) and out.metrics["psl_labels"] > 0
    with pytest.raises(ConfigError, match="psl_head_input"):
        tiny_cfg(psl_head_input="itc_feature", itc=False)  # PSL without ITC


# --------------------------------------------------------------------------------------------
# Visual tokenizers
# --------------------------------------------------------------------------------------------


def test_random_projection_quantizer_tokens_are_per_patch_in_row_major_order():
    q = RandomProjectionQuantizer(patch_size=8, codebook_size=64, dim=8, seed=0)
    assert not list(q.parameters())  # frozen: buffers only
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    ids = q(pixels)
    assert ids.shape == (2, 16) and ids.min() >= 0 and ids.max() < 64
    changed = pixels.clone()
    changed[0, :, 8:16, 16:24] = torch.randint(0, 256, (3, 8, 8), generator=g, dtype=torch.uint8)  # patch (1, 2)
    diff = (q(changed) != ids).nonzero().tolist()
    assert diff in ([], [[0, 1 * 4 + 2]])  # only that patch's token may change
    assert torch.equal(RandomProjectionQuantizer(8, 64, 8, seed=0)(pixels), ids)  # deterministic


def tiny_dvae(seed: int = 0) -> DVAEEncoder:
    """A small DALL-E encoder (16 channels, 1 block per group, 16 tokens) with random weights."""
    torch.manual_seed(seed)
    encoder = DVAEEncoder(hidden=16, blocks_per_group=1, vocab_size=16)
    for p in encoder.parameters():
        nn.init.normal_(p, std=0.3)
    return encoder


def test_dvae_encoder_has_dall_e_parameter_names_and_shapes():
    """OpenAI's encoder (hidden 256, 2 blocks per group, 8192 tokens): its state dict's names and
    shapes, so the converted encoder.pkl loads strict; the grid is the input side / 8."""
    with torch.device("meta"):
        state = DVAEEncoder().state_dict()
    assert {k: tuple(state[k].shape) for k in (
        "blocks.input.w", "blocks.group_1.block_2.res_path.conv_1.w", "blocks.group_2.block_1.id_path.w",
        "blocks.group_4.block_2.res_path.conv_4.w", "blocks.output.conv.b")} == {
        "blocks.input.w": (256, 3, 7, 7), "blocks.group_1.block_2.res_path.conv_1.w": (64, 256, 3, 3),
        "blocks.group_2.block_1.id_path.w": (512, 256, 1, 1),
        "blocks.group_4.block_2.res_path.conv_4.w": (2048, 512, 1, 1), "blocks.output.conv.b": (8192,)}
    assert "blocks.group_1.block_1.id_path.w" not in state  # same width: identity path
    assert len(state) == 74 and sum(v.numel() for v in state.values()) == 53_786_240
    assert tiny_dvae()(torch.rand(2, 3, 24, 24)).shape == (2, 16, 3, 3)


def test_dvae_block_is_identity_plus_scaled_residual():
    """DALL-E's block: x + res(x) / n_layers², n_layers = 4 groups x blocks per group."""
    encoder = tiny_dvae()
    block = encoder.blocks.group_1.block_1
    x = torch.randn(1, 16, 5, 5)
    assert torch.allclose(block(x), x + block.res_path(x) / (4 * 1) ** 2)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_dvae_tokenizer_loads_an_encoder_state_dict(tmp_path, suffix):
    encoder = tiny_dvae()
    path = tmp_path / f"encoder{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(encoder.state_dict(), path)
    else:
        torch.save(encoder.state_dict(), path)
    tok = DVAETokenizer(str(path), grid=4)
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    ids = tok(pixels)
    x = F.interpolate(pixels.float() / 255, size=(32, 32), mode="bilinear", align_corners=False)
    want = encoder(0.8 * x + 0.1).argmax(1).flatten(1)
    assert ids.shape == (2, 16) and torch.equal(ids, want)
    assert len(set(ids.flatten().tolist())) > 1  # the weights were loaded: tokens differ per patch
    assert not any(p.requires_grad for p in tok.parameters())


class _Payload:
    """Unpickling this creates ``marker``: what a crafted weights file would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_crafted_dvae_pickle_runs_nothing_and_names_the_file(tmp_path, writer):
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "encoder.pkl"
    payload = {"blocks.input.w": _Payload(marker)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    with pytest.raises(DVAEError, match=rf"{path}: not a state dict of tensors \(the weights-only unpickler "
                                         rf"refused it, so nothing in it ran: Unsupported (global: GLOBAL "
                                         rf"(io|builtins).open|operand)"):
        DVAETokenizer(str(path), grid=4)
    assert not marker.exists()
    pickle.loads(pickle.dumps(payload))  # the payload is live: an unsafe load would have run it
    assert marker.exists()


def test_dvae_files_that_are_not_encoder_state_dicts_are_named(tmp_path):
    torch.save(nn.Conv2d(3, 16, kernel_size=8, stride=8), tmp_path / "module.pt")  # a pickled module
    with pytest.raises(DVAEError, match=r"module.pt: not a state dict .*GLOBAL torch.nn.modules.conv.Conv2d.*"
                                        r"\.state_dict\(\)"):
        DVAETokenizer(str(tmp_path / "module.pt"), grid=4)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(DVAEError, match=r"other.pt: not a DALL-E dVAE encoder state dict"):
        DVAETokenizer(str(tmp_path / "other.pt"), grid=4)
    state = tiny_dvae().state_dict()
    del state["blocks.group_2.block_1.id_path.b"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(DVAEError, match=r"partial.pt: the tensors do not fit.*group_2.block_1.id_path.b"):
        DVAETokenizer(str(tmp_path / "partial.pt"), grid=4)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(DVAEError, match="garbage.safetensors: not a state dict"):
        DVAETokenizer(str(tmp_path / "garbage.safetensors"), grid=4)
    with pytest.raises(DVAEError, match="absent.pt: no such dVAE encoder file"):
        DVAETokenizer(str(tmp_path / "absent.pt"), grid=4)


def test_model_uses_the_configured_visual_tokenizer(tmp_path):
    torch.save(tiny_dvae().state_dict(), tmp_path / "enc.pt")
    model = tiny_model(visual_tokenizer="dvae", dvae_path=str(tmp_path / "enc.pt"))
    assert isinstance(model.visual_tokenizer, DVAETokenizer)
    assert "mim" in model(make_batch()).losses
    with pytest.raises(ConfigError, match="dvae_path"):
        tiny_cfg(visual_tokenizer="dvae")



# --------------------------------------------------------------------------------------------
# Data stage: RandAugment without colour changes (§2.5)
# --------------------------------------------------------------------------------------------


def test_randaugment_changes_geometry_and_intensity_but_never_colour():
    import io

    from PIL import Image

    from alignlab.platform.ingest import decode_image

    im = np.zeros((32, 32, 3), dtype=np.uint8)
    im[..., 0], im[..., 1:] = 200, 30  # a red image
    im[8:16, 8:24] = (30, 30, 200)  # with a blue bar
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="PNG")
    plain = decode_image(buf.getvalue(), 32, True, (1.0, 1.0), False, np.random.default_rng(0))
    changed = 0
    for seed in range(40):
        out = decode_image(buf.getvalue(), 32, True, (1.0, 1.0), False, np.random.default_rng(seed), randaugment=True)
        assert out.shape == (3, 32, 32) and out.dtype == np.uint8
        r, g, b = out.astype(int)
        grey = (r == g) & (g == b)  # the fill of shears, translations and rotations
        red, blue = (r > g) & (r > b), (b > r) & (b > g)
        # Interpolated edges between red, blue and grey are mixtures; no pixel turns green.
        assert not ((g > r) & (g > b)).any()
        assert (red | blue | grey).mean() > 0.9
        changed += not np.array_equal(out, plain)
    assert changed > 10
    # Evaluation rows are never augmented.
    assert np.array_equal(decode_image(buf.getvalue(), 32, False, (1.0, 1.0), False, np.random.default_rng(3),
                                       randaugment=True), plain)


def test_presets_validate_and_carry_the_papers_settings():
    paper = load_config("simla_paper")
    s = paper.model.simla
    assert (paper.data.batch_size, s.queue_size, s.momentum, s.alpha, s.psl_k) == (512, 65536, 0.995, 0.4, 4)
    assert (paper.optim.weight_decay, paper.optim.lr, paper.optim.min_lr, paper.optim.schedule) == \
        (0.02, 1e-4, 1e-5, "cosine")
    assert paper.data.image_size == paper.model.image.img_size == 256 and paper.data.randaugment
    assert paper.model.image.timm_name == "vit_base_patch16_224" and paper.model.text_init == "bert-base-uncased"
    assert paper.precision.precision == "fp16" and paper.model.simla.components() == TABLE1["e"]
    cpu = load_config("simla_flickr8k_cpu")
    # BERT-base's [CLS] summarises the sentence; the sentence-transformers MiniLM's mean does.
    assert (s.itc_text_pooling, cpu.model.simla.itc_text_pooling) == ("cls", "mean")
    img = cpu.model.image
    # The packaged MobileNetV2, named portably (no site-packages path), frozen, under a 384-wide ViT.
    assert (img.trunk, img.trunk_pretrained, img.trunk_checkpoint, img.freeze_trunk) == ("mobilenet_v2", True, "", True)
    assert cpu.model.hidden_size == 384 and img.embed_dim in (0, 384) and img.timm_name == "vit_small_patch16_224"
    assert cpu.data.image_size == img.img_size == 224 and img.patch_size == 32  # a 7x7 grid at stride 32
    for name in ("simla_demo", "simla_flickr8k"):
        cfg = load_config(name)
        assert cfg.model.architecture == "simla" and cfg.tracking.eval_every > 0
        assert cfg.model.simla.queue_size % cfg.data.batch_size == 0
