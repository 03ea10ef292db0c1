"""The dual-encoder contrastive baseline (the VSE/CLIP-style row the papers compare against).

An image encoder (a timm ViT over pixels, or a transformer over region features) and a BERT-style
text encoder, each projected to a shared L2-normalised space and aligned with symmetric InfoNCE
under a learnable temperature (MVPTR's L_vsc, SIMLA's ITC without queues or distillation).

With ``model.dual_encoder.frozen_features`` it is the *frozen-feature reference row*: both
encoders are pretrained, frozen and run once, at ``alignlab data build`` (the image: the
backbone's pooled feature of the whole-image box, region 0; the text: the cached sentence
feature, ``--text-features``), and only two small MLP heads train. It is what a user gets with no
vision-language pre-training at all, the row every comparison shows beside the architectures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from alignlab.models.base import Ablation, ConfigError, InputSpec, ModelOutput, ModelSpec, PretrainingModel, Vocab
from alignlab.models.blocks import (BertCheckpoint, RegionTransformer, TextEmbeddings, TransformerEncoder,
                                    TransformerSize, ViTEncoder, bert_layer_plan, init_weights)
from alignlab.models.objectives import clamp_logit_scale, contrastive_loss, global_view


class TextEncoder(nn.Module):
    """BERT-style text encoder: embeddings + a stack of transformer layers, [CLS] first."""

    def __init__(self, vocab_size: int, size: TransformerSize, num_layers: int, max_positions: int = 512):
        super().__init__()
        self.embeddings = TextEmbeddings(vocab_size, size, max_positions)
        self.encoder = TransformerEncoder(size, num_layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x, _ = self.encoder(self.embeddings(input_ids), attention_mask.bool())
        return x

    def load_bert(self, ckpt: BertCheckpoint, offset: int = 0) -> None:
        ckpt.load_embeddings(self.embeddings)
        ckpt.load_encoder(self.encoder, bert_layer_plan(ckpt.num_layers, len(self.encoder.layers), offset))


@dataclass
class DualEncoderConfig:
    """``model.dual_encoder``."""

    # The frozen-feature reference row: MLP heads over cached frozen features (module docstring).
    frozen_features: bool = False
    text_feature_dim: int = 384  # the sentence encoder's width (MiniLM-L6: 384)
    head_hidden: int = 1024  # hidden width of each MLP head


def projection_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """A two-layer MLP head (SimCLR's projection head) over a frozen feature."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class DualEncoder(PretrainingModel):
    objectives = ("itc",)

    def __init__(self, model_cfg, objectives_cfg, vocab: Vocab):
        super().__init__()
        self.negatives = objectives_cfg.negatives
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / model_cfg.temperature)))
        own = model_cfg.dual_encoder
        self.frozen_features = own.frozen_features
        if self.frozen_features:
            self.image_proj = projection_head(model_cfg.image.region_dim, own.head_hidden, model_cfg.embed_dim)
            self.text_proj = projection_head(own.text_feature_dim, own.head_hidden, model_cfg.embed_dim)
            return
        size = TransformerSize(model_cfg.hidden_size, model_cfg.num_heads, model_cfg.intermediate_size,
                               model_cfg.dropout)
        img = model_cfg.image
        self.image_kind = img.kind
        self.text = TextEncoder(vocab.size, size, model_cfg.num_layers)
        if img.kind == "vit":
            # timm initialises (or loads) the ViT, or the hybrid ViT over a pretrained CNN trunk.
            self.image = ViTEncoder.from_config(img)
        else:
            self.image = RegionTransformer(img.region_dim, size, model_cfg.num_layers)
            init_weights(self.image, model_cfg.init_std)
        self.text_proj = nn.Linear(size.hidden_size, model_cfg.embed_dim)
        self.image_proj = nn.Linear(self.image.width, model_cfg.embed_dim)
        for m in (self.text, self.text_proj, self.image_proj):
            init_weights(m, model_cfg.init_std)
        if model_cfg.text_init:
            ckpt = BertCheckpoint.from_pretrained(model_cfg.text_init)
            ckpt.check_size(size, "model.text_init")
            self.text.load_bert(ckpt)

    @classmethod
    def input_spec(cls, model_cfg, objectives_cfg) -> InputSpec:
        if model_cfg.dual_encoder.frozen_features:
            return InputSpec(regions=True, whole_image=True, text_features=True)
        kind = model_cfg.image.kind
        return InputSpec(pixels=kind == "vit", regions=kind == "regions")

    def embed_texts(self, batch):
        if self.frozen_features:
            return F.normalize(self.text_proj(batch["text_features"]), dim=-1)
        cls = self.text(batch["input_ids"], batch["attention_mask"])[:, 0]
        return F.normalize(self.text_proj(cls), dim=-1)

    def embed_images(self, batch):
        if self.frozen_features:  # region 0: the whole image's pooled backbone feature
            return F.normalize(self.image_proj(batch["region_features"][:, 0]), dim=-1)
        if self.image_kind == "vit":
            cls = self.image(batch["pixels"])[:, 0]
        else:
            cls = self.image(batch["region_features"], batch["region_mask"])[0][:, 0]
        return F.normalize(self.image_proj(cls), dim=-1)

    def forward(self, batch):
        img, txt = self.embed_images(batch), self.embed_texts(batch)
        img_all, offset = global_view(img, self.negatives)
        txt_all, _ = global_view(txt, self.negatives)
        scale = clamp_logit_scale(self.log_scale)
        loss = contrastive_loss(img, txt, scale, img_all, txt_all, offset)
        return ModelOutput(losses={"itc": loss}, metrics={"temperature": 1.0 / scale.detach()})


def check_config(cfg) -> None:
    if cfg.model.dual_encoder.frozen_features and cfg.model.image.kind != "regions":
        raise ConfigError("model.dual_encoder.frozen_features reads the whole-image region's feature: set "
                          "model.image.kind = 'regions' (shards from `alignlab data build --regions ...`)")


SPEC = ModelSpec(
    name="dual_encoder", model=DualEncoder, config=DualEncoderConfig, check_config=check_config,
    image_kinds=("vit", "regions"),
    ablations=lambda cfg: {"image_encoder": Ablation("Dual-encoder baseline: image encoder",
                                                     {"model.image.kind": ("vit", "regions")}, "model.image.kind")},
)
