"""Masking for the Ray Data CPU stage (numpy, vectorised over the batch): the train step only
computes.

BERT's recipe (Devlin et al., 2019), used by MLM (15%, MVPTR eq. 3) and MVPTR's masked concept
recovering (25%, §3.2): each maskable position is selected with probability ``prob``; a selected
position becomes [MASK] 80% of the time, a random token 10%, and stays unchanged 10%. Labels hold
the original id at selected positions and ``IGNORE`` elsewhere.
"""
from __future__ import annotations

import numpy as np

IGNORE = -100


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
