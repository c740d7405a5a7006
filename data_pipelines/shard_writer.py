"""Image folders to webdataset shards in a folder or on S3, with a manifest written last.

    python launch/make_shards.py --input DIR --output s3://bucket/prefix [--samples-per-shard N]
        [--resize-shorter PX] [--workers N]

Input layouts:
  * ImageFolder: one subfolder per class (sorted names are the classes), images inside.
  * Multi-label: images directly in DIR plus `labels.json` mapping file name -> list of
    class names, e.g. {"a.jpg": ["cat", "dog"], "b.png": []}; the sorted union is the classes.

Each sample is `<key>.jpg` or `<key>.png` (the original bytes unless `--resize-shorter`
shrinks it) plus `<key>.cls` (the class index) or `<key>.json` ({"labels": [indices]}). The
input order is shuffled with a fixed seed so every shard mixes classes. Undecodable images
are skipped with a warning and counted. S3 shards go up as parallel multipart uploads
(boto3 `upload_fileobj` with a `TransferConfig`); `manifest.json` is written after every
shard has landed, so a manifest only ever lists complete shards.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import os
import random
import re
from typing import Callable, Iterable, Iterator

from data_pipelines.manifest import MANIFEST_NAME, Manifest, ShardInfo
from data_pipelines.preflight import check_writable
from data_pipelines.s3 import DataSourceError, S3ClientFactory, client_error, is_s3_url, join_location, parse_s3_url
from data_pipelines.storage import write_bytes

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LABELS_FILE = "labels.json"
MULTIPART_BYTES = 16 << 20


class ShardWriteError(Exception):
    """The input cannot be turned into shards: one line that says why."""


@dataclasses.dataclass(frozen=True)
class Sample:
    key: str  # unique, no dots (webdataset splits the key from the extension at the first dot)
    image: bytes
    image_ext: str  # "jpg" or "png"
    label: int | list[int] | None  # a class index, the class indices present (multi-label), or None


@dataclasses.dataclass
class WriteSummary:
    output: str
    manifest: Manifest
    written: int
    skipped: int

    def line(self) -> str:
        return (f"wrote {self.written} samples in {len(self.manifest.shards)} shards to {self.output}"
                f" ({self.skipped} undecodable inputs skipped)")


def _shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _encode_sample(sample: Sample) -> dict:
    record = {"__key__": sample.key, sample.image_ext: sample.image}
    if sample.label is None:
        pass  # unlabeled data (label_kind "none"): the image alone
    elif isinstance(sample.label, int):
        record["cls"] = str(sample.label).encode("ascii")
    else:
        record["json"] = json.dumps({"labels": sorted(sample.label)}).encode("utf-8")
    return record


class _ShardSink:
    """Puts finished shards where they go: a folder (write + rename) or S3 (threaded multipart)."""

    def __init__(self, output: str, factory: S3ClientFactory | None, upload_workers: int):
        self.output = output
        self.factory = factory or S3ClientFactory()
        self.pool = concurrent.futures.ThreadPoolExecutor(max(1, upload_workers)) if is_s3_url(output) else None
        self.upload_workers = max(1, upload_workers)
        self.pending: list[concurrent.futures.Future] = []
        if not is_s3_url(output):
            os.makedirs(output, exist_ok=True)

    def put(self, name: str, data: bytes) -> None:
        url = join_location(self.output, name)
        if self.pool is None:
            write_bytes(url, data)
            return
        while len(self.pending) >= 2 * self.upload_workers:  # bound the shards held in memory
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(self._upload, url, data))

    def _upload(self, url: str, data: bytes) -> None:
        from boto3.exceptions import S3UploadFailedError
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        location = parse_s3_url(url)
        config = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES, max_concurrency=4)
        try:
            self.factory.client().upload_fileobj(io.BytesIO(data), location.bucket, location.prefix, Config=config)
        except (BotoCoreError, ClientError) as error:
            raise client_error(error, url) from None
        except S3UploadFailedError as error:  # wraps the ClientError's own one-line text
            raise DataSourceError(f"{url}: upload failed: {error}") from None

    def finish(self) -> None:
        try:
            for future in self.pending:
                future.result()
        finally:
            self.pending = []
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)


def write_shards(
    samples: Iterable[Sample],
    output: str,
    *,
    class_names: list[str],
    label_kind: str = "class",
    samples_per_shard: int = 1000,
    upload_workers: int = 4,
    factory: S3ClientFactory | None = None,
    skipped: Callable[[], int] | int = 0,
    total: int | None = None,
    progress: bool = True,
) -> WriteSummary:
    """Writes `samples` as webdataset tars plus `manifest.json` to a folder or s3:// prefix.

    `skipped` counts inputs the caller dropped; a callable is read after `samples` is exhausted.
    """
    import webdataset as wds
    from tqdm import tqdm

    if samples_per_shard < 1:
        raise ShardWriteError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    check_writable(output, factory)
    sink = _ShardSink(output, factory, upload_workers)
    shards: list[ShardInfo] = []
    written = 0
    seen_keys: set[str] = set()
    buffer, writer, in_shard = None, None, 0

    def close_shard():
        nonlocal buffer, writer, in_shard
        writer.close()
        data = buffer.getvalue()
        name = _shard_name(len(shards))
        shards.append(ShardInfo(name, in_shard, len(data), hashlib.sha256(data).hexdigest()))
        sink.put(name, data)
        buffer, writer, in_shard = None, None, 0

    try:
        for sample in tqdm(samples, total=total, unit="img", desc="shards", disable=not progress):
            if "." in sample.key or sample.key in seen_keys:
                raise ShardWriteError(f"sample key {sample.key!r} is {'duplicated' if sample.key in seen_keys else 'dotted'}")
            seen_keys.add(sample.key)
            if writer is None:
                buffer = io.BytesIO()
                writer = wds.TarWriter(buffer, mtime=0)  # an int: a float mtime makes tarfile add a PAX header per member
            writer.write(_encode_sample(sample))
            in_shard += 1
            written += 1
            if in_shard == samples_per_shard:
                close_shard()
        if writer is not None:
            close_shard()
    finally:
        sink.finish()
    skipped = skipped() if callable(skipped) else skipped
    manifest = Manifest(shards=shards, class_names=list(class_names), label_kind=label_kind, skipped=skipped)
    write_bytes(join_location(output, MANIFEST_NAME), manifest.to_json().encode("utf-8"), factory)
    return WriteSummary(output=output, manifest=manifest, written=written, skipped=skipped)


# ---- image folders ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _InputImage:
    path: str
    key: str
    label: int | list[int]


def _key_for(relative_path: str) -> str:
    stem = os.path.splitext(relative_path)[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def find_inputs(input_dir: str) -> tuple[list[_InputImage], list[str], str]:
    """(images, class names, label kind) for an ImageFolder tree or a folder with labels.json."""
    if not os.path.isdir(input_dir):
        raise ShardWriteError(f"{input_dir}: no such folder")
    labels_path = os.path.join(input_dir, LABELS_FILE)
    images: list[_InputImage] = []
    if os.path.exists(labels_path):
        try:
            with open(labels_path) as f:
                labels = json.load(f)
            if not isinstance(labels, dict) or not all(isinstance(v, list) for v in labels.values()):
                raise ValueError("expected an object mapping file name -> list of class names")
        except ValueError as error:
            raise ShardWriteError(f"{labels_path}: {error}") from None
        class_names = sorted({str(c) for names in labels.values() for c in names})
        index = {name: i for i, name in enumerate(class_names)}
        for file_name in sorted(labels):
            path = os.path.join(input_dir, file_name)
            if not os.path.isfile(path):
                raise ShardWriteError(f"{labels_path}: lists {file_name!r}, which is not in {input_dir}")
            images.append(_InputImage(path, _key_for(file_name), sorted({index[str(c)] for c in labels[file_name]})))
        return images, class_names, "multi_label"
    class_names = sorted(d for d in os.listdir(input_dir) if os.path.isdir(os.path.join(input_dir, d)))
    if not class_names:
        raise ShardWriteError(f"{input_dir}: neither class subfolders nor {LABELS_FILE}")
    for label, class_name in enumerate(class_names):
        class_dir = os.path.join(input_dir, class_name)
        for root, _, files in sorted(os.walk(class_dir)):
            for file_name in sorted(files):
                if file_name.lower().endswith(IMAGE_SUFFIXES):
                    relative = os.path.relpath(os.path.join(root, file_name), input_dir)
                    images.append(_InputImage(os.path.join(root, file_name), _key_for(relative), label))
    if not images:
        raise ShardWriteError(f"{input_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class subfolders")
    return images, class_names, "class"


def prepare_image(path: str, resize_shorter: int | None) -> tuple[bytes, str] | str:
    """(bytes, "jpg"|"png") ready for a shard, or the reason the file cannot be decoded."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            original = f.read()
        with Image.open(io.BytesIO(original)) as image:
            image.load()  # a full decode: truncated or corrupt files fail here, not at training time
            image_format = image.format
            shorter = min(image.size)
            if resize_shorter is None or shorter <= resize_shorter:
                if image_format in ("JPEG", "PNG"):
                    return original, "jpg" if image_format == "JPEG" else "png"
                resized = image
            else:
                scale = resize_shorter / shorter
                size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                resized = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
            out = io.BytesIO()
            if image_format == "JPEG":
                resized.convert("RGB").save(out, "JPEG", quality=95)
                return out.getvalue(), "jpg"
            resized.save(out, "PNG")
            return out.getvalue(), "png"
    except Exception as error:  # PIL raises many types for bad files
        return f"{type(error).__name__}: {error}"


def _prepare(args: tuple[str, int | None]):
    return prepare_image(*args)


def _bounded_map(pool: concurrent.futures.Executor, jobs: Iterator, window: int) -> Iterator:
    """`pool.map(_prepare, jobs)` in order, with at most `window` jobs submitted at a time
    (Executor.map submits everything at once: a million futures for ImageNet)."""
    while True:
        block = list(itertools.islice(jobs, window))
        if not block:
            return
        yield from pool.map(_prepare, block, chunksize=16)


def make_shards(
    input_dir: str,
    output: str,
    *,
    samples_per_shard: int = 1000,
    resize_shorter: int | None = None,
    workers: int = 1,
    seed: int = 0,
    factory: S3ClientFactory | None = None,
    progress: bool = True,
) -> WriteSummary:
    """The one function behind `launch/make_shards.py`."""
    images, class_names, label_kind = find_inputs(input_dir)
    check_writable(output, factory)  # before decoding anything
    random.Random(seed).shuffle(images)
    skipped = 0

    def samples() -> Iterator[Sample]:
        nonlocal skipped
        jobs = ((image.path, resize_shorter) for image in images)
        if workers > 1:
            pool = concurrent.futures.ProcessPoolExecutor(workers)
            prepared = _bounded_map(pool, jobs, window=workers * 256)
        else:
            pool, prepared = None, map(_prepare, jobs)
        try:
            for image, result in zip(images, prepared):
                if isinstance(result, str):
                    skipped += 1
                    log.warning("skipping undecodable image %s: %s", image.path, result)
                    continue
                data, ext = result
                yield Sample(image.key, data, ext, image.label)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    summary = write_shards(
        samples(), output, class_names=class_names, label_kind=label_kind, samples_per_shard=samples_per_shard,
        upload_workers=max(2, workers), factory=factory, total=len(images), progress=progress,
        skipped=lambda: skipped,
    )
    return summary
