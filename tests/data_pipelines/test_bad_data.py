"""Bad data while streaming from a real S3: skipped, counted, named, and iteration goes on."""

import io
import logging
import tarfile

import pytest
import webdataset as wds

from data_pipelines.manifest import ShardInfo
from data_pipelines.s3 import parse_s3_url
from data_pipelines.shard_writer import Sample, write_shards
from data_pipelines.storage import write_bytes
from data_pipelines.stream import ShardLoader
from data_pipelines.synthetic import classification_samples, write_synthetic


def test_corrupt_images_and_members_are_skipped_counted_and_named(fresh_prefix, s3, caplog):
    good = list(classification_samples(20, 4, 32))
    samples = good[:5] + [Sample("garbled", b"\xff\xd8\xff\xe0 not a jpeg at all", "jpg", 1)] + good[5:]
    summary = write_shards(samples, f"{fresh_prefix}/train", class_names=["a", "b", "c", "d"], samples_per_shard=8,
                           factory=s3, progress=False)
    # A third shard written by hand: one sample without an image, one with a label that is not a number.
    buffer = io.BytesIO()
    with wds.TarWriter(buffer) as tar:
        tar.write({"__key__": "nolabel", "jpg": good[0].image, "cls": b"seven"})
        tar.write({"__key__": "noimage", "cls": b"1"})
        tar.write({"__key__": "fine", "jpg": good[1].image, "cls": b"2"})
    write_bytes(f"{fresh_prefix}/train/extra.tar", buffer.getvalue(), s3)
    manifest = summary.manifest
    manifest.shards.append(ShardInfo("extra.tar", 3, len(buffer.getvalue())))
    write_bytes(f"{fresh_prefix}/train/manifest.json", manifest.to_json().encode(), s3)

    expected = {s.key for s in good} | {"fine"}
    with caplog.at_level(logging.WARNING, logger="data_pipelines.stream"):
        in_process = ShardLoader(f"{fresh_prefix}/train", batch_size=4, image_size=32, num_workers=0, factory=s3)
        assert {k for b in in_process for k in b["key"]} == expected
    assert in_process.stats["skipped_samples"] == 3 and in_process.remaining_samples() == 0
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert "garbled in shard shard-000000.tar" in warnings and "undecodable image" in warnings
    assert "noimage in shard extra.tar" in warnings and "nolabel in shard extra.tar" in warnings

    with_workers = ShardLoader(f"{fresh_prefix}/train", batch_size=4, image_size=32, num_workers=2, factory=s3)
    assert {k for b in with_workers for k in b["key"]} == expected
    assert with_workers.stats["skipped_samples"] == 3


@pytest.mark.parametrize("cut", ["mid_member", "at_header"])
def test_a_shard_shorter_than_its_manifest_is_reported_and_the_rest_streams(fresh_prefix, s3, caplog, cut):
    summary = write_synthetic("classification", f"{fresh_prefix}/train", num_samples=48, image_size=32, samples_per_shard=16, factory=s3)
    victim = summary.manifest.shards[1]
    client, location = s3.client(), parse_s3_url(f"{fresh_prefix}/train")
    data = client.get_object(Bucket=location.bucket, Key=location.key(victim.name))["Body"].read()
    # Keep 5 whole samples (10 members: .cls, .jpg each), cut at the 6th's header or inside it.
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    boundary = members[10].offset  # the header of the 6th sample's first member
    keep = boundary if cut == "at_header" else boundary + 700
    client.put_object(Bucket=location.bucket, Key=location.key(victim.name), Body=data[:keep])

    with caplog.at_level(logging.WARNING, logger="data_pipelines.stream"):
        stream = ShardLoader(f"{fresh_prefix}/train", batch_size=4, image_size=32, num_workers=0, factory=s3)
        keys = [k for b in stream for k in b["key"]]
    assert len(keys) == len(set(keys)) == 48 - 11
    # Cut inside sample 5, its .cls survives and it is skipped as incomplete; the rest are lost.
    lost = 11 if cut == "at_header" else 10
    assert stream.stats["short_shards"] == 1 and stream.stats["missing_samples"] == lost
    assert stream.stats["skipped_samples"] == 11 - lost and stream.remaining_samples() == 0
    warning = next(r.getMessage() for r in caplog.records if "manifest says" in r.getMessage())
    assert victim.name in warning and "manifest says 16" in warning and f"positions {16 - lost}-15 lost" in warning

    with_workers = ShardLoader(f"{fresh_prefix}/train", batch_size=4, image_size=32, num_workers=2, factory=s3)
    assert sorted(k for b in with_workers for k in b["key"]) == sorted(keys)
    assert with_workers.stats["missing_samples"] == lost


def test_a_shard_deleted_after_preflight_is_reported_not_fatal(fresh_prefix, s3, caplog):
    summary = write_synthetic("classification", f"{fresh_prefix}/train", num_samples=32, image_size=32, samples_per_shard=16, factory=s3)
    stream = ShardLoader(f"{fresh_prefix}/train", batch_size=4, image_size=32, num_workers=0, factory=s3)
    location = parse_s3_url(f"{fresh_prefix}/train")
    s3.client().delete_object(Bucket=location.bucket, Key=location.key(summary.manifest.shards[0].name))
    with caplog.at_level(logging.WARNING, logger="data_pipelines.stream"):
        keys = [k for b in stream for k in b["key"]]
    assert len(keys) == 16 and stream.stats["missing_samples"] == 16
    assert "NoSuchKey" in "\n".join(r.getMessage() for r in caplog.records)


def test_a_prefix_without_manifest_streams_whole_shards(fresh_prefix, s3):
    summary = write_synthetic("classification", f"{fresh_prefix}/train", num_samples=40, image_size=32, samples_per_shard=16, factory=s3)
    location = parse_s3_url(f"{fresh_prefix}/train")
    s3.client().delete_object(Bucket=location.bucket, Key=location.key("manifest.json"))
    ranks = [ShardLoader(f"{fresh_prefix}/train", batch_size=4, image_size=32, num_workers=1, world_size=2, rank=r, factory=s3)
             for r in range(2)]
    seen = [k for stream in ranks for b in stream for k in b["key"]]
    assert len(seen) == len(set(seen)) == summary.written


def test_a_connection_dropped_mid_shard_is_reopened_without_repeats(fresh_prefix, s3, monkeypatch, caplog):
    import data_pipelines.stream as stream_module

    summary = write_synthetic("classification", f"{fresh_prefix}/train", num_samples=32, image_size=32, samples_per_shard=16, factory=s3)
    real_open, drops = stream_module.open_stream, []

    class DroppingStream(io.RawIOBase):
        """The real S3 stream, cut with ConnectionResetError after 20 KB on the first two opens."""

        def __init__(self, inner):
            self.inner, self.sent = inner, 0

        def readable(self):
            return True

        def readinto(self, buffer):
            if self.sent > 20_000:
                raise ConnectionResetError("connection reset by peer (simulated)")
            data = self.inner.read(min(len(buffer), 4096))
            buffer[: len(data)] = data
            self.sent += len(data)
            return len(data)

    def flaky_open(url, factory=None):
        inner = real_open(url, factory)
        if url.endswith(summary.manifest.shards[0].name) and len(drops) < 2:
            drops.append(url)
            return io.BufferedReader(DroppingStream(inner))
        return inner

    monkeypatch.setattr(stream_module, "open_stream", flaky_open)
    with caplog.at_level(logging.WARNING, logger="data_pipelines.stream"):
        stream = ShardLoader(f"{fresh_prefix}/train", batch_size=4, image_size=32, num_workers=0, factory=s3)
        keys = [k for b in stream for k in b["key"]]
    assert len(drops) == 2 and len(keys) == len(set(keys)) == 32
    assert stream.stats["missing_samples"] == 0
    assert sum("reopening" in r.getMessage() for r in caplog.records) == 2
