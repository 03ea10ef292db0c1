"""Global-batch objectives across DDP workers: two gloo processes on CPU against one process over
the concatenated batch (contrastive loss and gradients, hard negatives from another worker's
slice, SIMLA's queues), and the single-process results left exactly as they were."""
from __future__ import annotations

import math
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from alignlab.models.objectives import (FeatureQueue, clamp_logit_scale, contrastive_loss, gather_no_grad,
                                        gather_rows, gather_with_grad, global_hard_negatives, global_view,
                                        same_item_mask, sample_hard_negatives)

pytestmark = pytest.mark.timeout(90)

WORLD, N, D_IN, D = 2, 3, 5, 4
# Hard negatives: image ids of the global batch of 4 (2 per worker). Rank 0 holds two captions of
# image 7 and rank 1 a third one, so the only negative for rank 0's rows is rank 1's row 1.
HN_IDS = torch.tensor([7, 7, 7, 8])
HN_STATES = torch.arange(4 * 3 * 2, dtype=torch.float32).view(4, 3, 2)  # (B, L, D) token states
HN_TOKENS = torch.arange(4 * 5).view(4, 5)
QUEUE_SIZE, QUEUE_ROWS, QUEUE_STEPS = 8, 2, 3


class Encoder(nn.Module):
    """Two linear "encoders" and a learnable temperature: the smallest dual encoder."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(D_IN, D)
        self.text = nn.Linear(D_IN, D)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x_img, x_txt):
        return (F.normalize(self.image(x_img), dim=-1), F.normalize(self.text(x_txt), dim=-1),
                clamp_logit_scale(self.log_scale))


def make_encoder() -> Encoder:
    torch.manual_seed(1)
    return Encoder()


def full_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * N, D_IN, generator=g), torch.randn(WORLD * N, D_IN, generator=g)


def queue_step(step: int, rank: int):
    """Distinct per-rank, per-step momentum features: row value 100·step + 10·rank + row."""
    ids = 100 * step + 10 * rank + torch.arange(QUEUE_ROWS)
    image = ids[:, None].float().expand(QUEUE_ROWS, D).contiguous()
    return image, -image, ids


# --------------------------------------------------------------------------------------------
# The two workers
# --------------------------------------------------------------------------------------------


def _contrastive(rank: int) -> dict:
    x_img, x_txt = full_batch()
    rows = slice(rank * N, (rank + 1) * N)
    xi, xt = x_img[rows].clone().requires_grad_(), x_txt[rows].clone().requires_grad_()
    model = DistributedDataParallel(make_encoder())
    img, txt, scale = model(xi, xt)
    img_all, offset = global_view(img, "global")
    txt_all, _ = global_view(txt, "global")
    loss = contrastive_loss(img, txt, scale, img_all, txt_all, offset)
    loss.backward()
    with torch.no_grad():
        img, txt, scale = model.module(xi, xt)
        img_l, offset_l = global_view(img, "local")
        txt_l, _ = global_view(txt, "local")
        local = contrastive_loss(img, txt, scale, img_l, txt_l, offset_l)
    return {"loss": loss.detach(), "offset": offset, "local_loss": local, "grad_img": xi.grad,
            "grad_txt": xt.grad, "params": {k: p.grad for k, p in model.module.named_parameters()}}


def _hard_negatives(rank: int) -> dict:
    rows = slice(2 * rank, 2 * rank + 2)
    states = HN_STATES[rows].clone().requires_grad_()
    logits = torch.randn(2, 4, generator=torch.Generator().manual_seed(rank))
    col_ids = gather_no_grad(HN_IDS[rows])
    idx, valid = global_hard_negatives(logits, HN_IDS[rows], col_ids, "sample",
                                       torch.Generator().manual_seed(3))
    hardest, _ = global_hard_negatives(logits, HN_IDS[rows], col_ids, "hardest")
    neg = gather_rows({"image_states": states, "input_ids": HN_TOKENS[rows]}, idx)
    neg["image_states"].sum().backward()
    out = {"col_ids": col_ids, "idx": idx, "valid": valid, "hardest": hardest,
           "neg": {k: v.detach() for k, v in neg.items()}, "neg_grad": states.grad}
    # Every rank fetches the whole global batch, weighting its loss by rank + 1: with gradient the
    # local rows receive Σ_r (r + 1) = 3, without only this rank's own weight.
    for grad in (True, False):
        states = HN_STATES[rows].clone().requires_grad_()
        every = gather_rows({"image_states": states}, torch.arange(4), grad=grad)["image_states"]
        (every.sum() * (rank + 1)).backward()
        out[f"all_rows_{grad}"], out[f"all_grad_{grad}"] = every.detach(), states.grad
    return out


def _queue(rank: int) -> dict:
    torch.manual_seed(rank)  # the initial queue must not depend on each worker's RNG state
    queue = FeatureQueue(QUEUE_SIZE, D)
    initial = {k: v.clone() for k, v in queue.state_dict().items()}
    for step in range(QUEUE_STEPS):
        queue.enqueue(*queue_step(step, rank))
    return {"initial": initial, "final": {k: v.clone() for k, v in queue.state_dict().items()}}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=30))
    try:
        out = {"contrastive": _contrastive(rank), "hn": _hard_negatives(rank), "queue": _queue(rank)}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """One 2-process gloo run of every scenario (spawning costs seconds), its results per rank."""
    tmp = tmp_path_factory.mktemp("global_batch")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


# --------------------------------------------------------------------------------------------
# Two workers against one process
# --------------------------------------------------------------------------------------------


def test_global_contrastive_equals_single_process_over_concatenated_batch(ranks):
    x_img, x_txt = full_batch()
    x_img.requires_grad_()
    x_txt.requires_grad_()
    model = make_encoder()
    img, txt, scale = model(x_img, x_txt)
    loss = contrastive_loss(img, txt, scale)
    loss.backward()

    # The single-process loss is the mean over all 2n rows = the mean of the workers' losses.
    assert torch.stack([r["contrastive"]["loss"] for r in ranks]).mean().item() == pytest.approx(loss.item(), abs=1e-5)
    for rank, out in enumerate(ranks):
        c, rows = out["contrastive"], slice(rank * N, (rank + 1) * N)
        assert c["offset"] == rank * N
        own = contrastive_loss(img[rows], txt[rows], scale, img, txt, rank * N)
        torch.testing.assert_close(c["loss"], own.detach(), atol=1e-5, rtol=0)
        # All-gather's backward sums every worker's gradient into the local rows: W × ∂(mean)/∂x.
        torch.testing.assert_close(c["grad_img"] / WORLD, x_img.grad[rows], atol=1e-5, rtol=0)
        torch.testing.assert_close(c["grad_txt"] / WORLD, x_txt.grad[rows], atol=1e-5, rtol=0)
        # DDP averages over workers: exactly the gradient of the concatenated-batch loss.
        for name, p in model.named_parameters():
            torch.testing.assert_close(c["params"][name], p.grad, atol=1e-5, rtol=0)


def test_local_negatives_give_the_per_worker_loss(ranks):
    x_img, x_txt = full_batch()
    with torch.no_grad():
        img, txt, scale = make_encoder()(x_img, x_txt)
    for rank, out in enumerate(ranks):
        rows = slice(rank * N, (rank + 1) * N)
        local = contrastive_loss(img[rows], txt[rows], scale)
        torch.testing.assert_close(out["contrastive"]["local_loss"], local, atol=1e-5, rtol=0)
        assert abs(out["contrastive"]["local_loss"] - out["contrastive"]["loss"]) > 1e-3


def test_hard_negative_comes_from_the_other_workers_slice(ranks):
    r0, r1 = ranks[0]["hn"], ranks[1]["hn"]
    assert torch.equal(r0["col_ids"], HN_IDS) and torch.equal(r1["col_ids"], HN_IDS)
    assert r0["valid"].all() and r1["valid"].all()
    # Rank 0's rows (image 7) can only pair with global row 3, which rank 1 holds.
    assert r0["idx"].tolist() == [3, 3] and r0["hardest"].tolist() == [3, 3]
    assert torch.equal(r0["neg"]["image_states"], HN_STATES[[3, 3]])
    assert torch.equal(r0["neg"]["input_ids"], HN_TOKENS[[3, 3]])
    # Rank 1: row 0 (image 7) has the same single candidate; row 1 (image 8) any of rank 0's
    # rows or rank 1's row 0, never itself.
    assert r1["idx"][0] == 3 and r1["idx"][1].item() in (0, 1, 2)
    assert torch.equal(r1["neg"]["image_states"], HN_STATES[r1["idx"]])
    # The loss on the negatives reaches the encoder of the worker that owns them: rank 1's row 1
    # was chosen three times (twice by rank 0, once by rank 1).
    torch.testing.assert_close(r1["neg_grad"][1], torch.full((3, 2), 3.0))


def test_gather_rows_gradient_with_and_without_grad(ranks):
    for rank, out in enumerate(r["hn"] for r in ranks):
        for grad in (True, False):
            assert torch.equal(out[f"all_rows_{grad}"], HN_STATES)
        torch.testing.assert_close(out["all_grad_True"], torch.full((2, 3, 2), 3.0))
        torch.testing.assert_close(out["all_grad_False"], torch.full((2, 3, 2), float(rank + 1)))


def test_queues_are_identical_across_workers_and_hold_the_global_batches_in_order(ranks):
    q0, q1 = ranks[0]["queue"], ranks[1]["queue"]
    for key in q0["final"]:
        assert torch.equal(q0["initial"][key], q1["initial"][key]), key
        assert torch.equal(q0["final"][key], q1["final"][key]), key

    def global_batch(step):
        return [queue_step(step, rank) for rank in range(WORLD)]

    # 3 steps of 4 rows into 8 slots: step 2 wrapped around over step 0.
    expected_ids = torch.cat([torch.cat([ids for _, _, ids in global_batch(s)]) for s in (2, 1)])
    expected_img = torch.cat([torch.cat([img for img, _, _ in global_batch(s)]) for s in (2, 1)])
    assert q0["final"]["idx_queue"].tolist() == expected_ids.tolist() == [200, 201, 210, 211, 100, 101, 110, 111]
    assert torch.equal(q0["final"]["image_queue"], expected_img)
    assert torch.equal(q0["final"]["text_queue"], -expected_img)
    assert int(q0["final"]["ptr"]) == (QUEUE_STEPS * WORLD * QUEUE_ROWS) % QUEUE_SIZE == 4


# --------------------------------------------------------------------------------------------
# One process: nothing changes
# --------------------------------------------------------------------------------------------


def test_single_process_returns_inputs_untouched():
    assert not dist.is_initialized()
    x = torch.randn(3, 4, requires_grad=True)
    gathered, offset = gather_with_grad(x)
    assert gathered is x and offset == 0
    assert gather_no_grad(x) is x
    assert global_view(x, "global")[0] is x and global_view(x, "local")[0] is x
    with pytest.raises(ValueError, match="global' or 'local"):
        global_view(x, "world")
    idx = torch.tensor([2, 0])
    for grad in (True, False):
        rows = gather_rows({"x": x}, idx, grad=grad)["x"]
        assert torch.equal(rows, x[idx]) and rows.requires_grad  # local rows keep their graph


def test_one_worker_group_returns_inputs_untouched(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        x = torch.randn(3, 4)
        gathered, offset = gather_with_grad(x)
        assert gathered is x and offset == 0 and gather_no_grad(x) is x
        assert torch.equal(gather_rows({"x": x}, torch.tensor([1]))["x"], x[[1]])
    finally:
        dist.destroy_process_group()


def test_single_process_hard_negatives_and_queue():
    logits = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([0, 1, 1])
    got = global_hard_negatives(logits, ids, ids, "sample", torch.Generator().manual_seed(5))
    want = sample_hard_negatives(logits, same_item_mask(ids, ids), "sample", torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert got[0][1] == 0 and got[0][2] == 0  # rows of image 1 only pair with image 0
    with pytest.raises(ValueError, match="global columns"):
        global_hard_negatives(logits[:, :2], ids, ids)

    queue = FeatureQueue(6, 2)
    assert set(queue.state_dict()) == {"image_queue", "text_queue", "idx_queue", "ptr"}
    assert torch.equal(queue.idx_queue, torch.full((6,), -1))
    queue.enqueue(torch.ones(3, 2), torch.zeros(3, 2), torch.tensor([4, 5, 6]))
    assert queue.idx_queue.tolist() == [4, 5, 6, -1, -1, -1] and int(queue.ptr) == 3
    # A batch of 4 at pointer 3 (a queue filled at another batch size, as a resumed checkpoint
    # holds it) continues at the start of the queue: slots 3, 4, 5, then 0.
    # (bf16 features, as autocast makes them, into the fp32 queue.)
    queue.enqueue(torch.full((4, 2), 2.0, dtype=torch.bfloat16), torch.full((4, 2), 3.0, dtype=torch.bfloat16),
                  torch.tensor([7, 8, 9, 10]))
    assert queue.idx_queue.tolist() == [10, 5, 6, 7, 8, 9] and int(queue.ptr) == 1
    assert queue.image_queue[:, 0].tolist() == [2.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    assert queue.text_queue[:, 0].tolist() == [3.0, 0.0, 0.0, 3.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="must hold the global batch 7"):
        queue.enqueue(torch.ones(7, 2), torch.zeros(7, 2), torch.arange(7))


def test_hand_computed_contrastive_loss():
    eye = torch.eye(2)
    # Logits = I both ways: every row is -log(e / (e + 1)) = log(1 + e^-1).
    assert contrastive_loss(eye, eye, torch.tensor(1.0)).item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)
    # text = [[1, 0], [0.6, 0.8]]: i2t logits [[1, .6], [0, .8]], t2i logits [[1, 0], [.6, .8]].
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    want = 0.25 * sum(math.log1p(math.exp(-m)) for m in (0.4, 0.8, 1.0, 0.2))
    assert contrastive_loss(eye, text, torch.tensor(1.0)).item() == pytest.approx(want, abs=1e-6)
