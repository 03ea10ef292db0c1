"""The dual-encoder contrastive baseline (the VSE/CLIP-style row the papers compare against).

An image encoder (a timm ViT over pixels, or a transformer over region features) and a BERT-style
text encoder, each projected to a shared L2-normalised space and aligned with symmetric InfoNCE
under a learnable temperature (MVPTR's L_vsc, SIMLA's ITC without queues or distillation).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from alignlab.models.base import Ablation, InputSpec, ModelOutput, ModelSpec, PretrainingModel, Vocab
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


class DualEncoder(PretrainingModel):
    objectives = ("itc",)

    def __init__(self, model_cfg, objectives_cfg, vocab: Vocab):
        super().__init__()
        size = TransformerSize(model_cfg.hidden_size, model_cfg.num_heads, model_cfg.intermediate_size,
                               model_cfg.dropout)
        img = model_cfg.image
        self.image_kind = img.kind
        self.negatives = objectives_cfg.negatives
        self.text = TextEncoder(vocab.size, size, model_cfg.num_layers)
        if img.kind == "vit":
            # timm initialises (or loads) the ViT, or the hybrid ViT over a pretrained CNN trunk.
            self.image = ViTEncoder.from_config(img)
        else:
            self.image = RegionTransformer(img.region_dim, size, model_cfg.num_layers)
            init_weights(self.image)
        self.text_proj = nn.Linear(size.hidden_size, model_cfg.embed_dim)
        self.image_proj = nn.Linear(self.image.width, model_cfg.embed_dim)
        for m in (self.text, self.text_proj, self.image_proj):
            init_weights(m)
        if model_cfg.text_init:
            ckpt = BertCheckpoint.from_pretrained(model_cfg.text_init)
            ckpt.check_size(size, "model.text_init")
            self.text.load_bert(ckpt)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / model_cfg.temperature)))

    @classmethod
    def input_spec(cls, model_cfg, objectives_cfg) -> InputSpec:
        kind = model_cfg.image.kind
        return InputSpec(pixels=kind == "vit", regions=kind == "regions")

    def embed_texts(self, batch):
        cls = self.text(batch["input_ids"], batch["attention_mask"])[:, 0]
        return F.normalize(self.text_proj(cls), dim=-1)

    def embed_images(self, batch):
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


SPEC = ModelSpec(
    name="dual_encoder", model=DualEncoder, image_kinds=("vit", "regions"),
    ablations=lambda cfg: {"image_encoder": Ablation("Dual-encoder baseline: image encoder",
                                                     {"model.image.kind": ("vit", "regions")}, "model.image.kind")},
)
