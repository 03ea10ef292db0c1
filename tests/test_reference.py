"""The frozen-feature reference row: MLP heads over the whole-image region's feature and the
cached sentence feature; the data stage's checks that the shards carry both; its final ranking
scored as every architecture's is."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alignlab.models.base import ConfigError, InputSpec
from alignlab.models.objectives import contrastive_loss
from alignlab.models.registry import build_model
from alignlab.platform import shards as S
from alignlab.platform.config import load_config
from alignlab.platform.evaluate import evaluate_retrieval
from alignlab.platform.ingest import Preprocessor
from alignlab.platform.tokenization import load_tokenizer, vocab_info

REGION_DIM, TEXT_DIM = 10, 6


def _cfg(tmp_path, *extra):
    return load_config("reference_flickr8k", [f"data.shards={tmp_path}", f"model.image.region_dim={REGION_DIM}",
                                              f"model.dual_encoder.text_feature_dim={TEXT_DIM}",
                                              "model.dual_encoder.head_hidden=16", "model.embed_dim=8", *extra])


@pytest.fixture()
def model(tmp_path):
    cfg = _cfg(tmp_path)
    tok = load_tokenizer(cfg.data.tokenizer, str(tmp_path))
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.objectives, vocab_info(tok, str(tmp_path)))


def _batch(n=4, regions=3):
    g = torch.Generator().manual_seed(1)
    return {"region_features": torch.randn(n, regions, REGION_DIM, generator=g),
            "text_features": F.normalize(torch.randn(n, TEXT_DIM, generator=g), dim=-1)}


def test_only_the_heads_and_temperature_train_and_the_loss_is_infonce(model):
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"image_proj", "text_proj", "log_scale"}
    batch = _batch()
    out = model(batch)
    img = F.normalize(model.image_proj(batch["region_features"][:, 0]), dim=-1)
    txt = F.normalize(model.text_proj(batch["text_features"]), dim=-1)
    assert out.losses["itc"].item() == pytest.approx(contrastive_loss(img, txt, model.log_scale.exp()).item(), rel=1e-6)
    out.losses["itc"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_the_image_embedding_reads_the_whole_image_region_only(model):
    batch = _batch()
    before = model.embed_images(batch)
    batch["region_features"][:, 1:] += 5.0  # the detections
    assert torch.equal(model.embed_images(batch), before)
    assert torch.allclose(torch.linalg.norm(before, dim=-1), torch.ones(4), atol=1e-6)


def test_reference_needs_region_features(tmp_path):
    with pytest.raises(ConfigError, match="model.image.kind = 'regions'"):
        _cfg(tmp_path, "model.image.kind=vit")


def _preprocess(tmp_path, batch, spec):
    cfg = _cfg(tmp_path)
    calls = []
    counter = SimpleNamespace(add=SimpleNamespace(remote=lambda *args: calls.append(args)))
    return Preprocessor(cfg.data, cfg.objectives, spec, train=True, counter=counter)(batch), calls


def _rows(n, first_box=(0.0, 0.0, 1.0, 1.0)):
    feats = np.empty(n, dtype=object)
    boxes = np.empty(n, dtype=object)
    for i in range(n):
        feats[i] = np.ones((2, REGION_DIM), np.float32)
        boxes[i] = np.array([first_box, (0.1, 0.1, 0.5, 0.5)], np.float32)
    text = np.empty(n, dtype=object)
    for i in range(n):
        text[i] = np.full(TEXT_DIM, 0.5, np.float32)
    return {"caption": np.array([b"a dog"] * n, dtype=object), "caption_id": np.array([f"c{i}" for i in range(n)]),
            "image_id": np.array([f"i{i}" for i in range(n)]), "region_features": feats, "boxes": boxes,
            "text_feature": text}


def test_the_data_stage_passes_text_features_and_skips_non_finite_ones(tmp_path):
    batch = _rows(3)
    batch["text_feature"][1] = np.full(TEXT_DIM, np.nan, np.float32)
    out, calls = _preprocess(tmp_path, batch, InputSpec(regions=True, whole_image=True, text_features=True))
    assert out["text_features"].shape == (2, TEXT_DIM) and (out["text_features"] == 0.5).all()
    ((skipped, _, _),) = calls
    assert [(reason, cid) for reason, cid, _, _ in skipped] == [("non_finite_text_feature", "c1")]


def test_shards_without_the_whole_image_box_or_text_features_fail_naming_the_fix(tmp_path):
    spec = InputSpec(regions=True, whole_image=True, text_features=True)
    with pytest.raises(S.ShardSchemaError, match=r"caption_id=c0: region 0 is the box \[0.1, 0.1, 0.5, 0.5\].*"
                                                 r"--no-whole-image-box"):
        _preprocess(tmp_path, _rows(2, first_box=(0.1, 0.1, 0.5, 0.5)), spec)
    batch = _rows(2)
    del batch["text_feature"]
    with pytest.raises(S.ShardSchemaError, match="--text-features"):
        _preprocess(tmp_path, batch, spec)


def test_without_itm_the_headline_rsum_is_the_uni_modal_one(model):
    batch = _batch(n=6)
    batch["image_key"] = torch.arange(6)
    metrics = evaluate_retrieval(model, [batch], torch.device("cpu"))
    assert "itm_pairs" not in metrics and metrics["rsum"] == metrics["uni_rsum"]
    assert metrics["i2t_r1"] == metrics["uni_i2t_r1"] and (metrics["eval_images"], metrics["eval_captions"]) == (6, 6)
