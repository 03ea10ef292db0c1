"""Visual tokenizers: image patches -> discrete visual tokens, the targets of SIMLA's masked image
modelling (§2.3, eq. 6: "we tokenize each patch with a discrete VAE ... one of 8192 visual tokens").

The tokenizer is pluggable (``model.simla.visual_tokenizer``, logged with the rest of the
config):

* ``random_projection`` (the default here): BEST-RQ's random-projection quantizer (Chiu et al.,
  2022). Each patch's pixels are standardised, projected by a frozen random matrix and assigned to
  the nearest of ``codebook_size`` frozen random unit vectors (cosine). It needs no downloaded or
  trained weights, is deterministic given its seed, and its buffers live in the checkpoint.
* ``dvae``: a DALL-E / BEiT discrete VAE encoder whose weights (a state dict) are loaded from a
  user-given file into :class:`DVAEEncoder`, the paper's tokenizer, for users who have them.

Both are frozen (no parameters reach the optimiser) and map uint8 pixels (B, 3, H, W) to token
ids (B, grid²) in patch order (row-major, as timm's ViT flattens patches).
"""
from __future__ import annotations

import pickle
import re
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from alignlab.models.base import load_refusal


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


class DVAEError(ValueError):
    """A dVAE encoder file cannot be used; the message names the file and what to do."""


class _Conv(nn.Module):
    """A same-padded convolution whose parameters are named ``w`` and ``b``, as in DALL-E's
    encoder, so its state dict loads unchanged."""

    def __init__(self, n_in: int, n_out: int, kernel: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n_out, n_in, kernel, kernel))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.w.shape[-1] - 1) // 2)


class _EncoderBlock(nn.Module):
    """DALL-E's residual block: identity (or a 1x1 projection when the width changes) plus the
    bottleneck path relu-3x3-relu-3x3-relu-3x3-relu-1x1 at a quarter of the width, scaled by
    1 / n_layers² (the encoder's post-gain)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        hidden = n_out // 4
        self.id_path = _Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", _Conv(n_in, hidden, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", _Conv(hidden, hidden, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", _Conv(hidden, hidden, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", _Conv(hidden, n_out, 1))]))
        self.post_gain = 1.0 / n_layers ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DVAEEncoder(nn.Module):
    """The encoder of DALL-E's discrete VAE (Ramesh et al., 2021), the tokenizer BEiT and SIMLA
    use: a 7x7 input convolution to ``hidden`` channels, four groups of ``blocks_per_group``
    residual blocks at 1, 2, 4 and 8 x ``hidden`` channels, max-pooled by 2 after each of the
    first three (so the grid is the image side / 8), and a relu + 1x1 convolution to
    ``vocab_size`` logits. Parameter names follow OpenAI's ``dall_e`` package (``blocks.input.w``,
    ``blocks.group_1.block_1.res_path.conv_1.w``, ..., ``blocks.output.conv.b``): the state dict
    of its ``encoder.pkl`` loads as is. OpenAI's defaults: hidden 256, 2 blocks per group, 8192
    tokens."""

    GROUPS = 4

    def __init__(self, hidden: int = 256, blocks_per_group: int = 2, vocab_size: int = 8192, in_channels: int = 3):
        super().__init__()
        n_layers = self.GROUPS * blocks_per_group
        groups: list[tuple[str, nn.Module]] = [("input", _Conv(in_channels, hidden, 7))]
        width = hidden
        for g in range(self.GROUPS):
            out = hidden * 2 ** g
            layers: list[tuple[str, nn.Module]] = []
            for i in range(blocks_per_group):
                layers.append((f"block_{i + 1}", _EncoderBlock(width, out, n_layers)))
                width = out
            if g < self.GROUPS - 1:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(layers))))
        groups.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()),
                                                            ("conv", _Conv(width, vocab_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], where: str) -> "DVAEEncoder":
        """The encoder whose sizes the state dict's shapes give, with its weights loaded (strict)."""
        try:
            hidden, in_channels = state["blocks.input.w"].shape[:2]
            vocab_size = state["blocks.output.conv.w"].shape[0]
        except (KeyError, AttributeError, ValueError) as e:
            raise DVAEError(f"{where}: not a DALL-E dVAE encoder state dict (no {e} tensor); found keys "
                            f"{sorted(state)[:6]}...") from e
        blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", k))}
        encoder = cls(int(hidden), max(blocks, default=1), int(vocab_size), int(in_channels))
        try:
            encoder.load_state_dict(state)
        except RuntimeError as e:
            raise DVAEError(f"{where}: the tensors do not fit a DALL-E dVAE encoder: {' '.join(str(e).split())}") from e
        return encoder


_CONVERT = ("Convert a pickled encoder once, in an isolated environment you trust, to its state dict saved with "
            "safetensors (safetensors.torch.save_file(encoder.state_dict(), 'encoder.safetensors')), and point "
            "model.simla.dvae_path at that file")


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors by name from a ``.safetensors`` file or a ``torch.save``-d state dict. Never
    unpickles objects: a file holding code (a pickled module such as OpenAI's ``encoder.pkl``)
    is refused, naming the file, before anything in it runs."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise DVAEError(f"{path}: no such dVAE encoder file") from e
    except pickle.UnpicklingError as e:
        raise DVAEError(f"{path}: not a state dict of tensors (the weights-only unpickler refused it, so nothing "
                        f"in it ran: {load_refusal(e)}). {_CONVERT}") from e
    except Exception as e:  # safetensors' and torch's errors on other bytes: not a state dict either
        raise DVAEError(f"{path}: not a state dict of tensors ({type(e).__name__}: {str(e)[:160]}). {_CONVERT}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DVAEError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return state


class DVAETokenizer(nn.Module):
    """SIMLA's MIM targets from a DALL-E dVAE encoder whose weights are read from ``path``, a
    state dict (``.safetensors``, or ``torch.save`` of ``encoder.state_dict()``) of
    :class:`DVAEEncoder`.

    As BEiT, the image is resized to 8 × grid pixels (the encoder downsamples by 8, so 112 px for
    a 14 × 14 grid of a 224 px image), mapped with DALL-E's ``map_pixels``, and each position's
    token is the argmax of the encoder's logits (B, vocab, grid, grid).
    """

    LOGIT_EPS = 0.1  # dall_e.utils.map_pixels

    def __init__(self, path: str, grid: int):
        super().__init__()
        self.encoder = DVAEEncoder.from_state_dict(load_state_dict(path), path)
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
