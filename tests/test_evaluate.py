import pytest
import torch

from alignlab.platform.evaluate import chance_rsum, ranks_i2t, ranks_t2i, recall_metrics, rerank


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
