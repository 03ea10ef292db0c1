import math

import pytest
import torch

from alignlab.models.objectives import (contrastive_loss, hard_negative_weights, itm_ranking_loss, masked_token_loss,
                                        same_item_mask, sample_hard_negatives)


def test_contrastive_loss_hand_computed_2x2():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(2.0)
    # S = image @ text.T = [[1, .6], [0, .8]]; logits = 2 S.
    # i2t row 0: -log(e^2 / (e^2 + e^1.2)); row 1: -log(e^1.6 / (e^0 + e^1.6))
    # t2i row 0 (text 0 vs images): [2, 0] -> -log(e^2/(e^2+1)); row 1: [1.2, 1.6] -> -log(e^1.6/(e^1.2+e^1.6))
    i2t = -math.log(math.exp(2) / (math.exp(2) + math.exp(1.2))) - math.log(math.exp(1.6) / (1 + math.exp(1.6)))
    t2i = -math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))
    expected = 0.5 * (i2t / 2 + t2i / 2)
    assert contrastive_loss(image, text, scale).item() == pytest.approx(expected, abs=1e-6)


def test_hard_negatives_never_return_the_positive_or_same_image():
    torch.manual_seed(0)
    logits = torch.randn(8, 8) * 3
    ids = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])  # rows 0 and 1 are captions of one image
    same = same_item_mask(ids, ids)
    for _ in range(200):
        idx, valid = sample_hard_negatives(logits, same)
        assert valid.all()
        assert not same[torch.arange(8), idx].any()
    idx, _ = sample_hard_negatives(logits, same, mode="hardest")
    expected = logits.masked_fill(same, float("-inf")).argmax(1)
    assert torch.equal(idx, expected)


def test_hard_negatives_follow_the_softmax_distribution():
    logits = torch.tensor([[5.0, 1.0, 2.0, 0.0]])  # column 0 is the positive
    same = torch.tensor([[True, False, False, False]])
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_hard_negatives(logits, same, generator=g)[0] for _ in range(20000)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    p = torch.tensor([1.0, 2.0, 0.0]).exp()
    p = p / p.sum()
    assert freq[0] == 0
    torch.testing.assert_close(freq[1:], p, atol=0.015, rtol=0)


def test_rows_without_candidates_are_flagged():
    same = torch.ones(2, 2, dtype=torch.bool)
    _, valid = sample_hard_negatives(torch.zeros(2, 2), same)
    assert not valid.any()


def test_a_positive_far_ahead_of_every_candidate_still_gets_its_hard_negative():
    # 1/τ = 100 and cosines 1.0 vs -0.1: the positive leads by 110 logits. Softmax first and then
    # zeroing the positive underflows exp(-110) to 0 in fp32, and the row would look candidate-less.
    logits = torch.tensor([[100.0, -10.0, -12.0], [-10.0, 100.0, -12.0]])
    same = torch.eye(2, 3, dtype=torch.bool)
    idx, valid = sample_hard_negatives(logits, same, mode="hardest")
    assert valid.all()
    assert idx.tolist() == [1, 0]
    weights = hard_negative_weights(logits, same)
    p = 1 / (1 + math.exp(-2.0))  # -10 against -12 among the candidates left
    torch.testing.assert_close(weights, torch.tensor([[0.0, p, 1 - p], [p, 0.0, 1 - p]]))


def test_masked_token_loss_only_counts_masked_positions():
    logits = torch.zeros(1, 3, 4, requires_grad=True)
    with torch.no_grad():
        logits[0, 0, 2] = 10.0  # an unmasked position with a confident wrong answer: must not count
    labels = torch.tensor([[-100, 1, -100]])
    loss = masked_token_loss(logits, labels)
    assert loss.item() == pytest.approx(math.log(4))
    loss.backward()
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[0, 2].abs().sum() == 0
    none = masked_token_loss(logits, torch.full((1, 3), -100))
    assert none.item() == 0.0 and none.requires_grad


def test_itm_ranking_loss_by_hand():
    """p(match) = sigmoid(l_match - l_no-match): log-odds 2 and 0 give 0.881 and 0.5; with margin
    0.2 the first triplet (positive 0.881, negative 0.5) meets it, the second (positive 0.5,
    negative 0.881) costs 0.2 + 0.381, so the mean is 0.2905."""
    positive = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    negative = torch.tensor([[3.0, 3.0], [-1.0, 1.0]])
    p_high = torch.sigmoid(torch.tensor(2.0)).item()
    expected = (0.0 + (0.2 + p_high - 0.5)) / 2
    assert itm_ranking_loss(positive, negative, margin=0.2).item() == pytest.approx(expected, abs=1e-6)
    # A triplet whose margin is met costs nothing, however far from 0 and 1 its p(match) lie.
    assert itm_ranking_loss(torch.tensor([[0.0, 9.0]]), torch.tensor([[0.0, -9.0]])).item() == 0.0
