"""S3 faults injected for real: a proxy (tests/faultproxy.py) in front of the real S3 server
answers 503 SlowDown, 500, 403, resets connections mid-body and stalls, over real HTTP."""

import dataclasses
import hashlib
import logging
import os
import re

import pytest

from data_pipelines.preflight import check_writable
from data_pipelines.s3 import DataSourceError
from data_pipelines.storage import read_bytes
from data_pipelines.stream import ShardLoader
from data_pipelines.synthetic import write_synthetic
from data_pipelines.transfer import list_prefix
from tests.conftest import free_port
from tests.faultproxy import FaultProxy


@pytest.fixture()
def proxy(s3_server):
    with FaultProxy(s3_server.endpoint_url, port=free_port()) as running:
        yield running


def through(proxy, s3_server, **timeouts):
    return dataclasses.replace(s3_server.client_factory(), endpoint_url=proxy.endpoint_url, **timeouts)


def test_a_stream_through_503s_a_500_a_reset_and_a_stall_yields_every_sample_once(s3_server, proxy, caplog):
    bucket = s3_server.create_bucket("vitscale-faults")
    source = f"{bucket}/stream"
    write_synthetic("classification", source, num_samples=96, num_classes=4, image_size=16, samples_per_shard=16,
                    factory=s3_server.client_factory())
    assert len([n for n in list_prefix(source, s3_server.client_factory()) if n.endswith(".tar")]) == 6
    proxy.add("GET", r"/stream/shard-000000\.tar", "503", times=2)
    proxy.add("GET", r"/stream/shard-000001\.tar", "500", times=1)
    proxy.add("GET", r"/stream/shard-000002\.tar", "reset", times=1)  # half its bytes, then a TCP reset
    proxy.add("GET", r"/stream/shard-000003\.tar", "stall", times=1, seconds=4)  # past the 1 s read timeout
    loader = ShardLoader(source, batch_size=8, augmentation="eval", image_size=16, num_workers=0,
                         factory=through(proxy, s3_server, read_timeout=1.0))
    with caplog.at_level(logging.WARNING, logger="data_pipelines.stream"):
        keys = [key for batch in loader for key in batch["key"]]
    # Every fault was served, and still: each of the 96 samples exactly once, nothing missing.
    assert [proxy.count(f) for f in ("503", "500", "reset", "stall")] == [2, 1, 1, 1], proxy.served
    assert len(keys) == len(set(keys)) == 96
    assert loader.stats["missing_samples"] == 0 and loader.stats["short_shards"] == 0
    # The 503s, the 500 and the stall were retried by botocore's retry mode; the reset came
    # mid-body, after the response began, where only the stream's own reopening helps.
    assert "shard shard-000002.tar: " in caplog.text and "reopening (1 of 3)" in caplog.text


def test_a_shard_that_keeps_dropping_its_connection_is_given_up_after_its_retries_and_counted(s3_server, proxy,
                                                                                             caplog):
    """Every read of one shard reset mid-body: it is reopened STREAM_RETRIES times, then given up
    with one line naming the positions lost; what it did yield and every other shard come
    through once, and the loss is counted (the run's missing-samples figure), not raised."""
    from data_pipelines.stream import STREAM_RETRIES

    bucket = s3_server.create_bucket("vitscale-faults")
    source = f"{bucket}/given-up"
    write_synthetic("classification", source, num_samples=64, num_classes=4, image_size=16, samples_per_shard=16,
                    factory=s3_server.client_factory())
    proxy.add("GET", r"/given-up/shard-000001\.tar", "reset")  # for good
    loader = ShardLoader(source, batch_size=8, augmentation="eval", image_size=16, num_workers=0,
                         factory=through(proxy, s3_server))
    with caplog.at_level(logging.WARNING, logger="data_pipelines.stream"):
        keys = [key for batch in loader for key in batch["key"]]
    assert proxy.count("reset") == STREAM_RETRIES + 1, proxy.served
    assert f"reopening ({STREAM_RETRIES} of {STREAM_RETRIES})" in caplog.text
    [lost] = [line for line in caplog.text.splitlines() if "shard shard-000001.tar unreadable after" in line]
    first_lost = int(re.search(r"positions (\d+)-15 lost", lost).group(1))
    assert 0 < first_lost < 16  # half a shard's bytes came through each time: its first samples did
    assert loader.stats["short_shards"] == 1 and loader.stats["missing_samples"] == 16 - first_lost
    assert len(keys) == len(set(keys)) == 64 - (16 - first_lost)


def test_uploads_and_reads_through_503s_and_resets_arrive_intact(s3_server, proxy):
    from data_pipelines.storage import write_bytes

    bucket = s3_server.create_bucket("vitscale-faults")
    factory = through(proxy, s3_server, read_timeout=2.0)
    data = bytes(range(256)) * 4096  # 1 MiB
    proxy.add("PUT", r"/up/object\.bin", "503", times=2)
    proxy.add("PUT", r"/up/object\.bin", "stall", times=1, seconds=4)
    write_bytes(f"{bucket}/up/object.bin", data, factory)
    proxy.add("GET", r"/up/object\.bin", "reset", times=1)
    proxy.add("GET", r"/up/object\.bin", "500", times=1)
    assert read_bytes(f"{bucket}/up/object.bin", factory) == data
    assert [proxy.count(f) for f in ("503", "stall", "reset", "500")] == [2, 1, 1, 1], proxy.served
    assert read_bytes(f"{bucket}/up/object.bin", s3_server.client_factory()) == data  # on the server, whole


def test_multipart_uploads_through_a_part_reset_mid_request_and_a_503_arrive_intact(s3_server, proxy, tmp_path):
    """A checkpoint's files go up as multipart uploads (16 MiB parts): a part whose connection
    is reset before the server saw it, and another answered 503, are sent again by the transfer,
    from the same bytes: a file's (upload_file) and a memory image's (upload_images, whose parts
    are read from the image in place)."""
    from data_pipelines.transfer import MemoryImage, sha256_file, upload_file, upload_images

    bucket = s3_server.create_bucket("vitscale-faults")
    factory = through(proxy, s3_server)
    data = os.urandom(40 << 20)  # three parts
    path = tmp_path / "file.bin"
    path.write_bytes(data)
    image = MemoryImage(stable=[(_address(data), len(data))])
    image.write(data)
    image.close()
    assert image.kept_bytes == len(data)  # the image holds the bytes by reference, not a copy
    for name in ("file.bin", "image.bin"):
        proxy.add("PUT", rf"/multipart/{name}\?.*partNumber=2", "reset", times=1)
        proxy.add("PUT", rf"/multipart/{name}\?.*partNumber=3", "503", times=1)
    assert upload_file(str(path), f"{bucket}/multipart/file.bin", factory) == sha256_file(str(path))
    [digest] = upload_images([(image, f"{bucket}/multipart/image.bin")], factory)
    assert digest == hashlib.sha256(data).hexdigest()
    assert [proxy.count(f) for f in ("reset", "503")] == [2, 2], proxy.served
    for name in ("file.bin", "image.bin"):  # on the server, whole, and no upload left open
        assert read_bytes(f"{bucket}/multipart/{name}", s3_server.client_factory()) == data
    assert not s3_server.client_factory().client().list_multipart_uploads(Bucket="vitscale-faults").get("Uploads")


def _address(data: bytes) -> int:
    import numpy as np

    return np.frombuffer(data, dtype=np.uint8).ctypes.data


def test_a_connect_that_never_completes_times_out_in_seconds(s3_server, monkeypatch):
    """An endpoint that takes no connection (its accept queue full: SYNs go unanswered, as a
    black-holed address does): the client gives up after its connect timeout and its retries,
    with one line, instead of botocore's 60 s per attempt."""
    import socket
    import threading

    from data_pipelines.s3 import S3ClientFactory

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=2)  # the one the queue holds
    with pytest.raises(OSError):  # the next connect hangs: the endpoint is black-holed
        socket.create_connection(("127.0.0.1", port), timeout=0.5)
    factory = dataclasses.replace(s3_server.client_factory(), endpoint_url=f"http://127.0.0.1:{port}", connect_timeout=0.5)
    assert S3ClientFactory().connect_timeout is None  # the default comes from CONNECT_TIMEOUT: 5 s
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore's retries, fewer (the user's setting, honoured)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            read_bytes("s3://vitscale-faults/anything", factory)
        except BaseException as error:  # noqa: BLE001 (handed to the test's thread)
            outcome.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=60)  # botocore's default: 60 s per attempt
    try:
        assert not reader.is_alive(), "the read still waits for a connection after 60 s: no connect timeout"
        [error] = outcome
        assert isinstance(error, DataSourceError) and not error.permanent, error
        assert f"127.0.0.1:{port}" in str(error) and "timeout" in str(error).lower(), error
        assert "\n" not in str(error) and s3_server.secret_access_key not in str(error)
    finally:
        filler.close()
        server.close()


def test_a_refusal_is_not_retried_and_says_so(s3_server, proxy):
    bucket = s3_server.create_bucket("vitscale-faults")
    from data_pipelines.storage import write_bytes

    proxy.add("PUT", r"/refused/", "403")
    with pytest.raises(DataSourceError) as caught:
        write_bytes(f"{bucket}/refused/object.bin", b"x", through(proxy, s3_server))
    assert caught.value.permanent and caught.value.code == "AccessDenied"
    assert "access denied: check the credentials and the bucket policy" in str(caught.value)
    assert proxy.count("403") == 1  # botocore's retry mode does not ask again; neither do we
    assert s3_server.secret_access_key not in str(caught.value)


def test_preflight_finds_a_location_that_refuses_writes(s3_server):
    """Credentials that may read and list but not write (a real SeaweedFS identity): the bucket
    answers, so only a real write finds it, before the run rather than at its first commit."""
    bucket = s3_server.create_bucket("vitscale-faults")
    check_writable(f"{bucket}/runs", s3_server.client_factory())
    assert not [n for n in list_prefix(f"{bucket}/runs", s3_server.client_factory()) if "write-check" in n]
    reader = s3_server.reader_factory()
    list_prefix(bucket, reader)  # reading is allowed
    with pytest.raises(DataSourceError, match=r"s3://vitscale-faults/runs: AccessDenied.*a test write was refused") as caught:
        check_writable(f"{bucket}/runs", reader)
    assert caught.value.permanent


def test_clients_wait_seconds_not_minutes_unless_told(s3_server, monkeypatch):
    from data_pipelines.s3 import S3ClientFactory

    config = s3_server.client_factory().client().meta.config
    assert (config.connect_timeout, config.read_timeout) == (5.0, 30.0)  # botocore's own: 60 s each
    assert config.retries["mode"] == "standard"
    monkeypatch.setenv("VITSCALE_S3_READ_TIMEOUT", "120")
    assert s3_server.client_factory().client().meta.config.read_timeout == 120.0
    monkeypatch.setenv("VITSCALE_S3_READ_TIMEOUT", "soon")
    with pytest.raises(DataSourceError, match=r"VITSCALE_S3_READ_TIMEOUT='soon': not a number of seconds"):
        S3ClientFactory(endpoint_url=s3_server.endpoint_url).client()
