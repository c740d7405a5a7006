"""Shards to batches for one rank, with a data position that survives restarts exactly.

    python -m data_pipelines.stream s3://bucket/prefix --batch-size 64 --workers 2   # stream one epoch, print rates

    loader = ShardLoader("s3://bucket/train", batch_size=256, rank=rank, world_size=world,
                         num_workers=8, seed=0)
    loader.load_state_dict(saved_states)           # list of every rank's state_dict(), or one merged
    for epoch in range(loader.epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:                       # {"image": float32 [B,3,S,S] in [-1,1]
            ...                                    #    (channels-last memory), "label": int64 [B]
                                                   #  or float multi-hot [B,C], "key": [B] keys}

With `dtype="uint8"` the batches' "image" is instead the raw uint8 pixels, [B,3,S,S] with
channels-last memory (a view of [B,S,S,3]), for a trainer that copies them to its accelerator
(4x fewer bytes) and normalises there with `augment.normalise_on_device`, which gives exactly
the float32 default's values. Either way, the workers hand uint8 batches to this process
through shared memory; the default normalises them here, on the CPU, into one of a few
float buffers that it reuses once nothing references an earlier batch's tensor any more
(fresh memory for every batch costs more in page faults than the arithmetic).

How one epoch is laid out. The epoch order is the manifest's shards permuted by
`Random(f"{seed}/{epoch}")`, each shard read front to back (the shard writer shuffled samples
across shards when it wrote them). The samples not yet consumed in this epoch, taken in that
order, are cut into `world_size * num_workers` contiguous, equally long (within one sample)
pieces; DataLoader worker `w` of rank `r` streams piece `r * num_workers + w` straight from
S3 (no local copy), decodes, augments (augment.py) and batches it; the DataLoader hands the
workers' batches to the rank in its fixed round-robin order. Augmentation randomness is
drawn from `Random(f"{seed}/{epoch}/{key}")`, so a sample is augmented the same way whatever
rank or worker reads it.

The guarantee, for one epoch. `state_dict()` records, as ranges of positions per shard,
every sample this rank has handed out, every sample its workers skipped on the way (corrupt
image, broken tar member, shard shorter than the manifest says, shard gone: each reported in
`stats` and by a warning that names the shard and key), and everything that was already
consumed in the state it loaded. Batches that workers prefetched but this rank has not yet
handed out are not recorded. After `load_state_dict(states)` with the states of all ranks,
taken at the same step (any world size, any number of workers before and after), the ranks
together yield exactly the samples of that epoch that no state records: nothing twice,
nothing left out, re-partitioned over the new `world_size * num_workers`. Given (seed,
epoch, world_size, num_workers, the recorded set), what each rank yields and in which order
is deterministic. Preconditions: the same shards and manifest, the same seed, states that
agree on the epoch (merging refuses otherwise), and the same `num_workers` on every rank.

Consequences a trainer should know: per-rank sample counts (and batch counts, since each
worker ends on its own partial batch) differ by at most `num_workers`; stop all ranks at the
smallest step count or let the last steps be uneven. Resuming mid-shard reads that shard
from its start and discards what was consumed. A connection dropped mid-shard is reopened
and resumes after the last sample handed on (STREAM_RETRIES times) before the rest of the
shard is reported missing. A prefix without a manifest still streams, but its shards
(sample counts unknown) are handed out whole, not split.

Held-out parts (`keep=KeySplit(fraction, part)`): a sample is in the held-out part when the
first 8 bytes of sha256(key), read as a fraction of 2**64, fall below `fraction`. The choice
depends on the key alone, never on a shard or a position, so rewriting the same samples with
another shard size, another shard order or another number of writers holds out the very same
samples; the part is about, not exactly, `fraction` of the samples (a 2% part of CIFAR's
50,000 is 1,000 +- 31). Samples of the other part are read past without being decoded and
count as consumed, so the data position keeps its guarantee.
"""

from __future__ import annotations

import argparse
import array
import dataclasses
import hashlib
import itertools
import json
import logging
import random
import sys
import tarfile
import time
from typing import Iterator

import numpy as np
import torch

from data_pipelines.augment import Augmentation, augmentation_for, normalise
from data_pipelines.manifest import Manifest, load_shard_list
from data_pipelines.s3 import DataSourceError, S3ClientFactory, join_location
from data_pipelines.storage import open_stream

log = logging.getLogger(__name__)

STATE_FORMAT = "vitscale-data-position/1"
STREAM_RETRIES = 3
FLOAT_BUFFERS = 3  # float32 batch buffers a loader keeps for reuse


class StaleDataPosition(ValueError):
    """A loader state (a checkpoint's data position) that names shards the manifest no longer has."""


def _stream_errors() -> tuple[type[BaseException], ...]:
    """Errors of a connection that dropped mid-object: worth reopening the shard."""
    from botocore.exceptions import BotoCoreError
    from urllib3.exceptions import HTTPError

    return (BotoCoreError, HTTPError, OSError)

Range = tuple[int, int, int | None]  # (shard index, first position, end position or None: to the end)


@dataclasses.dataclass(frozen=True)
class KeySplit:
    """A deterministic part of a data set, by sample key (module docstring): "holdout" is the
    held-out `fraction`, "train" the rest, "all" everything."""

    fraction: float
    part: str = "all"

    def __post_init__(self):
        if self.part not in ("all", "train", "holdout"):
            raise ValueError(f"part {self.part!r}: one of all, train, holdout")
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"fraction {self.fraction!r}: must be in [0, 1)")

    def __call__(self, key: str) -> bool:
        if self.part == "all":
            return True
        held_out = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") < self.fraction * 2**64
        return held_out == (self.part == "holdout")


# ---- the epoch's plan ---------------------------------------------------------------------

def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    # random.shuffle on a typed array: the same swaps, so the same order as on a list, but the
    # swaps touch 8-byte slots rather than one int object per shard scattered over the heap
    # (the list's shuffle grew 2.5x per doubling of the shards at JFT scale, this one 2.0x).
    order = array.array("q", range(num_shards))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order.tolist()


def _subtract(start: int, end: int | None, consumed: list[list[int]]) -> list[tuple[int, int | None]]:
    """[start, end) minus the sorted, disjoint consumed intervals (end None: unbounded)."""
    pieces, cursor = [], start
    for a, b in consumed:
        if end is not None and a >= end:
            break
        if b <= cursor:
            continue
        if a > cursor:
            pieces.append((cursor, a))
        cursor = max(cursor, b)
    if end is None or cursor < end:
        pieces.append((cursor, end))
    return pieces


def _remaining_ranges_loop(manifest: Manifest, order: list[int], consumed: dict[str, list[list[int]]]) -> list[Range]:
    """remaining_ranges as a Python loop over the shards (any input, unknown counts included)."""
    ranges = []
    for shard in order:
        info = manifest.shards[shard]
        for a, b in _subtract(0, info.samples, consumed.get(info.name, [])):
            ranges.append((shard, a, b))
    return ranges


def _unconsumed(ends: np.ndarray, shard: np.ndarray, a: np.ndarray, b: np.ndarray):
    """_subtract for many shards at once: the gaps (shard, start, end) that sorted, disjoint
    intervals [a, b) of each shard (grouped by shard) leave in [0, its end); None where the
    intervals are not sorted and disjoint (the caller then loops)."""
    same = shard[1:] == shard[:-1]
    if (a < 0).any() or (b < a).any() or (a[1:][same] < b[:-1][same]).any():
        return None
    n = ends[shard]
    # _subtract stops at the first interval that begins at or after the end: the gap before it
    # ends there, and every gap after it is empty (its intervals end at or after the end too).
    first = np.concatenate([[True], shard[1:] != shard[:-1]])
    last = np.concatenate([shard[1:] != shard[:-1], [True]])
    # The gap before each interval (from the previous one's end, or from 0), then each shard's tail.
    before_start = np.where(first, 0, np.concatenate([[0], b[:-1]]))
    group = np.cumsum(first) - 1
    slot_before = np.arange(len(shard)) + group
    slot_tail = np.flatnonzero(last) + group[last] + 1
    size = len(shard) + int(last.sum())
    gap_shard, gap_start, gap_end = (np.empty(size, dtype=np.int64) for _ in range(3))
    gap_shard[slot_before], gap_start[slot_before], gap_end[slot_before] = shard, before_start, np.minimum(a, n)
    gap_shard[slot_tail], gap_start[slot_tail], gap_end[slot_tail] = shard[last], b[last], n[last]
    keep = gap_start < gap_end
    return gap_shard[keep], gap_start[keep], gap_end[keep]


def remaining_ranges(manifest: Manifest, order: list[int], consumed: dict[str, list[list[int]]]) -> list[Range]:
    """What is left of the shards in `order`: (shard, start, end) per unconsumed stretch, in order.

    Array operations, with Python touching each shard once in index order and each consumed
    interval once: every rank runs it at each epoch's start and each resume (30,000 shards at
    JFT scale, most of them named in a mid-epoch state)."""
    shards = manifest.shards
    samples = [info.samples for info in shards]
    if not len(order) or None in samples:  # counts unknown (listed without a manifest): the loop
        return _remaining_ranges_loop(manifest, order, consumed)
    try:
        ends = np.array(samples, dtype=np.int64)
    except OverflowError:
        return _remaining_ranges_loop(manifest, order, consumed)
    counts = (ends > 0).astype(np.int64)  # a shard not consumed: one range, unless it is empty
    pieces = None
    if consumed:
        named, per_shard, flat = [], [], []
        for i, info in enumerate(shards):
            intervals = consumed.get(info.name)
            if intervals:
                named.append(i)
                per_shard.append(len(intervals))
                flat += intervals
        try:
            pairs = np.fromiter(itertools.chain.from_iterable(flat), dtype=np.int64, count=2 * len(flat))
        except (ValueError, TypeError, OverflowError):
            return _remaining_ranges_loop(manifest, order, consumed)
        pieces = _unconsumed(ends, np.repeat(np.array(named, dtype=np.int64), per_shard), pairs[0::2], pairs[1::2])
        if pieces is None:
            return _remaining_ranges_loop(manifest, order, consumed)
        gaps = np.bincount(pieces[0], minlength=len(shards))  # what is left of each consumed shard
        counts[named] = 0
        counts += gaps
    order_array = np.asarray(order, dtype=np.int64)
    per_position = counts[order_array]
    shard = np.repeat(order_array, per_position)
    start, end = np.zeros(len(shard), dtype=np.int64), ends[shard]
    if pieces is not None and len(pieces[0]):
        # The consumed shards' rows take their gaps, in order, from where that shard's begin.
        first_piece = np.cumsum(gaps) - gaps
        is_named = np.zeros(len(shards), dtype=bool)
        is_named[named] = True
        rows = np.flatnonzero(is_named[shard])
        row_start = np.repeat(np.cumsum(per_position) - per_position, per_position)
        which = first_piece[shard[rows]] + rows - row_start[rows]
        start[rows], end[rows] = pieces[1][which], pieces[2][which]
    return list(zip(shard.tolist(), start.tolist(), end.tolist()))


def _split_ranges_loop(ranges: list[Range], parts: int) -> list[list[Range]]:
    """split_ranges as one Python pass over the ranges and the parts together (any input)."""
    total = sum(end - start for _, start, end in ranges)
    bounds = [total * k // parts for k in range(parts + 1)]
    pieces: list[list[Range]] = [[] for _ in range(parts)]
    position, k = 0, 0
    for shard, start, end in ranges:
        stop = position + end - start
        while k < parts and bounds[k + 1] <= position:  # parts that end before this range
            k += 1
        j = k
        while j < parts and bounds[j] < stop:  # the parts this range overlaps, in order
            lo, hi = max(bounds[j], position), min(bounds[j + 1], stop)
            if lo < hi:
                pieces[j].append((shard, start + lo - position, start + hi - position))
            j += 1
        position = stop
    return pieces


def split_ranges(ranges: list[Range], parts: int) -> list[list[Range]]:
    """Cut the ranges, in order, into `parts` contiguous pieces of equal length (within one).

    O(ranges + parts), in array operations: every rank runs it at each epoch's start and each
    resume, and at JFT scale (30,000 shards, 512 ranks x 8 data workers) a loop over every part
    for every range took 45 s (benchmarks/scale.py)."""
    if any(end is None for _, _, end in ranges):  # unknown lengths: whole ranges, dealt round robin
        return [ranges[k::parts] for k in range(parts)]
    if not ranges:
        return [[] for _ in range(parts)]
    try:
        table = np.array(ranges, dtype=np.int64).reshape(len(ranges), 3)
    except OverflowError:
        return _split_ranges_loop(ranges, parts)
    shard, start, end = table.T
    if (end < start).any() or int(np.abs(table).max()) * 2 * (len(ranges) + 1) * parts >= 2**62:
        return _split_ranges_loop(ranges, parts)  # not ranges, or positions too long for int64
    stop = np.cumsum(end - start)  # each range's end in the epoch's positions
    position = stop - (end - start)
    bounds = int(stop[-1]) * np.arange(parts + 1, dtype=np.int64) // parts
    # Part k overlaps the ranges from the first that ends after its start to the last that
    # begins before its end: one candidate row per (part, range) pair, ~ranges + parts in all.
    first = np.searchsorted(stop, bounds[:-1], side="right")
    count = np.maximum(np.searchsorted(position, bounds[1:], side="left") - first, 0)
    part = np.repeat(np.arange(parts), count)
    row = first[part] + np.arange(len(part)) - np.repeat(np.cumsum(count) - count, count)
    lo = np.maximum(bounds[part], position[row])
    hi = np.minimum(bounds[part + 1], stop[row])
    keep = lo < hi
    part, row, lo, hi = part[keep], row[keep], lo[keep], hi[keep]
    cut = list(zip(shard[row].tolist(), (start[row] + lo - position[row]).tolist(),
                   (start[row] + hi - position[row]).tolist()))
    edges = np.concatenate([[0], np.cumsum(np.bincount(part, minlength=parts))]).tolist()
    return [cut[edges[k]:edges[k + 1]] for k in range(parts)]


def _add_interval(intervals: list[list[int]], a: int, b: int) -> None:
    """Insert [a, b) into sorted disjoint intervals, merging neighbours (in place)."""
    intervals.append([a, b])
    intervals.sort()
    merged = [intervals[0]]
    for lo, hi in intervals[1:]:
        if lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    intervals[:] = merged


def merge_loader_states(states: list[dict]) -> dict:
    """One state from every rank's `state_dict()`: the union of what they consumed."""
    if not states:
        raise ValueError("no loader states to merge")
    for state in states:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a loader state: format {state.get('format')!r}")
    seeds, epochs = {s["seed"] for s in states}, {s["epoch"] for s in states}
    if len(seeds) != 1 or len(epochs) != 1:
        raise ValueError(f"loader states disagree: seeds {sorted(seeds)}, epochs {sorted(epochs)}")
    # Every rank's intervals of a shard gathered, then sorted and merged once per shard:
    # O(n log n) in the intervals of all ranks' states (512 ranks x 8 workers mid-epoch), not
    # a sort per interval inserted.
    gathered: dict[str, list[list[int]]] = {}
    for state in states:
        for shard, intervals in state["consumed"].items():
            gathered.setdefault(shard, []).extend([int(a), int(b)] for a, b in intervals)
    consumed: dict[str, list[list[int]]] = {}
    for shard, intervals in gathered.items():
        intervals.sort()
        merged = consumed[shard] = []
        for a, b in intervals:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
    return {"format": STATE_FORMAT, "seed": seeds.pop(), "epoch": epochs.pop(), "consumed": consumed}


# ---- reading shards -----------------------------------------------------------------------

def _shard_members(stream) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, in tar order, grouped the webdataset way."""
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    key, files = None, {}
    try:
        for member in tar_file_iterator(stream):
            prefix, suffix = base_plus_ext(member["fname"])
            if prefix is None:
                continue
            if prefix != key:
                if key is not None:
                    yield key, files
                key, files = prefix, {}
            files[suffix.lower()] = member["data"]
    except tarfile.TarError:
        if key is not None:  # whole members were read; a sample missing one is skipped by the decoder
            yield key, files
        raise
    if key is not None:
        yield key, files


@dataclasses.dataclass
class _Progress:
    """Positions a worker has dealt with since its last batch, and what it had to skip."""

    ranges: list[list[int]] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (shard, key, reason)
    missing: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)  # (shard, from, to)

    def mark(self, shard: int, a: int, b: int) -> None:
        if self.ranges and self.ranges[-1][0] == shard and self.ranges[-1][2] == a:
            self.ranges[-1][2] = b
        else:
            self.ranges.append([shard, a, b])

    def take(self) -> dict:
        taken = {"ranges": self.ranges, "skipped": self.skipped, "missing": self.missing}
        self.ranges, self.skipped, self.missing = [], [], []
        return taken


def _batch_buffer(shape: tuple[int, ...], shared: bool) -> torch.Tensor:
    """An uninitialised uint8 tensor; in a worker, allocated straight in shared memory (as
    torch's own default_collate does) so handing it to the main process copies nothing."""
    if not shared:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


class _RankDataset(torch.utils.data.IterableDataset):
    """The dataset: worker `w` of this rank streams piece `rank * workers + w`."""

    def __init__(self, base: str, manifest: Manifest, pieces: list[list[Range]], rank: int, workers: int,
                 batch_size: int, augmentation: Augmentation, seed: int, epoch: int, factory: S3ClientFactory,
                 labels: bool = True, keep: KeySplit | None = None):
        self.keep = keep
        self.base, self.manifest, self.pieces = base, manifest, pieces
        self.rank, self.workers, self.batch_size = rank, workers, batch_size
        self.augmentation, self.seed, self.epoch, self.factory = augmentation, seed, epoch, factory
        self.labels = labels

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        piece = self.pieces[self.rank * self.workers + worker]
        size = self.augmentation.image_size
        images, labels, keys = None, [], []
        progress = _Progress()

        def batch():
            nonlocal images
            out = {"key": list(keys), "progress": progress.take(), "image": None, "label": None}
            if keys:
                out["image"] = images[: len(keys)]
                out["label"] = torch.from_numpy(np.stack(labels)) if isinstance(labels[0], np.ndarray) else torch.tensor(labels)
            images = None
            labels.clear(), keys.clear()
            return out

        for shard, start, end in piece:
            for position, key, files in self._read_range(shard, start, end, progress):
                progress.mark(shard, position, position + 1)
                if self.keep is not None and not self.keep(key):
                    continue
                if images is None:  # filled in place, in shared memory when this is a worker process
                    images = _batch_buffer((self.batch_size, size, size, 3), shared=info is not None)
                result = self._decode(key, files, images.numpy()[len(keys)])
                if isinstance(result, str):
                    name = self.manifest.shards[shard].name
                    log.warning("skipping sample %s in shard %s: %s", key, name, result)
                    progress.skipped.append((name, key, result))
                    continue
                labels.append(result), keys.append(key)
                if len(keys) == self.batch_size:
                    yield batch()
        if keys or progress.ranges:
            yield batch()

    def _read_range(self, shard: int, start: int, end: int | None, progress: _Progress):
        """(position, key, {extension: bytes}) for positions [start, end) of one shard.

        A connection that drops mid-shard is reopened (the object is read again from its
        start, skipping what was already handed on) up to STREAM_RETRIES times; a tar that
        ends early or is malformed is not retried: what it lacks is reported as missing.
        """
        info = self.manifest.shards[shard]
        url = join_location(self.base, info.name)
        next_position, failures = start, 0
        while True:
            position = 0
            try:
                with open_stream(url, self.factory) as stream:
                    for key, files in _shard_members(stream):
                        if position >= next_position:
                            yield position, key, files
                            next_position = position + 1
                        position += 1
                        if end is not None and position >= end:
                            return
                reason = f"ended after {position} samples"
            except (tarfile.TarError, DataSourceError) as error:
                reason = f"unreadable after {position} samples ({type(error).__name__}: {error})"
            except _stream_errors() as error:
                failures += 1
                if failures <= STREAM_RETRIES:
                    log.warning("shard %s: %s after %d samples; reopening (%d of %d)",
                                info.name, type(error).__name__, position, failures, STREAM_RETRIES)
                    continue
                reason = f"unreadable after {position} samples ({type(error).__name__}: {error})"
            break
        if end is None:
            if reason.startswith("unreadable"):
                log.warning("shard %s %s", info.name, reason)
        elif next_position < end:  # the shard is shorter than the manifest says
            message = f"shard {info.name} {reason}; manifest says {info.samples}: positions {next_position}-{end - 1} lost"
            log.warning(message)
            progress.missing.append((info.name, next_position, end))
            progress.mark(shard, next_position, end)

    def _decode(self, key: str, files: dict[str, bytes], out: np.ndarray):
        """The label, with the augmented image written into `out`; or the reason to skip the sample."""
        image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
        if image_ext is None:
            return f"no image member (has {', '.join(sorted(files)) or 'nothing'})"
        try:
            if not self.labels:
                label = 0  # a placeholder: unlabeled data, or labels this run does not use
            elif "cls" in files:
                label = int(files["cls"])
            elif "json" in files:
                hot = np.zeros(len(self.manifest.class_names), np.float32)
                hot[json.loads(files["json"])["labels"]] = 1.0
                label = hot
            else:
                return "no label member (.cls or .json)"
        except (ValueError, KeyError, IndexError, TypeError) as error:
            return f"bad label: {type(error).__name__}: {error}"
        try:
            self.augmentation.apply_into(files[image_ext], random.Random(f"{self.seed}/{self.epoch}/{key}"), out)
        except Exception as error:  # PIL raises many types for corrupt images
            return f"undecodable image: {type(error).__name__}: {error}"
        return label


# ---- the loader ---------------------------------------------------------------------------

class ShardLoader:
    """Batches of one rank's share of the epoch; see the module docstring for the guarantee.

    Args:
        source: a folder or s3://bucket/prefix holding shards (and normally manifest.json),
            or the URL of a manifest.
        augmentation: "pretrain", "finetune", "eval", or an `Augmentation`.
        num_workers: DataLoader worker processes (0: read in this process); the same on every rank.
        dtype: "float32" (default): images normalised to [-1, 1] here, on the CPU; "uint8": the
            raw pixels, to be normalised on the accelerator (`augment.normalise_on_device`).
        pin_memory: batches in page-locked memory (the DataLoader's pin thread), so that their
            copy to a GPU runs asynchronously (`.to(device, non_blocking=True)`); for GPU
            workers (torch ignores it, with a warning, where there is no accelerator).
        keep: a `KeySplit`: only the samples of that part are decoded and handed out.
    """

    def __init__(self, source: str, *, batch_size: int, augmentation: str | Augmentation = "pretrain",
                 image_size: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, prefetch_factor: int = 2, factory: S3ClientFactory | None = None,
                 labels: bool = True, dtype: str = "float32", pin_memory: bool = False,
                 keep: KeySplit | None = None):
        self.keep = keep
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if dtype not in ("float32", "uint8"):
            raise ValueError(f"dtype {dtype!r}: one of float32, uint8")
        self.dtype, self.pin_memory = dtype, pin_memory
        self._float_buffers: list[np.ndarray] = []
        self.source = source
        self.factory = factory or S3ClientFactory()
        self.base, self.manifest = load_shard_list(source, self.factory)
        self.augmentation = augmentation if isinstance(augmentation, Augmentation) else augmentation_for(augmentation, image_size)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.labels = labels  # False: labels are neither read nor required (self-supervision)
        self.epoch = 0
        self.consumed: dict[str, list[list[int]]] = {}
        self.stats = {"samples": 0, "skipped_samples": 0, "missing_samples": 0, "short_shards": 0}

    @property
    def class_names(self) -> list[str]:
        return self.manifest.class_names

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, {}

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "seed": self.seed, "epoch": self.epoch,
                "consumed": {shard: [list(i) for i in intervals] for shard, intervals in self.consumed.items()}}

    def load_state_dict(self, state: dict | list[dict]) -> None:
        merged = merge_loader_states(state if isinstance(state, list) else [state])
        if merged["seed"] != self.seed:
            raise ValueError(f"loader state was saved with seed {merged['seed']}, this loader has seed {self.seed}")
        known = {s.name for s in self.manifest.shards}
        unknown = sorted(set(merged["consumed"]) - known)
        if unknown:
            raise StaleDataPosition(
                f"the checkpoint's data position names {len(unknown)} shards that {self.source}'s manifest no longer "
                f"lists ({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}): the data was rewritten under "
                f"the run; resume it on the data it trained on, or start a new run (another --set run_name=...)")
        self.epoch, self.consumed = merged["epoch"], merged["consumed"]

    def remaining_samples(self) -> int | None:
        """Samples of this epoch not yet consumed by any rank (None when counts are unknown)."""
        ranges = remaining_ranges(self.manifest, list(range(len(self.manifest.shards))), self.consumed)
        return None if any(e is None for _, _, e in ranges) else sum(e - s for _, s, e in ranges)

    def __iter__(self) -> Iterator[dict]:
        workers = max(1, self.num_workers)
        order = epoch_shard_order(len(self.manifest.shards), self.seed, self.epoch)
        pieces = split_ranges(remaining_ranges(self.manifest, order, self.consumed), self.world_size * workers)
        body = _RankDataset(self.base, self.manifest, pieces, self.rank, workers, self.batch_size,
                            self.augmentation, self.seed, self.epoch, self.factory, self.labels, self.keep)
        loader = torch.utils.data.DataLoader(
            body, batch_size=None, num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor if self.num_workers else None, pin_memory=self.pin_memory,
        )
        batches = iter(loader)
        try:
            for raw in batches:
                self._absorb(raw)
                if raw["key"]:
                    pixels = raw.pop("image")
                    yield {"image": normalise(pixels, self._float_buffer(pixels.shape)) if self.dtype == "float32"
                           else pixels.permute(0, 3, 1, 2), "label": raw["label"], "key": raw["key"]}
        finally:
            del batches  # stops the worker processes now, also when the caller breaks early

    def _float_buffer(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """A kept float32 buffer of this shape that no batch handed out references any more
        (its only references: the list and the call's argument; the tensors handed out hold
        one each, through torch.from_numpy), else a new one, kept if there is room; None
        (normalise allocates) for a short last batch."""
        if shape[0] != self.batch_size:
            return None
        for buffer in self._float_buffers:
            if buffer.shape == shape and sys.getrefcount(buffer) == 3:  # the list, `buffer`, the argument
                return buffer
        buffer = np.empty(shape, np.float32)
        if len(self._float_buffers) < FLOAT_BUFFERS:
            self._float_buffers.append(buffer)
        return buffer

    def _absorb(self, raw: dict) -> None:
        progress = raw["progress"]
        for shard, a, b in progress["ranges"]:
            _add_interval(self.consumed.setdefault(self.manifest.shards[int(shard)].name, []), int(a), int(b))
        self.stats["samples"] += len(raw["key"])
        self.stats["skipped_samples"] += len(progress["skipped"])
        for _, a, b in progress["missing"]:
            self.stats["short_shards"] += 1
            self.stats["missing_samples"] += int(b) - int(a)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="stream one epoch and print throughput")
    parser.add_argument("source")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mode", default="pretrain")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    stream = ShardLoader(args.source, batch_size=args.batch_size, num_workers=args.workers, augmentation=args.mode)
    began = time.perf_counter()
    for _ in stream:
        pass
    seconds = time.perf_counter() - began
    print(f"{stream.stats['samples']} samples in {seconds:.1f} s ({stream.stats['samples'] / seconds:.0f}/s); {stream.stats}")
