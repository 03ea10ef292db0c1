"""Masking for the Ray Data CPU stage (numpy, vectorised over the batch): the train step only
computes.

BERT's recipe (Devlin et al., 2019), used by MLM (15%, MVPTR eq. 3) and MVPTR's masked concept
recovering (25%, §3.2): each maskable position is selected with probability ``prob``; a selected
position becomes [MASK] 80% of the time, a random token 10%, and stays unchanged 10%. Labels hold
the original id at selected positions and ``IGNORE`` elsewhere.
"""
from __future__ import annotations

import numpy as np

from alignlab.models.inputs import CONCEPT_MASK, CONCEPT_OFFSET, IGNORE


def bert_mask(ids: np.ndarray, maskable: np.ndarray, prob: float, mask_id: int, random_range: tuple[int, int],
              rng: np.random.Generator, selected: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns (masked ids, labels). ``maskable`` is False at special tokens and padding;
    ``random_range`` is the [low, high) id range random replacements are drawn from (the
    non-special vocabulary). ``selected`` overrides the random selection (chain masking decides
    it elsewhere)."""
    if selected is None:
        selected = maskable & (rng.random(ids.shape) < prob)
    labels = np.where(selected, ids, IGNORE)
    roll = rng.random(ids.shape)
    out = ids.copy()
    out[selected & (roll < 0.8)] = mask_id
    randomise = selected & (roll >= 0.8) & (roll < 0.9)
    out[randomise] = rng.integers(random_range[0], random_range[1], size=int(randomise.sum()))
    return out, labels


def object_mask(region_mask: np.ndarray, prob: float, rng: np.random.Generator) -> np.ndarray:
    """SemVLP's masked object prediction (§3.3.1, from LXMERT): each real object (``region_mask``
    True) is selected with probability ``prob`` (15%). Returns the (B, K) selection; the caller
    zeroes those objects' features ("the object features are masked with zeros") and keeps their
    boxes, so the model knows where a masked object is but not what it looks like."""
    return region_mask & (rng.random(region_mask.shape) < prob)


def chain_mask(phrase_ids: np.ndarray, concept_tokens: list[frozenset[int]], input_ids: np.ndarray,
               selected: np.ndarray, mask_id: int, offset: int) -> np.ndarray:
    """MVPTR's chain masking (§3.3): "if a token is masked, phrase concepts containing the token
    will be masked synchronously", so MLM cannot read a masked word back from its phrase.

    ``phrase_ids`` (B, P) hold concept ``k`` as ``k + offset`` (smaller ids are padding or
    specials); ``concept_tokens[k]`` is the set of token ids of concept k; ``selected`` (B, L) are
    the token positions MLM chose (all of BERT's 80/10/10 outcomes: a kept or randomised token is
    still predicted, so its phrase must not reveal it). A phrase "contains" a token when the
    token's id is among the phrase's ids: a repeated word ("red" of two red shapes) masks every
    phrase with that word, which over-masks rather than leaks. Masked phrases become ``mask_id``.
    """
    out = phrase_ids.copy()
    for b in range(phrase_ids.shape[0]):
        masked = set(input_ids[b][selected[b]].tolist())
        if not masked:
            continue
        for p, pid in enumerate(phrase_ids[b]):
            if pid >= offset and concept_tokens[pid - offset] & masked:
                out[b, p] = mask_id
    return out


def block_mask(n: int, grid: int, ratio: tuple[float, float], rng: np.random.Generator, min_block: int = 16,
               min_aspect: float = 0.3) -> np.ndarray:
    """BEiT's block-wise masking of image patches (Bao et al., 2022, Algorithm 1), used by SIMLA's
    MIM (§2.3): (n, grid, grid) booleans, True at masked patches.

    Per image a target count t = round(r · grid²) is drawn with r ~ U(ratio); rectangles of area
    U(min_block, t - masked) and log-uniform aspect ratio in [min_aspect, 1/min_aspect] are
    placed at random, each kept only if it adds at least one and at most the remaining number of
    new patches (10 tries per block). BEiT stops when a block fails to fit, which can leave an
    image short of its target; we then mask random single patches up to t, so the masked
    fraction always lies within ``ratio`` (up to rounding to whole patches).
    """
    total = grid * grid
    lo, hi = int(np.ceil(ratio[0] * total)), int(np.floor(ratio[1] * total))
    masks = np.zeros((n, grid, grid), dtype=bool)
    log_aspect = (np.log(min_aspect), -np.log(min_aspect))
    for mask in masks:
        target = int(np.clip(round(rng.uniform(*ratio) * total), lo, hi)) if lo <= hi else round(ratio[0] * total)
        count = 0
        while count < target:
            added = 0
            for _ in range(10):
                area = rng.uniform(min(min_block, target - count), target - count)
                aspect = np.exp(rng.uniform(*log_aspect))
                h, w = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
                if not (0 < h <= grid and 0 < w <= grid):
                    continue
                top, left = rng.integers(0, grid - h + 1), rng.integers(0, grid - w + 1)
                new = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < new <= target - count:
                    mask[top:top + h, left:left + w] = True
                    added = new
                    break
            if not added:
                free = np.flatnonzero(~mask.reshape(-1))
                mask.reshape(-1)[rng.choice(free, target - count, replace=False)] = True
                added = target - count
            count += added
    return masks


def random_phrase_mask(phrase_ids: np.ndarray, chained: np.ndarray, prob: float, n_concepts: int,
                       rng: np.random.Generator) -> np.ndarray:
    """The official MVPTR's phrase masking (``random_phrases`` in mvp_pytorch's
    ``oscar/oscar_datasets_ml/oscar_tsv4.py``), on top of chain masking (§3.3): every real phrase
    that chain masking left alone (``chained`` equal to ``phrase_ids`` there) is selected with
    probability ``prob`` and goes through BERT's 80/10/10, a random replacement being a random
    phrase concept. Nothing predicts the phrases (the official code sets their labels to -1), so
    only the masked ids are returned. Ids follow the concept layout (models.inputs CONCEPT_*)."""
    maskable = (phrase_ids >= CONCEPT_OFFSET) & (chained == phrase_ids)
    return bert_mask(chained, maskable, prob, CONCEPT_MASK, (CONCEPT_OFFSET, CONCEPT_OFFSET + n_concepts), rng)[0]
