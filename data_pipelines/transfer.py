"""Whole-file transfers between local disk and a folder or S3 prefix, for checkpoints.

    upload_file("/staging/step-5/x.pt", "s3://bucket/run/checkpoints/step-5/x.pt")

S3 uploads and downloads go through s3transfer (boto3's managed transfers): multipart,
several parts in parallel. The sha256 of an upload is computed in a second thread while the
parts go out, so hashing costs no wall time when the network is the slower side. Local
folders are handled the same way, for runs whose checkpoints live on a shared filesystem.

    image = MemoryImage(stable=spans_of_the_tensors); torch.save(state, image); image.close()
    sha256 = upload_image(image, "s3://bucket/run/x.pt")
    sha256, size = download_hashed("s3://bucket/run/x.pt", "/staging/x.pt")
    held, sha256 = download_to_memory("s3://bucket/run/x.pt", size)   # held.path opens it

`upload_image` uploads bytes held in memory (no local file): a `MemoryImage` keeps the
tensors' storages torch.save hands it by reference, so the parts go from the tensors to the
socket without a copy, and the sha256 is taken in a second thread while they go out.
`download_hashed` hashes the bytes in order as they arrive, so a download is verified when
its last part lands. `download_to_memory` does the same into memory that can be opened and
mapped like a file (a Linux memfd): no local disk, no staging copy, and pages the loader maps
rather than copies.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import contextlib
import ctypes
import hashlib
import http.client
import mmap
import os
import shutil
import threading
from typing import Callable

from data_pipelines.s3 import (
    DataSourceError, S3ClientFactory, client_error, error_code, is_s3_url, list_objects, parse_s3_url, s3_errors,
)

CHUNK_BYTES = 8 << 20


def transfer_config():
    from boto3.s3.transfer import TransferConfig

    # 16 MiB parts, 8 in flight: close to the line rate on loopback and on EC2 alike.
    return TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20, max_concurrency=8, use_threads=True)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)  # hashlib releases the GIL on large buffers
    return digest.hexdigest()


def upload_file(path: str, url: str, factory: S3ClientFactory | None = None) -> str:
    """Copy a local file to `url`; returns its sha256. Raises DataSourceError."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        digest = pool.submit(sha256_file, path)
        if is_s3_url(url):
            location = parse_s3_url(url)
            try:
                client = (factory or S3ClientFactory()).client()
                client.upload_file(path, location.bucket, location.prefix, Config=transfer_config())
            except s3_errors() as error:
                raise client_error(error, url) from None
        else:
            os.makedirs(os.path.dirname(url) or ".", exist_ok=True)
            shutil.copyfile(path, url + ".partial")
            os.replace(url + ".partial", url)
        return digest.result()


def download_file(url: str, path: str, factory: S3ClientFactory | None = None) -> None:
    """Copy `url` to a local file (written under a temporary name, renamed when complete)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    partial = path + ".partial"
    if is_s3_url(url):
        location = parse_s3_url(url)
        try:
            client = (factory or S3ClientFactory()).client()
            client.download_file(location.bucket, location.prefix, partial, Config=transfer_config())
        except s3_errors() as error:
            raise client_error(error, url) from None
    else:
        try:
            shutil.copyfile(url, partial)
        except OSError as error:
            raise DataSourceError(f"{url}: {error.strerror}") from None
    os.replace(partial, path)


KEEP_BYTES = 1 << 20  # a write at least this large into stable memory is kept, not copied


class MemoryImage:
    """A file's bytes as a writer (`torch.save`) wrote them, held in memory, the big pieces
    not copied: the bytes an upload sends straight to the socket and a hash reads in place.

    `stable` are (address, bytes) spans of memory the caller keeps alive and unchanged for as
    long as the image is used (a checkpoint snapshot's tensors). A write of at least
    KEEP_BYTES lying wholly inside one of them is kept by reference (torch's zip writer hands
    each tensor's storage to `write` as it is); every other write is copied, since its memory
    is only valid during the call.
    """

    def __init__(self, stable: list[tuple[int, int]] = ()):
        self._stable = sorted(stable)
        self._starts = [start for start, _ in self._stable]
        self.segments: list[memoryview] = []
        self.offsets: list[int] = []  # where each segment starts in the file
        self.size = 0
        self.kept_bytes = 0  # of `size`, held by reference
        self._small = bytearray()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        count = len(view)
        if count >= KEEP_BYTES and self._inside_stable(view):
            self._end_small()
            self._append(view)
            self.kept_bytes += count
        else:
            self._small += view
        self.size += count
        return count

    def flush(self) -> None:
        pass

    def close(self) -> None:
        """The writer is done: what it wrote last joins the segments."""
        self._end_small()

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for segment in self.segments:
            digest.update(segment)  # releases the GIL on large buffers
        return digest.hexdigest()

    def reader(self) -> "_ImageReader":
        return _ImageReader(self)

    def _inside_stable(self, view: memoryview) -> bool:
        import numpy as np

        address = np.frombuffer(view, dtype=np.uint8).ctypes.data  # works on read-only views
        i = bisect.bisect_right(self._starts, address) - 1
        return i >= 0 and address + len(view) <= self._stable[i][0] + self._stable[i][1]

    def _end_small(self) -> None:
        if self._small:
            self._append(memoryview(self._small))
            self._small = bytearray()

    def _append(self, view: memoryview) -> None:
        self.offsets.append(self.offsets[-1] + len(self.segments[-1]) if self.segments else 0)
        self.segments.append(view)


class _ImageReader:
    """A seekable file over a MemoryImage. `read` returns a view into the image where the
    bytes asked for lie in one segment (the HTTP layer sends it as it is), else a copy."""

    def __init__(self, image: MemoryImage):
        self._image, self._position = image, 0

    def read(self, amount: int | None = -1):
        image, start = self._image, self._position
        end = image.size if amount is None or amount < 0 else min(image.size, start + amount)
        if start >= end:
            return b""
        self._position = end
        i = bisect.bisect_right(image.offsets, start) - 1
        within = start - image.offsets[i]
        if end - image.offsets[i] <= len(image.segments[i]):
            return image.segments[i][within:end - image.offsets[i]]
        pieces = []
        while start < end:
            segment = image.segments[i]
            take = min(len(segment) - within, end - start)
            pieces.append(segment[within:within + take])
            start, within, i = start + take, 0, i + 1
        return b"".join(pieces)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._position, 2: self._image.size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _image_os_utils(images: dict[str, MemoryImage]):
    """s3transfer's file access for uploads "from files" whose bytes are `images` (by made-up
    file name): each part reads its own range of its image, in parallel, no part copied first."""
    from s3transfer.utils import OSUtils

    class ImageOSUtils(OSUtils):
        def get_file_size(self, filename: str) -> int:
            return images[filename].size

        def open(self, filename: str, mode: str):
            if mode != "rb":
                raise ValueError(f"a memory image opens for reading only, not {mode!r}")
            return images[filename].reader()

    return ImageOSUtils()


def upload_image(image: MemoryImage, url: str, factory: S3ClientFactory | None = None) -> str:
    """Upload a closed MemoryImage to `url`; returns its sha256 (`upload_images` of one)."""
    return upload_images([(image, url)], factory)[0]


def upload_images(uploads: list[tuple[MemoryImage, str]], factory: S3ClientFactory | None = None) -> list[str]:
    """Upload closed MemoryImages, each to its url, while a second thread takes their sha256s;
    returns the sha256s. To S3 through one s3transfer manager: multipart, its max_concurrency
    parts in flight over all the images together, so the next image's parts go out while the
    last ones of the image before are still on their way. DataSourceError names the first url
    that failed (s3transfer aborts the multipart uploads; a killed process leaves them behind:
    `abort_multipart_uploads`)."""
    from s3transfer.manager import TransferManager

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        digests = [pool.submit(image.sha256) for image, _ in uploads]
        remote = [(f"vitscale-memory-image-{i}", image, url) for i, (image, url) in enumerate(uploads) if is_s3_url(url)]
        if remote:
            try:
                client = (factory or S3ClientFactory()).client()
                images = {name: image for name, image, _ in remote}
                with TransferManager(client, transfer_config(), osutil=_image_os_utils(images)) as manager:
                    transfers = []
                    for name, _, url in remote:
                        location = parse_s3_url(url)
                        transfers.append((url, manager.upload(name, location.bucket, location.prefix)))
                    for url, transfer in transfers:
                        try:
                            transfer.result()
                        except s3_errors() as error:
                            raise client_error(error, url) from None
            except s3_errors() as error:  # before any transfer started: the client itself
                raise client_error(error, remote[0][2]) from None
        for image, url in uploads:
            if not is_s3_url(url):
                _write_image(image, url)
        return [digest.result() for digest in digests]


def _write_image(image: MemoryImage, url: str) -> None:
    os.makedirs(os.path.dirname(url) or ".", exist_ok=True)
    partial = url + ".partial"
    try:
        with open(partial, "wb") as f:
            for segment in image.segments:
                f.write(segment)
    except OSError as error:
        raise DataSourceError(f"{url}: {error.strerror}") from None
    os.replace(partial, url)


class _TrackedFile:
    """A seekable, unbuffered file for s3transfer's parallel ranged writes that knows how far
    from the start it is written without a gap (`contiguous`), so a hasher can follow."""

    def __init__(self, f):
        self.f, self._position = f, 0
        self._ranges: dict[int, int] = {}  # start -> end of written stretches past `contiguous`
        self.contiguous = 0
        self.changed = threading.Condition()

    def seek(self, offset: int, whence: int = 0) -> int:
        self._position = self.f.seek(offset, whence)
        return self._position

    def tell(self) -> int:
        return self._position

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data)
        written = 0
        while written < len(view):
            written += self.f.write(view[written:])
        start, self._position = self._position, self._position + written
        with self.changed:
            self._ranges[start] = self._position
            while self.contiguous in self._ranges:
                self.contiguous = self._ranges.pop(self.contiguous)
            self.changed.notify_all()
        return written

    def flush(self) -> None:
        pass


def _follow_and_hash(tracked: _TrackedFile, fd: int, done: threading.Event, digest) -> None:
    """Hash the file's contiguous prefix as it grows, until `done` and everything is hashed."""
    hashed = 0
    while True:
        with tracked.changed:
            while tracked.contiguous == hashed and not done.is_set():
                tracked.changed.wait(0.5)
            ready = tracked.contiguous
        if ready == hashed:
            return
        while hashed < ready:
            chunk = os.pread(fd, min(CHUNK_BYTES, ready - hashed), hashed)
            digest.update(chunk)  # releases the GIL on large buffers
            hashed += len(chunk)


def download_hashed(url: str, path: str, factory: S3ClientFactory | None = None) -> tuple[str, int]:
    """`download_file` that also returns (sha256, size) of what it wrote.

    s3transfer writes the ranged parts in parallel, in any order; a thread hashes the file's
    gap-free prefix as it grows (reading it back from the page cache), so hashing overlaps the
    download and the file is verified soon after its last part lands.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    partial = path + ".partial"
    digest, done = hashlib.sha256(), threading.Event()
    with open(partial, "w+b", buffering=0) as f:
        tracked = _TrackedFile(f)
        hasher = threading.Thread(target=_follow_and_hash, args=(tracked, f.fileno(), done, digest), daemon=True)
        hasher.start()
        try:
            if is_s3_url(url):
                location = parse_s3_url(url)
                try:
                    client = (factory or S3ClientFactory()).client()
                    client.download_fileobj(location.bucket, location.prefix, tracked, Config=transfer_config())
                except s3_errors() as error:
                    raise client_error(error, url) from None
            else:
                try:
                    with open(url, "rb", buffering=0) as source:
                        while chunk := source.read(CHUNK_BYTES):
                            tracked.write(chunk)
                except OSError as error:
                    raise DataSourceError(f"{url}: {error.strerror}") from None
        finally:
            done.set()
            with tracked.changed:
                tracked.changed.notify_all()
            hasher.join()
        size = os.fstat(f.fileno()).st_size
    if tracked.contiguous != size:
        raise DataSourceError(f"{url}: the download left a gap at byte {tracked.contiguous} of {size}")
    os.replace(partial, path)
    return digest.hexdigest(), size


class MemoryFile:
    """A file in memory (a memfd): `path` opens it, or maps it, like a file while it is open.

    `view` is a shared mapping of it (downloads write with `pwrite`, which fills a page
    without zeroing it first, and hash through `view`); `close_view` unmaps it early, for a
    reader that maps the file itself; `close` drops the descriptor and the mapping, and the
    memory goes once nothing else maps it either.
    """

    def __init__(self, size: int, name: str = "vitscale"):
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._map = mmap.mmap(self.fd, size, mmap.MAP_SHARED) if size else None
        except OSError:
            os.close(self.fd)
            raise
        self.view = memoryview(self._map) if self._map is not None else memoryview(b"")
        # Where `view` starts in this process's memory (0 when empty).
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._map)) if self._map is not None else 0

    @property
    def path(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    def allocated_bytes(self) -> int:
        """The memory it takes now (less than `size` once ranges were released)."""
        return os.fstat(self.fd).st_blocks * 512 if self.fd >= 0 else 0

    def release(self, offset: int, length: int) -> None:
        """Give the memory of a page-aligned range back to the system, in every mapping of it
        (it reads as zeros afterwards). Through the descriptor, so also after `close_view`; the
        GIL is free meanwhile (freeing 1 GiB takes ~0.2 s)."""
        if length and _fallocate(self.fd, _PUNCH_HOLE, offset, length) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"releasing {length} bytes at {offset}: {os.strerror(error)}")

    def close_view(self) -> None:
        """Unmap `view` (the file stays open): unmapping 1 GiB that was read through takes
        ~0.035 s, with the GIL free."""
        self.view.release()
        self.view = memoryview(b"")
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a slice of it is still alive (say, in a traceback):
                self._map.close()  # the mapping then goes with the last slice
            self._map = None
        self.address = 0

    def close(self) -> None:
        if self.fd < 0:
            return
        self.close_view()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "MemoryFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def memory_room() -> int | None:
    """Bytes of memory this process can still take (None: unknown): the smaller of the
    system's MemAvailable and, in a container, its cgroup's limit less its use."""
    room = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    room = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                headroom = int(limit) - int(f.read())
            room = headroom if room is None else min(room, headroom)
    except (OSError, ValueError):
        pass
    return room


def _libc_fallocate():
    """glibc's fallocate(fd, mode, offset, length) (os has only posix_fallocate), or None."""
    try:
        function = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError, TypeError):  # not glibc, or not Linux
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


_fallocate = _libc_fallocate()
_PUNCH_HOLE = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE (linux/falloc.h)


def memory_files_supported() -> bool:
    return hasattr(os, "memfd_create") and _fallocate is not None and os.path.isdir("/proc/self/fd")


# Ranged GETs of a download_to_memory: on loopback SeaweedFS, 32 MiB parts cost the server
# ~10% less CPU than 16 MiB ones at the same speed; 8 at once keep a real link busy. A part
# starts only while fewer than PARTS_AT_ONCE parts are fetched or waiting to be hashed, so the
# hash keeps up with the download even where both compete for the same cores (unbounded, it
# fell 0.3-0.6 s behind on 2 cores and finished alone: 2.15 s for 1.4 GB against 1.95 bounded).
PART_BYTES = 32 << 20
PARTS_AT_ONCE = 8
PART_ATTEMPTS = 3


BOUNCE_BYTES = 1 << 20
_bounce = threading.local()


def _read_exactly(body, fd: int, offset: int, length: int) -> None:
    """Write `length` bytes of a GetObject body into file `fd` at `offset`; IOError if the
    body ends short.

    The socket is read into a small buffer that stays in cache, and written on with `pwrite`:
    a memfd page that `pwrite` fills whole is never zeroed first, where one written through a
    mapping is faulted in and zeroed (writing 1.38 GB: 0.45 against 0.84 CPU-s here; a 1 GB
    download from loopback SeaweedFS: 1.20-1.25 s against 1.27-1.38 s). Reads from the
    http.client response under botocore's and urllib3's wrappers when it is there: urllib3's
    `readinto` reads into a fresh bytes object and copies it, which costs as much CPU as the
    socket itself at loopback speeds. The connection goes back to the pool when the body was
    read whole, and is closed otherwise.
    """
    if not hasattr(_bounce, "view"):
        _bounce.view = memoryview(bytearray(BOUNCE_BYTES))
    buffer = _bounce.view
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    read = fp.readinto if fp is not None and hasattr(raw, "release_conn") else body.readinto
    filled = 0
    try:
        while filled < length:
            count = read(buffer[:min(len(buffer), length - filled)])
            if not count:
                raise IOError(f"the body ended after {filled} of {length} bytes")
            _pwrite_all(fd, buffer[:count], offset + filled)
            filled += count
    except BaseException:
        body.close()
        raise
    if read is body.readinto:
        body.close()
    else:
        raw.release_conn()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written:], offset + written)


def _download_part(client, bucket: str, key: str, fd: int, start: int, length: int) -> int:
    """Write the object's `length` bytes from `start` into `fd` at `start`; returns the
    object's whole size."""
    from botocore.exceptions import ClientError

    for attempt in range(1, PART_ATTEMPTS + 1):
        try:
            response = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
            total = int(response.get("ContentRange", "/-1").rpartition("/")[2])
            if response["ContentLength"] != length:
                raise IOError(f"{response['ContentLength']} bytes at {start}, expected {length} (object size {total})")
            _read_exactly(response["Body"], fd, start, length)
            return total
        except ClientError:
            raise  # botocore has retried what is worth retrying
        except (IOError, http.client.HTTPException, *s3_errors()):  # a connection that broke mid-body
            if attempt == PART_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _download_error(error: BaseException, url: str) -> DataSourceError:
    if isinstance(error, s3_errors()):
        return client_error(error, url)
    return DataSourceError(f"{url}: {error}")


def _download_parts(client, files: list[tuple[str, MemoryFile]]) -> list[str]:
    """Ranged GETs of every file's parts through one window, hashed per file in order."""
    for url, held in files:
        if held.size == 0:
            location = parse_s3_url(url)
            try:
                size = client.head_object(Bucket=location.bucket, Key=location.prefix)["ContentLength"]
            except s3_errors() as error:
                raise _download_error(error, url) from None
            if size != 0:
                raise DataSourceError(f"{url}: {size} bytes, expected 0")
    plan = [(url, parse_s3_url(url), held, start) for url, held in files for start in range(0, held.size, PART_BYTES)]
    digests = {id(held): hashlib.sha256() for _, held in files}
    if not plan:
        return [digests[id(held)].hexdigest() for _, held in files]
    pool = concurrent.futures.ThreadPoolExecutor(min(PARTS_AT_ONCE, len(plan)))
    parts: collections.deque = collections.deque()  # fetched or being fetched, not hashed yet
    upcoming = iter(plan)

    def fetch_more() -> None:
        while len(parts) < PARTS_AT_ONCE and (item := next(upcoming, None)) is not None:
            _, location, held, start = item
            parts.append(pool.submit(_download_part, client, location.bucket, location.prefix, held.fd,
                                     start, min(PART_BYTES, held.size - start)))

    try:
        # Parts are hashed in order, here, while the pool fetches the next ones (hashlib
        # releases the GIL on large buffers); each part hashed makes room for one more, of this
        # file or the next, so the window stays full from a file's end to the next one's start.
        fetch_more()
        for url, _, held, start in plan:
            try:
                total = parts.popleft().result()
            except (IOError, http.client.HTTPException, *s3_errors()) as error:
                raise _download_error(error, url) from None
            if total != held.size:
                raise DataSourceError(f"{url}: {total} bytes, expected {held.size}")
            digests[id(held)].update(held.view[start:start + PART_BYTES])
            fetch_more()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return [digests[id(held)].hexdigest() for _, held in files]


def download_to_memory(url: str, size: int, factory: S3ClientFactory | None = None,
                       name: str | None = None) -> tuple[MemoryFile, str]:
    """Download `url`, which should be `size` bytes, into a MemoryFile; returns it and the sha256
    of what arrived (compare it with the expected one before reading the file). Raises
    DataSourceError (also when the object's size is not `size`); the caller closes the
    MemoryFile. `name` names the memory (in /proc/<pid>/maps); the object's base name by default.
    """
    [(held, digest)] = download_all_to_memory([(url, size, name)], factory)
    return held, digest


def download_all_to_memory(files: list[tuple[str, int, str | None]],
                           factory: S3ClientFactory | None = None) -> list[tuple[MemoryFile, str]]:
    """`download_to_memory` of several (url, size, name) at once: [(MemoryFile, sha256)].

    On S3, ranged GETs of PART_BYTES, PARTS_AT_ONCE at a time (as s3transfer would), through
    one window for all the files: the next file's first parts are on their way while the last
    ones of the file before are hashed. Each part is written into its place in its file; the
    parts are hashed in order as they complete, so a file is verified soon after its last part
    lands. On an error every MemoryFile is closed and DataSourceError names the file.
    """
    helds: list[MemoryFile] = []
    try:
        for url, size, name in files:
            helds.append(MemoryFile(size, name or os.path.basename(url)))
        remote = [(url, held) for (url, _, _), held in zip(files, helds) if is_s3_url(url)]
        digests = dict(zip((id(held) for _, held in remote),
                           _download_parts((factory or S3ClientFactory()).client(), remote) if remote else []))
        for (url, _, _), held in zip(files, helds):
            if not is_s3_url(url):
                digests[id(held)] = _copy_into_memory(url, held)
        return [(held, digests[id(held)]) for held in helds]
    except BaseException:
        for held in helds:
            held.close()
        raise


def _copy_into_memory(url: str, held: MemoryFile) -> str:
    """A local file into `held`; its sha256."""
    size = held.size
    try:
        with open(url, "rb", buffering=0) as source:
            actual = os.fstat(source.fileno()).st_size
            if actual != size:
                raise DataSourceError(f"{url}: {actual} bytes, expected {size}")
            buffer, filled = memoryview(bytearray(BOUNCE_BYTES)), 0
            while filled < size:  # written on with pwrite, as the S3 parts are
                count = source.readinto(buffer[:min(len(buffer), size - filled)])
                if not count:
                    raise DataSourceError(f"{url}: ended after {filled} of {size} bytes")
                _pwrite_all(held.fd, buffer[:count], filled)
                filled += count
    except OSError as error:
        raise DataSourceError(f"{url}: {error.strerror}") from None
    return hashlib.sha256(held.view).hexdigest()


def delete_file(url: str, factory: S3ClientFactory | None = None) -> None:
    if not is_s3_url(url):
        with contextlib.suppress(FileNotFoundError):
            os.remove(url)
        return
    location = parse_s3_url(url)
    try:
        (factory or S3ClientFactory()).client().delete_object(Bucket=location.bucket, Key=location.prefix)
    except s3_errors() as error:
        raise client_error(error, url) from None


def delete_prefix(url: str, factory: S3ClientFactory | None = None) -> int:
    """Delete every object under the prefix (or the folder); returns how many."""
    if not is_s3_url(url):
        count = sum(len(files) for _, _, files in os.walk(url))
        shutil.rmtree(url, ignore_errors=True)
        return count
    location = parse_s3_url(url)
    prefix = location.prefix.rstrip("/") + "/"
    client = (factory or S3ClientFactory()).client()
    count = 0
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=prefix):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=location.bucket, Delete={"Objects": keys, "Quiet": True})
                count += len(keys)
    except s3_errors() as error:
        raise client_error(error, url) from None
    return count


def abort_multipart_uploads(url: str, factory: S3ClientFactory | None = None, *,
                            where: Callable[[str], bool] | None = None) -> int:
    """Abort the unfinished multipart uploads under the prefix (parts left by a killed writer);
    `where(name)`, given each upload's key relative to the prefix, picks which. One listing of
    the prefix's open uploads (paginated), whatever number of objects it holds."""
    if not is_s3_url(url):
        return 0
    location = parse_s3_url(url)
    prefix = location.prefix.rstrip("/") + "/"
    client = (factory or S3ClientFactory()).client()
    count = 0
    try:
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=location.bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                if where is not None and not where(upload["Key"][len(prefix):]):
                    continue
                client.abort_multipart_upload(Bucket=location.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                count += 1
    except s3_errors() as error:
        raise client_error(error, url) from None
    return count


def list_folders(url: str, factory: S3ClientFactory | None = None) -> list[str]:
    """The names of the folders directly under the prefix or folder (S3: its CommonPrefixes,
    listed with a delimiter: one request per thousand folders, whatever they hold), sorted."""
    if not is_s3_url(url):
        try:
            return sorted(e.name for e in os.scandir(url) if e.is_dir())
        except FileNotFoundError:
            return []
    location = parse_s3_url(url)
    prefix = location.prefix.rstrip("/") + "/" if location.prefix else ""
    client = (factory or S3ClientFactory()).client()
    found = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=prefix,
                                                                    Delimiter="/"):
            found += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
    except s3_errors() as error:
        raise client_error(error, url) from None
    return sorted(found)


def exists_all(urls: list[str], factory: S3ClientFactory | None = None, *, at_once: int = 16) -> list[bool]:
    """Whether each object or file exists: one HEAD per S3 object, `at_once` in flight."""
    def exists(url: str) -> bool:
        if not is_s3_url(url):
            return os.path.isfile(url)
        location = parse_s3_url(url)
        try:
            (factory or S3ClientFactory()).client().head_object(Bucket=location.bucket, Key=location.prefix)
            return True
        except s3_errors() as error:
            if error_code(error) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise client_error(error, url) from None

    if len(urls) <= 1:
        return [exists(u) for u in urls]
    with concurrent.futures.ThreadPoolExecutor(min(at_once, len(urls))) as pool:
        return list(pool.map(exists, urls))


def list_prefix(url: str, factory: S3ClientFactory | None = None) -> dict[str, int]:
    """{path relative to url: size} for everything under the prefix or folder, recursively."""
    if not is_s3_url(url):
        found = {}
        for folder, _, files in os.walk(url):
            for name in files:
                path = os.path.join(folder, name)
                found[os.path.relpath(path, url)] = os.path.getsize(path)
        return found
    try:
        return dict(list_objects(factory or S3ClientFactory(), parse_s3_url(url)))
    except s3_errors() as error:
        raise client_error(error, url) from None
