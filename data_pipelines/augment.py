"""Decode + crop + resize + flip in one pass, decoding no more of the JPEG than the crop needs.

    python -m data_pipelines.augment IMAGE [pretrain|finetune|eval]    # writes IMAGE.aug.png

ViT conventions: pretraining takes an inception-style random-resized crop (area 8-100 %,
aspect 3/4-4/3) to `image_size` (224) plus a horizontal flip; fine-tuning the same at 384;
evaluation resizes the shorter side to image_size / 0.875 and takes the centre crop. The
resampling filter is always bilinear with antialiasing (PIL's BILINEAR: a triangle filter
widened by the downscale factor). The result is uint8 HxWx3; `normalise` maps a uint8 batch
to float [-1, 1] on the CPU, `normalise_on_device` does the same to a uint8 batch already on
an accelerator.

The crop box is chosen on the header's size before anything is decoded. Then one of:
  - draft: when the box is at least twice the output size, the JPEG decoder is asked for a
    1/2, 1/4 or 1/8 scale image (`Image.draft`), never smaller than the output, and PIL
    resizes the box from it;
  - rows (RGB JPEGs with an integer box, i.e. the random-resized crops): the decoder stops
    after the box's last row (rows below it are never decoded), writing into a buffer this
    thread reuses, and torch's uint8 antialiased-bilinear kernel resizes the box. Same box,
    size and filter as PIL's `resize(box=...)`; it differs only in fixed-point rounding (at
    most 1 level, in about 2 % of the pixels) and in the outermost output rows and columns
    (one when the box shrinks, about output/box when it is enlarged), whose filter window
    PIL lets reach past the box into the neighbouring pixels while torch (like
    torchvision's crop-then-resize) stays inside it;
  - otherwise (eval's fractional centre box, PNG, greyscale or CMYK JPEGs, a JPEG without
    its end marker, anything the rows path cannot decode): the full image is decoded and
    PIL resizes the box, errors being PIL's own.
"""

from __future__ import annotations

import dataclasses
import io
import math
import random
import sys
import threading

import numpy as np

MODES = ("pretrain", "finetune", "eval")
DEFAULT_SIZES = {"pretrain": 224, "finetune": 384, "eval": 224}
EVAL_CROP_FRACTION = 0.875


@dataclasses.dataclass(frozen=True)
class Augmentation:
    mode: str = "pretrain"
    image_size: int = 224
    crop_area: tuple[float, float] = (0.08, 1.0)
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    use_draft: bool = True
    decode_rows: bool = True  # False: always the plain path (full decode, PIL resize), for comparisons

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"augmentation mode {self.mode!r}: one of {', '.join(MODES)}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in the original image's pixels."""
        if self.mode == "eval":
            side = min(width, height) * EVAL_CROP_FRACTION
            left, top = (width - side) / 2, (height - side) / 2
            return left, top, left + side, top + side
        return random_resized_crop_box(width, height, rng, self.crop_area, self.crop_aspect)

    def apply(self, data: bytes, rng: random.Random) -> np.ndarray:
        """The augmented image as a new uint8 [S, S, 3] array."""
        out = np.empty((self.image_size, self.image_size, 3), np.uint8)
        self.apply_into(data, rng, out)
        return out

    def apply_into(self, data: bytes, rng: random.Random, out: np.ndarray) -> None:
        """Writes the augmented image into `out` (uint8 [S, S, 3], e.g. a slot of a batch)."""
        from PIL import Image

        size = self.image_size
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        left, top, right, bottom = self.crop_box(width, height, rng)
        flip = self.flip and self.mode != "eval"  # the flip draw comes after the box's, on every path
        if image.format == "JPEG":
            needed = max(size / (right - left), size / (bottom - top))  # scale that keeps the box >= output
            if self.use_draft and needed <= 0.5:
                image.draft("RGB", (math.ceil(width * needed), math.ceil(height * needed)))
            elif self.decode_rows and image.mode == "RGB" and all(float(v).is_integer() for v in (left, top, right, bottom)):
                pixels = _decode_jpeg_rows(image, data, int(bottom))
                if pixels is not None:
                    _resize_box(pixels, (int(left), int(top), int(right), int(bottom)), size, out,
                                flip and rng.random() < 0.5)
                    return
                image = Image.open(io.BytesIO(data))  # the plain path, which reports any error as PIL does
        fx, fy = image.size[0] / width, image.size[1] / height
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        resized = image.resize((size, size), Image.Resampling.BILINEAR, box=(left * fx, top * fy, right * fx, bottom * fy))
        if resized.mode != "RGB":
            resized = resized.convert("RGB")
        if flip and rng.random() < 0.5:
            resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out[...] = np.asarray(resized)


_buffers = threading.local()
KEEP_BUFFER_BYTES = 64 << 20  # the largest decode buffer a thread keeps for the next image (4 bytes a pixel)


def _decode_jpeg_rows(image, data: bytes, rows: int) -> np.ndarray | None:
    """The first `rows` rows of an RGB JPEG as a uint8 [rows, W, 4] view of this thread's
    reused buffer (the 4th byte is padding), or None where this path cannot be sure of the
    result (no end marker: maybe truncated; any decoder error before the last row).

    PIL's own JPEG decoder, run the way `ImageFile.load` runs it, but into an image that maps
    the buffer (PIL stores RGB as 4 bytes a pixel) and with the tile cut at `rows`: libjpeg
    then stops there. Stopping early makes `jpeg_finish_decompress` report too few scanlines,
    so success is judged by the last row's padding byte, set to 0 here and to 255 by the
    decoder when it writes that row.
    """
    from PIL import Image

    if len(image.tile) != 1 or image.tile[0][0] != "jpeg" or not data[-64:].rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
        return None
    width = image.size[0]
    rows = min(rows, image.size[1])
    need = width * rows * 4
    buffer = getattr(_buffers, "jpeg", None)
    if buffer is None or buffer.size < need:
        buffer = np.empty(max(need, 1 << 20), np.uint8)
        if need <= KEEP_BUFFER_BYTES:  # a rare huge image does not stay allocated in every worker
            _buffers.jpeg = buffer
    flat = buffer[:need]
    pixels = flat.reshape(rows, width, 4)
    pixels[rows - 1, width - 1, 3] = 0
    target = Image.frombuffer("RGB", (width, rows), flat, "raw", "RGBX", 0, 1)
    codec, _, offset, args = image.tile[0]
    try:
        decoder = Image._getdecoder(image.mode, codec, args, image.decoderconfig)
        try:
            decoder.setimage(target.im, (0, 0, width, rows))
            consumed, _ = decoder.decode(data[offset:] if offset else data)
        finally:
            decoder.cleanup()
    except Exception:  # noqa: BLE001 - any surprise from PIL's internals: take the plain path
        return None
    if consumed >= 0 or pixels[rows - 1, width - 1, 3] != 255:  # suspended for more data, or stopped early
        return None
    return pixels


def _resize_box(pixels: np.ndarray, box: tuple[int, int, int, int], size: int, out: np.ndarray, flip: bool) -> None:
    """Antialiased bilinear resize of pixels[top:bottom, left:right, :3] into out, flipped if asked."""
    import torch
    import torch.nn.functional as F

    left, top, right, bottom = box
    crop = torch.from_numpy(pixels)[top:bottom, left:right].permute(2, 0, 1).unsqueeze(0)  # [1, 4, h, w]
    threads = torch.get_num_threads()
    if threads > 1:  # in a process that is not a DataLoader worker: one image is too little to share out
        torch.set_num_threads(1)
    try:
        # torch's uint8 kernel (4 channels, as Pillow-SIMD's) runs faster on a dense channels-last copy of the box
        crop = crop.contiguous(memory_format=torch.channels_last)
        resized = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    finally:
        if threads > 1:
            torch.set_num_threads(threads)
    result = resized[0].permute(1, 2, 0).numpy()  # [size, size, 4]
    if flip:
        result = result[:, ::-1]
    for channel in range(3):  # channel by channel: several times faster than one strided 4 -> 3 copy
        np.copyto(out[:, :, channel], result[:, :, channel])


def augmentation_for(mode: str, image_size: int | None = None) -> Augmentation:
    if mode not in MODES:
        raise ValueError(f"augmentation mode {mode!r}: one of {', '.join(MODES)}")
    return Augmentation(mode=mode, image_size=image_size or DEFAULT_SIZES[mode])


def random_resized_crop_box(width, height, rng, area=(0.08, 1.0), aspect=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop box, drawn from `rng`."""
    total = width * height
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    for _ in range(10):
        target = total * rng.uniform(*area)
        ratio = math.exp(rng.uniform(*log_aspect))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    in_ratio = width / height  # fall back to a centre crop with the aspect clamped
    if in_ratio < aspect[0]:
        w, h = width, round(width / aspect[0])
    elif in_ratio > aspect[1]:
        h, w = height, round(height * aspect[1])
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def normalise(images_uint8, out: np.ndarray | None = None):
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1] (ViT: (x / 255 - 0.5) / 0.5).

    The result is a channels-last view (strides of [B, H, W, 3]), which convolutions and
    `.to(device)` accept as is. numpy does the arithmetic in one fused pass: about 3x faster
    than torch's uint8 -> float conversion on CPU. `out`: a float32 [B, H, W, 3] array to
    write into (and view) instead of a new one.
    """
    import torch

    pixels = images_uint8.numpy()
    if out is None:
        out = np.empty(pixels.shape, np.float32)
    np.multiply(pixels, np.float32(2 / 255), out=out, casting="unsafe")
    out -= np.float32(1)
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def normalise_on_device(images, dtype=None):
    """uint8 [B, 3, H, W] (a `ShardLoader(..., dtype="uint8")` batch, on any device) -> float in
    [-1, 1], computed in float32 exactly as `normalise` computes it, then cast to `dtype` if given.

    For a trainer that moves uint8 batches to the accelerator (4x fewer bytes to copy) and
    normalises there; the memory format (channels last) is kept.
    """
    import torch

    out = images.to(torch.float32).mul_(2 / 255).sub_(1)
    return out if dtype is None or dtype == torch.float32 else out.to(dtype)


if __name__ == "__main__":
    from PIL import Image

    path, mode = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "pretrain")
    with open(path, "rb") as f:
        pixels = augmentation_for(mode).apply(f.read(), random.Random(0))
    Image.fromarray(pixels).save(path + ".aug.png")
    print(f"{path}.aug.png {pixels.shape}")
