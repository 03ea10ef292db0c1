"""Visual tokenizers: image patches -> discrete visual tokens, the targets of SIMLA's masked image
modelling (§2.3, eq. 6: "we tokenize each patch with a discrete VAE ... one of 8192 visual tokens").

The tokenizer is pluggable (``model.simla.visual_tokenizer``, logged with the rest of the
config):

* ``random_projection`` (the default here): BEST-RQ's random-projection quantizer (Chiu et al.,
  2022). Each patch's pixels are standardised, projected by a frozen random matrix and assigned to
  the nearest of ``codebook_size`` frozen random unit vectors (cosine). It needs no downloaded or
  trained weights, is deterministic given its seed, and its buffers live in the checkpoint.
* ``dvae``: a DALL-E / BEiT discrete VAE encoder loaded from a user-given file, the paper's
  tokenizer, for users who have the weights.

Both are frozen (no parameters reach the optimiser) and map uint8 pixels (B, 3, H, W) to token
ids (B, grid²) in patch order (row-major, as timm's ViT flattens patches).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RandomProjectionQuantizer(nn.Module):
    """BEST-RQ's quantizer on image patches: ids = argmax_c <normalize(P x), normalize(e_c)>."""

    def __init__(self, patch_size: int, codebook_size: int, dim: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        in_dim = 3 * patch_size * patch_size
        self.patch_size = patch_size
        # Xavier-scaled projection and unit-norm codebook, as BEST-RQ; buffers, never trained.
        self.register_buffer("projection", torch.randn(in_dim, dim, generator=g) * (2.0 / (in_dim + dim)) ** 0.5)
        self.register_buffer("codebook", F.normalize(torch.randn(codebook_size, dim, generator=g), dim=-1))

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        x = pixels.float() / 255.0
        patches = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # (B, N, 3·p·p), row-major
        # Per-patch standardisation (BEST-RQ normalises its inputs) so tokens encode texture and
        # shape rather than brightness alone.
        patches = (patches - patches.mean(-1, keepdim=True)) / (patches.std(-1, keepdim=True) + 1e-5)
        z = F.normalize(patches @ self.projection, dim=-1)
        return (z @ self.codebook.t()).argmax(-1)


class DVAETokenizer(nn.Module):
    """A DALL-E dVAE encoder (BEiT's tokenizer) loaded from ``path``: a ``torch.save``-d module,
    such as OpenAI's ``encoder.pkl`` (its ``dall_e`` package must be importable to unpickle it).

    As BEiT, the image is resized to 8 × grid pixels (the encoder downsamples by 8, so 112 px for
    a 14 × 14 grid of a 224 px image), mapped with DALL-E's ``map_pixels``, and each position's
    token is the argmax of the encoder's logits (B, vocab, grid, grid).
    """

    LOGIT_EPS = 0.1  # dall_e.utils.map_pixels

    def __init__(self, path: str, grid: int):
        super().__init__()
        self.encoder = torch.load(path, map_location="cpu", weights_only=False)
        self.encoder.requires_grad_(False)
        self.grid = grid

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(pixels.float() / 255.0, size=(8 * self.grid, 8 * self.grid), mode="bilinear",
                          align_corners=False)
        x = (1 - 2 * self.LOGIT_EPS) * x + self.LOGIT_EPS
        return self.encoder(x).argmax(1).flatten(1)


def build_visual_tokenizer(simla_cfg, patch_size: int, grid: int) -> nn.Module:
    if simla_cfg.visual_tokenizer == "dvae":
        return DVAETokenizer(simla_cfg.dvae_path, grid)
    return RandomProjectionQuantizer(patch_size, simla_cfg.codebook_size, simla_cfg.rpq_dim, simla_cfg.rpq_seed)
