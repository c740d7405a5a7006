"""Whole-file transfers between local disk and a folder or S3 prefix, for checkpoints.

    upload_file("/staging/step-5/x.pt", "s3://bucket/run/checkpoints/step-5/x.pt")

S3 uploads and downloads go through s3transfer (boto3's managed transfers): multipart,
several parts in parallel. The sha256 of an upload is computed in a second thread while the
parts go out, so hashing costs no wall time when the network is the slower side. Local
folders are handled the same way, for runs whose checkpoints live on a shared filesystem.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import shutil

from data_pipelines.s3 import (
    DataSourceError, S3ClientFactory, describe_client_error, is_s3_url, list_objects, parse_s3_url, s3_errors,
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
                raise DataSourceError(describe_client_error(error, url)) from None
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
            raise DataSourceError(describe_client_error(error, url)) from None
    else:
        try:
            shutil.copyfile(url, partial)
        except OSError as error:
            raise DataSourceError(f"{url}: {error.strerror}") from None
    os.replace(partial, path)


def delete_file(url: str, factory: S3ClientFactory | None = None) -> None:
    if not is_s3_url(url):
        with contextlib.suppress(FileNotFoundError):
            os.remove(url)
        return
    location = parse_s3_url(url)
    try:
        (factory or S3ClientFactory()).client().delete_object(Bucket=location.bucket, Key=location.prefix)
    except s3_errors() as error:
        raise DataSourceError(describe_client_error(error, url)) from None


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
        raise DataSourceError(describe_client_error(error, url)) from None
    return count


def abort_multipart_uploads(url: str, factory: S3ClientFactory | None = None) -> int:
    """Abort the unfinished multipart uploads under the prefix (parts left by a killed writer)."""
    if not is_s3_url(url):
        return 0
    location = parse_s3_url(url)
    prefix = location.prefix.rstrip("/") + "/"
    client = (factory or S3ClientFactory()).client()
    count = 0
    try:
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=location.bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                client.abort_multipart_upload(Bucket=location.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                count += 1
    except s3_errors() as error:
        raise DataSourceError(describe_client_error(error, url)) from None
    return count


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
        raise DataSourceError(describe_client_error(error, url)) from None
