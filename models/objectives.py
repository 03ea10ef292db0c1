"""Pre-training objectives as small pure functions of tensors.

Every architecture takes its losses from here: contrastive alignment (MVPTR's VSC, SIMLA's ITC,
the dual-encoder baseline), hard-negative sampling for ITM / WPG, masked-token prediction
(MLM, MCR, masked-object labels), and the global-batch view of features across DDP workers.

Global batches: the papers' batch sizes are global (MVPTR 1024 on 8 GPUs, SIMLA 512 on 8). Each
worker computes the loss of its own rows against the columns of *all* workers, with labels offset
by its rank; features are gathered with an autograd-aware all-gather so that the gradient of
every worker's loss reaches the rows that produced them. Averaging gradients over workers (DDP)
then gives exactly the gradient of the loss over the concatenated batch. Hard negatives are mined
from the same global similarities (``global_hard_negatives``, ``gather_rows``) and SIMLA's queues
take every worker's momentum features (``FeatureQueue``). With one worker, or no process group,
every function here returns exactly the single-process result.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------------------------
# Global batch across DDP workers
# --------------------------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All workers' ``x`` concatenated along dim 0, differentiable with respect to the local
    rows, and the offset of the local rows in it. A single process (or a 1-worker group) returns
    ``(x, 0)`` untouched. Every worker must hold a tensor of the same shape (the data stage drops
    ragged last batches and pads to fixed lengths).

    The backward of the autograd-aware all-gather is a reduce-scatter that *sums* over workers
    the gradients reaching each slice, so the local rows receive Σ_w ∂L_w/∂x; DDP's mean over
    workers then yields ∂/∂θ of the mean of the workers' losses, i.e. of the loss over the
    concatenated batch. The backward is itself a collective: every worker must backpropagate
    through the result.
    """
    if not _distributed():
        return x, 0
    return functional_all_gather()(x.contiguous(), 0, dist.group.WORLD), dist.get_rank() * x.shape[0]


def functional_all_gather():
    """The autograd-aware functional all-gather: ``all_gather_single`` from torch 2.13 on (torch
    2.14 deprecates ``torch.distributed.nn.functional.all_gather`` for it: same gradient, one tensor
    instead of a tuple, gloo and NCCL), else its predecessor ``all_gather_tensor_autograd``, with
    the same arguments and gradient (torch 2.11 on the GPU machines)."""
    from torch.distributed import _functional_collectives as fc

    return getattr(fc, "all_gather_single", None) or fc.all_gather_tensor_autograd


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All workers' ``x`` concatenated along dim 0, as constants (momentum features for SIMLA's
    queues, image ids and token ids for hard-negative lookup). A single process returns ``x``
    untouched. Shapes must match across workers, as for ``gather_with_grad``."""
    if not _distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def _gather_keeping_local(x: torch.Tensor) -> torch.Tensor:
    """``gather_no_grad`` with the local slice put back as ``x`` itself, so that this worker's
    rows keep their graph and only other workers' rows are constants (open_clip's
    ``gather_features`` without ``torch.distributed.nn``)."""
    if not _distributed():
        return x
    gathered, start = gather_no_grad(x), dist.get_rank() * x.shape[0]
    return torch.cat([gathered[:start], x, gathered[start + x.shape[0]:]], 0)


def local_offset(n: int, negatives: str) -> int:
    """Where this worker's ``n`` rows start in the columns of ``negatives`` ("global": all
    workers' batches gathered in rank order; "local": its own)."""
    return dist.get_rank() * n if negatives == "global" and _distributed() else 0


def global_view(x: torch.Tensor, negatives: str) -> tuple[torch.Tensor, int]:
    """``negatives="global"``: the gathered batch and the local offset; ``"local"``: ``(x, 0)``."""
    if negatives == "global":
        return gather_with_grad(x)
    if negatives != "local":
        raise ValueError(f"negatives must be 'global' or 'local', got {negatives!r}")
    return x, 0


# --------------------------------------------------------------------------------------------
# Contrastive alignment
# --------------------------------------------------------------------------------------------


def contrastive_logits(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                       image_all: torch.Tensor | None = None, text_all: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-to-text and text-to-image logits S/τ of local rows against all columns
    (MVPTR eq. 1 before the softmax; CLIP). Features must be L2-normalised."""
    image_all = image if image_all is None else image_all
    text_all = text if text_all is None else text_all
    return logit_scale * image @ text_all.t(), logit_scale * text @ image_all.t()


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     image_all: torch.Tensor | None = None, text_all: torch.Tensor | None = None,
                     offset: int = 0) -> torch.Tensor:
    """Symmetric InfoNCE, MVPTR's L_vsc (§3.3):

        L = -1/2n (Σ_i log p_v2s(V_i, S_i) + Σ_j log p_s2v(S_j, V_j)),  p ∝ exp(S/τ)

    over the local rows ``image``/``text`` (n each) against the columns ``image_all``/``text_all``
    (the global batch; default: the local one). Row i's positive is column ``offset + i``.
    ``logit_scale`` is 1/τ.
    """
    logits_i2t, logits_t2i = contrastive_logits(image, text, logit_scale, image_all, text_all)
    labels = torch.arange(image.shape[0], device=image.device) + offset
    return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))


def clamp_logit_scale(log_scale: torch.Tensor, max_scale: float = 100.0, min_scale: float = 0.0) -> torch.Tensor:
    """exp of a learnable log(1/τ), capped as CLIP does (1/τ <= 100) so τ cannot collapse to zero;
    ``min_scale`` > 0 also bounds τ from above (the official SIMLA/ALBEF code keeps τ in
    [0.001, 0.5], i.e. 1/τ in [2, 1000])."""
    return log_scale.exp().clamp(min=min_scale, max=max_scale)


# --------------------------------------------------------------------------------------------
# Hard negatives for ITM and WPG
# --------------------------------------------------------------------------------------------


def own_pair_mask(n_rows: int, n_cols: int, offset: int = 0, device: torch.device | None = None) -> torch.Tensor:
    """(n_rows, n_cols) booleans, True only at each row's own pair, column ``offset + row`` (the
    local rows' place in a global batch). The official MVPTR and SIMLA code exclude just this
    column from hard-negative sampling (``fill_diagonal_(0)``), so another caption of the same
    image can be drawn as a "negative", and the official SIMLA code's ITC target is this one-hot
    (``sim_targets.fill_diagonal_(1)``) rather than :func:`positive_targets`."""
    cols = torch.arange(n_cols, device=device)
    return cols[None, :] == offset + torch.arange(n_rows, device=device)[:, None]


def hard_negative_weights(logits: torch.Tensor, same_item: torch.Tensor) -> torch.Tensor:
    """p_v2s / p_s2v of MVPTR eq. 1: the softmax of S/τ over the candidates that are neither the
    positive itself nor another caption/copy of the same image (those get zero probability; a
    row with no candidate left is all zero).

    The excluded columns are masked to -inf *before* the softmax: zeroing them after it lets a
    positive that leads every candidate by more than ~103 logits (fp32's exp underflow, reached
    once 1/τ passes ~52) push every other weight to 0, and the row would be dropped as if it had
    no negative.
    """
    has_candidate = ~same_item.all(-1, keepdim=True)
    weights = logits.float().masked_fill(same_item, float("-inf")).softmax(-1)
    return torch.where(has_candidate, weights, 0.0)  # an all -inf row's softmax is NaN


def sample_hard_negatives(logits: torch.Tensor, same_item: torch.Tensor, mode: str = "sample",
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One hard negative column per row, drawn from p ∝ exp(S/τ) over the valid candidates
    (MVPTR §3.3 ITM/WPG, ALBEF) or, with ``mode="hardest"``, the most similar one.

    Returns (indices, valid): ``valid[i]`` is False when row i has no candidate left (a batch
    holding only captions of its image); callers drop such rows.
    The positive (and anything marked in ``same_item``) is never returned.
    """
    weights = hard_negative_weights(logits.detach(), same_item)
    valid = weights.sum(-1) > 0
    safe = torch.where(valid[:, None], weights, torch.ones_like(weights))
    if mode == "hardest":
        idx = safe.argmax(-1)
    elif mode == "sample":
        idx = torch.multinomial(safe, 1, generator=generator).squeeze(1)
    else:
        raise ValueError(f"hard-negative mode must be 'sample' or 'hardest', got {mode!r}")
    return idx, valid


def same_item_mask(row_ids: torch.Tensor, col_ids: torch.Tensor) -> torch.Tensor:
    """True where a candidate column shows the same image as the row (so is no negative)."""
    return row_ids[:, None] == col_ids[None, :]


# Global hard negatives. Each worker mines the negatives of its own rows from their similarities
# to the whole global batch (the logits of ``contrastive_logits`` against the gathered columns),
# so a row's negative may live on any worker. The multi-modal (fusion) pass of a negative pair
# still runs on the worker that owns the positive, which keeps the ITM/WPG labels and the pair's
# loss local: that worker fetches the chosen candidates' *inputs to the fusion encoder* — for an
# image negative the unimodal image token states or region features and their mask, for a text
# negative the caption's token ids and mask (or its unimodal token states) — by gathering them
# from all workers and indexing the chosen global rows (``gather_rows``). This is BLIP's scheme
# (ids gathered as constants, image embeddings with ``all_gather_with_grad``); ALBEF mines only
# inside the local batch. The cost is one global batch of those inputs on every worker.


def global_hard_negatives(logits: torch.Tensor, row_ids: torch.Tensor, col_ids: torch.Tensor,
                          mode: str = "sample", generator: torch.Generator | None = None,
                          exclude: str = "same_image", offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One hard negative per local row, as an index into the *global* batch (MVPTR §3.3 ITM/WPG
    over p_v2s / p_s2v of eq. 1).

    ``logits`` (n_local, N_global) are the local rows against all workers' columns; ``row_ids``
    (n_local) and ``col_ids`` (N_global, e.g. ``gather_no_grad(image_ids)``) are image ids. A
    column showing the row's image — its positive, or another caption of that image anywhere in
    the global batch — is never chosen; with ``exclude="own_pair"`` (the official code's
    reading) only the row's own column, ``offset + row``, is (:func:`own_pair_mask`). Returns
    (global indices, valid) as ``sample_hard_negatives``; feed the indices to ``gather_rows``.
    """
    if logits.shape != (row_ids.shape[0], col_ids.shape[0]):
        raise ValueError(f"logits {tuple(logits.shape)} must be (rows {row_ids.shape[0]}, "
                         f"global columns {col_ids.shape[0]})")
    if exclude == "same_image":
        excluded = same_item_mask(row_ids, col_ids)
    elif exclude == "own_pair":
        excluded = own_pair_mask(*logits.shape, offset, logits.device)
    else:
        raise ValueError(f"hard-negative exclusion must be 'same_image' or 'own_pair', got {exclude!r}")
    return sample_hard_negatives(logits, excluded, mode, generator)


def gather_rows(tensors: dict[str, torch.Tensor], global_idx: torch.Tensor, grad: bool = True
                ) -> dict[str, torch.Tensor]:
    """Rows ``global_idx`` of the global batch of each tensor (all workers' ``tensors[k]``
    concatenated along dim 0), on this worker: how the owner of a positive fetches the fusion
    inputs of hard negatives chosen by ``global_hard_negatives``. In one process it is plain
    indexing, ``tensors[k][global_idx]``.

    Gradients: rows of this worker's own slice always keep their graph. With ``grad=True`` (the
    default) floating tensors are gathered with ``gather_with_grad``, so the loss on a negative
    owned by another worker reaches that worker's encoder, exactly as in one process over the
    concatenated batch (BLIP). ``grad=False`` treats other workers' rows as constants, sparing
    the backward reduce-scatter at the price of those gradient terms. Integer tensors (ids, masks)
    are gathered as constants. A collective: every worker calls it with the same keys in the same
    order and, with ``grad=True``, backpropagates through the result.
    """
    rows = {}
    for key, x in tensors.items():
        gathered = gather_with_grad(x)[0] if grad and x.is_floating_point() else _gather_keeping_local(x)
        rows[key] = gathered[global_idx]
    return rows


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary image-text matching as 2-way cross-entropy over [no-match, match] (MVPTR eq. 4,
    SIMLA eq. 5)."""
    return F.cross_entropy(logits.float(), labels.long())


# --------------------------------------------------------------------------------------------
# Weakly-supervised phrase grounding (MVPTR §3.3)
# --------------------------------------------------------------------------------------------


def wpg_similarity(phrases: torch.Tensor, regions: torch.Tensor, phrase_mask: torch.Tensor,
                   region_mask: torch.Tensor, random_top: int = 1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """S_wpg(V, S) of MVPTR eq. 2, one value per pair: the mean over the M phrases of the max over
    the K regions of the cosine similarity of their multi-modal outputs,

        S_wpg = 1/M Σ_i max_j g(c̃_i)ᵀ g(r̃_j).

    ``phrases`` (B, P, d) and ``regions`` (B, K, d) are the multi-modal encoder's outputs of one
    batch of pairs; masks are True at real phrases / regions. We read g as the L2 normalisation
    itself ("L2-normalized representations ... denoted as g(·)"), so WPG adds no parameters. A
    pair without phrases gets 0 (callers leave such rows out of the loss).

    ``random_top`` > 1 is the official code's reading (#15): each phrase takes one of its
    ``random_top`` most similar regions, uniformly at random (of the real ones, if fewer), instead
    of the best.
    """
    phrases, regions = phrases.float(), regions.float()
    # The cosines as dot products over norms, as F.normalize clamps them (eps 1e-12): the same
    # values without writing normalised copies of every (padded) region state, 4x faster on the
    # CPU at the paper's shapes (alignlab bench --quick, objectives).
    norms = phrases.norm(dim=-1).clamp(min=1e-12)[:, :, None] * regions.norm(dim=-1).clamp(min=1e-12)[:, None, :]
    sim = (phrases @ regions.transpose(1, 2)) / norms
    sim = sim.masked_fill(~region_mask.bool()[:, None, :], float("-inf"))
    if random_top > 1:
        top = sim.topk(min(random_top, sim.shape[-1]), dim=-1).values  # (B, P, t), best first
        real = region_mask.bool().sum(-1).clamp(min=1, max=top.shape[-1])[:, None]  # (B, 1)
        u = torch.rand(top.shape[:2], generator=generator, device=top.device)
        sim = top.gather(-1, (u * real).long().clamp(max=top.shape[-1] - 1)[..., None]).squeeze(-1)
    else:
        sim = sim.amax(-1)  # (B, P)
    pm = phrase_mask.bool()
    sim = sim.masked_fill(~pm, 0.0)
    return sim.sum(-1) / pm.sum(-1).clamp(min=1)


def triplet_hinge(positive: torch.Tensor, negative: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """The triplet ranking hinge (VSE++): mean over pairs of max(0, margin + s(negative) - s(positive)),
    each negative's score set against its own positive's."""
    return (margin + negative - positive).clamp(min=0).mean()


def wpg_hinge(positive: torch.Tensor, negative: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """L_wpg of MVPTR §3.3: mean over pairs of max(0, margin + S_wpg(V_i', S_i) - S_wpg(V_i, S_i)),
    with V_i' a hard negative image of text S_i.

    The paper prints min(0, ·): that is unbounded below (it keeps rewarding the gap after the
    margin is met and gives no gradient while the margin is violated). The authors'
    implementation clamps at zero from below, the usual triplet hinge (VSE++), and so do we.
    """
    return triplet_hinge(positive, negative, margin)


def itm_ranking_loss(positive_logits: torch.Tensor, negative_logits: torch.Tensor, margin: float = 0.2
                     ) -> torch.Tensor:
    """Retrieval fine-tuning of a cross-encoder as a ranking (UNITER §3.2 and its hard-negative
    retrieval fine-tuning): the triplet hinge on p(match), the score the re-ranking sorts by, of
    each positive pair against a negative that shares its image or its caption. ``*_logits`` are
    ITM's [no-match, match] logits (N, 2), row i of each the same triplet; p(match) =
    sigmoid(l_match - l_no-match), so the head that pre-training's :func:`itm_loss` trained scores
    the ranking unchanged. Unlike the binary loss it asks nothing of p(match)'s level, only of its
    order within one query's candidates, which is all a re-ranking reads."""
    return triplet_hinge(positive_logits.float().softmax(-1)[:, 1], negative_logits.float().softmax(-1)[:, 1],
                         margin)


# --------------------------------------------------------------------------------------------
# Queues of momentum features (SIMLA's ITC, from MoCo / ALBEF)
# --------------------------------------------------------------------------------------------


class FeatureQueue(nn.Module):
    """First-in-first-out queues of M momentum image and text features and their image ids,
    used as extra contrastive columns (SIMLA §3.2 ITC, ALBEF eq. 1-2 with queues, MoCo).

    Each ``enqueue`` writes the *global* batch — every worker's momentum features gathered
    without gradient — so the queues stay identical on every worker, and the initial random
    features come from a fixed seed for the same reason. ``idx_queue`` holds image ids (``-1``
    for the initial entries; ids are ≥ 0) so that queued copies of a row's image are excluded
    from its negatives with ``same_item_mask``. All buffers live in the state dict, so
    checkpoints restore the queues and the pointer.
    """

    def __init__(self, size: int, dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        # Random unit vectors, as ALBEF: near-orthogonal to everything, so the initial entries
        # are uninformative negatives until the first M pairs have been enqueued.
        self.register_buffer("image_queue", F.normalize(torch.randn(size, dim, generator=g), dim=-1))
        self.register_buffer("text_queue", F.normalize(torch.randn(size, dim, generator=g), dim=-1))
        self.register_buffer("idx_queue", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor) -> None:
        """Write all workers' (n, d) momentum features and (n,) image ids at the pointer and
        advance it; a batch that reaches the end of the queue continues at its start. ALBEF
        requires M to be a multiple of the batch so that never happens, but a queue restored from
        a checkpoint written at another batch size (retrieval fine-tuning at batch 64 from
        pre-training at 32) keeps a pointer that need not be a multiple of the new batch, so
        any batch up to M is written this way. A collective: every worker calls it every step."""
        image_all, text_all = gather_no_grad(image_feat), gather_no_grad(text_feat)
        idx_all = gather_no_grad(idx)
        size, n = self.image_queue.shape[0], image_all.shape[0]
        if n > size:
            raise ValueError(f"queue size {size} must hold the global batch {n} (rows per worker × workers)")
        ptr = int(self.ptr)
        slots = (ptr + torch.arange(n, device=self.ptr.device)) % size
        # Under autocast the features are bf16 or fp16; index_put, unlike a slice, does not cast.
        self.image_queue[slots] = image_all.to(self.image_queue.dtype)
        self.text_queue[slots] = text_all.to(self.text_queue.dtype)
        self.idx_queue[slots] = idx_all
        self.ptr.fill_((ptr + n) % size)


# --------------------------------------------------------------------------------------------
# Masked prediction
# --------------------------------------------------------------------------------------------


def masked_token_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy averaged over the masked positions only (labels elsewhere = ``ignore_index``):
    MVPTR's L_mlm (eq. 3) and L_mcr, SemVLP's masked-LM and masked-object labels. Returns 0 (with
    gradient) when nothing is masked, so a batch without masks does not turn the loss into NaN."""
    logits = logits.float().reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    if not (labels != ignore_index).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


def feature_regression_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SemVLP's RoI-feature regression (§3.3.1), LXMERT's: the mean squared error between the
    predicted and the detector's feature of each masked object, averaged over those objects and
    the D feature dimensions (a per-dimension mean keeps the loss on the scale of the other,
    equally weighted losses for any D). ``predicted`` and ``target`` are (n_masked, D), already
    restricted to the masked objects. LXMERT's paper states an L2 loss, its code a smooth L1; we
    follow the paper. Returns 0 (with gradient) when no object is masked."""
    if predicted.shape[0] == 0:
        return predicted.sum() * 0.0
    return F.mse_loss(predicted.float(), target.float())


# --------------------------------------------------------------------------------------------
# Momentum distillation and pseudo-label supervision (SIMLA)
# --------------------------------------------------------------------------------------------


def positive_targets(row_ids: torch.Tensor, col_ids: torch.Tensor) -> torch.Tensor:
    """The ground truth y^i2t / y^t2i of SIMLA eq. 2 as a distribution over the columns: uniform
    over every column that shows the row's image (its own pair, other captions of that image in
    the batch, queued copies of it), zero elsewhere.

    The paper writes y as one-hot; with several captions per image in the batch and in the
    queue, a one-hot target would push away true matches, so we read it as ALBEF's
    image-id-aware targets (``idx``-based ``sim_targets``). A row with exactly one matching
    column gets the one-hot vector. Every row must match at least one column (its own pair).
    """
    pos = same_item_mask(row_ids, col_ids).float()
    return pos / pos.sum(-1, keepdim=True)


def distillation_loss(logits: torch.Tensor, hard_targets: torch.Tensor, teacher_probs: torch.Tensor,
                      alpha: float) -> torch.Tensor:
    """Momentum distillation, SIMLA eq. 3-4 (ITC) and eq. 7 (MLM, MIM), from ALBEF:

        (1 - α) H(y, p) + α H(p_m, p) = H((1 - α) y + α p_m, p),

    the equality holding because the cross-entropy H(q, p) = -Σ q log p is linear in q. Rows of
    ``logits`` (n, C) are predictions p (softmax over C), ``hard_targets`` the ground truth y
    (one-hot or a distribution, n × C) and ``teacher_probs`` the momentum model's softmax p_m.
    Mean over rows; 0 (with gradient) for no rows.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    targets = (1.0 - alpha) * hard_targets.float() + alpha * teacher_probs.float()
    return -(targets * logits.float().log_softmax(-1)).sum(-1).mean()


def psl_targets(attn_row: torch.Tensor, token_ids: torch.Tensor, special_mask: torch.Tensor, k: int,
                vocab_size: int) -> torch.Tensor:
    """SIMLA's hard pseudo-labels y^PSL (§2.4, appendix §3): the tokens at the k text positions
    the multi-modal [CLS] attends to most in the last self-attention layer, as a multi-hot
    vector over the vocabulary (B, V).

    ``attn_row`` (B, N) is that [CLS] row (averaged over heads by the caller), ``token_ids``
    (B, N) the caption, ``special_mask`` (B, N) True at [CLS], [SEP], [MASK] and padding, which
    are never labels. A caption with fewer than k eligible tokens labels all of them. The top-k
    is over *positions*, as the appendix states; a word repeated within the top k counts once.
    """
    scores = attn_row.float().masked_fill(special_mask, float("-inf"))
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=-1)
    chosen = top.values > float("-inf")
    # Unchosen slots (short captions) point at id 0 with value 0, which the max leaves as is.
    ids = torch.where(chosen, token_ids.gather(1, top.indices), 0)
    targets = torch.zeros(token_ids.shape[0], vocab_size, device=attn_row.device)
    return targets.scatter_reduce_(1, ids, chosen.float(), reduce="amax")


def psl_vote_targets(attn_rows: torch.Tensor, token_ids: torch.Tensor, per_head: int, positions: int,
                     vocab_size: int, cls_id: int) -> torch.Tensor:
    """The official SIMLA code's pseudo-labels (#15's "official" reading of §2.4; codezakh/SIMLA,
    SIMLA.forward): each head's [CLS] row (``attn_rows`` (B, H, N), the momentum stack's last
    layer on the online image) votes for its ``per_head`` most attended positions, the
    ``positions`` most voted positions give their tokens, and only the [CLS] id is removed, so
    [SEP] or padding can become labels. Multi-hot (B, V)."""
    b, _, n = attn_rows.shape
    top = attn_rows.float().topk(min(per_head, n), dim=-1).indices.reshape(b, -1)
    votes = torch.zeros(b, n, device=attn_rows.device).scatter_add_(1, top, torch.ones(top.shape, device=top.device))
    chosen = votes.topk(min(positions, n), dim=-1).indices
    targets = torch.zeros(b, vocab_size, device=attn_rows.device).scatter_(1, token_ids.gather(1, chosen), 1.0)
    targets[:, cls_id] = 0.0
    return targets


def multilabel_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """SIMLA eq. 8: binary cross-entropy of σ(logits) against ``targets`` in [0, 1], averaged
    over the V vocabulary entries (the paper's 1/V) and over the rows. Eq. 9's distilled form is
    this loss against (1 - α) y^PSL + α σ(p_m^PSL): BCE is linear in its target as well."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


# --------------------------------------------------------------------------------------------
# Downstream fine-tuning (MVPTR §4.2, SemVLP §4, SIMLA §3)
# --------------------------------------------------------------------------------------------


def soft_target_loss(logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """VQA as classification over the answer set (MVPTR §4.2, after VinVL: "a task-specific MLP
    with softmax ... Cross entropy is used during fine-tuning"): cross entropy against each
    question's answer scores (its VQA accuracy per candidate answer) normalised to sum 1. A
    question none of whose answers is in the answer set carries no target and is left out."""
    total = scores.sum(-1)
    keep = total > 0
    if not keep.any():
        return logits.sum() * 0.0
    targets = scores[keep] / total[keep, None]
    return -(targets * F.log_softmax(logits[keep].float(), -1)).sum(-1).mean()


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes (x1, y1, x2, y2) broadcast over leading dims: ``a`` (..., 4), ``b`` (..., 4)."""
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[..., 2:] - x[..., :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-9)


def grounding_loss(scores: torch.Tensor, positive: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
    """Referring-expression grounding as binary classification of each region candidate (MVPTR
    §4.2, "Visual Grounding": the [CLS]-to-region similarity scored by cross entropy), a region
    being positive when its IoU with the referred box is >= 0.5: binary cross entropy over the
    valid regions of every row. ``scores`` (B, K) logits, ``positive`` / ``region_mask`` (B, K)."""
    valid = region_mask.bool()
    return F.binary_cross_entropy_with_logits(scores.float()[valid], positive.float()[valid])
