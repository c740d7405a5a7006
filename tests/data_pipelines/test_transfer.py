"""Multipart transfers with their sha256 taken on the way, against a real SeaweedFS."""

import hashlib
import http.client
import os
import time
import types

import pytest

from data_pipelines.s3 import DataSourceError
from data_pipelines import transfer
from data_pipelines.transfer import download_hashed, download_to_memory, upload_stream

SIZE = 40 * 2**20 + 12345  # three 16 MiB parts, the last one short


@pytest.fixture(scope="module")
def payload():
    return os.urandom(SIZE)


@pytest.mark.parametrize("where", ["s3", "folder"])
def test_upload_stream_then_download_hashed_round_trip(where, payload, fresh_prefix, s3, tmp_path):
    url = f"{fresh_prefix}/blob.bin" if where == "s3" else str(tmp_path / "remote" / "blob.bin")

    def produce(f):
        for start in range(0, SIZE, 3_000_001):  # odd-sized writes across part boundaries
            f.write(payload[start:start + 3_000_001])

    expected = hashlib.sha256(payload).hexdigest()
    assert upload_stream(produce, url, s3) == (expected, SIZE)
    local = str(tmp_path / "local" / "blob.bin")
    assert download_hashed(url, local, s3) == (expected, SIZE)
    with open(local, "rb") as f:
        assert f.read() == payload
    assert not os.path.exists(local + ".partial")


def test_a_failed_upload_stream_reraises_and_a_missing_object_is_a_clear_error(fresh_prefix, s3, tmp_path):
    def produce(f):
        f.write(b"x" * (17 * 2**20))
        raise RuntimeError("serializer broke")

    with pytest.raises(RuntimeError, match="serializer broke"):
        upload_stream(produce, f"{fresh_prefix}/broken.bin", s3)
    with pytest.raises(DataSourceError, match="broken.bin"):
        download_hashed(f"{fresh_prefix}/broken.bin", str(tmp_path / "broken.bin"), s3)


@pytest.mark.parametrize("where", ["s3", "folder"])
def test_download_to_memory_holds_the_bytes_and_their_sha256(where, payload, fresh_prefix, s3, tmp_path):
    url = f"{fresh_prefix}/memory.bin" if where == "s3" else str(tmp_path / "remote" / "memory.bin")
    upload_stream(lambda f: f.write(payload), url, s3)
    held, digest = download_to_memory(url, SIZE, s3)
    with held:
        assert digest == hashlib.sha256(payload).hexdigest()
        with open(held.path, "rb") as f:  # opens like a file, as torch.load(mmap=True) does
            assert f.read() == payload
    assert held.fd == -1


def test_download_to_memory_of_an_empty_object(fresh_prefix, s3):
    upload_stream(lambda f: None, f"{fresh_prefix}/empty.bin", s3)
    held, digest = download_to_memory(f"{fresh_prefix}/empty.bin", 0, s3)
    held.close()
    assert digest == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("expected", [SIZE - 1, SIZE + 1, 0])
def test_download_to_memory_names_a_size_other_than_expected(expected, payload, fresh_prefix, s3):
    url = f"{fresh_prefix}/sized.bin"
    upload_stream(lambda f: f.write(payload), url, s3)
    with pytest.raises(DataSourceError, match=f"sized.bin: {SIZE} bytes, expected {expected}"):
        download_to_memory(url, expected, s3)


def test_download_to_memory_retries_a_part_whose_body_breaks(payload, fresh_prefix, s3, monkeypatch):
    url = f"{fresh_prefix}/flaky.bin"
    upload_stream(lambda f: f.write(payload), url, s3)
    real, broken = transfer._read_exactly, []

    def break_the_second_part_once(body, view):
        if len(view) == transfer.PART_BYTES and not broken:
            broken.append(True)
            body.close()
            raise http.client.IncompleteRead(b"", len(view))  # what http.client raises for a cut body
        return real(body, view)

    monkeypatch.setattr(transfer, "_read_exactly", break_the_second_part_once)
    held, digest = download_to_memory(url, SIZE, s3)
    held.close()
    assert broken and digest == hashlib.sha256(payload).hexdigest()


def test_download_to_memory_of_a_missing_object_is_a_clear_error(fresh_prefix, s3):
    with pytest.raises(DataSourceError, match="missing.bin"):
        download_to_memory(f"{fresh_prefix}/missing.bin", SIZE, s3)


def test_download_to_memory_names_a_body_that_keeps_breaking(payload, fresh_prefix, s3, monkeypatch):
    url = f"{fresh_prefix}/broken-body.bin"
    upload_stream(lambda f: f.write(payload), url, s3)

    def always_broken(body, view):
        body.close()
        raise http.client.IncompleteRead(b"", len(view))

    monkeypatch.setattr(transfer, "_read_exactly", always_broken)
    with pytest.raises(DataSourceError, match=r"broken-body.bin: IncompleteRead"):
        download_to_memory(url, SIZE, s3)


def test_download_to_memory_fetches_at_most_parts_at_once_ahead_of_its_hash(payload, fresh_prefix, s3, monkeypatch):
    """A slow hash holds the download back: a part starts only while fewer than PARTS_AT_ONCE
    parts are fetched but not hashed (so on a busy machine the hash never lags far behind)."""
    url = f"{fresh_prefix}/windowed.bin"
    upload_stream(lambda f: f.write(payload), url, s3)
    monkeypatch.setattr(transfer, "PART_BYTES", 1 << 20)
    monkeypatch.setattr(transfer, "PARTS_AT_ONCE", 3)
    events, real_part, real_sha256 = [], transfer._download_part, hashlib.sha256

    def recorded_part(client, bucket, key, view, start):
        events.append(("start", start // transfer.PART_BYTES))
        return real_part(client, bucket, key, view, start)

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
