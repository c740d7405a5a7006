"""augment.py's decode paths agree with the plain PIL path; uint8 batches normalise to the float ones."""

import io
import itertools
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines import augment
from data_pipelines.augment import Augmentation, normalise, normalise_on_device
from data_pipelines.stream import ShardLoader
from data_pipelines.synthetic import write_synthetic


def _photo_like(width, height, mode="RGB", seed=0, **save):
    """A smooth gradient with texture and noise, JPEG-encoded: closer to a photograph than pure noise."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xs / width * 255, ys / height * 255, 128 + 100 * np.sin(xs / 9) * np.cos(ys / 13)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, **save)
    return out.getvalue()


def _both(augmentation, data, seed):
    """(rows path, plain path) outputs and the rng draw each leaves next."""
    results = []
    for decode_rows in (True, False):
        rng = random.Random(seed)
        out = Augmentation(augmentation.mode, augmentation.image_size, decode_rows=decode_rows).apply(data, rng)
        results.append((out.astype(int), rng.random()))
    return results


@pytest.mark.parametrize("size, progressive", [((500, 375), False), ((375, 500), True), ((640, 427), False),
                                                ((150, 120), False)])  # the last: boxes smaller than the output
def test_rows_path_matches_the_plain_pil_path(size, progressive, monkeypatch):
    calls = []
    resize = augment._resize_box
    monkeypatch.setattr(augment, "_resize_box", lambda *args: calls.append(args[1]) or resize(*args))
    data = _photo_like(*size, progressive=progressive)
    for seed in range(12):
        (fast, next_fast), (plain, next_plain) = _both(augment.augmentation_for("pretrain"), data, seed)
        assert next_fast == next_plain  # the same random draws, so the same crop box and flip
        assert fast.shape == plain.shape == (224, 224, 3)
        # PIL's filter window may reach past the box, torch's stays inside: the outermost output
        # pixels differ, one when downscaling, about 1/scale when upscaling a box smaller than the output
        left, top, right, bottom = Augmentation().crop_box(*size, random.Random(seed))
        m = 1 + math.ceil(224 / min(right - left, bottom - top)) if min(right - left, bottom - top) < 224 else 1
        inner = np.abs(fast - plain)[m:-m, m:-m]
        assert inner.max() <= 1 and inner.mean() < 0.1  # fixed-point rounding only
        assert np.abs(fast - plain).mean() < 0.5
    assert len(calls) >= 9  # the rows path was taken (not for the few boxes that allow draft mode)


def test_the_rows_path_decodes_only_the_rows_asked_for_and_they_equal_a_full_decode():
    data = _photo_like(320, 240)
    image = Image.open(io.BytesIO(data))
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    rows = augment._decode_jpeg_rows(image, data, 101)
    assert rows.shape == (101, 320, 4)
    assert np.array_equal(rows[..., :3], full[:101])
    whole = augment._decode_jpeg_rows(Image.open(io.BytesIO(data)), data, 240)
    assert np.array_equal(whole[..., :3], full)


def test_other_images_take_the_plain_path_unchanged_and_errors_are_pils():
    greyscale = _photo_like(300, 200, mode="L")
    png = io.BytesIO()
    Image.open(io.BytesIO(_photo_like(300, 200))).save(png, "PNG")
    for data in (greyscale, png.getvalue()):
        for seed in range(5):
            (fast, _), (plain, _) = _both(augment.augmentation_for("pretrain"), data, seed)
            assert np.array_equal(fast, plain)
    evaluation = augment.augmentation_for("eval", 128)  # a fractional centre box: the plain path
    data = _photo_like(300, 200)
    assert np.array_equal(evaluation.apply(data, random.Random(0)),
                          Augmentation("eval", 128, decode_rows=False).apply(data, random.Random(0)))
    truncated = _photo_like(400, 300)[:-3000]  # no end marker: never trusted to the rows path
    for decode_rows in (True, False):
        with pytest.raises(OSError, match="truncated"):
            Augmentation(decode_rows=decode_rows, crop_area=(0.05, 0.06)).apply(truncated, random.Random(3))


def test_in_process_use_keeps_torchs_thread_count():
    threads = torch.get_num_threads()
    augment.augmentation_for("pretrain").apply(_photo_like(400, 300), random.Random(0))
    assert torch.get_num_threads() == threads


def test_normalise_on_device_equals_the_cpu_normalisation():
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    expected = normalise(pixels)
    got = normalise_on_device(pixels.permute(0, 3, 1, 2))
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(normalise_on_device(pixels.permute(0, 3, 1, 2), torch.bfloat16), expected.to(torch.bfloat16))


@pytest.fixture(scope="module")
def small_shards(s3_server, test_bucket):
    source = f"{test_bucket}/augment-tests/train"
    write_synthetic("classification", source, num_samples=40, image_size=48, samples_per_shard=16,
                    factory=s3_server.client_factory(), progress=False)
    return source


def test_uint8_batches_normalise_to_the_float_batches_and_resume_the_same(small_shards, s3):
    settings = dict(batch_size=8, image_size=32, num_workers=2, seed=3, factory=s3)
    floats, raw = ShardLoader(small_shards, **settings), ShardLoader(small_shards, dtype="uint8", **settings)
    pairs = list(zip(floats, raw, strict=True))
    for f, r in pairs:
        assert r["image"].dtype == torch.uint8 and r["image"].shape == f["image"].shape
        assert r["key"] == f["key"] and torch.equal(r["label"], f["label"])
        assert torch.equal(normalise_on_device(r["image"]), f["image"])
    assert floats.state_dict() == raw.state_dict()

    first, second = ShardLoader(small_shards, dtype="uint8", **settings), ShardLoader(small_shards, **settings)
    taken = [k for b in itertools.islice(iter(first), 2) for k in b["key"]]
    second.load_state_dict(first.state_dict())
    rest = [k for b in second for k in b["key"]]
    assert sorted(taken + rest) == sorted(k for f, _ in pairs for k in f["key"]) and not set(taken) & set(rest)
    with pytest.raises(ValueError, match="dtype"):
        ShardLoader(small_shards, dtype="float16", **settings)


def test_float_buffers_are_reused_only_once_no_batch_references_them(small_shards, s3):
    settings = dict(batch_size=4, image_size=32, num_workers=2, seed=3, factory=s3)
    held, copies = [], []  # every batch kept: none may be overwritten by a later one
    for batch in ShardLoader(small_shards, **settings):
        held.append(batch)
        copies.append(batch["image"].clone())  # as it was handed out
    del batch
    assert len({b["image"].data_ptr() for b in held}) == len(held)
    dropped, addresses = ShardLoader(small_shards, **settings), set()
    for batch, original in zip(dropped, copies, strict=True):
        assert torch.equal(batch["image"], original)
        addresses.add(batch["image"].data_ptr())
        del batch
    assert all(torch.equal(b["image"], c) for b, c in zip(held, copies))  # as handed out, after both loaders
    assert len(addresses) <= 2  # the loader's float buffers, reused (the `batch` being replaced holds one)
