"""Fine-tuning datasets as users download them, to webdataset shards: CIFAR and VTAB-1k.

    python launch/make_shards.py --input cifar-10-batches-py --output s3://bucket/cifar10       # train/, test/
    python launch/make_shards.py --input vtab-1k/caltech101 --output s3://bucket/vtab/caltech101 \
        [--resize-shorter PX] [--workers N]                                  # train800/, val200/, train800val200/, test/

Input layouts (`detect_format` tells them apart by the files present):
  * CIFAR-10 `cifar-10-batches-py/` (`data_batch_1`..`data_batch_5`, `test_batch`, `batches.meta`)
    or CIFAR-100 `cifar-100-python/` (`train`, `test`, `meta`): Python 2 pickles of dicts with
    b"data" (uint8 N x 3072: the 32x32 image's 1024 R, then G, then B values), b"labels" or
    b"fine_labels", b"filenames"; the meta file holds b"label_names" or b"fine_label_names".
    They are read by `DataUnpickler`, which builds numpy arrays and plain values and refuses
    every other global, so a crafted file cannot run code. Images become lossless PNGs (shrunk
    only by a `--resize-shorter` below 32); keys are `<file>-<index>` (`data_batch_1-00042`,
    `train-12345`).
  * VTAB-1k task folder, as the PyTorch VTAB code bases lay it out: images anywhere under it
    plus the lists `train800.txt`, `val200.txt`, `train800val200.txt`, `test.txt`, each line
    `relative/path.jpg label`. Classes are "0".."K-1", K = 1 + the largest label in the four
    lists. Keys come from the relative path (image_inputs' `key_for`), so an image has the
    same key in train800 and train800val200. Images keep their bytes (JPEG/PNG) unless
    `--resize-shorter` shrinks them, as for image folders.

Each split goes to its own folder or prefix below the output, shards plus manifest.json,
through `shard_writer.write_shards`; samples are shuffled with a fixed seed, as image folders
are. Every input is read and checked before the first shard is written. The fine-tuning
held-out split is chosen by a hash of the key, which is why keys derive from the source only.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import logging
import os
import pickle
import random
from typing import Callable, Iterator

import numpy as np

from data_pipelines.preflight import check_writable
from data_pipelines.image_inputs import key_for
from data_pipelines.s3 import S3ClientFactory, join_location
from data_pipelines.shard_writer import (
    Sample, ShardWriteError, WriteSummary, _bounded_map, _prepare, write_shards,
)

log = logging.getLogger(__name__)

FORMATS = ("auto", "imagefolder", "cifar", "vtab")
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR10_META = "batches.meta"
CIFAR100_FILES = {"train": ["train"], "test": ["test"]}
CIFAR100_META = "meta"
VTAB_SPLITS = ("train800", "val200", "train800val200", "test")
CIFAR_SIDE = 32


def detect_format(input_dir: str) -> str:
    """"cifar", "vtab" or "imagefolder" (ImageFolder tree or labels.json), from the files present."""
    def has(name: str) -> bool:
        return os.path.isfile(os.path.join(input_dir, name))

    if has(CIFAR10_META) or has("data_batch_1") or (has(CIFAR100_META) and has("train")):
        return "cifar"
    if has("train800.txt"):
        return "vtab"
    return "imagefolder"


@dataclasses.dataclass
class _Split:
    name: str
    class_names: list[str]
    count: int
    samples: Callable[[], Iterator[Sample]]
    skipped: Callable[[], int] = lambda: 0


def write_downstream(
    input_dir: str,
    output: str,
    fmt: str,
    *,
    samples_per_shard: int = 1000,
    resize_shorter: int | None = None,
    workers: int = 1,
    seed: int = 0,
    factory: S3ClientFactory | None = None,
    progress: bool = True,
    report: Callable[[WriteSummary], None] | None = None,
) -> list[WriteSummary]:
    """Writes every split of a CIFAR folder (`fmt="cifar"`) or VTAB-1k task folder (`"vtab"`)
    to `output/<split>/`; `report` is called with each split's summary as it is written."""
    if not os.path.isdir(input_dir):
        raise ShardWriteError(f"{input_dir}: no such folder")
    if fmt == "cifar":
        splits = _cifar_splits(input_dir, resize_shorter, seed)
    elif fmt == "vtab":
        splits = _vtab_splits(input_dir, resize_shorter, workers, seed)
    else:
        raise ShardWriteError(f"format {fmt!r}: one of cifar, vtab")
    check_writable(output, factory)  # before encoding anything
    summaries = []
    for split in splits:
        summary = write_shards(
            split.samples(), join_location(output, split.name), class_names=split.class_names,
            samples_per_shard=samples_per_shard, upload_workers=max(2, workers), factory=factory,
            skipped=split.skipped, total=split.count, progress=progress,
        )
        summaries.append(summary)
        if report is not None:
            report(summary)
    return summaries


# ---- CIFAR ---------------------------------------------------------------------------------

def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class DataUnpickler(pickle.Unpickler):
    """Loads pickles of plain data and numpy arrays; any other global is refused, so no code
    named by the file runs (the pickle module's own advice for untrusted data)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
    }

    def find_class(self, module: str, name: str):
        resolve = self.ALLOWED.get((module, name))
        if resolve is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays and plain data are allowed")
        return resolve()


def load_data_pickle(path: str) -> dict:
    """A CIFAR python batch (a Python 2 pickle: str comes back as bytes) through `DataUnpickler`."""
    try:
        with open(path, "rb") as f:
            value = DataUnpickler(f, encoding="bytes").load()
    except OSError as error:
        raise ShardWriteError(f"{path}: {error.strerror or error}") from None
    except Exception as error:  # a damaged or foreign pickle raises many types
        raise ShardWriteError(f"{path}: not a CIFAR python batch ({type(error).__name__}: {error})") from None
    if not isinstance(value, dict):
        raise ShardWriteError(f"{path}: not a CIFAR python batch (a {type(value).__name__}, not a dict)")
    return value


def _field(batch: dict, path: str, *names: bytes):
    for name in names:
        if name in batch:
            return batch[name]
    raise ShardWriteError(f"{path}: no {' or '.join(repr(n) for n in names)} entry (has {sorted(map(repr, batch))})")


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _cifar_batch(path: str, num_classes: int) -> tuple[np.ndarray, list[int]]:
    batch = load_data_pickle(path)
    data = _field(batch, path, b"data")
    labels = _field(batch, path, b"fine_labels", b"labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * CIFAR_SIDE ** 2:
        raise ShardWriteError(f"{path}: b'data' is not a uint8 N x {3 * CIFAR_SIDE ** 2} array")
    try:
        labels = [int(label) for label in labels]
    except (TypeError, ValueError) as error:
        raise ShardWriteError(f"{path}: labels are not integers ({error})") from None
    if len(labels) != len(data):
        raise ShardWriteError(f"{path}: {len(data)} images but {len(labels)} labels")
    bad = next((label for label in labels if not 0 <= label < num_classes), None)
    if bad is not None:
        raise ShardWriteError(f"{path}: label {bad} outside the {num_classes} classes of the meta file")
    return data, labels


def cifar_png(row: np.ndarray, resize_shorter: int | None = None) -> bytes:
    """One CIFAR row (1024 R, 1024 G, 1024 B) as PNG bytes."""
    from PIL import Image

    image = Image.fromarray(row.reshape(3, CIFAR_SIDE, CIFAR_SIDE).transpose(1, 2, 0))
    if resize_shorter is not None and resize_shorter < CIFAR_SIDE:
        image = image.resize((resize_shorter, resize_shorter), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _cifar_splits(input_dir: str, resize_shorter: int | None, seed: int) -> list[_Split]:
    if os.path.isfile(os.path.join(input_dir, CIFAR10_META)):
        files, meta_name, names_field = CIFAR10_FILES, CIFAR10_META, b"label_names"
    elif os.path.isfile(os.path.join(input_dir, CIFAR100_META)):
        files, meta_name, names_field = CIFAR100_FILES, CIFAR100_META, b"fine_label_names"
    else:
        raise ShardWriteError(f"{input_dir}: not a CIFAR python folder (neither {CIFAR10_META} with data_batch_1..5 "
                              f"and test_batch, nor {CIFAR100_META} with train and test)")
    missing = [name for names in files.values() for name in names if not os.path.isfile(os.path.join(input_dir, name))]
    if missing:
        raise ShardWriteError(f"{input_dir}: CIFAR files missing: {', '.join(missing)}")
    meta_path = os.path.join(input_dir, meta_name)
    class_names = [_text(name) for name in _field(load_data_pickle(meta_path), meta_path, names_field)]
    splits = []
    for split, names in files.items():
        rows = []  # (key, data array, row index, label)
        for name in names:
            data, labels = _cifar_batch(os.path.join(input_dir, name), len(class_names))
            rows += [(f"{name}-{i:05d}", data, i, label) for i, label in enumerate(labels)]
        random.Random(seed).shuffle(rows)

        def samples(rows=rows) -> Iterator[Sample]:
            for key, data, i, label in rows:
                yield Sample(key, cifar_png(data[i], resize_shorter), "png", label)

        splits.append(_Split(split, class_names, len(rows), samples))
    return splits


# ---- VTAB-1k -------------------------------------------------------------------------------

def _read_vtab_list(task_dir: str, split: str) -> list[tuple[str, str, int]]:
    """(image path, key, label) per line of `<split>.txt`; one error naming file and line otherwise."""
    list_path = os.path.join(task_dir, f"{split}.txt")
    entries, keys = [], {}
    with open(list_path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{list_path}:{number}"
            fields = line.rsplit(None, 1)
            if len(fields) != 2 or not fields[1].isdigit():
                shown = line.strip() if len(line) < 120 else line[:117].strip() + "..."
                raise ShardWriteError(f"{where}: expected 'relative/path/to/image label' with an integer label >= 0, got {shown!r}")
            relative, label = os.path.normpath(fields[0].strip()), int(fields[1])
            if os.path.isabs(relative):
                raise ShardWriteError(f"{where}: {fields[0].strip()!r} is absolute; paths are relative to {task_dir}")
            path = os.path.join(task_dir, relative)
            if not os.path.isfile(path):
                raise ShardWriteError(f"{where}: {fields[0].strip()!r} is not in {task_dir}")
            key = key_for(relative)
            if key in keys:
                raise ShardWriteError(f"{where}: {relative!r} repeats line {keys[key]} (same image or sample key {key!r})")
            keys[key] = number
            entries.append((path, key, label))
    if not entries:
        raise ShardWriteError(f"{list_path}: lists no images")
    return entries


def _vtab_splits(task_dir: str, resize_shorter: int | None, workers: int, seed: int) -> list[_Split]:
    missing = [f"{split}.txt" for split in VTAB_SPLITS if not os.path.isfile(os.path.join(task_dir, f"{split}.txt"))]
    if missing:
        raise ShardWriteError(f"{task_dir}: not a VTAB-1k task folder: {', '.join(missing)} missing")
    lists = {split: _read_vtab_list(task_dir, split) for split in VTAB_SPLITS}
    class_names = [str(c) for c in range(1 + max(label for entries in lists.values() for _, _, label in entries))]
    splits = []
    for split, entries in lists.items():
        random.Random(seed).shuffle(entries)
        skipped = [0]

        def samples(entries=entries, skipped=skipped) -> Iterator[Sample]:
            jobs = ((path, resize_shorter) for path, _, _ in entries)
            pool = concurrent.futures.ProcessPoolExecutor(workers) if workers > 1 else None
            prepared = _bounded_map(pool, jobs, window=workers * 256) if pool else map(_prepare, jobs)
            try:
                for (path, key, label), result in zip(entries, prepared):
                    if isinstance(result, str):
                        skipped[0] += 1
                        log.warning("skipping undecodable image %s: %s", path, result)
                        continue
                    data, ext = result
                    yield Sample(key, data, ext, label)
            finally:
                if pool is not None:
                    pool.shutdown(cancel_futures=True)

        splits.append(_Split(split, class_names, len(entries), samples, lambda skipped=skipped: skipped[0]))
    return splits
