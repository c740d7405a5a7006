"""Before any training starts: is the data there, complete, and readable with these credentials?

    python -m data_pipelines.preflight s3://bucket/prefix [--sha256]    # one line; exit 2 on failure

`check_readable` lists the location once and compares it with the manifest: a missing
bucket, wrong credentials, an empty prefix, a missing shard or a shard whose size differs
from the manifest (truncated or rewritten) each raise `DataSourceError` with one line that
names the URL and never a secret. `check_writable` does the same for an output location: a
real write and delete of a small probe there.
"""

from __future__ import annotations

import hashlib
import os
import sys
import uuid

from data_pipelines.manifest import Manifest, load_shard_list
from data_pipelines.s3 import DataSourceError, S3ClientFactory, describe_client_error, error_code, is_s3_url, join_location, parse_s3_url, s3_errors
from data_pipelines.storage import list_names, read_bytes


def check_readable(source: str, factory: S3ClientFactory | None = None, *, verify_sha256: bool = False) -> Manifest:
    """The manifest of `source` once every shard it lists is present at its recorded size."""
    base, manifest = load_shard_list(source, factory)
    if not manifest.shards:
        raise DataSourceError(f"{source}: the manifest lists no shards")
    present = dict(list_names(base, factory))
    for shard in manifest.shards:
        url = join_location(base, shard.name)
        if shard.name not in present:
            raise DataSourceError(f"{url}: missing (the manifest lists it)")
        if present[shard.name] != shard.bytes:
            raise DataSourceError(f"{url}: {present[shard.name]} bytes, the manifest says {shard.bytes} (truncated or rewritten)")
        if verify_sha256 and shard.sha256 and hashlib.sha256(read_bytes(url, factory)).hexdigest() != shard.sha256:
            raise DataSourceError(f"{url}: sha256 differs from the manifest")
    return manifest


def check_writable(destination: str, factory: S3ClientFactory | None = None) -> None:
    """Raise `DataSourceError` unless a real write and delete under `destination` succeed: a
    small probe object (or file) is written and deleted, so a bucket that exists but refuses
    writes (a policy, read-only credentials) is found before the run, not at its first commit."""
    probe = f".vitscale-write-check-{uuid.uuid4().hex[:12]}"
    if is_s3_url(destination):
        location = parse_s3_url(join_location(destination, probe))
        client = (factory or S3ClientFactory()).client()
        try:
            client.put_object(Bucket=location.bucket, Key=location.prefix, Body=b"")
        except s3_errors() as error:
            raise DataSourceError(f"{describe_client_error(error, destination)} (a test write was refused)",
                                  code=error_code(error)) from None
        try:
            client.delete_object(Bucket=location.bucket, Key=location.prefix)
        except s3_errors() as error:
            raise DataSourceError(f"{describe_client_error(error, destination)} (a test delete was refused: "
                                  f"retention deletes old checkpoints)", code=error_code(error)) from None
        return
    try:
        os.makedirs(destination, exist_ok=True)
        path = os.path.join(destination, probe)
        with open(path, "wb"):
            pass
        os.remove(path)
    except OSError as error:
        raise DataSourceError(f"{destination}: {error.strerror} (a test write and delete)") from None


if __name__ == "__main__":
    try:
        found = check_readable(sys.argv[1], verify_sha256="--sha256" in sys.argv[2:])
    except DataSourceError as error:
        print(f"preflight: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"{sys.argv[1]}: {len(found.shards)} shards, {found.total_samples} samples, {len(found.class_names)} classes")
