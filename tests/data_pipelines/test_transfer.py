"""Multipart transfers with their sha256 taken on the way, against a real SeaweedFS."""

import hashlib
import os

import pytest

from data_pipelines.s3 import DataSourceError
from data_pipelines.transfer import download_hashed, upload_stream

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
