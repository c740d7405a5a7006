"""Foreign ViT checkpoints in and out (model/foreign.py), on files these tests write themselves in
the published layouts (no weights can be downloaded here): the JAX/Flax .npz trees of
google-research/vision_transformer and big_vision, and timm's state dict names. The layouts are
written out below from the documented names (timm's `_load_weights` reads the same), not by the
code under test; the check is the logits of the model that carries the converted weights."""

import io
import json
import os
import sys

import numpy as np
import pytest
import torch

from model import build_model
from model.foreign import ForeignWeightsError, check_state, from_npz, from_timm, read_npz, to_timm
from tests.conftest import run_process

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "launch", "import_weights.py")


def source_model(name="ViT-Ti/16", image_size=32, num_classes=7, representation_size=None, seed=0):
    torch.manual_seed(seed)
    model = build_model(name, num_classes=num_classes, image_size=image_size, representation_size=representation_size)
    with torch.no_grad():  # every parameter non-trivial (the zoo's init zeroes the head and biases)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def npz_tree(model, layout: str) -> dict[str, np.ndarray]:
    """The model's weights as the published .npz trees name and shape them.

    original: Transformer/encoderblock_i/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
      MlpBlock_3}, Transformer/posembed_input/pos_embedding with the class token's position first;
    big_vision: params/ prefix, {LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
      MlpBlock_0} stacked over a first axis (scanned encoder), pos_embedding for patches only.
    Kernels are (in, out), convs HWIO, attention q/k/v kernels (D, heads, head_dim), out (heads, head_dim, D).
    """
    s = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    heads = model.blocks[0].attn.num_heads
    width = s["cls_token"].shape[-1]
    hd = width // heads
    tree = {"embedding/kernel": s["patch_embed.weight"].transpose(2, 3, 1, 0), "embedding/bias": s["patch_embed.bias"],
            "cls": s["cls_token"], "Transformer/encoder_norm/scale": s["norm.weight"],
            "Transformer/encoder_norm/bias": s["norm.bias"], "head/kernel": s["head.weight"].T,
            "head/bias": s["head.bias"]}
    if "pre_logits.0.weight" in s:
        tree["pre_logits/kernel"], tree["pre_logits/bias"] = s["pre_logits.0.weight"].T, s["pre_logits.0.bias"]
    mha, ln2, mlp = (1, 2, 3) if layout == "original" else (0, 1, 0)
    blocks = []
    for i in range(len(model.blocks)):
        b = f"blocks.{i}."
        q, k, v = np.split(s[b + "attn.qkv.weight"], 3)  # rows: q, k, v outputs
        qb, kb, vb = np.split(s[b + "attn.qkv.bias"], 3)
        att = f"MultiHeadDotProductAttention_{mha}/"
        block = {"LayerNorm_0/scale": s[b + "norm1.weight"], "LayerNorm_0/bias": s[b + "norm1.bias"],
                 f"LayerNorm_{ln2}/scale": s[b + "norm2.weight"], f"LayerNorm_{ln2}/bias": s[b + "norm2.bias"],
                 f"MlpBlock_{mlp}/Dense_0/kernel": s[b + "mlp.fc1.weight"].T, f"MlpBlock_{mlp}/Dense_0/bias": s[b + "mlp.fc1.bias"],
                 f"MlpBlock_{mlp}/Dense_1/kernel": s[b + "mlp.fc2.weight"].T, f"MlpBlock_{mlp}/Dense_1/bias": s[b + "mlp.fc2.bias"],
                 att + "out/kernel": s[b + "attn.proj.weight"].T.reshape(heads, hd, width), att + "out/bias": s[b + "attn.proj.bias"]}
        for n, w_, b_ in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            block[att + f"{n}/kernel"] = w_.T.reshape(width, heads, hd)
            block[att + f"{n}/bias"] = b_.reshape(heads, hd)
        blocks.append(block)
    if layout == "original":
        tree["Transformer/posembed_input/pos_embedding"] = s["pos_embed"]
        for i, block in enumerate(blocks):
            tree.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in block.items()})
        return tree
    assert np.all(s["pos_embed"][:, 0] == 0)  # big_vision gives the class token no position
    tree["pos_embedding"] = s["pos_embed"][:, 1:]
    for key in blocks[0]:
        tree[f"Transformer/encoderblock/{key}"] = np.stack([block[key] for block in blocks])
    return {f"params/{k}": np.ascontiguousarray(v) for k, v in tree.items()}


def npz_bytes(tree) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **tree)
    return buffer.getvalue()


@pytest.mark.parametrize("layout,representation_size", [("original", 48), ("big_vision", None)])
def test_an_npz_tree_converts_to_the_same_model(layout, representation_size):
    source = source_model(representation_size=representation_size)
    if layout == "big_vision":
        with torch.no_grad():
            source.pos_embed[:, 0] = 0
    state = from_npz(read_npz(npz_bytes(npz_tree(source, layout))))
    build = check_state(state, "ViT-Ti/16")
    assert build == {"num_classes": 7, "image_size": 32, "representation_size": representation_size}
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = source(images)
        model = build_model("ViT-Ti/16", **build)
        model.load_state_dict(state, strict=True)
        got = model.eval()(images)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def hybrid_tree(model) -> dict[str, np.ndarray]:
    """An R50+ViT's .npz as the original code names it: the ViT part as npz_tree's "original", the
    ResNet as conv_root, gn_root, block{i}/unit{j}/{conv,gn}{1,2,3}, conv_proj, gn_proj."""
    tree = npz_tree(model, "original")
    hwio = lambda conv: conv.weight.detach().numpy().transpose(2, 3, 1, 0)  # noqa: E731
    vec = lambda t: t.detach().numpy()  # noqa: E731
    root = model.backbone.root
    tree.update({"conv_root/kernel": hwio(root[0]), "gn_root/scale": vec(root[1].weight), "gn_root/bias": vec(root[1].bias)})
    for i, stage in enumerate(model.backbone.stages):
        for j, unit in enumerate(stage):
            base = f"block{i + 1}/unit{j + 1}/"
            for r in (1, 2, 3):
                tree[f"{base}conv{r}/kernel"] = hwio(getattr(unit, f"conv{r}"))
                tree[f"{base}gn{r}/scale"] = vec(getattr(unit, f"norm{r}").weight)
                tree[f"{base}gn{r}/bias"] = vec(getattr(unit, f"norm{r}").bias)
            if unit.downsample is not None:
                tree[f"{base}conv_proj/kernel"] = hwio(unit.downsample[0])
                tree[f"{base}gn_proj/scale"] = vec(unit.downsample[1].weight)
                tree[f"{base}gn_proj/bias"] = vec(unit.downsample[1].bias)
    return tree


def bit_tree(model) -> dict[str, np.ndarray]:
    """A BiT ResNet-v2 .npz as google-research/big_transfer names it."""
    hwio = lambda conv: conv.weight.detach().numpy().transpose(2, 3, 1, 0)  # noqa: E731
    vec = lambda t: t.detach().numpy()  # noqa: E731
    f = model.features
    tree = {"resnet/root_block/standardized_conv2d/kernel": hwio(f.root[0]),
            "resnet/group_norm/gamma": vec(f.norm[0].weight), "resnet/group_norm/beta": vec(f.norm[0].bias),
            "resnet/head/conv2d/kernel": vec(model.head.weight).T.reshape(1, 1, *model.head.weight.shape[::-1]),
            "resnet/head/conv2d/bias": vec(model.head.bias)}
    for i, stage in enumerate(f.stages):
        for j, unit in enumerate(stage):
            base = f"resnet/block{i + 1}/unit{j + 1:02d}/"
            for r, letter in ((1, "a"), (2, "b"), (3, "c")):
                tree[f"{base}{letter}/standardized_conv2d/kernel"] = hwio(getattr(unit, f"conv{r}"))
                tree[f"{base}{letter}/group_norm/gamma"] = vec(getattr(unit, f"norm{r}").weight)
                tree[f"{base}{letter}/group_norm/beta"] = vec(getattr(unit, f"norm{r}").bias)
            if unit.downsample is not None:
                tree[f"{base}a/proj/standardized_conv2d/kernel"] = hwio(unit.downsample)
    return tree


@pytest.mark.parametrize("name,tree", [("R50+ViT-B/16", hybrid_tree), ("R50x1", bit_tree)])
def test_hybrid_and_bit_npz_trees_convert_to_the_same_model(name, tree):
    from model.foreign import looks_like

    source = source_model(name, image_size=64, num_classes=5)
    state = from_npz(read_npz(npz_bytes(tree(source))))
    assert looks_like(state) == name
    build = check_state(state, name)
    assert build["num_classes"] == 5
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source(images)
        model = build_model(name, num_classes=5, image_size=64)
        model.load_state_dict(state, strict=True)
        got = model.eval()(images)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_timm_hybrid_and_resnetv2_states_convert_both_ways():
    """timm's names (vision_transformer_hybrid's `patch_embed.backbone.*`, resnetv2's `stem.conv`,
    `stages.i.blocks.j`, `downsample.conv`/`.norm`, `norm`, a 1x1-conv `head.fc`), written here
    from our names, come back as ours exactly."""
    import re

    def timm_resnet(key, norm_in_downsample):
        key = key.replace("root.0.", "stem.conv.").replace("root.1.", "stem.norm.")
        key = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", key)
        if norm_in_downsample:
            return key.replace("downsample.0.", "downsample.conv.").replace("downsample.1.", "downsample.norm.")
        return key.replace("downsample.", "downsample.conv.")

    hybrid = source_model("R50+ViT-B/16", image_size=64, num_classes=5).state_dict()
    theirs = {("patch_embed.backbone." + timm_resnet(k[len("backbone."):], True)) if k.startswith("backbone.")
              else k.replace("patch_embed.", "patch_embed.proj."): v for k, v in hybrid.items()}
    assert "patch_embed.backbone.stages.0.blocks.0.downsample.conv.weight" in theirs
    out = to_timm(hybrid)  # and ours out: the same names, the same tensors
    assert set(out) == set(theirs) and all(torch.equal(out[k], theirs[k]) for k in theirs)
    back = from_timm(theirs)
    assert set(back) == set(hybrid) and all(torch.equal(back[k], hybrid[k]) for k in hybrid)
    bit = source_model("R50x1", image_size=64, num_classes=5).state_dict()
    theirs = {}
    for k, v in bit.items():
        if k.startswith("features.norm.0."):
            theirs["norm." + k.split(".")[-1]] = v
        elif k.startswith("head."):
            theirs["head.fc." + k.split(".")[-1]] = v[:, :, None, None] if v.ndim == 2 else v
        else:
            theirs[timm_resnet(k[len("features."):], False)] = v
    assert "stages.1.blocks.0.downsample.conv.weight" in theirs and "stem.conv.weight" in theirs
    out = to_timm(bit)
    assert set(out) == set(theirs) and all(torch.equal(out[k], theirs[k]) for k in theirs)
    back = from_timm(theirs)
    assert set(back) == set(bit) and all(torch.equal(back[k], bit[k]) for k in bit)


def test_timm_names_round_trip_and_match_timms_layout():
    source = source_model()
    state = source.state_dict()
    theirs = to_timm(state)
    # timm's vit_*_patch* names (vision_transformer.VisionTransformer, num_classes > 0).
    assert {"patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "blocks.0.norm1.weight",
            "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias",
            "norm.weight", "head.weight", "head.bias"} <= set(theirs)
    assert not any(k.startswith("patch_embed.weight") for k in theirs)
    back = from_timm(theirs)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_a_mismatch_names_the_key_both_shapes_and_the_model_it_looks_like():
    state = source_model().state_dict()
    with pytest.raises(ForeignWeightsError, match=r"not ViT-S/16: .* is \(1, 1, 192\) in the file, \(1, 1, 384\) in "
                                                  r"ViT-S/16 \(the file looks like ViT-Ti/16\)"):
        check_state(state, "ViT-S/16")
    del state["blocks.11.mlp.fc2.bias"]
    with pytest.raises(ForeignWeightsError, match="the file has no blocks.11.mlp.fc2.bias"):
        check_state(state, "ViT-Ti/16")


def test_refused_files_are_refused_without_unpickling():
    with pytest.raises(ForeignWeightsError, match="pickled objects"):
        read_npz(npz_bytes({"embedding/kernel": np.array([object()], dtype=object)}))
    good = npz_bytes(npz_tree(source_model(), "original"))
    with pytest.raises(ForeignWeightsError, match="not a readable .npz"):
        read_npz(good[: len(good) // 2])
    with pytest.raises(ForeignWeightsError, match="a hybrid without its ResNet stages"):
        from_npz({"embedding/kernel": np.zeros((1, 1, 1024, 768)), "conv_root/kernel": np.zeros((7, 7, 3, 64)),
                  "gn_root/scale": np.zeros(64), "gn_root/bias": np.zeros(64), "cls": np.zeros((1, 1, 768))})


def run(*args):
    return run_process([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=180, cwd=ROOT)


def test_the_command_imports_an_npz_as_an_export_finetune_takes_and_gives_it_to_timm(tmp_path):
    from orchestrator.checkpoint import load_exported_weights
    from orchestrator.finetuning import read_weights_record

    source = source_model()
    npz = tmp_path / "ViT-Ti_16.npz"
    npz.write_bytes(npz_bytes(npz_tree(source, "original")))
    out = run("--input", str(npz), "--output", str(tmp_path / "imported"))  # the model found from its shapes
    assert out.returncode == 0, out.stderr
    weights = out.stdout.strip().splitlines()[-1]
    assert weights == str(tmp_path / "imported" / "weights" / "model.safetensors")
    record = read_weights_record(weights)  # what launch/finetune.py --weights reads first
    assert (record["model"], record["num_classes"], record["image_size"], record["source_format"]) == (
        "ViT-Ti/16", 7, 32, "npz")
    # Fine-tuning's load: a 10-class head at 64 px from the 7-class 32 px import.
    model = build_model("ViT-Ti/16", num_classes=10, image_size=64)
    load_exported_weights(model, weights, sha256=record["sha256"])
    assert torch.equal(model.blocks[3].mlp.fc1.weight, source.blocks[3].mlp.fc1.weight)
    assert torch.count_nonzero(model.head.weight) == 0
    # The same file again: the same bytes.
    again = run("--input", str(npz), "--output", str(tmp_path / "again"), "--model", "ViT-Ti/16")
    assert json.loads(open(tmp_path / "again" / "weights" / "model.json").read())["sha256"] == record["sha256"], again.stderr
    # Out to timm: its names, the model named.
    timm_file = tmp_path / "timm.safetensors"
    out = run("--input", weights, "--to", "timm", "--output", str(timm_file))
    assert out.returncode == 0, out.stderr
    assert "timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, num_classes=7)" in out.stdout
    from safetensors.torch import load_file

    theirs = load_file(str(timm_file))
    assert torch.equal(theirs["patch_embed.proj.weight"], source.patch_embed.weight.detach())


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "text.npz").write_text("not a zip")
    torch.save({"x": torch.zeros(1), "obj": io.StringIO()}, tmp_path / "custom.pth")
    np.savez(tmp_path / "vit.npz", **npz_tree(source_model(), "original"))
    from safetensors.torch import save
    whole = save({k: v.contiguous() for k, v in to_timm(source_model().state_dict()).items()})
    (tmp_path / "cut.safetensors").write_bytes(whole[: len(whole) // 3])  # a download cut short
    cases = [
        (["--input", str(tmp_path / "cut.safetensors"), "--output", str(tmp_path / "o")],
         ["cut.safetensors: not a readable safetensors file"]),
        (["--input", str(tmp_path / "text.npz"), "--output", str(tmp_path / "o")], ["not a readable .npz"]),
        (["--input", str(tmp_path / "custom.pth"), "--output", str(tmp_path / "o")], ["weights_only=True"]),
        (["--input", str(tmp_path / "vit.npz"), "--output", str(tmp_path / "o"), "--model", "ViT-B/16"],
         ["not ViT-B/16", "looks like ViT-Ti/16"]),
        (["--input", str(tmp_path / "missing.npz"), "--output", str(tmp_path / "o")], ["missing.npz"]),
        (["--input", str(tmp_path / "vit.npz"), "--output", str(tmp_path / "o"), "--model", "ViT-Q/16"],
         ["unknown model 'ViT-Q/16'", "ViT-B/16"]),
    ]
    for args, named in cases:
        out = run(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, (args, out.stderr)
        for text in named:
            assert text in out.stderr, (args, out.stderr)
    assert not (tmp_path / "o").exists()  # nothing written


def test_finetune_takes_a_foreign_file_and_imports_it_beside_itself(tmp_path):
    """launch/finetune.py --weights ViT-Ti_16.npz: orchestrator.imports.export_for, before its preflight."""
    from orchestrator.config import ConfigError
    from orchestrator.finetuning import read_weights_record
    from orchestrator.imports import export_for

    npz = tmp_path / "ViT-Ti_16.npz"
    npz.write_bytes(npz_bytes(npz_tree(source_model(), "original")))
    said = []
    weights = export_for(str(npz), log=said.append)
    assert weights == str(tmp_path / "vit-ti-16" / "weights" / "model.safetensors")
    assert read_weights_record(weights)["model"] == "ViT-Ti/16" and said and "imported ViT-Ti/16 from " in said[0]
    assert export_for(weights, log=said.append) == weights and len(said) == 1  # an export: as it is
    (tmp_path / "broken.pth").write_bytes(b"\x80\x04not really")
    with pytest.raises(ConfigError, match="broken.pth: .*weights_only=True"):
        export_for(str(tmp_path / "broken.pth"))
