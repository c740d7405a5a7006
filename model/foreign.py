"""Foreign checkpoints of the zoo's models in, and ours out to timm: pure functions, no I/O.

    state = from_npz(read_npz(data))            # vision_transformer, big_vision, big_transfer
    state = from_timm(timm_state_dict)           # timm's vit_*_patch*, vit_*_r50_*, resnetv2_*_bit
    timm_state = to_timm(state)                  # ours -> timm, strict-loadable (timm_model_args)
    name = check_state(state, "ViT-B/16")        # names and shapes against the zoo model

Each `from_*` gives a state dict under our names (model/vit.py), its head and pre-logits as the
file has them; `model.convert.adapt_pretrained` then fits it to a fine-tuning model (position
embeddings resampled to the model's grid, the head kept when the class count matches, else a
zero head, pre-logits dropped unless the model keeps them). `.npz` files are read with
numpy's `allow_pickle=False`: nothing is unpickled.

The npz layouts, as timm's `vision_transformer._load_weights` reads them:
- the original code (google-research/vision_transformer, the paper's and AugReg's checkpoints):
  `Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
  MlpBlock_3}`, position embeddings `Transformer/posembed_input/pos_embedding` with the class
  token's first;
- big_vision (`params/` prefix, or none): `{LayerNorm_0, MultiHeadDotProductAttention_0,
  LayerNorm_1, MlpBlock_0}`, position embeddings `pos_embedding` over the patches only (the
  class token gets none: here a zero one), blocks either one per layer or stacked along a
  first axis (`Transformer/encoderblock/...`, a scanned encoder); `opt/target/` prefixes too.
The R50+ViT hybrids' .npz adds the original code's ResNet (`conv_root`, `gn_root`,
`block{i}/unit{j}/{conv,gn}{1,2,3}`, `conv_proj`, `gn_proj`); BiT's (google-research/big_transfer)
is `resnet/root_block`, `resnet/block{i}/unit{jj}/{a,b,c}/{standardized_conv2d,group_norm}`,
`a/proj`, `resnet/group_norm`, `resnet/head/conv2d`. timm's hybrid (`patch_embed.backbone.stem`,
`stages.i.blocks.j`, `downsample.conv/.norm`) and ResNetV2 (`stem.conv`, `norm`, `head.fc` a
1x1 conv) state dicts are read too.
"""

from __future__ import annotations

import io
from typing import Mapping

import numpy as np
import torch

PREFIXES = ("", "params/", "opt/target/", "params/img/")
# Zoo size -> timm's name for it (timm.models.vision_transformer).
TIMM_SIZES = {"Ti": "tiny", "S": "small", "B": "base", "L": "large", "H": "huge"}


class ForeignWeightsError(ValueError):
    """A file that is not a checkpoint this module reads, or not of the model it is said to be."""


# ---- reading ------------------------------------------------------------------------------

def read_npz(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, read without unpickling (object arrays are refused)."""
    if not data.startswith(b"PK"):  # numpy would take anything else for a pickle
        raise ForeignWeightsError("not a readable .npz (not a zip archive)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except ValueError as error:  # object arrays: "Object arrays cannot be loaded when allow_pickle=False"
        raise ForeignWeightsError(f"an .npz holding pickled objects, refused ({error})") from None
    except Exception as error:  # a truncated or foreign zip: BadZipFile, EOFError, OSError
        raise ForeignWeightsError(f"not a readable .npz ({type(error).__name__}: {error})") from None


def detect_format(keys) -> str:
    """'npz' (a JAX/Flax tree), 'timm', 'vitscale', or raises ForeignWeightsError."""
    keys = set(keys)
    if any(f"{p}embedding/kernel" in keys for p in PREFIXES) or "resnet/root_block/standardized_conv2d/kernel" in keys:
        return "npz"
    if "patch_embed.proj.weight" in keys:
        return "timm"
    if "stem.conv.weight" in keys and "head.fc.weight" in keys or "stem.conv.weight" in keys and "norm.weight" in keys:
        return "timm"  # a ResNetV2 (BiT)
    if ("patch_embed.weight" in keys and "cls_token" in keys) or "features.root.0.weight" in keys:
        return "vitscale"
    sample = ", ".join(sorted(keys)[:3])
    raise ForeignWeightsError(f"neither a ViT .npz tree nor a timm or vitscale ViT state (keys: {sample}, ...)")


# ---- npz -> ours --------------------------------------------------------------------------

def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).float()


def from_npz(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A ViT's, R50+ViT hybrid's or BiT's JAX/Flax .npz tree (module docstring) as our state dict."""
    if "resnet/root_block/standardized_conv2d/kernel" in arrays:
        return from_bit_npz(arrays)
    prefix = next((p for p in PREFIXES if f"{p}embedding/kernel" in arrays), None)
    if prefix is None:
        raise ForeignWeightsError("no embedding/kernel: not a ViT .npz tree")
    w = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    hybrid = _hybrid_backbone(w, prefix) if "conv_root/kernel" in w else {}
    if "cls" not in w:
        raise ForeignWeightsError("a ViT without a class token (global-average pooled): the zoo's ViTs classify "
                                  "the class token")

    def get(name: str) -> np.ndarray:
        if name not in w:
            raise ForeignWeightsError(f"the .npz has no {prefix}{name}")
        return w[name]

    kernel = get("embedding/kernel")  # (ph, pw, 3, D): HWIO
    if kernel.ndim != 4:
        raise ForeignWeightsError(f"{prefix}embedding/kernel has shape {kernel.shape}, not a conv's (ph, pw, 3, D)")
    state = {"patch_embed.weight": _t(kernel.transpose(3, 2, 0, 1)), "patch_embed.bias": _t(get("embedding/bias")),
             "cls_token": _t(get("cls")).reshape(1, 1, -1)}
    width = state["cls_token"].shape[-1]
    if "Transformer/posembed_input/pos_embedding" in w:  # the original code: the class token's first
        state["pos_embed"] = _t(w["Transformer/posembed_input/pos_embedding"]).reshape(1, -1, width)
    else:  # big_vision: the patches' only; the class token is added after, with none
        patches = _t(get("pos_embedding")).reshape(1, -1, width)
        state["pos_embed"] = torch.cat([torch.zeros(1, 1, width), patches], dim=1)

    big_vision = "Transformer/encoderblock/LayerNorm_0/scale" in w or any(
        k.startswith("Transformer/encoderblock_0/MultiHeadDotProductAttention_0/") for k in w)
    mha, norm2, mlp = (0, 1, 0) if big_vision else (1, 2, 3)
    stacked = "Transformer/encoderblock/LayerNorm_0/scale" in w
    if stacked:
        depth = w["Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
    else:
        depth = 0
        while f"Transformer/encoderblock_{depth}/LayerNorm_0/scale" in w:
            depth += 1
    if depth == 0:
        raise ForeignWeightsError(f"the .npz has no {prefix}Transformer/encoderblock_0/: no encoder blocks")
    for i in range(depth):
        base = "Transformer/encoderblock/" if stacked else f"Transformer/encoderblock_{i}/"

        def block(name: str) -> np.ndarray:
            array = get(base + name)
            return array[i] if stacked else array

        attention = f"MultiHeadDotProductAttention_{mha}/"
        ours = f"blocks.{i}."
        state[ours + "norm1.weight"] = _t(block("LayerNorm_0/scale"))
        state[ours + "norm1.bias"] = _t(block("LayerNorm_0/bias"))
        # q, k, v kernels (D, heads, head_dim) -> rows of one (3D, D) matrix, q first.
        state[ours + "attn.qkv.weight"] = torch.cat(
            [_t(block(f"{attention}{n}/kernel")).flatten(1).T for n in ("query", "key", "value")])
        state[ours + "attn.qkv.bias"] = torch.cat(
            [_t(block(f"{attention}{n}/bias")).reshape(-1) for n in ("query", "key", "value")])
        out = _t(block(f"{attention}out/kernel"))  # (heads, head_dim, D)
        state[ours + "attn.proj.weight"] = out.reshape(-1, out.shape[-1]).T.contiguous()
        state[ours + "attn.proj.bias"] = _t(block(f"{attention}out/bias"))
        state[ours + "norm2.weight"] = _t(block(f"LayerNorm_{norm2}/scale"))
        state[ours + "norm2.bias"] = _t(block(f"LayerNorm_{norm2}/bias"))
        for r in (0, 1):
            state[ours + f"mlp.fc{r + 1}.weight"] = _t(block(f"MlpBlock_{mlp}/Dense_{r}/kernel")).T.contiguous()
            state[ours + f"mlp.fc{r + 1}.bias"] = _t(block(f"MlpBlock_{mlp}/Dense_{r}/bias"))
    state["norm.weight"] = _t(get("Transformer/encoder_norm/scale"))
    state["norm.bias"] = _t(get("Transformer/encoder_norm/bias"))
    if "pre_logits/kernel" in w:
        state["pre_logits.0.weight"] = _t(w["pre_logits/kernel"]).T.contiguous()
        state["pre_logits.0.bias"] = _t(w["pre_logits/bias"])
    if "head/kernel" in w:
        state["head.weight"] = _t(w["head/kernel"]).T.contiguous()
        state["head.bias"] = _t(w["head/bias"])
    return _with_head({**hybrid, **state})


def _conv(kernel: np.ndarray) -> torch.Tensor:
    return _t(kernel.transpose(3, 2, 0, 1))  # HWIO -> OIHW


def _hybrid_backbone(w: Mapping[str, np.ndarray], prefix: str) -> dict[str, torch.Tensor]:
    """The R50 of an R50+ViT .npz (the original code's names: conv_root, gn_root,
    block{i}/unit{j}/{conv,gn}{1,2,3}, conv_proj, gn_proj) under our `backbone.` names."""
    state = {"backbone.root.0.weight": _conv(w["conv_root/kernel"]),
             "backbone.root.1.weight": _t(w["gn_root/scale"]), "backbone.root.1.bias": _t(w["gn_root/bias"])}
    stage = 1
    while f"block{stage}/unit1/conv1/kernel" in w:
        unit = 1
        while f"block{stage}/unit{unit}/conv1/kernel" in w:
            base, ours = f"block{stage}/unit{unit}/", f"backbone.stages.{stage - 1}.{unit - 1}."
            for r in (1, 2, 3):
                state[ours + f"conv{r}.weight"] = _conv(w[f"{base}conv{r}/kernel"])
                state[ours + f"norm{r}.weight"] = _t(w[f"{base}gn{r}/scale"])
                state[ours + f"norm{r}.bias"] = _t(w[f"{base}gn{r}/bias"])
            if f"{base}conv_proj/kernel" in w:
                state[ours + "downsample.0.weight"] = _conv(w[f"{base}conv_proj/kernel"])
                state[ours + "downsample.1.weight"] = _t(w[f"{base}gn_proj/scale"])
                state[ours + "downsample.1.bias"] = _t(w[f"{base}gn_proj/bias"])
            unit += 1
        stage += 1
    if stage == 1:
        raise ForeignWeightsError(f"the .npz has {prefix}conv_root but no {prefix}block1/unit1/: a hybrid without "
                                  f"its ResNet stages")
    return state


def from_bit_npz(w: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A BiT ResNet-v2 .npz (google-research/big_transfer: resnet/root_block, resnet/block{i}/
    unit{jj}/{a,b,c}/{standardized_conv2d,group_norm}, a/proj, resnet/group_norm, resnet/head/conv2d)
    under our ResNetV2 names."""
    p = "resnet/"
    state = {"features.root.0.weight": _conv(w[p + "root_block/standardized_conv2d/kernel"]),
             "features.norm.0.weight": _t(w[p + "group_norm/gamma"]), "features.norm.0.bias": _t(w[p + "group_norm/beta"])}
    stage = 1
    while f"{p}block{stage}/unit01/a/standardized_conv2d/kernel" in w:
        unit = 1
        while f"{p}block{stage}/unit{unit:02d}/a/standardized_conv2d/kernel" in w:
            base, ours = f"{p}block{stage}/unit{unit:02d}/", f"features.stages.{stage - 1}.{unit - 1}."
            for r, letter in ((1, "a"), (2, "b"), (3, "c")):
                state[ours + f"conv{r}.weight"] = _conv(w[f"{base}{letter}/standardized_conv2d/kernel"])
                state[ours + f"norm{r}.weight"] = _t(w[f"{base}{letter}/group_norm/gamma"])
                state[ours + f"norm{r}.bias"] = _t(w[f"{base}{letter}/group_norm/beta"])
            if f"{base}a/proj/standardized_conv2d/kernel" in w:
                state[ours + "downsample.weight"] = _conv(w[f"{base}a/proj/standardized_conv2d/kernel"])
            unit += 1
        stage += 1
    if f"{p}head/conv2d/kernel" in w:
        kernel = w[f"{p}head/conv2d/kernel"]  # (1, 1, features, classes)
        state["head.weight"] = _t(kernel.reshape(kernel.shape[-2], kernel.shape[-1]).T)
        state["head.bias"] = _t(w[f"{p}head/conv2d/bias"])
    return _with_head(state)


# ---- timm <-> ours ------------------------------------------------------------------------

def from_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm `vit_*_patch*` VisionTransformer's state dict as ours."""
    state = dict(state.get("state_dict", state)) if isinstance(state.get("state_dict"), Mapping) else dict(state)
    if "stem.conv.weight" in state:
        return _from_timm_resnetv2(state)
    if "patch_embed.proj.weight" not in state:
        raise ForeignWeightsError("no patch_embed.proj.weight: not a timm ViT state")
    unsupported = [k for k in state if k.startswith(("fc_norm.", "attn_pool.", "reg_token", "norm_pre."))
                   or ".ls1." in k or ".ls2." in k or ".q_norm." in k or ".k_norm." in k]
    if unsupported:
        raise ForeignWeightsError(f"a timm ViT variant the zoo does not build: it has {unsupported[0]}")
    ours = {}
    for key, value in state.items():
        key = key.replace("patch_embed.proj.", "patch_embed.").replace("pre_logits.fc.", "pre_logits.0.")
        if key.startswith("patch_embed.backbone."):  # a hybrid (vit_*_r50_*): its ResNet
            key = _resnet_key(key[len("patch_embed.backbone."):], "backbone.", norm_in_downsample=True)
        ours[key] = value.detach().float().contiguous()
    return _with_head(ours)


def _resnet_key(key: str, prefix: str, *, norm_in_downsample: bool) -> str:
    """A timm ResNetV2 key (stem.conv, stem.norm, stages.i.blocks.j.*, downsample.conv/.norm)
    under our names (root.0, root.1, stages.i.j.*, downsample.0/.1 or downsample)."""
    key = key.replace("stem.conv.", "root.0.").replace("stem.norm.", "root.1.").replace(".blocks.", ".")
    if norm_in_downsample:
        key = key.replace("downsample.conv.", "downsample.0.").replace("downsample.norm.", "downsample.1.")
    else:
        key = key.replace("downsample.conv.", "downsample.")
    return prefix + key


def _from_timm_resnetv2(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's resnetv2_*_bit (pre-activation, fixed padding) as our ResNetV2."""
    ours = {}
    for key, value in state.items():
        value = value.detach().float()
        if key.startswith("head.fc."):  # a 1x1 conv head
            ours[key.replace("head.fc.", "head.")] = value.flatten(1) if value.ndim == 4 else value
        elif key.startswith("norm."):
            ours["features.norm.0." + key[len("norm."):]] = value
        else:
            ours[_resnet_key(key, "features.", norm_in_downsample=False)] = value
    return _with_head({k: v.contiguous() for k, v in ours.items()})


# Zoo models with a timm counterpart of the same architecture (timm 1.0's registered names).
TIMM_HYBRIDS = {"R50+ViT-B/16": "vit_base_r50_s16_224", "R50+ViT-L/32": "vit_large_r50_s32_224"}
TIMM_BIT = {"R50x1": "resnetv2_50x1_bit", "R101x1": "resnetv2_101x1_bit", "R152x2": "resnetv2_152x2_bit"}


def _timm_resnet_key(key: str, norm_in_downsample: bool) -> str:
    """Ours (root.0, root.1, stages.i.j.*, downsample[.0/.1]) -> timm's ResNetV2 names."""
    key = key.replace("root.0.", "stem.conv.").replace("root.1.", "stem.norm.")
    if key.startswith("stages."):
        stage, unit, rest = key[len("stages."):].split(".", 2)
        key = f"stages.{stage}.blocks.{unit}.{rest}"
    if norm_in_downsample:
        return key.replace("downsample.0.", "downsample.conv.").replace("downsample.1.", "downsample.norm.")
    return key.replace("downsample.", "downsample.conv.")


def to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict under timm's names: plain ViTs (vit_*_patch*), R50+ViT hybrids
    (vit_*_r50_*), BiT (resnetv2_*_bit, whose head is a 1x1 conv). timm's ViTs have no pre-logits
    layer: a state with one is refused (fine-tuned exports have none)."""
    if any(k.startswith("pre_logits.") for k in state):
        raise ForeignWeightsError("the weights have a pre-logits layer, which timm's VisionTransformer does not "
                                  "build; export a fine-tuned model (the fan-out's final trials), which has none")
    dropped = ("mask_token", "masked_patch_head.weight", "masked_patch_head.bias")
    bit = "features.root.0.weight" in state
    out = {}
    for key, value in state.items():
        if key in dropped:
            continue
        if key.startswith("backbone."):
            out["patch_embed.backbone." + _timm_resnet_key(key[len("backbone."):], True)] = value
        elif key.startswith("features.norm.0."):
            out["norm." + key[len("features.norm.0."):]] = value
        elif key.startswith("features."):
            out[_timm_resnet_key(key[len("features."):], False)] = value
        elif bit and key.startswith("head."):
            out["head.fc." + key[len("head."):]] = value[:, :, None, None] if value.ndim == 2 else value
        else:
            out[key.replace("patch_embed.", "patch_embed.proj.")] = value
    return out


def timm_model_args(name: str, state: Mapping[str, torch.Tensor]) -> tuple[str, dict]:
    """(timm model name, create_model keyword arguments) for our `name` and its state: timm's
    registered name where the zoo model has one, a plain ViT's size given as arguments
    otherwise (ViT-Mu). Raises for a hybrid or BiT that timm does not build."""
    from model.specs import model_spec

    spec = model_spec(name)
    classes = int(state["head.weight"].shape[0])
    if spec.family == "resnet":
        if name not in TIMM_BIT:
            raise ForeignWeightsError(f"timm has no {name}; its BiT models: {', '.join(TIMM_BIT)}")
        return TIMM_BIT[name], {"num_classes": classes}
    grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    args = {"img_size": grid * spec.stride, "num_classes": classes}
    if spec.family == "hybrid":
        if name not in TIMM_HYBRIDS:
            raise ForeignWeightsError(f"timm has no {name}; its hybrids: {', '.join(TIMM_HYBRIDS)}")
        return TIMM_HYBRIDS[name], args
    size = name.removeprefix("ViT-").split("/")[0]
    if size in TIMM_SIZES:
        return f"vit_{TIMM_SIZES[size]}_patch{spec.patch_size}_224", args
    return "vit_tiny_patch16_224", {**args, "patch_size": spec.patch_size, "embed_dim": spec.width,
                                    "depth": spec.depth, "num_heads": spec.num_heads,
                                    "mlp_ratio": spec.mlp_dim / spec.width}


# ---- checks -------------------------------------------------------------------------------

def _with_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state without a classifier (timm's num_classes=0, a headless .npz) gets a one-class zero
    head: fine-tuning replaces it with the dataset's (adapt_pretrained), and our model has one."""
    if "head.weight" not in state:
        if "features.norm.0.weight" in state:  # BiT: the pooled features' width
            features = state["features.norm.0.weight"].shape[0]
        elif "pre_logits.0.weight" in state:
            features = state["pre_logits.0.weight"].shape[0]
        else:
            features = state["cls_token"].shape[-1]
        state["head.weight"] = torch.zeros(1, features)
        state["head.bias"] = torch.zeros(1)
    return state


def _block_counts(state: Mapping[str, torch.Tensor], prefix: str) -> tuple[int, ...]:
    counts: dict[int, set] = {}
    for key in state:
        if key.startswith(prefix + "stages."):
            stage, unit = key[len(prefix) + len("stages."):].split(".")[:2]
            counts.setdefault(int(stage), set()).add(int(unit))
    return tuple(len(counts[i]) for i in sorted(counts))


def looks_like(state: Mapping[str, torch.Tensor]) -> str | None:
    """The zoo model whose sizes the state has (a ViT's width, depth and patch; a hybrid's also
    its ResNet stages; a BiT's stages and width), or None."""
    from model.specs import MODEL_NAMES, model_spec

    if "features.root.0.weight" in state:  # BiT
        shape = (_block_counts(state, "features."), state["features.root.0.weight"].shape[0] // 64)
        return next((n for n in MODEL_NAMES if model_spec(n).family == "resnet"
                     and (model_spec(n).block_counts, model_spec(n).width_factor) == shape), None)
    if "patch_embed.weight" not in state or "cls_token" not in state:
        return None
    width = state["cls_token"].shape[-1]
    patch = state["patch_embed.weight"].shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    hybrid = "backbone.root.0.weight" in state
    counts = _block_counts(state, "backbone.") if hybrid else None
    for name in MODEL_NAMES:
        spec = model_spec(name)
        if (spec.width, spec.depth, spec.patch_size) != (width, depth, patch):
            continue
        if (spec.family == "vit" and not hybrid) or (spec.family == "hybrid" and hybrid and spec.block_counts == counts):
            return name
    return None


def check_state(state: Mapping[str, torch.Tensor], name: str) -> dict:
    """Checks the state's names and shapes against the zoo model `name` (built on the meta
    device at the state's own grid, classes and pre-logits). Returns the build arguments
    (num_classes, image_size, representation_size). Raises ForeignWeightsError naming the first
    bad key, both shapes, and the zoo model the state looks like."""
    from model.registry import build_model
    from model.specs import model_spec

    spec = model_spec(name)
    like = looks_like(state)
    hint = f" (the file looks like {like})" if like and like != name else ""
    if "head.weight" not in state:
        raise ForeignWeightsError(f"the state has no head.weight: not a model of the zoo{hint}")
    if spec.family == "resnet":  # BiT takes any image size and has no pre-logits
        build = {"num_classes": int(state["head.weight"].shape[0]), "image_size": 224}
    else:
        if "pos_embed" not in state:
            raise ForeignWeightsError(f"not {name}: the state has no pos_embed{hint}")
        patches = state["pos_embed"].shape[1] - 1
        grid = round(patches ** 0.5)
        if grid * grid != patches:
            raise ForeignWeightsError(f"pos_embed holds {patches} patch positions, not a square grid")
        build = {"num_classes": int(state["head.weight"].shape[0]), "image_size": grid * spec.stride,
                 "representation_size": int(state["pre_logits.0.weight"].shape[0])
                 if "pre_logits.0.weight" in state else None}
    expected = build_model(name, device="meta", **build).state_dict()
    build.setdefault("representation_size", None)
    for key, value in expected.items():
        if key not in state:
            raise ForeignWeightsError(f"not {name}: the file has no {key}{hint}")
        if tuple(state[key].shape) != tuple(value.shape):
            raise ForeignWeightsError(f"not {name}: {key} is {tuple(state[key].shape)} in the file, "
                                      f"{tuple(value.shape)} in {name}{hint}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ForeignWeightsError(f"not {name}: the file has {extra[0]}, which {name} does not{hint}")
    return build
