import pytest
import torch

from alignlab.models.base import PretrainingModel
from alignlab.platform.evaluate import (chance_rsum, evaluate_retrieval, pairwise_accuracy, ranks_i2t, ranks_t2i,
                                       recall_metrics, rerank)


def test_recall_on_a_known_ranking():
    # 3 images, 2 captions each: caption j belongs to image j // 2.
    caption_image = torch.tensor([0, 0, 1, 1, 2, 2])
    scores = torch.tensor([
        [0.9, 0.1, 0.8, 0.0, 0.0, 0.0],   # image 0: its caption ranks first
        [0.5, 0.0, 0.1, 0.2, 0.0, 0.0],   # image 1: best own caption (3) ranks second
        [0.0, 0.0, 0.0, 0.0, 0.1, 0.3],   # image 2: caption 5 first
    ])
    assert ranks_i2t(scores, caption_image).tolist() == [0, 1, 0]
    # caption 2 (of image 1) scores image 0 higher (.8 > .1): its image ranks second.
    assert ranks_t2i(scores, caption_image).tolist() == [0, 0, 1, 0, 0, 0]
    m = recall_metrics(scores, caption_image)
    assert m["i2t_r1"] == pytest.approx(100 * 2 / 3) and m["i2t_r5"] == 100.0
    assert m["t2i_r1"] == pytest.approx(100 * 5 / 6)
    assert m["rsum"] == sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    # Exact quotients of counts (a float32 mean gave 66.66666865...).
    assert m["i2t_r1"] == 100.0 * 2 / 3 and m["t2i_r1"] == 100.0 * 5 / 6


def test_perfect_scores_give_full_rsum_and_chance_is_low():
    caption_image = torch.arange(10).repeat_interleave(2)
    scores = (torch.arange(10)[:, None] == caption_image[None]).float()
    assert recall_metrics(scores, caption_image)["rsum"] == 600.0
    assert chance_rsum(200, 2) < 20


def test_rerank_scores_n_times_k_pairs_and_reorders():
    torch.manual_seed(0)
    n_img, caption_image = 20, torch.arange(20).repeat_interleave(2)
    scores = torch.randn(n_img, 40) * 0.1
    calls = []

    def match(img_idx, txt_idx):  # an oracle ITM head
        calls.append(len(img_idx))
        return (caption_image[txt_idx] == img_idx).float()

    i2t, t2i, pairs = rerank(scores, k_captions=8, k_images=4, match=match, batch_size=16)
    assert pairs == n_img * 8 + 40 * 4 == sum(calls)
    base = recall_metrics(scores, caption_image)
    after = recall_metrics(i2t, caption_image, scores_t2i=t2i)
    # Whenever the oracle sees the right candidate in the top-k, it moves it to rank 1.
    in_top_c = (caption_image[scores.topk(8, 1).indices] == torch.arange(n_img)[:, None]).any(1).float().mean()
    assert abs(after["i2t_r1"] - 100 * in_top_c.item()) < 1e-4
    assert after["rsum"] >= base["rsum"]
    # Candidates outside the top-k keep their uni-modal order.
    outside = torch.ones_like(scores, dtype=torch.bool).scatter_(1, scores.topk(8, 1).indices, False)
    assert torch.equal(i2t[outside], scores[outside])


def test_rerank_keeps_the_order_of_confident_match_scores():
    # Three captions of one image, all in the top-k; the ITM head is confident on all three and
    # prefers caption 2, then 0. Lifted by a constant 1e4 in float32 (spacing 2^-10 there) they tied.
    scores = torch.tensor([[0.3, 0.2, 0.1]])
    p = torch.tensor([0.99960, 0.99930, 0.99995])
    i2t, t2i, _ = rerank(scores, k_captions=3, k_images=1, match=lambda i, t: p[t])
    assert i2t.argsort(dim=1, descending=True).tolist() == [[2, 0, 1]]
    assert torch.equal(scores, torch.tensor([[0.3, 0.2, 0.1]]))  # the caller's scores stay as they were


# --------------------------------------------------------------------------------------------
# Compositional evaluation
# --------------------------------------------------------------------------------------------


def test_pairwise_accuracy_on_known_scores():
    # Group 7: true 0.9 beats swap_attribute (0.5), ties swap_relation (0.9).
    # Group 3: true 0.2 loses to swap_attribute (0.4), beats wrong_count (0.1).
    scores = torch.tensor([0.9, 0.5, 0.9, 0.4, 0.2, 0.1])
    types = torch.tensor([0, 1, 2, 1, 0, 3])
    groups = torch.tensor([7, 7, 7, 3, 3, 3])
    assert pairwise_accuracy(scores, types, groups) == {1: (0.5, 2), 2: (0.5, 1), 3: (1.0, 1)}
    with pytest.raises(ValueError, match="group 3 has a candidate of type 1 but no true caption"):
        pairwise_accuracy(scores[:4], types[:4], groups[:4])
    with pytest.raises(ValueError, match="two true captions"):
        pairwise_accuracy(scores, torch.tensor([0, 1, 2, 1, 0, 3]), torch.tensor([7, 7, 7, 7, 7, 7]))


class _Scored(PretrainingModel):
    """A model whose uni-modal cosine is ``input_ids[:, 0] / 10`` (image (1, 0), text (s, √(1-s²)))
    and whose ITM score is ``input_ids[:, 1]``; ``itm=False``: no multi-modal head."""

    def __init__(self, itm: bool = True):
        super().__init__()
        self.itm = itm

    def embed_images(self, batch):
        return torch.tensor([[1.0, 0.0]]).expand(len(batch["pixels"]), 2)

    def embed_texts(self, batch):
        s = batch["input_ids"][:, 0].float() / 10
        return torch.stack([s, (1 - s ** 2).sqrt()], dim=1)

    def match_scores(self, images, texts):
        assert "pixels" in images and "input_ids" in texts
        return texts["input_ids"][:, 1].float() if self.itm else None


def test_evaluate_compositional_reports_each_type_by_each_scorer():
    from alignlab.platform.evaluate import evaluate_compositional

    # (candidate_type, group_id, uni score x10, itm score) per row, in two batches.
    rows = [(0, 0, 8, 5), (1, 0, 6, 6), (2, 0, 9, 1),  # uni: swap_attr win, swap_rel loss; itm: loss, win
            (0, 1, 5, 5), (1, 1, 5, 2), (4, 1, 2, 9)]  # uni: tie, win; itm: win, loss
    batches = []
    for part in (rows[:4], rows[4:]):
        t = torch.tensor(part)
        batches.append({"candidate_type": t[:, 0], "group_id": t[:, 1], "input_ids": t[:, 2:],
                        "pixels": torch.zeros(len(part), 3, 2, 2)})
    model = _Scored()
    model.train()
    m = evaluate_compositional(model, batches, torch.device("cpu"))
    assert model.training  # restored
    assert m["compo/chance"] == 0.5
    assert m["compo/uni_acc_swap_attribute"] == 0.75 and m["compo/itm_acc_swap_attribute"] == 0.5
    assert m["compo/uni_acc_swap_relation"] == 0.0 and m["compo/itm_acc_swap_relation"] == 1.0
    assert m["compo/uni_acc_replace_object"] == 1.0 and m["compo/itm_acc_replace_object"] == 0.0
    assert m["compo/pairs_swap_attribute"] == 2 and m["compo/pairs_replace_object"] == 1
    assert m["compo/uni_acc_mean"] == pytest.approx((0.75 + 0.0 + 1.0) / 3)
    assert "compo/uni_acc_wrong_count" not in m  # no such candidate in the split
    uni_only = evaluate_compositional(_Scored(itm=False), batches, torch.device("cpu"))
    assert not any(k.startswith("compo/itm") for k in uni_only)
    assert uni_only["compo/uni_acc_swap_attribute"] == 0.75


def test_a_bag_of_words_scorer_is_at_chance_on_attribute_swaps(tmp_path):
    """The synthetic compositional split through the CPU stage (candidate_type and group_id passed
    through): a bag-of-words text embedding cannot tell an attribute swap from the truth, so it
    ties on every one and scores chance exactly, while it sees a replaced object."""

    import pyarrow.parquet as pq

    from alignlab.models.base import CONCEPT_OFFSET, InputSpec
    from alignlab.platform import shards
    from alignlab.platform.config import load_config
    from alignlab.platform.evaluate import evaluate_compositional
    from alignlab.platform.ingest import Preprocessor, columns_for
    from alignlab.platform.synth import SynthConfig, generate

    generate(str(tmp_path), SynthConfig(n_train_images=8, n_test_images=40, rows_per_file=1000))
    cfg = load_config("dual_encoder_demo", [f"data.shards={tmp_path}"])
    spec = InputSpec(tags=True)
    table = pq.read_table(tmp_path / "compositional", columns=columns_for(spec) + list(shards.COMPOSITIONAL_COLUMNS))
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    pre = Preprocessor(cfg.data, cfg.objectives, spec, train=False,
                       id_columns=shards.COMPOSITIONAL_COLUMNS)
    out = {k: torch.from_numpy(v) for k, v in pre(batch).items()}
    assert out["candidate_type"].tolist() == batch["candidate_type"].tolist()
    assert out["group_id"].tolist() == batch["group_id"].tolist()

    vocab = len(pre.tokenizer)
    shape_token = torch.tensor(pre.tokenizer.convert_tokens_to_ids(shards.read_vocab_file(str(tmp_path), "tags.txt")))

    class BagOfWords(torch.nn.Module):
        def embed_images(self, b):  # the image's shape words
            ids = torch.where(b["tag_mask"], shape_token[(b["tag_ids"] - CONCEPT_OFFSET).clamp(min=0)], 0)
            bag = torch.zeros(len(ids), vocab).scatter_add_(1, ids, b["tag_mask"].float())
            return torch.nn.functional.normalize(bag, dim=-1)

        def embed_texts(self, b):  # the caption's words, order ignored
            words = b["input_ids"] * (b["input_ids"] > 4)  # specials (ids 0-4) out
            bag = torch.zeros(len(words), vocab).scatter_add_(1, words, (words > 0).float())
            return torch.nn.functional.normalize(bag, dim=-1)

        def match_scores(self, images, texts):
            return None

    m = evaluate_compositional(BagOfWords(), [out], torch.device("cpu"))
    assert m["compo/pairs_swap_attribute"] >= 30 and m["compo/uni_acc_swap_attribute"] == 0.5
    assert m["compo/uni_acc_replace_object"] > 0.6


class _KeyEmbedder(PretrainingModel):
    """A retrieval model that embeds image and caption i as the one-hot of their image (a perfect
    uni-modal ranking), or, ``noisy``, as random vectors."""

    def __init__(self, noisy: bool):
        super().__init__()
        self.noisy = noisy

    def _embed(self, batch, seed):
        keys = batch["image_key"]
        if self.noisy:
            return torch.nn.functional.normalize(torch.randn(len(keys), 8, generator=torch.Generator().manual_seed(
                seed)), dim=-1)
        return torch.nn.functional.one_hot(keys, 8).float()

    def embed_images(self, batch):
        return self._embed(batch, 1)

    def embed_texts(self, batch):
        return self._embed(batch, 2)


def test_a_shortlist_model_ranks_and_the_model_re_ranks_its_top_k():
    """eval.shortlist: uni_* are the shortlisting model's ranking; the re-ranker's ITM re-scores
    its top k (SemVLP, which has no uni-modal ranking of its own)."""
    keys = torch.arange(8)
    batch = {"image_key": keys, "input_ids": keys[:, None], "region_features": keys[:, None, None].float()}

    class Reranker(_KeyEmbedder):
        def match_scores(self, images, texts):  # the oracle, from the region / token columns
            return (images["region_features"][:, 0, 0].long() == texts["input_ids"][:, 0]).float()

    reranker = Reranker(noisy=True)
    alone = evaluate_retrieval(reranker, [batch], torch.device("cpu"), k_captions=2, k_images=2)
    shortlisted = evaluate_retrieval(reranker, [batch], torch.device("cpu"), k_captions=2, k_images=2,
                                     shortlist=_KeyEmbedder(noisy=False))
    assert shortlisted["uni_rsum"] == 600.0 and shortlisted["rsum"] == 600.0
    assert alone["uni_rsum"] < 600.0 and alone["rsum"] <= shortlisted["rsum"]


def test_input_specs_union_asks_for_every_input_of_both():
    from alignlab.models.inputs import InputSpec

    semvlp = InputSpec(regions=True, tags=True, mlm=True)
    reference = InputSpec(regions=True, whole_image=True, text_features=True)
    both = semvlp.union(reference)
    assert (both.regions, both.tags, both.mlm, both.whole_image, both.text_features) == (True,) * 5
    assert not (both.pixels or both.mim or both.qa)
    simla = InputSpec(pixels=True, mim=True, mim_grid=5, mim_ratio=(0.3, 0.4))
    assert (reference.union(simla).mim_grid, reference.union(simla).mim_ratio) == (5, (0.3, 0.4))


def test_re_ranking_encodes_each_item_once_and_scores_as_pair_by_pair_encoding():
    """Re-ranking takes each image's and caption's states once (not once per re-scored pair) and
    ranks exactly as a model that encodes every pair anew."""
    keys = torch.arange(8)
    batch = {"image_key": keys, "input_ids": keys[:, None], "region_features": keys[:, None, None].float()}

    class PerPair(_KeyEmbedder):
        def match_scores(self, images, texts):  # the oracle, from the region / token columns
            return (images["region_features"][:, 0, 0].long() == texts["input_ids"][:, 0]).float()

    class Cached(PerPair):
        encoded = {"images": 0, "texts": 0}

        def match_image_states(self, images):
            self.encoded["images"] += len(images["region_features"])
            return {"key": images["region_features"][:, 0, 0].long()}

        def match_text_states(self, texts):
            self.encoded["texts"] += len(texts["input_ids"])
            return {"key": texts["input_ids"][:, 0]}

        def match_from_states(self, images, texts):
            return (images["key"] == texts["key"]).float()

    cached = Cached(noisy=True)
    via_states = evaluate_retrieval(cached, [batch], torch.device("cpu"), k_captions=3, k_images=3, batch_size=5)
    per_pair = evaluate_retrieval(PerPair(noisy=True), [batch], torch.device("cpu"), k_captions=3, k_images=3)
    assert via_states == per_pair and via_states["itm_pairs"] == 48.0
    assert cached.encoded == {"images": 8, "texts": 8}


def test_eval_prints_a_reranked_line_only_where_itm_re_ranked():
    from alignlab.platform.cli import retrieval_lines

    recalls = {f"{d}_r{k}": float(k) for d in ("i2t", "t2i") for k in (1, 5, 10)}
    uni = {**{f"uni_{k}": v for k, v in recalls.items()}, "uni_rsum": 32.0}
    base = {"eval_images": 1000.0, "eval_captions": 5000.0, **uni}
    # No ITM: the evaluation logs the uni-modal ranking under both names.
    plain = retrieval_lines({**base, **recalls, "rsum": 32.0})
    assert plain[0] == "1000 images, 5000 captions scored"
    assert plain[1].startswith("uni-modal") and plain[1].endswith("RSUM 32.0")
    assert not any(line.startswith("ITM re-ranked") for line in plain)
    assert plain[-1].startswith("not re-ranked")
    reranked = retrieval_lines({**base, **{k: v + 1 for k, v in recalls.items()}, "rsum": 38.0, "itm_pairs": 24.0})
    assert [line.split()[0] for line in reranked[1:]] == ["uni-modal", "ITM"]
    assert reranked[2].endswith("RSUM 38.0") and "i2t_r1 2.0" in reranked[2]
