"""Multipart transfers with their sha256 taken on the way, against a real SeaweedFS."""

import hashlib
import http.client
import os
import time
import types

import pytest
import torch

from data_pipelines.s3 import DataSourceError
from data_pipelines import transfer
from data_pipelines.transfer import (
    MemoryImage, download_all_to_memory, download_hashed, download_to_memory, upload_image, upload_images,
)

SIZE = 40 * 2**20 + 12345  # three 16 MiB parts, the last one short


@pytest.fixture(scope="module")
def payload():
    return os.urandom(SIZE)


def upload_bytes(payload: bytes, url: str, s3) -> str:
    image = MemoryImage()
    image.write(payload)
    image.close()
    return upload_image(image, url, s3)


def image_of(payload: bytes, pieces: int = 3_000_001):
    """`payload` written in odd-sized pieces, every other one from memory declared stable
    (kept by reference), the rest from a scratch buffer (copied)."""
    source = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    image = MemoryImage(stable=[(source.data_ptr(), source.numel())])
    for n, start in enumerate(range(0, len(payload), pieces)):
        piece = memoryview(source.numpy())[start:start + pieces]
        image.write(piece if n % 2 == 0 else bytearray(piece))
    image.close()
    return image, source


@pytest.mark.parametrize("where", ["s3", "folder"])
def test_upload_image_then_download_hashed_round_trip(where, payload, fresh_prefix, s3, tmp_path):
    url = f"{fresh_prefix}/blob.bin" if where == "s3" else str(tmp_path / "remote" / "blob.bin")
    image, source = image_of(payload)  # its pieces cross the 16 MiB part boundaries
    assert image.size == SIZE and 0 < image.kept_bytes < SIZE
    expected = hashlib.sha256(payload).hexdigest()
    assert upload_image(image, url, s3) == expected
    local = str(tmp_path / "local" / "blob.bin")
    assert download_hashed(url, local, s3) == (expected, SIZE)
    with open(local, "rb") as f:
        assert f.read() == payload
    assert not os.path.exists(local + ".partial")


def test_a_memory_image_keeps_big_writes_of_stable_memory_and_copies_the_rest():
    """What lies in the stable spans is held by reference (the upload sends the tensor's own
    memory); a buffer only valid during `write`, or a small piece, is copied."""
    stable = torch.zeros(3 << 20, dtype=torch.uint8)
    scratch = bytearray(2 << 20)
    image = MemoryImage(stable=[(stable.data_ptr(), stable.numel())])
    image.write(b"header")  # small: copied
    image.write(memoryview(stable.numpy())[: 2 << 20])  # stable and big: kept
    image.write(scratch)  # big but not stable: copied
    image.write(memoryview(stable.numpy())[: 100])  # stable but small: copied
    image.close()
    assert (image.size, image.kept_bytes) == (6 + (2 << 20) + (2 << 20) + 100, 2 << 20)
    stable[0], scratch[0] = 7, 7
    data = image.reader().read()
    assert data[6] == 7 and data[6 + (2 << 20)] == 0


def test_a_memory_image_reads_like_a_file_across_its_segments(payload):
    image, _ = image_of(payload[: 7_000_000], pieces=1_500_000)
    reader = image.reader()
    assert bytes(reader.read(100)) == payload[:100]
    reader.seek(1_499_990)
    assert bytes(reader.read(20)) == payload[1_499_990:1_500_010]  # across two segments: joined
    assert reader.tell() == 1_500_010
    reader.seek(-5, 2)
    assert bytes(reader.read()) == payload[6_999_995:7_000_000] and reader.read(10) == b""
    reader.seek(0)
    assert b"".join(bytes(reader.read(16384)) for _ in range(500)) == payload[:7_000_000]


def test_a_failed_upload_image_is_a_clear_error_and_a_missing_object_too(payload, fresh_prefix, s3, tmp_path):
    with pytest.raises(DataSourceError, match="s3://no-such-bucket-here/x.bin"):
        upload_bytes(payload[:1000], "s3://no-such-bucket-here/x.bin", s3)
    with pytest.raises(DataSourceError, match="broken.bin"):
        download_hashed(f"{fresh_prefix}/broken.bin", str(tmp_path / "broken.bin"), s3)


@pytest.mark.parametrize("where", ["s3", "folder"])
def test_download_to_memory_holds_the_bytes_and_their_sha256(where, payload, fresh_prefix, s3, tmp_path):
    url = f"{fresh_prefix}/memory.bin" if where == "s3" else str(tmp_path / "remote" / "memory.bin")
    upload_bytes(payload, url, s3)
    held, digest = download_to_memory(url, SIZE, s3)
    with held:
        assert digest == hashlib.sha256(payload).hexdigest()
        with open(held.path, "rb") as f:  # opens like a file, as torch.load(mmap=True) does
            assert f.read() == payload
    assert held.fd == -1


def test_a_memory_file_gives_back_a_range_through_its_descriptor_after_its_view_is_unmapped(payload, tmp_path):
    """What a restore does once DeepSpeed has copied what it needs out of a download: the
    hashing view goes first, then the ranges nothing uses go back, in every mapping of them."""
    import mmap

    (tmp_path / "x.bin").write_bytes(payload)
    held, _ = download_to_memory(str(tmp_path / "x.bin"), SIZE)
    with held, open(held.path, "rb") as f, mmap.mmap(f.fileno(), SIZE, prot=mmap.PROT_READ) as reader:
        held.close_view()
        assert held.view.nbytes == 0 and held.address == 0
        start, length = 4 * mmap.PAGESIZE, 16 * 2**20
        before = held.allocated_bytes()
        held.release(start, length)
        assert held.allocated_bytes() == before - length
        assert reader[start:start + length] == bytes(length)  # gone from the reader's mapping too
        assert reader[:start] == payload[:start] and reader[start + length:] == payload[start + length:]
    assert held.fd == -1
    with pytest.raises(OSError, match="releasing 4096 bytes at 0: Bad file descriptor"):
        held.release(0, 4096)


def test_download_to_memory_of_an_empty_object(fresh_prefix, s3):
    upload_bytes(b"", f"{fresh_prefix}/empty.bin", s3)
    held, digest = download_to_memory(f"{fresh_prefix}/empty.bin", 0, s3)
    held.close()
    assert digest == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("expected", [SIZE - 1, SIZE + 1, 0])
def test_download_to_memory_names_a_size_other_than_expected(expected, payload, fresh_prefix, s3):
    url = f"{fresh_prefix}/sized.bin"
    upload_bytes(payload, url, s3)
    with pytest.raises(DataSourceError, match=f"sized.bin: {SIZE} bytes, expected {expected}"):
        download_to_memory(url, expected, s3)


def test_download_to_memory_retries_a_part_whose_body_breaks(payload, fresh_prefix, s3, monkeypatch):
    url = f"{fresh_prefix}/flaky.bin"
    upload_bytes(payload, url, s3)
    real, broken = transfer._read_exactly, []

    def break_the_second_part_once(body, fd, offset, length):
        if offset == transfer.PART_BYTES and not broken:
            broken.append(True)
            body.close()
            raise http.client.IncompleteRead(b"", length)  # what http.client raises for a cut body
        return real(body, fd, offset, length)

    monkeypatch.setattr(transfer, "_read_exactly", break_the_second_part_once)
    held, digest = download_to_memory(url, SIZE, s3)
    held.close()
    assert broken and digest == hashlib.sha256(payload).hexdigest()


def test_download_to_memory_of_a_missing_object_is_a_clear_error(fresh_prefix, s3):
    with pytest.raises(DataSourceError, match="missing.bin"):
        download_to_memory(f"{fresh_prefix}/missing.bin", SIZE, s3)


def test_download_to_memory_names_a_body_that_keeps_breaking(payload, fresh_prefix, s3, monkeypatch):
    url = f"{fresh_prefix}/broken-body.bin"
    upload_bytes(payload, url, s3)

    def always_broken(body, fd, offset, length):
        body.close()
        raise http.client.IncompleteRead(b"", length)

    monkeypatch.setattr(transfer, "_read_exactly", always_broken)
    with pytest.raises(DataSourceError, match=r"broken-body.bin: IncompleteRead"):
        download_to_memory(url, SIZE, s3)


def test_download_to_memory_fetches_at_most_parts_at_once_ahead_of_its_hash(payload, fresh_prefix, s3, monkeypatch):
    """A slow hash holds the download back: a part starts only while fewer than PARTS_AT_ONCE
    parts are fetched but not hashed (so on a busy machine the hash never lags far behind)."""
    url = f"{fresh_prefix}/windowed.bin"
    upload_bytes(payload, url, s3)
    monkeypatch.setattr(transfer, "PART_BYTES", 1 << 20)
    monkeypatch.setattr(transfer, "PARTS_AT_ONCE", 3)
    events, real_part, real_sha256 = [], transfer._download_part, hashlib.sha256

    def recorded_part(client, bucket, key, fd, start, length):
        events.append(("start", start // transfer.PART_BYTES))
        return real_part(client, bucket, key, fd, start, length)

    class SlowDigest:
        def __init__(self):
            self.inner = real_sha256()

        def update(self, data):
            time.sleep(0.02)  # slower than a loopback part
            self.inner.update(data)
            events.append(("hashed", None))

        def hexdigest(self):
            return self.inner.hexdigest()

    monkeypatch.setattr(transfer, "_download_part", recorded_part)
    monkeypatch.setattr(transfer, "hashlib", types.SimpleNamespace(sha256=SlowDigest))
    held, digest = download_to_memory(url, SIZE, s3)
    held.close()
    monkeypatch.undo()
    assert digest == hashlib.sha256(payload).hexdigest()
    hashed, started = 0, []
    for kind, index in events:
        if kind == "hashed":
            hashed += 1
        else:
            assert index < hashed + 3, f"part {index} started with only {hashed} parts hashed"
            started.append(index)
    assert sorted(started) == list(range(-(-SIZE // (1 << 20))))


def test_download_all_to_memory_keeps_the_window_full_from_one_file_to_the_next(payload, fresh_prefix, s3, monkeypatch):
    """Several files through one window: the second file's parts start while the first one's
    last parts still wait for their hash, and each file gets its own bytes and sha256."""
    sizes = {"a.bin": 5 * (1 << 20) + 7, "empty.bin": 0, "b.bin": 9 * (1 << 20) + 3}
    for name, size in sizes.items():
        upload_bytes(payload[:size], f"{fresh_prefix}/{name}", s3)
    monkeypatch.setattr(transfer, "PART_BYTES", 1 << 20)
    monkeypatch.setattr(transfer, "PARTS_AT_ONCE", 4)
    events, real_part, real_sha256 = [], transfer._download_part, hashlib.sha256

    def recorded_part(client, bucket, key, fd, start, length):
        events.append(("start", key.rpartition("/")[2], start))
        return real_part(client, bucket, key, fd, start, length)

    class SlowDigest:
        def __init__(self):
            self.inner = real_sha256()

        def update(self, data):
            time.sleep(0.02)
            self.inner.update(data)
            events.append(("hashed", len(data)))

        def hexdigest(self):
            return self.inner.hexdigest()

    monkeypatch.setattr(transfer, "_download_part", recorded_part)
    monkeypatch.setattr(transfer, "hashlib", types.SimpleNamespace(sha256=SlowDigest))
    downloads = download_all_to_memory([(f"{fresh_prefix}/{n}", size, None) for n, size in sizes.items()], s3)
    monkeypatch.undo()
    for (name, size), (held, digest) in zip(sizes.items(), downloads):
        with held:
            assert digest == hashlib.sha256(payload[:size]).hexdigest(), name
            with open(held.path, "rb") as f:
                assert f.read() == payload[:size], name
    first_of_b = events.index(("start", "b.bin", 0))
    assert sum(1 for e in events[:first_of_b] if e[0] == "hashed") < 6  # a.bin's 6 parts were not all hashed yet


def test_download_all_to_memory_names_the_missing_file_and_closes_every_memory(payload, fresh_prefix, s3, monkeypatch):
    upload_bytes(payload[:1000], f"{fresh_prefix}/there.bin", s3)
    made = []
    real = transfer.MemoryFile

    def recorded(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(transfer, "MemoryFile", recorded)
    with pytest.raises(DataSourceError, match="not-there.bin"):
        download_all_to_memory([(f"{fresh_prefix}/there.bin", 1000, None), (f"{fresh_prefix}/not-there.bin", 1000, None)], s3)
    assert len(made) == 2 and all(held.fd == -1 for held in made)


def test_upload_images_sends_several_through_one_manager_and_names_the_one_that_failed(payload, fresh_prefix, s3, tmp_path):
    first, _ = image_of(payload[:20_000_000])
    second, _ = image_of(payload[5:9_000_005])
    urls = [f"{fresh_prefix}/one.bin", str(tmp_path / "two.bin")]  # S3 and a folder alike
    assert upload_images([(first, urls[0]), (second, urls[1])], s3) == [
        hashlib.sha256(payload[:20_000_000]).hexdigest(), hashlib.sha256(payload[5:9_000_005]).hexdigest()]
    held, _ = download_to_memory(urls[0], first.size, s3)
    with held, open(held.path, "rb") as f:
        assert f.read() == payload[:20_000_000]
    with open(urls[1], "rb") as f:
        assert f.read() == payload[5:9_000_005]
    with pytest.raises(DataSourceError, match="s3://no-such-bucket-here/two.bin"):
        upload_images([(first, f"{fresh_prefix}/again.bin"), (second, "s3://no-such-bucket-here/two.bin")], s3)
