"""Small data sets for the dry run and the tests, written through the same shard writer.

    python -m data_pipelines.synthetic classification /tmp/shards [--samples 512]
    python -m data_pipelines.synthetic multi_label s3://bucket/prefix
    python -m data_pipelines.synthetic digits /tmp/digits

* `classification`: each class is a hue plus a stripe orientation, with noise; a small model
  learns it in a few hundred steps.
* `multi_label`: up to three coloured squares on grey; the label is the set of colours present.
* `digits`: scikit-learn's 1,797 real 8x8 handwritten digits, upscaled (PNG); `split="train"`
  or `"test"` takes a fixed part: every fifth image (index 0, 5, 10, ...: 360) is test, the
  other 1,437 train.
"""

from __future__ import annotations

import dataclasses

import argparse
import colorsys
import io
from typing import Iterator

import numpy as np

from data_pipelines.s3 import S3ClientFactory
from data_pipelines.shard_writer import Sample, WriteSummary, write_shards


def _jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=quality)
    return out.getvalue()


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def _class_colour(index: int, count: int) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(index / count, 0.8, 0.9)) * 255


def classification_samples(num_samples: int, num_classes: int = 10, image_size: int = 64, seed: int = 0) -> Iterator[Sample]:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:image_size, 0:image_size] / image_size
    for i in range(num_samples):
        label = int(rng.integers(num_classes))
        angle = np.pi * label / num_classes
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * (xs * np.cos(angle) + ys * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
        pixels = stripes[..., None] * _class_colour(label, num_classes) + rng.normal(0, 20, (image_size, image_size, 3))
        yield Sample(f"synthetic{i:07d}", _jpeg(np.clip(pixels, 0, 255).astype(np.uint8)), "jpg", label)


def multi_label_samples(num_samples: int, num_classes: int = 6, image_size: int = 64, seed: int = 0) -> Iterator[Sample]:
    rng = np.random.default_rng(seed)
    side = image_size // 4
    for i in range(num_samples):
        pixels = np.full((image_size, image_size, 3), 128.0) + rng.normal(0, 10, (image_size, image_size, 3))
        present = sorted(int(c) for c in rng.choice(num_classes, size=int(rng.integers(0, 4)), replace=False))
        for c in present:
            y, x = rng.integers(0, image_size - side, size=2)
            pixels[y:y + side, x:x + side] = _class_colour(c, num_classes)
        yield Sample(f"multilabel{i:07d}", _jpeg(np.clip(pixels, 0, 255).astype(np.uint8)), "jpg", present)


DIGITS_TEST_EVERY = 5  # digits' fixed test split: every fifth image


def digits_samples(image_size: int = 64, split: str | None = None) -> Iterator[Sample]:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        if split is not None and (i % DIGITS_TEST_EVERY == 0) != (split == "test"):
            continue
        grey = Image.fromarray((image * (255 / 16)).astype(np.uint8)).resize((image_size, image_size), Image.Resampling.BILINEAR)
        yield Sample(f"digit{i:05d}", _png(np.asarray(grey.convert("RGB"))), "png", int(label))


def write_synthetic(
    kind: str,
    output: str,
    *,
    num_samples: int = 512,
    num_classes: int | None = None,
    image_size: int = 64,
    samples_per_shard: int = 128,
    seed: int = 0,
    factory: S3ClientFactory | None = None,
    progress: bool = False,
    split: str | None = None,
) -> WriteSummary:
    """Writes one of the generated sets (`classification`, `multi_label`, `digits`) as shards;
    `split` ("train" or "test") takes digits' fixed part of that name (module docstring)."""
    if kind == "classification":
        num_classes = num_classes or 10
        samples, label_kind = classification_samples(num_samples, num_classes, image_size, seed), "class"
        total = num_samples
    elif kind == "multi_label":
        num_classes = num_classes or 6
        samples, label_kind = multi_label_samples(num_samples, num_classes, image_size, seed), "multi_label"
        total = num_samples
    elif kind == "unlabeled":  # the classification images without their labels
        num_classes = num_classes or 10
        samples = (dataclasses.replace(s, label=None) for s in classification_samples(num_samples, num_classes, image_size, seed))
        label_kind, total = "none", num_samples
    elif kind == "digits":
        test = len(range(0, 1797, DIGITS_TEST_EVERY))
        total = {None: 1797, "test": test, "train": 1797 - test}[split]
        num_classes, samples, label_kind = 10, digits_samples(image_size, split), "class"
    else:
        raise ValueError(f"unknown synthetic set {kind!r}: classification, multi_label, unlabeled or digits")
    class_names = [str(c) for c in range(num_classes)] if kind == "digits" else [f"class{c}" for c in range(num_classes)]
    if kind == "unlabeled":
        class_names = []
    return write_shards(samples, output, class_names=class_names, label_kind=label_kind,
                        samples_per_shard=samples_per_shard, factory=factory, total=total, progress=progress)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="write a generated data set as webdataset shards")
    parser.add_argument("kind", choices=["classification", "multi_label", "digits"])
    parser.add_argument("output", help="a folder or s3://bucket/prefix")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--samples-per-shard", type=int, default=128)
    args = parser.parse_args()
    print(write_synthetic(args.kind, args.output, num_samples=args.samples, image_size=args.image_size,
                          samples_per_shard=args.samples_per_shard, progress=True).line())
