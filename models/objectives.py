"""Pre-training objectives as small pure functions of tensors.

Every architecture takes its losses from here: contrastive alignment (MVPTR's VSC, SIMLA's ITC,
the dual-encoder baseline), hard-negative sampling for ITM / WPG, masked-token prediction
(MLM, MCR, masked-object labels), and the global-batch view of features across DDP workers.

Global batches: the papers' batch sizes are global (MVPTR 1024 on 8 GPUs, SIMLA 512 on 8). Each
worker computes the loss of its own rows against the columns of *all* workers, with labels offset
by its rank; features are gathered with an autograd-aware all-gather so that the gradient of
every worker's loss reaches the rows that produced them. Averaging gradients over workers (DDP)
then gives exactly the gradient of the loss over the concatenated batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------
# Global batch across DDP workers
# --------------------------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All workers' ``x`` concatenated along dim 0, differentiable with respect to the local
    rows, and the offset of the local rows in it. A single process returns ``(x, 0)`` unchanged.
    Every worker must hold the same number of rows (the data stage drops ragged last batches)."""
    if not _distributed():
        return x, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x)
    return torch.cat(parts, 0), dist.get_rank() * x.shape[0]


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All workers' ``x`` concatenated, without gradient (momentum features for SIMLA's queues,
    candidate ids for hard-negative lookup)."""
    if not _distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


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


def clamp_logit_scale(log_scale: torch.Tensor, max_scale: float = 100.0) -> torch.Tensor:
    """exp of a learnable log(1/τ), capped as CLIP does so τ cannot collapse to zero."""
    return log_scale.exp().clamp(max=max_scale)


# --------------------------------------------------------------------------------------------
# Hard negatives for ITM and WPG
# --------------------------------------------------------------------------------------------


def hard_negative_weights(logits: torch.Tensor, same_item: torch.Tensor) -> torch.Tensor:
    """p_v2s / p_s2v of MVPTR eq. 1 (softmax of S/τ over candidates) with every candidate that is
    the positive itself, or another caption/copy of the same image, given zero probability."""
    return logits.float().softmax(-1).masked_fill(same_item, 0.0)


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


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary image-text matching as 2-way cross-entropy over [no-match, match] (MVPTR eq. 4,
    SIMLA eq. 5)."""
    return F.cross_entropy(logits.float(), labels.long())


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
