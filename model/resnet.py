"""BiT ResNets (Kolesnikov et al., arXiv:1912.11370) and the R50 backbone of the ViT hybrids.

Both use Group Normalization (32 groups) and Weight Standardization in every conv. BiT
uses pre-activation bottlenecks (ResNet-v2); the hybrid backbone of the ViT paper's official
code uses post-activation bottlenecks (conv -> GN -> ReLU, ReLU after the residual sum), and
so does timm's port of it, so checkpoints of either load into the matching variant.
"""

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn


def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow's "SAME" padding: the output is ceil(input / stride), and the padding that
    takes is split with the larger half after (right, bottom). Strided layers of the official
    hybrid's ResNet (google-research/vision_transformer, and timm's port of its weights:
    StdConv2dSame, MaxPool2dSame) pad so; a symmetric padding shifts their sampling grid."""
    height, width = x.shape[-2:]
    pad_h = max((math.ceil(height / stride) - 1) * stride + kernel - height, 0)
    pad_w = max((math.ceil(width / stride) - 1) * stride + kernel - width, 0)
    if not pad_h and not pad_w:
        return x
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)


class StdConv2d(nn.Conv2d):
    """Conv2d whose weights are standardised (zero mean, unit variance per output channel) in
    forward: (w - mean) / sqrt(var + eps), as BiT; with `eps_on_std`, (w - mean) / (std + eps),
    as the ViT paper's hybrid code (vision_transformer's and big_vision's `weight_standardize`).
    `same=True` pads as TensorFlow's "SAME" (pad_same) instead of `padding`."""

    def __init__(self, *args, eps: float = 1e-8, same: bool = False, eps_on_std: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps
        self.same = same
        self.eps_on_std = eps_on_std
        if same and self.padding != (0, 0):
            raise ValueError("a SAME-padded conv takes no padding of its own")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            x = pad_same(x, self.kernel_size[0], self.stride[0])
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        scale = torch.sqrt(var) + self.eps if self.eps_on_std else torch.sqrt(var + self.eps)
        return self._conv_forward(x, (self.weight - mean) / scale, self.bias)


class MaxPool2dSame(nn.MaxPool2d):
    """Max pooling padded as TensorFlow's "SAME", with -inf (the hybrid's stem)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(pad_same(x, self.kernel_size, self.stride, value=float("-inf")))


class PreActBottleneck(nn.Module):
    """BiT unit: GN -> ReLU -> conv1x1 -> GN -> ReLU -> conv3x3 (stride) -> GN -> ReLU -> conv1x1, + shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, eps: float):
        super().__init__()
        mid = out_channels // 4
        self.norm1 = nn.GroupNorm(32, in_channels)
        self.conv1 = StdConv2d(in_channels, mid, 1, bias=False, eps=eps)
        self.norm2 = nn.GroupNorm(32, mid)
        self.conv2 = StdConv2d(mid, mid, 3, stride=stride, padding=1, bias=False, eps=eps)
        self.norm3 = nn.GroupNorm(32, mid)
        self.conv3 = StdConv2d(mid, out_channels, 1, bias=False, eps=eps)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = StdConv2d(in_channels, out_channels, 1, stride=stride, bias=False, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = F.relu(self.norm1(x))
        # The projection sees the normalised input, the identity shortcut the raw one (as BiT).
        shortcut = self.downsample(x_preact) if self.downsample is not None else x
        y = self.conv1(x_preact)
        y = self.conv2(F.relu(self.norm2(y)))
        y = self.conv3(F.relu(self.norm3(y)))
        return y + shortcut


class Bottleneck(nn.Module):
    """Post-activation unit of the hybrid backbone: conv -> GN -> ReLU twice, conv -> GN, ReLU(sum)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, eps: float):
        super().__init__()
        mid = out_channels // 4
        conv = functools.partial(StdConv2d, bias=False, eps=eps, eps_on_std=True)  # the official hybrid's
        self.conv1 = conv(in_channels, mid, 1)
        self.norm1 = nn.GroupNorm(32, mid)
        # Strided: TensorFlow's SAME padding, as the official hybrid (pad_same).
        self.conv2 = conv(mid, mid, 3, stride=stride, padding=0 if stride > 1 else 1, same=stride > 1)
        self.norm2 = nn.GroupNorm(32, mid)
        self.conv3 = conv(mid, out_channels, 1)
        self.norm3 = nn.GroupNorm(32, out_channels)
        nn.init.zeros_(self.norm3.weight)  # each unit starts as the identity, as in the original
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(conv(in_channels, out_channels, 1, stride=stride),
                                            nn.GroupNorm(32, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x) if self.downsample is not None else x
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        return F.relu(self.norm3(self.conv3(y)) + shortcut)


class ResNetFeatures(nn.Module):
    """Root + bottleneck stages: (N, 3, H, W) -> (N, out_channels, H / stride, W / stride).

    Args:
        block_counts: units per stage; stage i has 256 * width_factor * 2**i output channels
            and halves the resolution, except the first.
        preact: BiT pre-activation units, with the final GN + ReLU that pre-activation needs
            before anything reads the features; else the hybrid's post-activation units.
        eps: Weight Standardization epsilon.
    """

    def __init__(self, block_counts: tuple[int, ...], width_factor: int = 1, preact: bool = True, eps: float = 1e-8):
        super().__init__()
        root_width = 64 * width_factor
        if preact:
            # BiT: a symmetric padding, and zeros, not -inf, before the max pool.
            root = [StdConv2d(3, root_width, 7, stride=2, padding=3, bias=False, eps=eps),
                    nn.ConstantPad2d(1, 0.0), nn.MaxPool2d(3, stride=2)]
        else:
            # The hybrid: TensorFlow's SAME padding for the conv and the pool (pad_same).
            root = [StdConv2d(3, root_width, 7, stride=2, same=True, bias=False, eps=eps, eps_on_std=True),
                    nn.GroupNorm(32, root_width), nn.ReLU(), MaxPool2dSame(3, stride=2)]
        self.root = nn.Sequential(*root)

        unit = PreActBottleneck if preact else Bottleneck
        stages, in_channels = [], root_width
        for index, count in enumerate(block_counts):
            out_channels = 256 * width_factor * 2**index
            stride = 1 if index == 0 else 2
            units = [unit(in_channels, out_channels, stride, eps)]
            units += [unit(out_channels, out_channels, 1, eps) for _ in range(count - 1)]
            stages.append(nn.Sequential(*units))
            in_channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Sequential(nn.GroupNorm(32, in_channels), nn.ReLU()) if preact else nn.Identity()
        self.out_channels = in_channels
        self.stride = 4 * 2 ** (len(block_counts) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self.root(x)))


class ResNetV2(nn.Module):
    """BiT classifier: pre-activation ResNet features, global average pool, zero-initialised linear head."""

    def __init__(self, *, block_counts: tuple[int, ...], width_factor: int, num_classes: int):
        super().__init__()
        self.features = ResNetFeatures(block_counts, width_factor, preact=True)
        self.head = nn.Linear(self.features.out_channels, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))
