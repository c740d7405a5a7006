"""ViT, BiT and hybrid building blocks on CPU: structure, initialisation, dropout, weight standardisation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import StdConv2d, VisionTransformer, build_model
from model.resnet import ResNetFeatures


def mu_model(**options):
    return build_model("ViT-Mu/4", num_classes=10, image_size=32, **options)


def test_fresh_model_predicts_zero_logits():
    torch.manual_seed(0)
    logits = mu_model()(torch.randn(3, 3, 32, 32))
    assert torch.equal(logits, torch.zeros(3, 10))


def test_initialisation():
    torch.manual_seed(0)
    model = build_model("ViT-S/16", num_classes=10, image_size=224)
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    mlp_bias = model.blocks[0].mlp.fc1.bias
    assert 0 < mlp_bias.abs().max().item() < 1e-4
    assert torch.equal(model.blocks[0].attn.qkv.bias, torch.zeros_like(model.blocks[0].attn.qkv.bias))
    qkv = model.blocks[0].attn.qkv.weight  # xavier-uniform bound sqrt(6 / (fan_in + fan_out))
    assert qkv.abs().max().item() == pytest.approx((6 / (384 + 3 * 384)) ** 0.5, rel=0.01)


def test_pre_ln_block_order():
    model = mu_model()
    block = model.blocks[0]
    x = torch.randn(2, 65, 64)
    attn_out = block.attn(block.norm1(x))
    expected = x + attn_out
    expected = expected + block.mlp(block.norm2(expected))
    torch.testing.assert_close(block(x), expected)


def test_attention_matches_a_reference_multi_head_attention():
    torch.manual_seed(0)
    attention = mu_model().blocks[0].attn
    x = torch.randn(2, 5, 64)
    q, k, v = attention.qkv(x).split(64, dim=-1)
    heads = lambda t: t.reshape(2, 5, 2, 32).transpose(1, 2)  # noqa: E731
    weights = (heads(q) @ heads(k).transpose(-1, -2) / 32**0.5).softmax(-1)
    expected = attention.proj((weights @ heads(v)).transpose(1, 2).reshape(2, 5, 64))
    torch.testing.assert_close(attention(x), expected)


def test_forward_is_the_class_token_through_final_norm_and_head():
    torch.manual_seed(0)
    model = build_model("ViT-Mu/4", num_classes=5, image_size=32, representation_size=16)
    nn.init.normal_(model.head.weight)
    images = torch.randn(2, 3, 32, 32)
    patches = F.conv2d(images, model.patch_embed.weight, model.patch_embed.bias, stride=4).flatten(2).transpose(1, 2)
    x = torch.cat([model.cls_token.expand(2, -1, -1), patches], 1) + model.pos_embed
    x = model.norm(model.blocks(x))
    expected = model.head(torch.tanh(model.pre_logits[0](x[:, 0])))
    torch.testing.assert_close(model(images), expected)


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    model = mu_model(dropout=0.5)
    nn.init.normal_(model.head.weight)
    images = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(model.train()(images), model(images))
    model.eval()
    torch.testing.assert_close(model(images), model(images))
    # after position embeddings, after attention projection, after each MLP dense layer (shared module)
    assert model.pos_dropout.p == model.blocks[0].attn.proj_dropout.p == model.blocks[0].mlp.dropout.p == 0.5


def test_std_conv_ignores_the_scale_and_offset_of_each_filter():
    torch.manual_seed(0)
    conv = StdConv2d(4, 8, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 6, 6)
    before = conv(x)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(8, 1, 1, 1) * 5 + 0.1).add_(torch.randn(8, 1, 1, 1))
    torch.testing.assert_close(conv(x), before, rtol=1e-4, atol=1e-4)
    # and differs from a plain conv with the same weights
    assert not torch.allclose(F.conv2d(x, conv.weight, padding=1), conv(x), atol=1e-3)


@pytest.mark.parametrize("preact", [True, False])
def test_resnet_features_stride_and_channels(preact):
    features = ResNetFeatures((1, 1, 1), width_factor=1, preact=preact)
    out = features(torch.randn(2, 3, 64, 64))
    assert (features.stride, features.out_channels) == (16, 1024)
    assert out.shape == (2, 1024, 4, 4)
    assert (out >= 0).all()  # both end in a ReLU: BiT's final GN+ReLU, the hybrid's post-activation


def test_resnets_use_group_norm_32_and_std_conv_everywhere():
    model = build_model("R50x2", num_classes=10, device="meta")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
    assert convs and all(isinstance(m, StdConv2d) for m in convs)
    assert norms and all(isinstance(m, nn.GroupNorm) and m.num_groups == 32 for m in norms)
    assert model.features.root[0].out_channels == 128  # x2 doubles the root width too


def test_small_hybrid_runs_on_cpu():
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=64, patch_size=1, width=32, depth=1, mlp_dim=64, num_heads=2, num_classes=3,
        backbone=ResNetFeatures((1, 1), preact=False),
    )  # fmt: skip
    assert model.num_patches == (64 // 8) ** 2
    nn.init.normal_(model.head.weight)
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert model.backbone.root[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("hybrid", [False, True])
def test_patch_embedding_is_the_strided_conv(hybrid):
    # embed_patches computes the conv as one matrix product over flattened patches.
    torch.manual_seed(0)
    if hybrid:
        model = VisionTransformer(
            image_size=64, patch_size=1, width=32, depth=1, mlp_dim=64, num_heads=2, num_classes=3,
            backbone=ResNetFeatures((1, 1), preact=False),
        )  # fmt: skip
        images = torch.randn(2, 3, 64, 64)
    else:
        model, images = mu_model(), torch.randn(2, 3, 32, 32)
    nn.init.normal_(model.patch_embed.bias)
    features = model.backbone(images) if hybrid else images
    expected = model.patch_embed(features).flatten(2).transpose(1, 2)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), model.patch_embed.weight)
    got = model.embed_patches(images)
    (got_grad,) = torch.autograd.grad(got.square().sum(), model.patch_embed.weight)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-4)  # fp32 summation order
    # Channels-last images (what a GPU worker's uint8 loader gives) embed the same.
    channels_last = model.embed_patches(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(channels_last, expected)


def test_the_hybrids_strided_layers_pad_as_tensorflows_same():
    """The official R50+ViT (google-research/vision_transformer, timm's vit_base_r50_s16_*:
    StdConv2dSame, MaxPool2dSame) pads strided layers as TensorFlow's "SAME": output
    ceil(n / stride), the odd pixel of padding after. A symmetric padding (ours before) shifts
    the sampling grid by a pixel: the published weights then give other features."""
    from model.resnet import MaxPool2dSame, pad_same

    # (size, kernel, stride) -> (before, after), by TensorFlow's formula.
    for (n, k, s), (before, after) in {(224, 7, 2): (2, 3), (112, 3, 2): (0, 1), (56, 3, 2): (0, 1),
                                       (7, 3, 2): (1, 1), (384, 7, 2): (2, 3), (28, 1, 2): (0, 0)}.items():
        x = torch.arange(n, dtype=torch.float32).reshape(1, 1, 1, n).expand(1, 1, n, n)
        padded = pad_same(x, k, s, value=-1.0)
        assert padded.shape[-1] == n + before + after, (n, k, s)
        row = padded[0, 0, before]  # the first row of the image
        assert (row[:before] == -1).all() and (row[before:before + n] == x[0, 0, 0]).all() and (row[before + n:] == -1).all()
        assert F.max_pool2d(padded, k, s).shape[-1] == -(-n // s)
    model = build_model("R50+ViT-B/16", num_classes=3, image_size=64)
    root = model.backbone.root
    assert root[0].same and root[0].padding == (0, 0) and isinstance(root[3], MaxPool2dSame)
    strided = [m for m in model.backbone.modules() if getattr(m, "stride", None) == (2, 2) and hasattr(m, "same")]
    # The root, stages 2-3: conv2 (SAME) and the 1x1 projection (SAME pads a 1x1 conv with nothing).
    assert len(strided) == 1 + 2 * 2
    assert all(m.same if m.kernel_size != (1, 1) else m.padding == (0, 0) for m in strided)
    # The pool pads with -inf: a window over the padding holds only what the image has.
    pooled = MaxPool2dSame(3, stride=2)(-torch.ones(1, 1, 4, 4))
    assert (pooled == -1).all()
    # Weight Standardization as the official hybrid code's weight_standardize: (w - mean) / (std + 1e-5).
    convs = [m for m in model.backbone.modules() if isinstance(m, StdConv2d)]
    assert convs and all(m.eps_on_std and m.eps == 1e-5 for m in convs)
    conv = convs[1]
    w = conv.weight.detach()
    official = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True, unbiased=False) + 1e-5)
    x = torch.randn(1, conv.in_channels, 8, 8)
    assert torch.allclose(conv(x), F.conv2d(x, official, None, conv.stride, conv.padding), atol=1e-5)
    # BiT keeps its own (symmetric, zero-padded pool).
    bit = build_model("R50x1", num_classes=3, image_size=64)
    assert not bit.features.root[0].same and bit.features.root[0].padding == (3, 3)
    assert not any(m.eps_on_std for m in bit.modules() if isinstance(m, StdConv2d))
