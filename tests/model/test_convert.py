"""Position-embedding resize, head replacement and checkpoint adaptation for fine-tuning."""

import pytest
import torch

from model import adapt_pretrained, build_model, replace_head, resize_pos_embed


def test_resize_is_identity_when_the_grid_is_unchanged():
    posemb = torch.randn(1, 1 + 7 * 7, 16)
    torch.testing.assert_close(resize_pos_embed(posemb, 7), posemb, rtol=0, atol=1e-6)


def test_resize_keeps_class_token_and_shape():
    posemb = torch.randn(1, 1 + 14 * 14, 8)
    resized = resize_pos_embed(posemb, 24)
    assert resized.shape == (1, 1 + 24 * 24, 8)
    assert torch.equal(resized[:, 0], posemb[:, 0])
    resized = resize_pos_embed(posemb, (6, 10))
    assert resized.shape == (1, 1 + 60, 8)


def test_resize_keeps_several_prefix_tokens():
    posemb = torch.randn(1, 2 + 4 * 4, 3)
    resized = resize_pos_embed(posemb, 8, num_prefix_tokens=2)
    assert torch.equal(resized[:, :2], posemb[:, :2])
    assert resized.shape == (1, 2 + 64, 3)


def test_resize_keeps_a_linear_ramp_linear():
    old, new = 8, 12
    # value = column position in image coordinates (pixel centres at (i + 0.5) / grid)
    ramp = lambda grid: ((torch.arange(grid) + 0.5) / grid).repeat(grid, 1)  # noqa: E731
    posemb = torch.cat([torch.full((1,), 9.0), ramp(old).flatten()]).reshape(1, -1, 1)
    resized = resize_pos_embed(posemb, new)[0, 1:, 0].reshape(new, new)
    # Bilinear interpolation is exact on a linear function away from the clamped borders.
    inner = slice(1, new - 1)
    torch.testing.assert_close(resized[:, inner], ramp(new)[:, inner], rtol=0, atol=1e-5)
    assert (resized.diff(dim=1) >= 0).all()  # still monotone along columns
    torch.testing.assert_close(resized.diff(dim=0), torch.zeros(new - 1, new))  # constant along rows


def test_resize_does_not_mutate_and_keeps_dtype():
    posemb = torch.randn(1, 1 + 16, 4, dtype=torch.bfloat16)
    copy = posemb.clone()
    assert resize_pos_embed(posemb, 6).dtype == torch.bfloat16
    assert torch.equal(posemb, copy)


def test_resize_rejects_non_square_grid():
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(torch.randn(1, 1 + 12, 4), 4)


def pretrained_state(**options):
    torch.manual_seed(0)
    model = build_model("ViT-Mu/4", num_classes=21, image_size=32, representation_size=64, **options)
    torch.nn.init.normal_(model.head.weight)
    return model.state_dict()


def test_replace_head():
    state = pretrained_state()
    before = {key: value.clone() for key, value in state.items()}
    new_state = replace_head(state, num_classes=5)
    assert not any(key.startswith("pre_logits") for key in new_state)
    assert new_state["head.weight"].shape == (5, 64)
    assert new_state["head.bias"].shape == (5,)
    assert not new_state["head.weight"].any() and not new_state["head.bias"].any()
    assert new_state.keys() == {k for k in state if not k.startswith("pre_logits")}
    # the input is untouched
    assert state.keys() == before.keys()
    assert all(torch.equal(state[key], before[key]) for key in state)


def test_adapt_pretrained_loads_strictly_into_a_384px_model_with_other_classes():
    state = pretrained_state()
    finetune = build_model("ViT-Mu/4", num_classes=37, image_size=384)
    adapted = adapt_pretrained(state, finetune)
    finetune.load_state_dict(adapted, strict=True)
    assert finetune.pos_embed.shape == (1, 1 + 96 * 96, 64)
    assert torch.equal(finetune.pos_embed[:, 0], state["pos_embed"][:, 0])
    assert torch.equal(finetune.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])
    assert not finetune.head.weight.any()
    assert "pre_logits.0.weight" in state and state["pos_embed"].shape == (1, 65, 64)  # input unchanged


def test_adapt_pretrained_drops_masked_patch_parameters():
    state = pretrained_state(masked_patch_prediction=True)
    finetune = build_model("ViT-Mu/4", num_classes=10, image_size=48)
    adapted = adapt_pretrained(state, finetune)
    finetune.load_state_dict(adapted, strict=True)
    dropped = state.keys() - adapted.keys()
    assert dropped and all(not k.startswith(("blocks.", "patch_embed.", "norm.")) for k in dropped), dropped
    # The encoder is the pretrained one, weight for weight; only the new head starts at zero.
    for key, value in finetune.state_dict().items():
        if key.startswith(("blocks.", "patch_embed.", "norm.")):
            assert torch.equal(value, state[key]), key
    assert not finetune.head.weight.any()


def test_adapt_pretrained_keeps_a_matching_checkpoint_as_is():
    state = pretrained_state()
    same = build_model("ViT-Mu/4", num_classes=21, image_size=32, representation_size=64)
    adapted = adapt_pretrained(state, same)
    assert adapted.keys() == state.keys()
    assert all(adapted[key] is state[key] for key in state)


@pytest.mark.parametrize("name", ["R50+ViT-B/16", "R50x1"])
def test_adapt_pretrained_on_meta_for_hybrids_and_resnets(name):
    pretrained = build_model(name, num_classes=1000, device="meta").state_dict()
    finetune = build_model(name, num_classes=10, image_size=384, device="meta")
    finetune.load_state_dict(adapt_pretrained(pretrained, finetune), strict=True)


def test_adapt_pretrained_refuses_to_invent_a_pre_logits_layer():
    state = build_model("ViT-Mu/4", num_classes=21, image_size=32).state_dict()
    finetune = build_model("ViT-Mu/4", num_classes=10, image_size=32, representation_size=64)
    with pytest.raises(ValueError, match="pre-logits"):
        adapt_pretrained(state, finetune)
