"""Frozen sentence features: the cached text side of the frozen-feature reference row.

Each caption is run once through a frozen BERT-family encoder and its last layer is mean-pooled
over the caption's tokens and L2-normalised, the sentence-embedding recipe the offline
``all-MiniLM-L6-v2`` checkpoint was trained for (Reimers & Gurevych 2019, mean pooling). The vector
is stored with the caption (``text_feature``), so a model reading it trains only what sits above.
"""
from __future__ import annotations

import numpy as np


class SentenceFeaturizer:
    """``__call__(captions) -> (N, hidden) float32``, unit-norm rows."""

    def __init__(self, name_or_path: str, max_length: int = 64, batch_size: int = 128):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from alignlab.models.blocks import resolve_pretrained

        path = resolve_pretrained(name_or_path)
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.dim = int(self.model.config.hidden_size)
        self.max_length, self.batch_size = max_length, batch_size

    def __call__(self, captions: list[str]) -> np.ndarray:
        torch = self._torch
        out = np.zeros((len(captions), self.dim), np.float32)
        # Batches of similar length pad little.
        order = np.argsort([len(c) for c in captions], kind="stable")
        for start in range(0, len(captions), self.batch_size):
            idx = order[start:start + self.batch_size]
            tok = self.tokenizer([captions[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            with torch.inference_mode():
                hidden = self.model(**tok).last_hidden_state
            mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out
