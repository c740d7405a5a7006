"""Checkpoints to S3 (or a folder): local staging, per-rank upload, a manifest written last.

    manager = CheckpointManager("s3://bucket/run/checkpoints", rank=r, world_size=n, staging_dir="/tmp/ckpt")
    restored = manager.restore(engine)            # None on a fresh run
    ...
    manager.save(engine, step, loader_state=loader.state_dict(), config=config.model_dump())
    manager.close()

Layout under the checkpoint URL:

    step-00000010/<DeepSpeed's files>            each uploaded by the rank that wrote it
    step-00000010/ranks/<attempt>/rank-00001.json
                                                 a rank's report: its files (name, size, sha256),
                                                 its data-loader state and RNG state
    step-00000010/manifest.json                  the commit: written last, by rank 0, once
                                                 every rank of its attempt reported success

An attempt is one worker group's life: the managers of its ranks take rank 0's random id at
their first collective (`restore`, or the first `save`), and rank 0 counts only the reports
of its own attempt. A step that an earlier attempt started (a crash, a resize: 4 workers then
2) keeps that attempt's reports beside, never counted: not its old hashes and data positions,
not its failure, not its extra ranks.

A checkpoint exists only when its manifest exists and every file it lists is there with the
stated size and, once downloaded, the stated sha256. DeepSpeed's own `latest` file is never
written or read. `save` lets DeepSpeed assemble its state dicts, copies their tensors to host
memory and returns; a background thread serializes each file into memory, where the
snapshot's tensors are held by reference rather than copied (`MemoryImage`; no staging
file), and uploads the rank's files together, one window of parallel multipart parts over
all of them that go from those tensors to the socket, taking their sha256s in a second
thread meanwhile. At most one checkpoint is in flight, and `save` waits only while the
previous one is still going; that wait plus the copy is the stall, counted in
`stall_seconds`. The copy goes into the previous checkpoint's host buffers when the shapes
match, so a rank keeps one checkpoint's worth of host memory between saves (`close` frees it).

`restore` downloads this rank's files into memory (a memfd; a staging file where there are
none), in parallel ranged parts through one window over all of them, hashing each file in
order as it arrives, and loads them only after every file of every rank matched the
manifest. The staging folder then holds links to that memory, so DeepSpeed finds and maps the
files where it expects them.

Ranks coordinate through the store itself (their reports), not through collectives, so that
the upload thread never issues a collective beside the training loop's. The only collectives
are in `restore`, on the main thread, before training starts.

Loading never unpickles untrusted data: a file is loaded only after its sha256 matched the
manifest, and then with `torch.load(weights_only=True, mmap=True)` and a short allow-list of
DeepSpeed's own classes. DeepSpeed copies most tensors into its own buffers and keeps a few as
they are (on the CPU, the optimizer's moments). Memory downloads are mapped shared, so those
few stay where they were downloaded, and the pages nothing uses any more are given back once
DeepSpeed is done, in a background thread while training goes on (with the optimizer state
the load replaced); from a staging file on disk they are copied out, so no file stays mapped.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import hashlib
import mmap
import os
import random
import re
import shutil
import socket
import threading
import time
import uuid
from typing import Any, Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from data_pipelines.s3 import DataSourceError, S3ClientFactory, join_location
from data_pipelines.storage import read_bytes, write_bytes
from data_pipelines.transfer import (
    MemoryFile, abort_multipart_uploads, delete_file, delete_prefix, download_all_to_memory, download_hashed, exists_all,
    list_folders, list_prefix, memory_files_supported, memory_room, MemoryImage, upload_file, upload_images,
)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")
# DeepSpeed names a rank's own shard "..zero_pp_rank_<r>_.."; other files are read by all ranks.
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")
# Staging-file downloads at once. Each already fetches several parts in parallel; on a
# loopback store bound by the server, more files at once were slower, not faster. (Uploads and
# memory downloads share one window of parts over all of a checkpoint's files instead.)
DOWNLOADS_AT_ONCE = 1
# Rank reports rank 0 reads at once when it commits.
REPORTS_AT_ONCE = 32
# What a staging disk keeps free beyond a write's own size (file system overhead, logs).
ROOM_MARGIN = 4 << 20


class CheckpointError(RuntimeError):
    """Checkpointing cannot go on (failure budget spent, a step DeepSpeed cannot convert): one line."""


class RefusedError(CheckpointError):
    """Checkpointing cannot go on, and restarting the workers would not change that: the store
    refuses (access denied, no such bucket) or the staging disk is too small. The training loop
    tells the driver, which stops the run instead of letting Ray Train restart it (progress.py)."""


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    size: int
    sha256: str
    rank: int


class RankReport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rank: int
    attempt: str | None = None  # None in manifests written before attempts existed
    ok: bool
    error: str | None = None
    files: list[FileEntry] = []
    loader_state: dict[str, Any] = {}
    rng: dict[str, Any] = {}


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: int
    step: int
    world_size: int
    time: float
    config: dict[str, Any]
    files: list[FileEntry]
    ranks: list[RankReport]


class Restored(BaseModel):
    """What `restore` hands back to the training loop besides the engine's own state."""

    step: int
    loader_state: dict[str, Any]
    manifest: Manifest


def step_name(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------------------------------------
# RNG state as JSON (no pickles in the manifest).


def capture_rng() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    captured = {
        "python": [version, list(state), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        captured["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return captured


def restore_rng(captured: dict[str, Any]) -> None:
    version, state, gauss = captured["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = captured["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_bytes_tensor(captured["torch"]))
    if "cuda" in captured and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_bytes_tensor(s) for s in captured["cuda"]])


def _bytes_tensor(encoded: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.uint8).clone()


# ---------------------------------------------------------------------------------------------
# Loading DeepSpeed's files without unpickling arbitrary objects.


def _deepspeed_safe_globals() -> list:
    """DeepSpeed's own classes that its checkpoint files contain, and nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class _CheckpointFiles:
    """Wraps DeepSpeed's checkpoint engine: weights-only loads, and saves as snapshots.

    While `capture` is on, `save(state_dict, path)` copies the tensors to host memory and
    returns; the upload thread serializes and uploads them (`serialize`, or `write` to a file
    for a checkpoint engine other than torch.save). Training waits only for the copy. The
    copy reuses the buffers of the previous snapshot of the same file (`give_back`). While
    `mapping` is on, `load` maps files instead of reading them and records what it mapped;
    a file `restore` downloaded into memory (`in_memory`) is mapped shared, so the tensors
    DeepSpeed keeps as they are stay in that memory and `trim` gives back the rest.
    Everything else passes through to DeepSpeed's engine.
    """

    def __init__(self, inner):
        self.inner = inner
        self.capture = False
        self.pending: list[tuple[str, Any]] = []
        self.spare: dict[str, list[torch.Tensor]] = {}  # file name -> buffers of its last snapshot
        self.mapping = False
        self.mapped: list[tuple[int, int]] = []  # (address, bytes) of storages `load` mapped
        self.in_memory: dict[str, MemoryFile] = {}  # staging path -> the memory it links to
        self.shared: list[_SharedLoad] = []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def preserves_storage_sharing(self) -> bool:
        return False  # `save` snapshots (copies) every tensor itself; DeepSpeed need not

    def save(self, state_dict, path: str) -> None:
        if not self.capture:
            return self.inner.save(state_dict, path)
        spare = iter(self.spare.pop(os.path.basename(path), []))
        self.pending.append((path, _snapshot(state_dict, spare)))

    def give_back(self, path: str, state) -> None:
        """The upload of `state` is over: its tensors may hold the next snapshot of `path`."""
        self.spare[os.path.basename(path)] = list(_tensors(state))

    @property
    def streams(self) -> bool:
        """Whether `serialize` writes what DeepSpeed's own engine would write to a file."""
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        return type(self.inner) is TorchCheckpointEngine

    def serialize(self, state_dict, f) -> None:
        # Without the CRC32 of each zip record: it cost 0.23 CPU-s per GiB, and the sha256
        # covers every byte already; torch.load does not check them (`unzip -t` would
        # complain). torch keeps the setting per thread.
        before = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            torch.save(state_dict, f, _use_new_zipfile_serialization=self.inner.zipfile_serialization)
        finally:
            torch.serialization.set_crc32_options(before)

    def write(self, state_dict, path: str) -> None:
        self.inner.save(state_dict, path)

    def load(self, path: str, map_location=None):
        held = self.in_memory.get(os.path.abspath(path)) if self.mapping else None
        if held is not None:
            before = _mappings_of(held)
            with torch.serialization.safe_globals(_deepspeed_safe_globals()), \
                    torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
                state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
            mapped = _mappings_of(held) - before  # torch's own mapping of the whole file
            if len(mapped) == 1:
                self.shared.append(_SharedLoad(held, mapped.pop(), state))
                return state
            # Not found where expected: copy out what DeepSpeed keeps, as for a file on disk.
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            if not self.mapping:
                return torch.load(path, map_location=map_location, weights_only=True)
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        self.mapped.extend(_storage_span(t) for t in _tensors(state) if t.device.type == "cpu")
        return state

    def trim(self) -> int:
        """`_trim` of the shared loads so far."""
        shared, self.shared = self.shared, []
        return _trim(shared)


def _trim(shared: list["_SharedLoad"]) -> int:
    """Give back the memory of the shared loads that no tensor uses any more (DeepSpeed
    copied those into its own buffers); returns the bytes still in use. A storage kept
    alive only by a reference cycle counts as in use (no `gc.collect()`: it cost 0.2 s
    here, and DeepSpeed's loads leave none). A storage that dies meanwhile stays: the
    check can only err towards keeping."""
    live: dict[int, tuple[MemoryFile, list[tuple[int, int]]]] = {}
    for load in shared:  # a file loaded twice is one memory: its loads' ranges together
        live.setdefault(id(load.held), (load.held, []))[1].extend(load.live())
    # A file per thread: freeing pages holds the file's lock, not the GIL (ViT-B/16's two
    # files, with unmapping the views the download hashed through: 0.17 s one after the
    # other, 0.13-0.14 s side by side).
    with concurrent.futures.ThreadPoolExecutor(max(1, len(live))) as pool:
        return sum(pool.map(lambda item: _free_all_but(*item), live.values()))


def _close_all(helds) -> int:
    """Close downloads held in memory; the bytes they took just before."""
    helds = list(helds)
    taken = sum(held.allocated_bytes() for held in helds)
    for held in helds:
        held.close()
    return taken


def _optimizer_state_tensors(engine) -> list[torch.Tensor]:
    """The host-memory tensors of the state of `engine`'s torch optimizer (under DeepSpeed's
    wrapper). Not a GPU's: its caching allocator frees them at no cost, and holding them
    would only raise the load's peak of GPU memory."""
    optimizer = getattr(engine, "optimizer", None)
    state = getattr(getattr(optimizer, "optimizer", optimizer), "state", None)
    if not isinstance(state, dict):
        return []
    return [t for entry in state.values() if isinstance(entry, dict)
            for t in entry.values() if isinstance(t, torch.Tensor) and t.device.type == "cpu"]


class _SharedLoad:
    """One file `load` mapped shared from memory: where each of its storages lies in the file."""

    def __init__(self, held: MemoryFile, mapping: tuple[int, int], state):
        from torch.multiprocessing.reductions import StorageWeakRef

        self.held = held
        start, file_offset = mapping
        self.storages: dict[int, tuple[Any, int, int]] = {}  # address -> (weak ref, offset in file, bytes)
        for tensor in _tensors(state):
            storage = tensor.untyped_storage()
            if tensor.device.type == "cpu" and storage.nbytes():
                address = storage.data_ptr()
                self.storages[address] = (StorageWeakRef(storage), address - start + file_offset, storage.nbytes())

    def live(self) -> list[tuple[int, int]]:
        """(start, end) in the file of each storage some tensor still uses."""
        return [(offset, offset + size) for ref, offset, size in self.storages.values() if not ref.expired()]


def _free_all_but(held: MemoryFile, live: list[tuple[int, int]]) -> int:
    """`_release_all_but`, after unmapping the view the download hashed through (unmapped
    first, its pages need not be unmapped from it range by range)."""
    held.close_view()
    return _release_all_but(held, live)


def _release_all_but(held: MemoryFile, live: list[tuple[int, int]]) -> int:
    """Free `held`'s pages that hold no byte of the `live` ranges; the bytes of those ranges."""
    live = sorted(set(live))
    page = mmap.PAGESIZE
    edge = 0  # everything before it is in use or freed
    for start, end in [*live, (held.size, held.size)]:
        first, last = -(-edge // page) * page, start // page * page
        if last > first:
            held.release(first, last - first)
        edge = max(edge, end)
    return sum(end - start for start, end in live)


def _mappings_of(held: MemoryFile) -> set[tuple[int, int]]:
    """(start address, file offset) of this process's shared mappings of `held`, ours aside."""
    inode, ours = str(os.fstat(held.fd).st_ino), held.address
    found = set()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[4] == inode and "s" in fields[1] and "memfd:" in fields[5]:
                start = int(fields[0].split("-")[0], 16)
                if start != ours:
                    found.add((start, int(fields[2], 16)))
    return found


def _snapshot(item, spare):
    """A host copy of `item`'s tensors (like DeepSpeed's clone_tensors_for_torch_save), each
    copied into the next buffer of `spare` when shape and dtype match, else into a new one.
    A GPU tensor's buffer is page-locked (pinned): the copy out of the GPU, which is all a
    background save stalls training for, then runs at the link's full speed rather than
    through the driver's staging of pageable memory (as PyTorch's own async checkpointing
    stages into pinned memory)."""
    if torch.is_tensor(item):
        buffer = next(spare, None)
        pinned = item.device.type == "cuda"
        if (buffer is None or buffer.shape != item.shape or buffer.dtype != item.dtype
                or (pinned and not buffer.is_pinned())):
            try:
                buffer = torch.empty(item.shape, dtype=item.dtype, device="cpu", pin_memory=pinned)
            except RuntimeError:  # no page-locked memory to be had: pageable works, only slower
                buffer = torch.empty(item.shape, dtype=item.dtype, device="cpu")
        return buffer.copy_(item.detach())
    if isinstance(item, list):
        return [_snapshot(v, spare) for v in item]
    if isinstance(item, tuple):
        return tuple(_snapshot(v, spare) for v in item)
    if isinstance(item, dict):
        return type(item)({k: _snapshot(v, spare) for k, v in item.items()})
    return item


def _tensors(item):
    """The tensors in a state dict, in the order `_snapshot` visits them."""
    if torch.is_tensor(item):
        yield item
    elif isinstance(item, (list, tuple)):
        for v in item:
            yield from _tensors(v)
    elif isinstance(item, dict):
        for v in item.values():
            yield from _tensors(v)


def _storage_span(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _unmap(engine, mapped: list[tuple[int, int]]) -> None:
    """Give the tensors DeepSpeed adopted from mapped files (rather than copying out of them:
    the optimizer's moments) memory of their own, in place, so no staging file stays mapped."""
    if not mapped:
        return

    def own(tensor) -> None:
        if torch.is_tensor(tensor) and tensor.device.type == "cpu":
            address = tensor.untyped_storage().data_ptr()
            if any(start <= address < start + size for start, size in mapped):
                tensor.data = tensor.data.clone()

    for tensor in [*engine.module.parameters(), *engine.module.buffers()]:
        own(tensor)
    optimizer, seen = engine.optimizer, set()
    while optimizer is not None and id(optimizer) not in seen:  # DeepSpeed's wrappers, then torch's
        seen.add(id(optimizer))
        state = getattr(optimizer, "state", None)
        for per_param in state.values() if isinstance(state, dict) else []:
            for value in per_param.values() if isinstance(per_param, dict) else []:
                own(value)
        optimizer = getattr(optimizer, "optimizer", None)


_RESTORE_MEMORY = "vitscale-restore-"  # the name of every memfd `restore` downloads into


def still_mapped(folder: str) -> list[str]:
    """Files under `folder` this process still maps (Linux; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    prefix = os.path.abspath(folder) + os.sep
    return sorted({line.split(None, 5)[-1] for line in lines if prefix in line})


def checkpoint_files(engine) -> _CheckpointFiles:
    """Install (once) and return the wrapper around `engine`'s checkpoint engine."""
    if not isinstance(engine.checkpoint_engine, _CheckpointFiles):
        engine.checkpoint_engine = _CheckpointFiles(engine.checkpoint_engine)
    return engine.checkpoint_engine


# ---------------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves and restores DeepSpeed engines under one checkpoint URL; one instance per rank.

    Args:
        url: `s3://bucket/prefix` or a folder shared by all ranks.
        staging_dir: fast local disk; each rank uses its own sub-folder.
        keep_last: committed checkpoints kept, newest first; `keep_every` (steps): also keep
            every checkpoint whose step is a multiple of it (0: none).
        failure_budget: failed saves in a row tolerated before `save` raises CheckpointError. A
            refusal that retrying cannot cure (access denied, no such bucket: DataSourceError's
            `permanent`) is not retried and makes the next `save` raise at once.
        commit_timeout: how long rank 0 waits for the other ranks' reports.
        upload_attempts: tries per file before the save counts as failed (each try itself
            retries requests per boto3's retry mode).
    """

    def __init__(
        self,
        url: str,
        *,
        staging_dir: str,
        rank: int = 0,
        world_size: int = 1,
        keep_last: int = 2,
        keep_every: int = 0,
        failure_budget: int = 3,
        commit_timeout: float = 600.0,
        upload_attempts: int = 3,
        factory: S3ClientFactory | None = None,
        log: Callable[[str], None] = print,
    ):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: must keep at least the newest checkpoint")
        self.url = url.rstrip("/")
        self.rank, self.world_size = rank, world_size
        self.staging_dir = os.path.join(staging_dir, f"rank-{rank:05d}")
        self.keep_last, self.keep_every = keep_last, keep_every
        self.failure_budget, self.commit_timeout, self.upload_attempts = failure_budget, commit_timeout, upload_attempts
        self.factory = factory or S3ClientFactory()
        self.log = log
        self._held_at: dict[str, MemoryFile] = {}  # staging path -> a restore's download, until loaded
        # Of the last restore's downloads, once its release is over (`wait`): bytes of the
        # tensors kept, and the memory they still took.
        self.restore_kept_bytes = 0
        self.restore_resident_bytes = 0
        self.restore_release_seconds = 0.0  # how long that release took
        self._thread: threading.Thread | None = None
        self._release_thread: threading.Thread | None = None  # a restore giving back memory
        self._files: list[_CheckpointFiles] = []  # the engines' wrappers this manager saved with
        self._lock = threading.Lock()
        # Counters (read by metrics); written by the upload thread under the lock.
        self.failures_in_a_row = 0
        self.failures_total = 0
        self.last_error: str | None = None
        self.refused: str | None = None  # a permanent refusal (DataSourceError.permanent): the next save raises
        self.retention_failures_total = 0  # deletions of old steps that failed (the commits stand)
        self._retention_error: str | None = None
        self.last_committed_step: int | None = None
        self.commits: list[tuple[int, float]] = []  # rank 0: (step, wall time) of each commit, in order
        self.stall_seconds = 0.0  # training time spent inside save(): local save + waiting
        self.last_stall_seconds = 0.0
        self.upload_seconds = 0.0
        self.uploaded_bytes = 0
        self._attempt: str | None = None  # rank 0's id for this worker group (`attempt`)

    @property
    def attempt(self) -> str:
        """This worker group's attempt id: rank 0's, broadcast at the first call (a collective:
        `restore` and `save` make it, where every rank calls them)."""
        if self._attempt is None:
            box = [uuid.uuid4().hex[:16] if self.rank == 0 else None]
            if _distributed():
                torch.distributed.broadcast_object_list(box, src=0)
            self._attempt = box[0]
        return self._attempt

    # --- saving ---------------------------------------------------------------------------

    def save(self, engine, step: int, *, loader_state: dict[str, Any], config: dict[str, Any]) -> None:
        """Save locally now (a collective: every rank calls it), upload in the background."""
        started = time.perf_counter()
        self.wait()
        with self._lock:
            if self.refused is not None:
                raise RefusedError(f"the checkpoint location refuses this run: {self.refused}; retrying cannot help "
                                   f"(check the credentials, the bucket and its policy)")
            if self.failures_in_a_row > self.failure_budget:
                raise CheckpointError(
                    f"{self.failures_in_a_row} checkpoint saves failed in a row (budget {self.failure_budget}); "
                    f"last error: {self.last_error}"
                )
        attempt = self.attempt  # before the thread: it may be a collective
        tag = step_name(step)
        local = os.path.join(self.staging_dir, tag)
        shutil.rmtree(local, ignore_errors=True)
        os.makedirs(local, exist_ok=True)
        files = checkpoint_files(engine)
        if files not in self._files:
            self._files.append(files)
        files.capture, files.pending = True, []
        try:
            engine.save_checkpoint(self.staging_dir, tag=tag, save_latest=False)
        finally:
            files.capture = False
        snapshots, files.pending = files.pending, []
        report = RankReport(rank=self.rank, attempt=attempt, ok=True, loader_state=loader_state, rng=capture_rng())
        self._thread = threading.Thread(
            target=self._upload_and_commit, args=(step, local, report, config, files, snapshots),
            name=f"checkpoint-{tag}", daemon=True,
        )
        self._thread.start()
        self.last_stall_seconds = time.perf_counter() - started
        self.stall_seconds += self.last_stall_seconds

    def wait(self) -> None:
        """Block until the upload in flight (if any) has finished or failed, and the last
        restore has given back the memory it no longer needs."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._release_thread is not None:
            self._release_thread.join()
            self._release_thread = None

    def close(self) -> None:
        """Wait for the upload in flight; drop the host buffers kept for the next snapshot."""
        self.wait()
        for files in self._files:
            files.spare.clear()

    def _upload_and_commit(self, step: int, local: str, report: RankReport, config: dict[str, Any],
                           files: _CheckpointFiles, snapshots: list[tuple[str, Any]]) -> None:
        step_url = join_location(self.url, step_name(step))
        started = time.perf_counter()
        try:
            report.files.extend(self._upload_snapshots(files, snapshots, local, step_url))
            snapshots.clear()
            written = {entry.name for entry in report.files}
            for name in sorted(set(os.listdir(local)) - written):  # anything DeepSpeed wrote directly
                path = os.path.join(local, name)
                digest = self._upload_with_retries(path, join_location(step_url, name))
                report.files.append(FileEntry(name=name, size=os.path.getsize(path), sha256=digest, rank=self.rank))
        except Exception as error:  # whatever it is: reported to the other ranks, counted, named
            report = RankReport(rank=self.rank, attempt=report.attempt, ok=False, error=_failure(error))
            refused = _failure(error) if getattr(error, "permanent", False) else None
        else:
            refused = None
        try:
            write_bytes(join_location(step_url, f"ranks/{report.attempt}/rank-{self.rank:05d}.json"),
                        report.model_dump_json().encode(), self.factory)
            if not report.ok:
                raise DataSourceError(report.error)
            if self.rank == 0:
                self._commit(step, step_url, config)
        except Exception as error:
            with self._lock:
                self.failures_in_a_row += 1
                self.failures_total += 1
                self.last_error = _failure(error)
                self.refused = refused or (self.last_error if getattr(error, "permanent", False) else None)
            self.log(f"checkpoint step {step} failed on rank {self.rank}: {self.last_error}")
            return
        finally:
            shutil.rmtree(local, ignore_errors=True)
        with self._lock:
            self.failures_in_a_row = 0
            self.upload_seconds += time.perf_counter() - started
            self.uploaded_bytes += sum(f.size for f in report.files)
            if self.rank == 0:
                self.last_committed_step = step
                self.commits.append((step, time.time()))
        if self.rank == 0:
            self._retain(step)

    def _retain(self, newest: int) -> None:
        """Retention after a commit, which stands whatever happens here: a delete refused (a
        policy without s3:DeleteObject, Object Lock) or failing is counted apart from the saves,
        said once per kind of error, and tried again after the next commit."""
        try:
            self._apply_retention(newest=newest)
        except Exception as error:
            line = _failure(error)
            with self._lock:
                self.retention_failures_total += 1
                said, self._retention_error = self._retention_error == line, line
            if not said:
                self.log(f"warning: deleting old checkpoints after step {newest} failed ({line}); step {newest} is "
                         f"committed all the same, and the next commit tries again")

    def _upload_snapshots(self, files: _CheckpointFiles, snapshots: list[tuple[str, Any]], local: str,
                          step_url: str) -> list[FileEntry]:
        """Serialize each snapshot into memory (its tensors by reference) and upload them all
        together (one window of parallel parts over all the files); the files uploaded. A
        checkpoint engine other than torch.save writes its files into `local` instead, for
        the caller to upload with the rest. Every snapshot's buffers are given back after."""
        try:
            images = []
            for path, state in snapshots:
                if files.streams:
                    image = MemoryImage(stable=[_storage_span(t) for t in _tensors(state)])
                    files.serialize(state, image)
                    image.close()
                    images.append((os.path.relpath(path, local), image))
                else:
                    files.write(state, path)
            digests = self._with_retries(lambda: upload_images(
                [(image, join_location(step_url, name)) for name, image in images], self.factory))
            return [FileEntry(name=name, size=image.size, sha256=digest, rank=self.rank)
                    for (name, image), digest in zip(images, digests)]
        finally:
            for path, state in snapshots:
                files.give_back(path, state)

    def _upload_with_retries(self, path: str, url: str) -> str:
        return self._with_retries(lambda: upload_file(path, url, self.factory))

    def _with_retries(self, attempt_once: Callable[[], Any]) -> Any:
        for attempt in range(1, self.upload_attempts + 1):
            try:
                return attempt_once()
            except DataSourceError as error:
                if error.permanent or attempt == self.upload_attempts:  # a refusal: asking again will not help
                    raise
                time.sleep(min(30.0, 0.5 * 2**attempt))
        raise AssertionError("unreachable")

    def _commit(self, step: int, step_url: str, config: dict[str, Any]) -> None:
        """Rank 0: wait for every rank's report of this attempt, then write the manifest last."""
        reports_url = join_location(step_url, f"ranks/{self.attempt}")
        wanted = {f"rank-{r:05d}.json" for r in range(self.world_size)}
        deadline = time.monotonic() + self.commit_timeout
        while True:
            names = sorted(wanted & set(list_prefix(reports_url, self.factory)))
            if len(names) == self.world_size:
                break
            if time.monotonic() > deadline:
                raise CheckpointError(f"only {len(names)} of {self.world_size} ranks reported step {step} in time")
            time.sleep(0.2)
        # Every rank's report, REPORTS_AT_ONCE GETs in flight (512 ranks: not 512 round trips in a row).
        with concurrent.futures.ThreadPoolExecutor(min(REPORTS_AT_ONCE, len(names))) as pool:
            raw = list(pool.map(lambda n: read_bytes(join_location(reports_url, n), self.factory), names))
        reports = [RankReport.model_validate_json(r) for r in raw]
        strays = [r for r, n in zip(reports, names) if r.attempt != self.attempt or f"rank-{r.rank:05d}.json" != n]
        if strays:
            raise CheckpointError(f"step {step}: the report of rank {strays[0].rank} under this attempt "
                                  f"({self.attempt}) names attempt {strays[0].attempt}")
        failed = [r for r in reports if not r.ok]
        if failed:
            raise CheckpointError(f"rank {failed[0].rank} could not upload step {step}: {failed[0].error}")
        manifest = Manifest(
            format=FORMAT_VERSION, step=step, world_size=self.world_size, time=time.time(), config=config,
            files=[f for r in reports for f in r.files], ranks=reports,
        )
        write_bytes(join_location(step_url, MANIFEST), manifest.model_dump_json(indent=1).encode(), self.factory)
        self.log(f"checkpoint step {step} committed ({sum(f.size for f in manifest.files):,} bytes)")

    # --- retention ---------------------------------------------------------------------------

    def _apply_retention(self, newest: int) -> None:
        """Delete what is no longer kept, only ever below the checkpoint just committed."""
        committed, partial = self._list_steps()
        kept = set(sorted(committed)[-self.keep_last:])
        if self.keep_every:
            kept |= {s for s in committed if s % self.keep_every == 0}
        doomed = [s for s in committed if s not in kept and s < newest] + [s for s in partial if s < newest]
        # Open multipart uploads below the new commit are a killed writer's (no rank uploads an
        # older step once every rank has reported this one; one driver per run): aborted, also
        # under a step that has no object at all, whose every file was still in flight, and
        # which the listing of steps therefore does not show.
        abort_multipart_uploads(self.url, self.factory, where=lambda name: _step_of(name) < newest)
        for step in sorted(doomed):
            url = join_location(self.url, step_name(step))
            # The manifest goes first: a crash half-way leaves a partial step, never a
            # manifest whose files are gone.
            if step in committed:
                delete_file(join_location(url, MANIFEST), self.factory)
            delete_prefix(url, self.factory)

    def _list_steps(self) -> tuple[list[int], list[int]]:
        return list_steps(self.url, self.factory)

    # --- restoring ---------------------------------------------------------------------------

    def committed_steps(self) -> list[int]:
        return self._list_steps()[0]

    def read_manifest(self, step: int) -> Manifest:
        raw = read_bytes(join_location(join_location(self.url, step_name(step)), MANIFEST), self.factory)
        return Manifest.model_validate_json(raw)

    def restore(self, engine) -> Restored | None:
        """Load the newest verified checkpoint into `engine`; None when there is none.

        Every rank calls it (it is collective when torch.distributed is initialised). A
        checkpoint whose files are missing or fail their sha256 is skipped with a warning and
        the previous one is tried. A step written by another number of workers is converted
        to DeepSpeed's universal checkpoint first (orchestrator/universal.py). It returns once
        the engine is loaded; the memory the restore no longer needs is given back in a
        background thread meanwhile (`_start_release`; `wait` joins it).
        """
        self.wait()
        _ = self.attempt  # agreed here, where every rank is, before any save
        candidates = self._agree(sorted(self.committed_steps(), reverse=True))
        for step in candidates:
            manifest = self.read_manifest(step)
            if manifest.world_size != self.world_size:
                restored = self._restore_resized(engine, manifest)
                if restored is None:
                    continue
                return restored
            handed_off = False
            try:
                problem = self._download_verified(manifest)
                problems = self._gather_problems(problem)
                if full := [p for p in problems if p.startswith(_NO_ROOM)]:  # not the checkpoint's fault
                    raise RefusedError(full[0][len(_NO_ROOM):])
                if problems:
                    self.log(f"warning: checkpoint step {step} is unusable ({problems[0]}); trying the previous one")
                    continue
                files = checkpoint_files(engine)  # every file DeepSpeed loads goes through weights-only torch.load
                files.mapping, files.mapped, files.shared = True, [], []
                files.in_memory = dict(self._held_at)
                # The state the load replaces stays referenced here, so that the load does not
                # stop to free it (0.075 s for ViT-B/16's Adam moments); the release frees it.
                replaced = _optimizer_state_tensors(engine)
                try:
                    path, _ = engine.load_checkpoint(self.staging_dir, tag=step_name(step), load_module_strict=True)
                    _unmap(engine, files.mapped)
                    if path is not None:
                        self._start_release(files.shared, replaced)
                        handed_off = True
                finally:
                    files.mapping, files.mapped, files.in_memory, files.shared = False, [], {}, []
                    replaced = None
            finally:
                if not handed_off:
                    self._release_downloads()
            if path is None:
                raise CheckpointError(f"DeepSpeed could not load checkpoint step {step} from {self.staging_dir}")
            mine = next(r for r in manifest.ranks if r.rank == self.rank)
            restore_rng(mine.rng)
            local = os.path.join(self.staging_dir, step_name(step))
            for name in still_mapped(local):
                self.log(f"warning: {name} is still mapped after restoring step {step}: its space stays in use")
            shutil.rmtree(local, ignore_errors=True)
            with self._lock:
                self.last_committed_step = step
            self.log(f"resumed from step {step}")
            return Restored(step=step, loader_state=mine.loader_state, manifest=manifest)
        return None

    def _restore_resized(self, engine, manifest: Manifest) -> Restored | None:
        """`restore` of a step another world size wrote (orchestrator/universal.py); None when
        the files were missing or did not match the manifest."""
        from orchestrator import universal

        here = self._ranks_on_this_machine()
        leader = here[0]
        # Beside the ranks' own folders, in the staging folder the ranks of this machine share.
        run = hashlib.sha256(self.url.encode()).hexdigest()[:12]
        scratch = os.path.join(os.path.dirname(self.staging_dir),
                               f"resize-{run}-{step_name(manifest.step)}-rank-{leader:05d}")
        local = os.path.join(scratch, step_name(manifest.step))
        problem = None
        if self.rank == leader:  # the download, then DeepSpeed's universal conversion beside it
            shutil.rmtree(local, ignore_errors=True)  # an earlier try's, if any
            problem = room_problem(scratch, 2 * sum(e.size for e in manifest.files),
                                   f"converting step {manifest.step} from {manifest.world_size} workers")
        if full := self._gather_problems(problem):  # every rank stops, not only the leader
            raise RefusedError(full[0])
        if self.rank == leader:
            self.log(f"checkpoint step {manifest.step} was written by {manifest.world_size} workers: rank {leader} "
                     f"downloads all of it and converts it for ranks {', '.join(map(str, here))} on this machine")
            problem = self._download_to_staging(join_location(self.url, step_name(manifest.step)), local, manifest.files)
        problems = self._gather_problems(problem)
        if problems:
            if self.rank == leader:
                shutil.rmtree(scratch, ignore_errors=True)
            self.log(f"warning: checkpoint step {manifest.step} is unusable ({problems[0]}); trying the previous one")
            return None
        restored = universal.restore_resized(engine, manifest, folder=local, scratch=scratch, converts=self.rank == leader,
                                             rank=self.rank, world_size=self.world_size,
                                             agree=self._gather_problems, log=self.log)
        with self._lock:
            self.last_committed_step = manifest.step
        return restored

    def _ranks_on_this_machine(self) -> list[int]:
        """The ranks with this rank's host name and staging folder, lowest first: the first
        fetches and converts for them all."""
        if not _distributed():
            return [self.rank]
        places: list[tuple[str, str] | None] = [None] * self.world_size
        torch.distributed.all_gather_object(places, (socket.gethostname(), os.path.abspath(os.path.dirname(self.staging_dir))))
        return [r for r, place in enumerate(places) if place == places[self.rank]]

    def _download_verified(self, manifest: Manifest) -> str | None:
        """Fetch the files this rank's engine will read; the first problem found, or None."""
        local = os.path.join(self.staging_dir, step_name(manifest.step))
        shutil.rmtree(local, ignore_errors=True)
        step_url = join_location(self.url, step_name(manifest.step))
        wanted = [e for e in manifest.files if not (m := _RANK_FILE.search(e.name)) or int(m.group(1)) == self.rank]
        if not wanted:
            return None
        if memory_files_supported():
            size = sum(e.size for e in wanted)
            if fits_in_memory(size, memory_room()):
                return self._download_to_memory(step_url, local, wanted)
            self.log(f"restoring step {manifest.step} through staging files: its {size:,} bytes "
                     f"for rank {self.rank} would take more than half the memory left")
        # The ranks of a machine share its staging disk: room for each of them (about the same size).
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
        if room := room_problem(local, ranks_here * sum(e.size for e in wanted),
                                f"restoring step {manifest.step} through staging files ({ranks_here} ranks here)"):
            return _NO_ROOM + room
        return self._download_to_staging(step_url, local, wanted)

    def _download_to_staging(self, step_url: str, local: str, entries: list[FileEntry]) -> str | None:
        """Each file to `local` under its own name, verified; the first problem found, or None."""
        if problem := _name_outside(local, entries):
            return problem
        # Each file is hashed in order as it arrives, so it is verified when it lands.
        with concurrent.futures.ThreadPoolExecutor(min(DOWNLOADS_AT_ONCE, len(entries))) as pool:
            downloads = [
                pool.submit(download_hashed, join_location(step_url, e.name), os.path.join(local, e.name), self.factory)
                for e in entries
            ]
            for entry, download in zip(entries, downloads):
                try:
                    digest, size = download.result()
                except DataSourceError as error:
                    return str(error)
                if size != entry.size or digest != entry.sha256:
                    return f"{entry.name} does not match its size or sha256 in the manifest"
        return None

    def _download_to_memory(self, step_url: str, local: str, wanted: list[FileEntry]) -> str | None:
        """Each file into memory, verified, then linked from `local` under its own name."""
        if problem := _name_outside(local, wanted):
            return problem
        # All files through one window of parallel parts: the next file is on its way while
        # the last parts of the one before are hashed.
        try:
            downloads = download_all_to_memory(
                [(join_location(step_url, e.name), e.size, _RESTORE_MEMORY + os.path.basename(e.name)) for e in wanted],
                self.factory)
        except DataSourceError as error:
            return str(error)
        paths = [os.path.abspath(os.path.join(local, e.name)) for e in wanted]
        for path, (held, _) in zip(paths, downloads):
            self._held_at[path] = held
        for entry, path, (held, digest) in zip(wanted, paths, downloads):
            if digest != entry.sha256:
                return f"{entry.name} does not match its sha256 in the manifest"
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.symlink(held.path, path)
        return None

    def _release_downloads(self) -> None:
        """Close what `_download_to_memory` held: its memory goes once nothing maps it."""
        self.restore_resident_bytes = _close_all(self._held_at.values())
        self._held_at = {}

    def _start_release(self, shared: list[_SharedLoad], replaced: list[torch.Tensor]) -> None:
        """Give back, in a background thread, what a restore no longer needs: the engine's state
        the load replaced, and the downloaded memory DeepSpeed copied into its own buffers
        (`_trim`), then close the downloads. Training goes on meanwhile (ViT-B/16: ~0.2 s of
        freeing pages, ~0.075 s of it holding the GIL); `wait` joins it, and so does the next
        save or restore."""
        held, self._held_at = list(self._held_at.values()), {}
        dropped = list(replaced)  # the thread's own list: clearing it drops the last references

        def release() -> None:
            started = time.perf_counter()
            try:
                self.restore_kept_bytes = _trim(shared)
                # Last: torch frees a tensor holding the GIL (munmap of ViT-B/16's replaced Adam
                # moments: ~0.075 s), where the trim's page freeing leaves it free.
                dropped.clear()
            except Exception as error:  # the memory then goes when the tensors go, not sooner
                self.log(f"warning: giving back a restore's spare memory failed: {_failure(error)}")
            finally:
                shared.clear()
                self.restore_resident_bytes = _close_all(held)
                self.restore_release_seconds = time.perf_counter() - started

        self._release_thread = threading.Thread(target=release, name="checkpoint-restore-release", daemon=True)
        self._release_thread.start()

    def _agree(self, steps: list[int]) -> list[int]:
        """Rank 0's view of the committed steps, so that every rank tries the same ones."""
        if not _distributed():
            return steps
        box = [steps]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _gather_problems(self, problem: str | None) -> list[str]:
        if not _distributed():
            return [problem] if problem else []
        everyone: list[str | None] = [None] * self.world_size
        torch.distributed.all_gather_object(everyone, problem)
        return [p for p in everyone if p]


def _failure(error: BaseException) -> str:
    """An upload or commit failure in one line: storage and checkpoint errors say what failed
    already; anything else (a bug, a full disk, a missing module) is named by its type, so it
    is neither lost in a dying thread nor mistaken for a storage error."""
    if isinstance(error, (DataSourceError, CheckpointError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _name_outside(local: str, entries: list[FileEntry]) -> str | None:
    """The first manifest entry whose name would land outside `local`, as a problem; or None."""
    for entry in entries:
        if not os.path.abspath(os.path.join(local, entry.name)).startswith(os.path.abspath(local) + os.sep):
            return f"{entry.name} is not a file name inside the checkpoint"
    return None


_NO_ROOM = "no room: "  # a rank's restore problem that is the disk's, not the checkpoint's


def room_problem(folder: str, needed: int, what: str) -> str | None:
    """None when the disk of `folder` (or its nearest existing parent) has room for `needed`
    bytes more and ROOM_MARGIN; else the one line that says what, where, and how much."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if free >= needed + ROOM_MARGIN:
        return None
    return (f"{what} needs {_size(needed + ROOM_MARGIN)} free in {folder} ({_size(needed)} and a margin), the disk "
            f"has {_size(free)}: point VITSCALE_STAGING_DIR at a larger disk (README: the staging folder)")


def _size(count: int) -> str:
    return f"{count / 2**20:,.1f} MiB" if count < 2**30 else f"{count / 2**30:,.2f} GiB"


def fits_in_memory(size: int, room: int | None) -> bool:
    """Whether a restore downloads into memory: when it takes at most half of what is left
    (the engine's own buffers still grow while it loads). Unknown room: yes."""
    return room is None or 2 * size <= room


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _step_of(name: str) -> int:
    """The step of a name under a checkpoint URL ("step-00000004/..."); for any other name (the
    lease, ...) a number above every step, so that retention never takes it for an old step."""
    match = _STEP_DIR.match(name.partition("/")[0])
    return int(match.group(1)) if match else 1 << 62


def list_steps(url: str, factory: S3ClientFactory | None = None) -> tuple[list[int], list[int]]:
    """Under a checkpoint URL: (steps with a manifest, steps with files but no manifest).

    The step folders are listed with a delimiter and each one's manifest is looked up
    directly (HEADs, 16 at once): O(steps) requests at every commit (retention) and restore,
    not a listing of every object of every kept step (ranks x files x steps)."""
    url = url.rstrip("/")
    steps = sorted(int(m.group(1)) for name in list_folders(url, factory) if (m := _STEP_DIR.match(name)))
    found = exists_all([join_location(join_location(url, step_name(s)), MANIFEST) for s in steps], factory)
    return [s for s, ok in zip(steps, found) if ok], [s for s, ok in zip(steps, found) if not ok]


def committed_steps(url: str, factory: S3ClientFactory | None = None) -> list[int]:
    """The committed checkpoints' steps under a checkpoint URL, oldest first (no manager needed:
    the driver asks, e.g. where a stopped run stands)."""
    return list_steps(url, factory)[0]


# ---------------------------------------------------------------------------------------------


def export_weights(engine, url: str, *, metadata: dict[str, str] | None = None, staging_dir: str,
                   factory: S3ClientFactory | None = None) -> str | None:
    """Write the model's weights alone as safetensors to `url` (a collective; rank 0 writes).

    Each parameter as the optimizer keeps it: the fp32 master weights that DeepSpeed holds,
    partitioned, for bf16 training (gathered with its `safe_get_full_fp32_param`), not the
    bf16 working copy the forward pass used; fine-tuning starts from what pretraining
    reached, not from its rounding. Buffers, and parameters without a master, as the module
    has them. Under ZeRO-3 the parameters are gathered first. Returns the sha256 on rank 0,
    else None.
    """
    from deepspeed.utils import safe_get_full_fp32_param
    from safetensors.torch import save_file

    module = engine.module
    parameters = dict(module.named_parameters(remove_duplicate=False))
    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    else:
        gather = contextlib.nullcontext()
    state: dict[str, torch.Tensor] = {}
    with gather:
        for name, value in module.state_dict().items():
            # A collective per parameter, in the module's order on every rank.
            master = safe_get_full_fp32_param(parameters[name]) if name in parameters else None
            if engine.global_rank == 0:
                state[name] = (value if master is None else master).detach().to("cpu", copy=True).contiguous()
    if engine.global_rank != 0:
        return None
    os.makedirs(staging_dir, exist_ok=True)
    if room := room_problem(staging_dir, sum(t.nbytes for t in state.values()), "exporting the weights"):
        raise RefusedError(room)
    path = os.path.join(staging_dir, "model.safetensors")
    save_file(state, path, metadata=metadata or {})
    canonical_safetensors_header(path)
    return upload_file(path, url, factory)


class WeightsError(ValueError):
    """Weights that cannot be loaded: not there, not what their record says, not safetensors."""


def load_exported_weights(model: torch.nn.Module, url: str, *, sha256: str | None = None,
                          factory: S3ClientFactory | None = None) -> None:
    """Load a vitscale export (export_weights) into `model`, adapted to it (model/convert.py:
    pre-logits dropped and a zero head where the class count differs, position embeddings
    resized to the model's grid). safetensors holds tensors only: nothing is unpickled. With
    `sha256`, the bytes must be those the export's record names (a run exported anew since,
    or a truncated download, is refused rather than fine-tuned)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    from model import adapt_pretrained

    try:
        data = read_bytes(url, factory)
    except DataSourceError as error:
        raise WeightsError(str(error)) from None
    if sha256 is not None and (found := hashlib.sha256(data).hexdigest()) != sha256:
        raise WeightsError(f"{url}: sha256 {found[:12]} is not the {sha256[:12]} its record names")
    try:
        state = load_safetensors(data)
    except (SafetensorError, ValueError) as error:
        raise WeightsError(f"{url}: not a safetensors file ({error})") from None
    model.load_state_dict(adapt_pretrained(state, model), strict=True)


def canonical_safetensors_header(path: str) -> None:
    """Rewrite a safetensors file's header in place with its metadata in key order.

    safetensors writes the `__metadata__` entries in the order of a Rust HashMap, which is
    seeded at random in every process: the same weights and metadata gave a different file,
    and a different sha256, at every export (seen: two identical dry runs, and a finished run
    exported again from its checkpoint). The tensors' entries are already in a fixed order, so
    sorting the metadata makes the bytes a function of the contents. The header keeps its
    length (the same keys and values, padded with spaces as the format allows), so the
    tensor data does not move.
    """
    import json
    import struct

    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        metadata = header.pop("__metadata__", None)
        if not metadata:
            return
        ordered = {"__metadata__": dict(sorted(metadata.items())), **header}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > length:  # a serializer that escapes differently: leave the file valid as it is
            return
        f.seek(8)
        f.write(text.ljust(length, b" "))
