"""SemVLP (Li et al., 2021): the two modes share every self-attention and FFN tensor and differ by
the cross-attention above L_s only; two-stream text never sees the image; the mode alternates at
about 0.5 and identically on every rank; mismatched pairs carry no MLM or object loss; the object
losses read masked objects only; the CPU stage masks objects and labels QA rows with their
answers.txt index; BERT initialisation; retrieval fine-tuning's pinned mode, switched-off tasks and
hard ITM pairs."""
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import save_tiny_bert

from alignlab.models.base import Vocab
from alignlab.models.blocks import MultiHeadAttention, TransformerSize
from alignlab.models.objectives import feature_regression_loss
from alignlab.models.registry import build_model
from alignlab.models.semvlp import SemVLP
from alignlab.platform.config import ConfigError, load_config
from alignlab.models.base import IGNORE
from alignlab.platform.masking import object_mask

VOCAB = Vocab(size=30, pad_id=0, cls_id=1, sep_id=2, mask_id=3, tags=("circle", "square", "triangle"))
LAYERS = 4


def _cfg(*extra):
    return load_config(None, ["model.architecture=semvlp", "model.image.kind=regions", "model.image.region_dim=8",
                              "model.hidden_size=16", "model.num_heads=2", "model.intermediate_size=32",
                              f"model.num_layers={LAYERS}", "model.dropout=0.0", "model.semvlp.cross_layer=2",
                              *extra])


def _model(*extra, vocab: Vocab = VOCAB) -> SemVLP:
    torch.manual_seed(0)
    cfg = _cfg(*extra)
    return build_model(cfg.model, cfg.objectives, vocab)


def _batch(n=6, seed=1):
    """A batch in the CPU stage's layout: every row has masked words and masked objects."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 30, (n, 7), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    mlm_ids, mlm_labels = ids.clone(), torch.full_like(ids, IGNORE)
    mlm_ids[:, 2:4], mlm_labels[:, 2:4] = 3, ids[:, 2:4]
    feats = torch.randn(n, 3, 8, generator=g)
    region_mask = torch.ones(n, 3, dtype=torch.bool)
    region_mask[0, 2] = False
    masked = torch.zeros(n, 3, dtype=torch.bool)
    masked[:, 0] = True
    labels = torch.randint(0, 3, (n, 3), generator=g).masked_fill(~masked, IGNORE)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), mlm_input_ids=mlm_ids, mlm_labels=mlm_labels,
                region_features=feats, masked_region_features=feats.masked_fill(masked[..., None], 0.0),
                boxes=torch.rand(n, 3, 4, generator=g), region_mask=region_mask, object_mask=masked,
                object_labels=labels, image_key=torch.arange(n), caption_key=torch.arange(n))


def _fix_pairs(monkeypatch, matched):
    """ITM pairing fixed: mismatched rows take the next row's caption."""
    matched = torch.tensor(matched)
    n = len(matched)
    rows = torch.where(matched, torch.arange(n), (torch.arange(n) + 1) % n)
    monkeypatch.setattr(SemVLP, "mismatch", staticmethod(lambda keys, prob=0.5: (rows, matched)))


def _grads(model, batch, mode):
    model.zero_grad(set_to_none=True)
    model.mode = mode
    out = model(batch)
    sum(out.losses.values()).backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}, out


# --------------------------------------------------------------------------------------------
# Architecture: sharing and L_s
# --------------------------------------------------------------------------------------------


def test_both_modes_train_the_same_self_attention_and_ffn_tensors(monkeypatch):
    """The same parameter objects receive gradient in both modes; two-stream adds exactly the
    cross-attention of the layers above L_s, nothing else."""
    _fix_pairs(monkeypatch, [True, False] * 3)
    model = _model()
    single, _ = _grads(model, _batch(), "single")
    two, _ = _grads(model, _batch(), "two")
    cross = {n for n, _ in model.named_parameters() if ".crossattention." in n}
    assert cross and two - single == cross
    assert single - two == set()
    shared = {n for n in single if n.startswith("encoder.")}
    for i in range(LAYERS):
        for part in ("attention.query.weight", "attention.dense.weight", "intermediate.weight", "output.weight"):
            assert f"encoder.layers.{i}.{part}" in shared
    # One copy: the encoder's self-attention/FFN tensors are its only transformer weights.
    assert not any(n.startswith(("text_encoder", "image_encoder", "fusion")) for n, _ in model.named_parameters())


def test_same_tensor_drives_both_modes():
    """Editing one self-attention weight in place changes the outputs of both modes."""
    model = _model().eval()
    b = _batch()
    before = {m: model.match_scores(b, b) for m in ("single", "two")}
    with torch.no_grad():
        model.encoder.layers[0].attention.value.weight.mul_(3.0)
    for m in ("single", "two"):
        model.eval_mode = m
        assert not torch.allclose(model.match_scores(b, b), before[m])


@pytest.mark.parametrize("cross_layer", [0, 1, 2, 3])
def test_cross_attention_exists_only_above_L_s_and_is_all_two_stream_adds(cross_layer):
    both = _model(f"model.semvlp.cross_layer={cross_layer}")
    assert [layer.crossattention is not None for layer in both.encoder.layers] == \
        [i >= cross_layer for i in range(LAYERS)]
    single = _model(f"model.semvlp.cross_layer={cross_layer}", "model.semvlp.mode=single")
    assert all(layer.crossattention is None for layer in single.encoder.layers)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    per_module = sum(p.numel() for p in MultiHeadAttention(TransformerSize(16, 2, 32)).parameters())
    assert count(both) - count(single) == (LAYERS - cross_layer) * per_module


def test_L_s_range_is_checked():
    with pytest.raises(ConfigError, match="cross_layer"):
        _cfg(f"model.semvlp.cross_layer={LAYERS + 1}")
    with pytest.raises(ConfigError, match="no cross-attending layer"):
        _cfg(f"model.semvlp.cross_layer={LAYERS}")
    assert _cfg(f"model.semvlp.cross_layer={LAYERS}", "model.semvlp.mode=single").model.semvlp.cross_layer == LAYERS
    with pytest.raises(ConfigError, match="model.image.kind"):
        load_config(None, ["model.architecture=semvlp", "model.image.kind=vit"])


def test_two_stream_text_outputs_do_not_depend_on_the_image():
    model = _model().eval()
    b, other = _batch(seed=1), _batch(seed=2)
    args = lambda x: model.embed_objects(x["region_features"], x["boxes"], x["region_mask"])  # noqa: E731
    o1, h1 = model.encode("two", *args(b), b["input_ids"], b["attention_mask"])
    o2, h2 = model.encode("two", *args(other), b["input_ids"], b["attention_mask"])
    torch.testing.assert_close(h1, h2, rtol=0, atol=0)
    assert not torch.allclose(o1, o2)
    # The image does reach the objects through the text: other text, other object states.
    o3, _ = model.encode("two", *args(b), other["input_ids"], b["attention_mask"])
    assert not torch.allclose(o1, o3)
    # Single-stream, by contrast, lets the text see the image.
    _, s1 = model.encode("single", *args(b), b["input_ids"], b["attention_mask"])
    _, s2 = model.encode("single", *args(other), b["input_ids"], b["attention_mask"])
    assert not torch.allclose(s1, s2)


# --------------------------------------------------------------------------------------------
# Alternation
# --------------------------------------------------------------------------------------------


def test_mode_alternates_at_about_one_half_and_every_rank_agrees():
    rank0, rank1 = _model(), _model()
    modes0, modes1 = [], []
    for step in range(2000):
        rank0.begin_step(step, 100)
        rank1.begin_step(step, 100)
        modes0.append(rank0.mode)
        modes1.append(rank1.mode)
    assert modes0 == modes1  # seeded by the step: lock-step across DDP ranks and on resume
    frac = modes0.count("single") / len(modes0)
    assert 0.46 < frac < 0.54  # 0.5 ± ~3.6 standard deviations
    assert max(len(list(g)) for g in _runs(modes0)) < 20  # alternating, not a few long blocks
    assert rank0.find_unused_parameters


def _runs(xs):
    import itertools
    return (list(g) for _, g in itertools.groupby(xs))


def test_single_mode_models_never_switch():
    for mode in ("single", "two"):
        model = _model(f"model.semvlp.mode={mode}")
        for step in range(50):
            model.begin_step(step, 10)
            assert model.mode == mode
        assert not model.find_unused_parameters


def test_losses_and_mode_metric_are_named_per_mode(monkeypatch):
    _fix_pairs(monkeypatch, [True, False] * 3)
    model = _model()
    for mode, flag in (("single", 1.0), ("two", 0.0)):
        model.mode = mode
        out = model(_batch())
        assert set(out.losses) == {f"{t}_{mode}" for t in ("mlm", "roi_regression", "object_label", "itm")}
        assert out.metrics["mode_single"].item() == flag
        assert all(torch.isfinite(v) and v > 0 for v in out.losses.values())


# --------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------


def test_itm_pairing_mismatches_about_half_and_never_with_the_same_image():
    torch.manual_seed(0)
    keys = torch.tensor([0, 0, 1, 1, 2, 3, 4, 5])
    swapped = 0
    for _ in range(300):
        rows, matched = SemVLP.mismatch(keys)
        assert (rows[matched] == torch.arange(8)[matched]).all()
        assert (keys[rows[~matched]] != keys[~matched]).all()
        swapped += int((~matched).sum())
    assert 0.45 < swapped / (300 * 8) < 0.55
    # A batch showing one image has no caption of another image: every pair stays matched.
    rows, matched = SemVLP.mismatch(torch.zeros(4, dtype=torch.long))
    assert matched.all()


@pytest.mark.parametrize("mode", ["single", "two"])
def test_no_mlm_or_object_loss_on_mismatched_pairs(monkeypatch, mode):
    model = _model()
    model.mode = mode
    b = _batch()
    # Labels only on rows 1, 3, 5, which are mismatched: nothing to predict, no gradient.
    b["mlm_labels"][0::2] = IGNORE
    b["object_mask"][0::2] = False
    b["object_labels"][0::2] = IGNORE
    _fix_pairs(monkeypatch, [True, False] * 3)
    out = model(b)
    for task in ("mlm", "roi_regression", "object_label"):
        assert out.losses[f"{task}_{mode}"].item() == 0.0
    assert out.losses[f"itm_{mode}"] > 0
    # The same labels on matched pairs are predicted.
    _fix_pairs(monkeypatch, [False, True] * 3)
    out = model(b)
    for task in ("mlm", "roi_regression", "object_label"):
        assert out.losses[f"{task}_{mode}"] > 0


def test_mismatched_caption_travels_with_its_mlm_labels(monkeypatch):
    """With every pair matched except through the pairing, the MLM loss of a swapped batch equals
    the loss of the same captions paired by hand (labels follow the sentence, not the row)."""
    model = _model()
    model.mode = "two"  # text alone: the image cannot change the MLM loss
    b = _batch()
    _fix_pairs(monkeypatch, [True] * 6)
    reference = model(b).losses["mlm_two"]
    perm = torch.tensor([1, 2, 3, 4, 5, 0])
    monkeypatch.setattr(SemVLP, "mismatch", staticmethod(lambda keys, prob=0.5: (perm, torch.ones(6, dtype=torch.bool))))
    torch.testing.assert_close(model(b).losses["mlm_two"], reference)


@pytest.mark.parametrize("mode", ["single", "two"])
def test_object_losses_read_masked_objects_only(monkeypatch, mode):
    _fix_pairs(monkeypatch, [True] * 6)
    model = _model()
    model.mode = mode
    b = _batch()
    base = model(b).losses
    # The targets of unmasked objects (their features changed only as targets, the encoder's
    # input staying the same; their labels set where the CPU stage leaves IGNORE) do not count.
    b2 = {k: v.clone() for k, v in b.items()}
    b2["region_features"][:, 1:] += 5.0
    b2["object_labels"][:, 1:] = 0
    out = model(b2).losses
    torch.testing.assert_close(out[f"roi_regression_{mode}"], base[f"roi_regression_{mode}"])
    torch.testing.assert_close(out[f"object_label_{mode}"], base[f"object_label_{mode}"])
    # A masked object's own target does.
    b3 = {k: v.clone() for k, v in b.items()}
    b3["region_features"][:, 0] += 5.0
    b3["object_labels"][:, 0] = (b3["object_labels"][:, 0] + 1) % 3
    out = model(b3).losses
    assert out[f"roi_regression_{mode}"] > base[f"roi_regression_{mode}"]
    assert not torch.allclose(out[f"object_label_{mode}"], base[f"object_label_{mode}"])


def test_feature_regression_loss_by_hand():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert feature_regression_loss(pred, target).item() == pytest.approx((1 + 4 + 1 + 1) / 4)
    empty = torch.zeros(0, 2, requires_grad=True)
    loss = feature_regression_loss(empty, torch.zeros(0, 2))
    assert loss.item() == 0.0 and loss.requires_grad


def test_qa_head_trains_on_rows_with_answers_only(monkeypatch):
    _fix_pairs(monkeypatch, [True, False] * 3)
    model = _model("model.semvlp.num_answers=5", vocab=replace(VOCAB, answers=tuple("abcde")))
    b = _batch()
    assert "qa_single" not in model(b).losses  # caption batches carry no answers
    b["answer_labels"] = torch.tensor([4, 2, IGNORE, 1, 0, 3])
    out = model(b).losses["qa_single"]
    # Rows 0 and 4 are matched and answered; row 2 has no answer; odd rows are mismatched.
    o, h = model.encode("single", *model.embed_objects(b["masked_region_features"], b["boxes"], b["region_mask"]),
                        b["mlm_input_ids"], b["attention_mask"])
    expected = torch.nn.functional.cross_entropy(model.qa_head(h[[0, 4], 0]), torch.tensor([4, 0]))
    torch.testing.assert_close(out, expected)


def test_num_answers_turns_qa_on_and_must_cover_answers_txt():
    with pytest.raises(ValueError, match=r"model.semvlp.num_answers = 5 turns image QA on, but the shard set has "
                                         r"no answers.txt"):
        _model("model.semvlp.num_answers=5")
    with pytest.raises(ValueError, match=r"model.semvlp.num_answers = 5 is smaller than the shard set's answers.txt "
                                         r"\(6 answers\); set model.semvlp.num_answers=6"):
        _model("model.semvlp.num_answers=5", vocab=replace(VOCAB, answers=tuple("abcdef")))
    assert _model("model.semvlp.num_answers=7", vocab=replace(VOCAB, answers=tuple("abcdef"))).qa_head is not None
    # num_answers = 0 is off whatever the shard set holds: no head, and the CPU stage reads no QA columns.
    assert _model(vocab=replace(VOCAB, answers=tuple("ab"))).qa_head is None
    off, on = _cfg(), _cfg("model.semvlp.num_answers=2")
    assert not SemVLP.input_spec(off.model, off.objectives).qa and SemVLP.input_spec(on.model, on.objectives).qa


# --------------------------------------------------------------------------------------------
# Retrieval interface, initialisation, CPU stage
# --------------------------------------------------------------------------------------------


def test_retrieval_interface_and_eval_mode():
    model = _model().eval()
    b = _batch()
    img, txt = model.embed_images(b), model.embed_texts(b)
    assert img.shape == txt.shape == (6, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(6))
    scores = {}
    for mode in ("single", "two"):
        model.eval_mode = mode
        scores[mode] = model.match_scores(b, b)
        assert scores[mode].shape == (6,) and ((scores[mode] > 0) & (scores[mode] < 1)).all()
    assert not torch.allclose(scores["single"], scores["two"])
    assert _model("model.semvlp.mode=two").eval_mode == "two"
    assert _model().eval_mode == "single"  # Table 5: single-stream fine-tuning is better


# --------------------------------------------------------------------------------------------
# Retrieval fine-tuning: one mode, ITM alone, hard pairs
# --------------------------------------------------------------------------------------------

RETRIEVAL = ("model.semvlp.itm_pairs=hard", "model.semvlp.single_prob=1.0", "objectives.itm_negatives=hardest",
             *(f"objectives.weights.{t}_{m}=0" for t in ("mlm", "roi_regression", "object_label", "qa")
               for m in ("single", "two")))


def _clean_batch(n=6, seed=1):
    """What the CPU stage prepares with every masked-prediction task off: no masks."""
    b = _batch(n, seed)
    return {k: v for k, v in b.items() if k not in ("mlm_input_ids", "mlm_labels", "masked_region_features",
                                                    "object_mask", "object_labels")}


def test_single_prob_one_pins_every_step_to_single_stream():
    model = _model("model.semvlp.single_prob=1.0")
    for step in range(200):
        model.begin_step(step, 10)
        assert model.mode == "single"
    assert model.modes == ("single",) and model.find_unused_parameters  # cross-attention stays, unused
    # One rule for a pinned mode and a single-mode model: the evaluated mode must be trained.
    for pinned in (("model.semvlp.single_prob=0.0", "model.semvlp.eval_mode=single"),
                   ("model.semvlp.mode=two", "model.semvlp.eval_mode=single")):
        with pytest.raises(ConfigError, match="which no step trains.*model.semvlp.eval_mode='two'"):
            _cfg(*pinned)
    with pytest.raises(ConfigError, match="model.semvlp.eval_mode='single'"):
        _cfg("model.semvlp.mode=single", "model.semvlp.eval_mode=two")


def test_switched_off_prediction_tasks_prepare_no_masks():
    cfg = _cfg(*RETRIEVAL)
    spec = SemVLP.input_spec(cfg.model, cfg.objectives)
    assert not spec.mlm and not spec.objects and spec.regions
    # Off in the pinned mode's tasks only is enough: two-stream steps never run.
    cfg = _cfg("model.semvlp.single_prob=1.0", *(f"objectives.weights.{t}_single=0"
                                                 for t in ("mlm", "roi_regression", "object_label")))
    assert not SemVLP.input_spec(cfg.model, cfg.objectives).mlm
    cfg = _cfg()
    assert SemVLP.input_spec(cfg.model, cfg.objectives).mlm and SemVLP.input_spec(cfg.model, cfg.objectives).objects


def test_hard_pairs_draw_the_most_similar_caption_of_another_image():
    """Captions 0 and 3 are word for word the same (different images), so each is the other's
    hardest negative (cosine 1); rows 4 and 5 show one image, so never each other's."""
    model = _model(*RETRIEVAL)
    b = _clean_batch()
    b["input_ids"][3] = b["input_ids"][0]
    b["image_key"] = torch.tensor([0, 1, 2, 3, 4, 4])
    image_rows, text_rows, matched, positive_of = model.hard_pairs(b)
    n = 6
    assert positive_of.tolist() == list(range(n)) * 2
    assert image_rows.shape == text_rows.shape == (3 * n,)
    assert matched.tolist() == [True] * n + [False] * 2 * n
    assert (image_rows[:n] == torch.arange(n)).all() and (text_rows[:n] == torch.arange(n)).all()
    neg_caption = dict(zip(image_rows[n:2 * n].tolist(), text_rows[n:2 * n].tolist()))  # image -> caption
    neg_image = dict(zip(text_rows[2 * n:].tolist(), image_rows[2 * n:].tolist()))  # caption -> image
    assert neg_caption[0] == 3 and neg_caption[3] == 0 and neg_image[0] == 3 and neg_image[3] == 0
    keys = b["image_key"]
    assert (keys[image_rows[n:]] != keys[text_rows[n:]]).all()


def test_shortlist_pairs_draw_each_images_and_each_captions_nearest_miss_by_the_retriever():
    """``itm_pairs: shortlist`` reads the retriever's image-by-caption scores, rows for the negative
    caption of an image, columns for the negative image of a caption: here they differ, so a
    transposed read would pick other rows."""
    model = _model(*RETRIEVAL, "model.semvlp.itm_pairs=shortlist")
    cfg = _cfg(*RETRIEVAL, "model.semvlp.itm_pairs=shortlist")
    assert SemVLP.input_spec(cfg.model, cfg.objectives).shortlist_scores
    assert not SemVLP.input_spec(_cfg(*RETRIEVAL).model, cfg.objectives).shortlist_scores
    b = _clean_batch()
    b["image_key"] = torch.tensor([0, 1, 2, 3, 4, 4])
    scores = torch.rand(6, 6, generator=torch.Generator().manual_seed(3))
    b["shortlist_scores"] = scores
    image_rows, text_rows, matched, _ = model.hard_pairs(b)
    n = 6
    assert matched.tolist() == [True] * n + [False] * 2 * n
    others = scores.masked_fill(b["image_key"][:, None] == b["image_key"][None, :], -1.0)
    best_caption, best_image = others.argmax(1), others.argmax(0)  # hardest mode: the nearest miss
    assert (best_caption != best_image).any()
    assert text_rows[n:2 * n].tolist() == best_caption[image_rows[n:2 * n]].tolist()
    assert image_rows[2 * n:].tolist() == best_image[text_rows[2 * n:]].tolist()
    assert sorted(image_rows[n:2 * n].tolist()) == sorted(text_rows[2 * n:].tolist()) == list(range(n))
    b.pop("shortlist_scores")
    with pytest.raises(KeyError, match="shortlist_scores"):
        model.hard_pairs(b)


def test_retrieval_itm_loss_is_cross_entropy_over_positives_and_both_negatives():
    """ITM alone, on clean inputs: the loss equals the 2-way cross-entropy of each pair encoded by
    itself, positives labelled 1 and the 2n negatives 0."""
    model = _model(*RETRIEVAL).eval()
    model.begin_step(0, 10)
    b = _clean_batch()
    out = model(b)
    assert set(out.losses) == {"itm_single"}
    image_rows, text_rows, matched, _ = model.hard_pairs(b)
    expected = torch.nn.functional.cross_entropy(_pair_logits(model, b, image_rows, text_rows), matched.long())
    torch.testing.assert_close(out.losses["itm_single"], expected, rtol=1e-4, atol=1e-5)
    out.losses["itm_single"].backward()
    assert next(model.itm_head.parameters()).grad is not None
    assert all(p.grad is None for p in model.mlm_head.parameters())


def _pair_logits(model, b, image_rows, text_rows):
    """ITM's logits of each (image row, text row) pair encoded by itself, in single-stream mode."""
    logits = []
    for i, t in zip(image_rows.tolist(), text_rows.tolist()):
        x, mask = model.embed_objects(b["region_features"][i:i + 1], b["boxes"][i:i + 1], b["region_mask"][i:i + 1])
        o, h = model.encode("single", x, mask, b["input_ids"][t:t + 1], b["attention_mask"][t:t + 1])
        logits.append(model.itm_head(model.pooled("single", o, h)))
    return torch.cat(logits)


def test_ranking_itm_loss_hinges_each_negative_on_its_own_positive():
    """``itm_loss: ranking``: mean over the 2n negatives of max(0, m + p(negative) - p(its
    positive)), p = p(match) of the pair encoded by itself; rows 4 and 5 show one image, so they
    stay each other's non-negatives and the hinge still pairs every negative with its own row."""
    model = _model(*RETRIEVAL, "model.semvlp.itm_loss=ranking", "model.semvlp.rank_margin=0.3").eval()
    model.begin_step(0, 10)
    b = _clean_batch()
    b["image_key"] = torch.tensor([0, 1, 2, 3, 4, 4])
    out = model(b)
    image_rows, text_rows, matched, positive_of = model.hard_pairs(b)
    p = _pair_logits(model, b, image_rows, text_rows).softmax(-1)[:, 1]
    n = 6
    keys = b["image_key"]
    assert (keys[image_rows[n:]] != keys[text_rows[n:]]).all()  # no negative shows its own image
    assert ((image_rows[n:] == positive_of) | (text_rows[n:] == positive_of)).all()  # each shares one side
    pos = p[:n][positive_of]
    by_hand = torch.stack([max(torch.tensor(0.0), 0.3 + neg - q) for neg, q in zip(p[n:], pos)]).mean()
    torch.testing.assert_close(out.losses["itm_single"], by_hand, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.metrics["itm_rank_acc_single"], (pos > p[n:]).float().mean())
    out.losses["itm_single"].backward()
    assert next(model.itm_head.parameters()).grad.abs().sum() > 0


def test_ranking_itm_loss_needs_pairs_that_keep_their_positive():
    with pytest.raises(ConfigError, match="model.semvlp.itm_pairs to 'hard' or 'shortlist'"):
        _cfg("model.semvlp.itm_loss=ranking")
    with pytest.raises(ConfigError, match="rank_margin"):
        _cfg(*RETRIEVAL, "model.semvlp.itm_loss=ranking", "model.semvlp.rank_margin=1.0")
    with pytest.raises(ConfigError, match="binary.*ranking|ranking.*binary"):
        _cfg(*RETRIEVAL, "model.semvlp.itm_loss=rank")


def test_shared_encoder_initialises_from_bert(tmp_path):
    hf = save_tiny_bert(tmp_path / "bert", LAYERS)
    model = _model(f"model.text_init={tmp_path / 'bert'}")
    for i in range(LAYERS):
        torch.testing.assert_close(model.encoder.layers[i].attention.query.weight,
                                   hf.encoder.layer[i].attention.self.query.weight)
        torch.testing.assert_close(model.encoder.layers[i].output.weight, hf.encoder.layer[i].output.dense.weight)
    torch.testing.assert_close(model.text_embeddings.word_embeddings.weight, hf.embeddings.word_embeddings.weight)


def test_object_mask_selects_real_objects_at_the_rate():
    rng = np.random.default_rng(0)
    region_mask = np.zeros((400, 10), dtype=bool)
    region_mask[:, :6] = True
    sel = object_mask(region_mask, 0.15, rng)
    assert not (sel & ~region_mask).any()
    assert 0.13 < sel.sum() / region_mask.sum() < 0.17


def test_preprocessor_zeroes_masked_objects_and_labels_them_with_their_tags(tmp_path):
    import pyarrow.parquet as pq

    from alignlab.platform import shards
    from alignlab.platform.ingest import Preprocessor, columns_for
    from alignlab.platform.synth import SynthConfig, generate

    generate(str(tmp_path), SynthConfig(n_train_images=60, n_test_images=4, rows_per_file=200))
    cfg = load_config("semvlp_demo", [f"data.shards={tmp_path}", "objectives.object_mask_prob=0.3"])
    spec = SemVLP.input_spec(cfg.model, cfg.objectives)
    table = pq.read_table(shards.list_parquet(str(tmp_path / "train"))[0], columns=columns_for(spec))
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    out = Preprocessor(cfg.data, cfg.objectives, spec, train=True)(batch)
    tags = shards.read_vocab_file(str(tmp_path), "tags.txt")
    sel = out["object_mask"]
    assert not (sel & ~out["region_mask"]).any()
    assert 0.2 < sel.sum() / out["region_mask"].sum() < 0.4
    assert (out["masked_region_features"][sel] == 0).all()
    assert (out["masked_region_features"][~sel] == out["region_features"][~sel]).all()
    assert (out["region_features"][sel] != 0).any(axis=-1).all()  # the regression targets stay
    assert (out["object_labels"][~sel] == IGNORE).all()
    for i, j in zip(*np.nonzero(sel)):
        assert out["object_labels"][i, j] == tags.index(batch["tags"][i][j])
    assert "mlm_labels" in out and "boxes" in out


ANSWERS = ["yes", "no", "red"]


@pytest.fixture(scope="module")
def qa_shards(tmp_path_factory):
    """A small synthetic shard set with an answers.txt."""
    from alignlab.platform.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("qa")
    generate(str(root), SynthConfig(n_train_images=6, n_test_images=2, captions_per_image=1, rows_per_file=100))
    (root / "answers.txt").write_text("".join(a + "\n" for a in ANSWERS))
    return root


def _qa_batches(root):
    """(config, spec, caption batch, mixed batch) in the shard columns' numpy layout. The mixed
    batch: rows 0-1 caption rows, rows 2-5 QA rows (question repeated in caption, as the shards
    store it) answered "blue" (not in answers.txt), "no", "yes", "red"."""
    import pyarrow.parquet as pq

    from alignlab.platform import shards
    from alignlab.platform.ingest import columns_for

    cfg = load_config("semvlp_demo", [f"data.shards={root}", f"model.semvlp.num_answers={len(ANSWERS)}"])
    spec = SemVLP.input_spec(cfg.model, cfg.objectives)
    assert spec.qa and columns_for(spec)[-2:] == ["question", "answer"]
    table = pq.read_table(shards.list_parquet(str(root / "train"))[0], columns=columns_for(replace(spec, qa=False)))
    captions = {c: table.column(c).to_numpy(zero_copy_only=False)[:6] for c in table.column_names}
    mixed = {k: v.copy() for k, v in captions.items()}
    questions = [None, None, "what colour is the circle", "is there a square", "is it a circle", "what colour"]
    mixed["question"] = np.array(questions, dtype=object)
    mixed["answer"] = np.array([None, None, "blue", "no", "yes", "red"], dtype=object)
    mixed["caption"][2:] = questions[2:]
    return cfg, spec, captions, mixed


def test_preprocessor_labels_qa_rows_with_their_answers_txt_index(qa_shards):
    from alignlab.platform.ingest import Preprocessor

    cfg, spec, captions, mixed = _qa_batches(qa_shards)
    calls = []
    counter = SimpleNamespace(add=SimpleNamespace(remote=lambda *args: calls.append(args)))
    pre = Preprocessor(cfg.data, cfg.objectives, spec, train=True, counter=counter)
    out = pre(mixed)
    assert out["answer_labels"].dtype == np.int64
    assert out["answer_labels"].tolist() == [IGNORE, IGNORE, IGNORE, 1, 0, 2]
    # An answer outside answers.txt is a note, not a skip: its row keeps its other objectives.
    assert len(out["input_ids"]) == 6 and calls == [([], [("answer_not_in_vocab", str(mixed["caption_id"][2]))], True)]
    # Shards without QA columns (caption corpora) yield no answer_labels at all.
    assert "answer_labels" not in pre(captions)


@pytest.mark.parametrize("mode", ["single", "two"])
def test_qa_loss_from_preprocessed_qa_rows_trains_the_qa_head(monkeypatch, qa_shards, mode):
    from alignlab.platform.ingest import Preprocessor
    from alignlab.platform.tokenization import load_tokenizer, vocab_info

    cfg, spec, captions, mixed = _qa_batches(qa_shards)
    vocab = vocab_info(load_tokenizer(cfg.data.tokenizer, str(qa_shards)), str(qa_shards))
    assert vocab.answers == tuple(ANSWERS)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.objectives, vocab)
    pre = Preprocessor(cfg.data, cfg.objectives, spec, train=True)
    _fix_pairs(monkeypatch, [True] * 6)
    as_torch = lambda b: {k: torch.from_numpy(v) for k, v in pre(b).items()}  # noqa: E731

    grads, out = _grads(model, as_torch(mixed), mode)
    loss = out.losses[f"qa_{mode}"]
    assert torch.isfinite(loss) and loss > 0
    assert {"qa_head.decoder.weight", "qa_head.decoder.bias"} <= grads
    # Caption rows only: no QA columns, no qa loss; QA columns but null questions, a zero one.
    _, out = _grads(model, as_torch(captions), mode)
    assert not any(k.startswith("qa_") for k in out.losses)
    mixed_captions = {**mixed, "question": np.array([None] * 6, dtype=object)}
    grads, out = _grads(model, as_torch(mixed_captions), mode)
    assert out.losses[f"qa_{mode}"].item() == 0.0 and not any(n.startswith("qa_head") for n in grads)
