"""S3 access against a real SeaweedFS: URL parsing, client factory, and the one-line error paths."""

import dataclasses
import multiprocessing
import os
import pickle

import pytest

from data_pipelines.manifest import MANIFEST_NAME
from data_pipelines.preflight import check_readable
from data_pipelines.s3 import DataSourceError, S3ClientFactory, S3Location, is_s3_url, join_location, parse_s3_url
from data_pipelines.storage import read_bytes, write_bytes
from data_pipelines.stream import ShardLoader
from data_pipelines.synthetic import write_synthetic


def test_urls_parse_into_bucket_and_prefix_and_folders_stay_paths():
    assert parse_s3_url("s3://bucket/a/b/") == S3Location("bucket", "a/b")
    assert parse_s3_url("s3://bucket") == S3Location("bucket", "")
    assert parse_s3_url("s3://bucket/a").url("x.tar") == "s3://bucket/a/x.tar"
    assert parse_s3_url("s3://bucket").url("x.tar") == "s3://bucket/x.tar"
    assert join_location("/data/shards", "x.tar") == "/data/shards/x.tar"
    assert not is_s3_url("/data/s3://odd")
    with pytest.raises(DataSourceError):
        parse_s3_url("s3:///no-bucket")


def test_client_factory_pickles_without_a_client_and_hides_the_secret():
    factory = S3ClientFactory(endpoint_url="http://127.0.0.1:1", access_key_id="AKIDEXAMPLE", secret_access_key="s3cr3t-value")
    assert "s3cr3t-value" not in repr(factory)
    assert pickle.loads(pickle.dumps(factory)) == factory


def _client_identity(factory):
    return getattr(factory.client(), "vitscale_made_in", None), os.getpid()


def test_each_process_makes_its_own_client(s3):
    here = s3.client()
    assert s3.client() is here  # cached in this process
    here.vitscale_made_in = os.getpid()  # a mark that a forked child would see on an inherited client
    with multiprocessing.get_context("fork").Pool(1) as pool:
        made_in, child_pid = pool.apply(_client_identity, (s3,))
    assert child_pid != os.getpid() and made_in is None  # the child's client is its own, not the parent's


def test_a_client_is_reused_only_under_the_environment_it_was_made_under(s3_server, monkeypatch):
    # A dry run points AWS_ENDPOINT_URL at its embedded server: a second one in the same
    # process must not get a client of the first one's server, which is gone.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    factory = S3ClientFactory()
    first = factory.client()
    assert first.meta.endpoint_url == "http://127.0.0.1:1" and factory.client() is first
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    second = factory.client()
    assert second is not first and second.meta.endpoint_url == s3_server.endpoint_url
    assert factory.client() is second
    assert second.list_buckets()["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_standard_environment_configures_boto3(s3_server, fresh_prefix, monkeypatch):
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    factory = S3ClientFactory()  # nothing explicit: AWS_ENDPOINT_URL and the key variables
    client = factory._new_client()
    assert client.meta.endpoint_url == s3_server.endpoint_url
    assert client.meta.config.retries["mode"] == "adaptive"
    write_bytes(f"{fresh_prefix}/hello.txt", b"hi", factory)
    assert read_bytes(f"{fresh_prefix}/hello.txt", factory) == b"hi"


def test_preflight_accepts_complete_shards(fresh_prefix, s3):
    write_synthetic("classification", f"{fresh_prefix}/train", num_samples=40, samples_per_shard=16, factory=s3)
    manifest = check_readable(f"{fresh_prefix}/train", s3, verify_sha256=True)
    assert manifest.total_samples == 40 and [s.samples for s in manifest.shards] == [16, 16, 8]


def _one_line(error: Exception, secret: str) -> str:
    text = str(error)
    assert "\n" not in text and secret not in text
    return text


def test_missing_bucket_is_one_clear_line(s3_server, s3):
    with pytest.raises(DataSourceError) as caught:
        check_readable("s3://no-such-bucket-here/train", s3)
    text = _one_line(caught.value, s3_server.secret_access_key)
    assert "s3://no-such-bucket-here/train" in text and "NoSuchBucket" in text


def test_wrong_credentials_are_one_clear_line_without_the_secret(s3_server, fresh_prefix):
    wrong = dataclasses.replace(s3_server.client_factory(), secret_access_key="definitely-wrong-secret")
    with pytest.raises(DataSourceError) as caught:
        check_readable(f"{fresh_prefix}/train", wrong)
    text = _one_line(caught.value, "definitely-wrong-secret")
    assert "SignatureDoesNotMatch" in text or "AccessDenied" in text or "InvalidAccessKeyId" in text
    with pytest.raises(DataSourceError):
        ShardLoader(f"{fresh_prefix}/train", batch_size=4, factory=wrong)


def test_empty_prefix_is_one_clear_line(s3_server, fresh_prefix, s3):
    with pytest.raises(DataSourceError) as caught:
        check_readable(f"{fresh_prefix}/nothing-here", s3)
    assert "no manifest.json and no .tar shards" in _one_line(caught.value, s3_server.secret_access_key)


def test_missing_and_truncated_shards_fail_preflight(fresh_prefix, s3):
    summary = write_synthetic("classification", f"{fresh_prefix}/train", num_samples=40, samples_per_shard=16, factory=s3)
    client, location = s3.client(), parse_s3_url(f"{fresh_prefix}/train")
    first, second = summary.manifest.shards[0].name, summary.manifest.shards[1].name
    data = client.get_object(Bucket=location.bucket, Key=location.key(second))["Body"].read()
    client.put_object(Bucket=location.bucket, Key=location.key(second), Body=data[: len(data) // 2])
    with pytest.raises(DataSourceError, match=f"{second}: .* bytes, the manifest says"):
        check_readable(f"{fresh_prefix}/train", s3)
    client.delete_object(Bucket=location.bucket, Key=location.key(first))
    with pytest.raises(DataSourceError, match=f"{first}: missing"):
        check_readable(f"{fresh_prefix}/train", s3)
    with pytest.raises(DataSourceError, match="NoSuchKey"):
        read_bytes(f"{fresh_prefix}/train/{first}", s3)


def test_corrupt_manifest_is_one_clear_line(fresh_prefix, s3):
    write_bytes(f"{fresh_prefix}/train/{MANIFEST_NAME}", b"{not json", s3)
    with pytest.raises(DataSourceError, match="not a valid shard manifest"):
        check_readable(f"{fresh_prefix}/train", s3)


def test_embedded_server_stops_sigterm_then_sigkill_and_cleans_up():
    import signal

    from data_pipelines.embedded_s3 import EmbeddedS3

    server = EmbeddedS3(grace_seconds=1).start()
    process, data_dir = server._process, server.data_dir
    assert server.secret_access_key not in repr(server)
    server.stop()
    # Gone, by the SIGKILL after the 1 s grace: SeaweedFS takes >10 s to act on SIGTERM.
    assert process.poll() == -signal.SIGKILL and not os.path.exists(data_dir)
    server.stop()  # idempotent


def test_embedded_server_waits_for_a_clean_exit_only_when_its_store_is_kept(tmp_path, monkeypatch):
    """A store of its own is deleted right after: no grace (a dry run waited 15 s for it)."""
    from data_pipelines import embedded_s3

    graces = []
    monkeypatch.setattr(embedded_s3, "terminate", lambda process, grace_seconds: graces.append(grace_seconds))
    own = embedded_s3.EmbeddedS3(grace_seconds=9)
    own.stop()
    (tmp_path / "store").mkdir()
    kept = embedded_s3.EmbeddedS3(str(tmp_path / "store"), grace_seconds=9)
    kept.stop()
    assert graces == [0, 9]
    assert not os.path.exists(own.data_dir) and os.path.isdir(kept.data_dir)
