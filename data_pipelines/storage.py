"""Bytes in and out of a folder or an S3 prefix; the backend comes from the URL scheme.

    python -m data_pipelines.storage s3://bucket/prefix    # list names and sizes

Every S3 failure becomes a one-line `DataSourceError` naming the URL and the error code.
"""

from __future__ import annotations

import io
import os
import sys
from typing import BinaryIO

from data_pipelines.s3 import (
    DataSourceError, S3ClientFactory, client_error, is_s3_url, list_objects, parse_s3_url, s3_errors,
)

READ_BUFFER_BYTES = 1 << 20
BODY_ATTEMPTS = 3  # read_bytes: tries of an object whose connection broke mid-body


def list_names(url: str, factory: S3ClientFactory | None = None) -> list[tuple[str, int]]:
    """(name, size) of every file directly in the folder, or every object under the prefix."""
    if is_s3_url(url):
        try:
            return list_objects(factory or S3ClientFactory(), parse_s3_url(url))
        except s3_errors() as error:
            raise client_error(error, url) from None
    if not os.path.isdir(url):
        raise DataSourceError(f"{url}: no such folder")
    return sorted((n, os.path.getsize(os.path.join(url, n))) for n in os.listdir(url) if os.path.isfile(os.path.join(url, n)))


def read_bytes(url: str, factory: S3ClientFactory | None = None) -> bytes:
    """The object's or file's bytes. An S3 read whose connection breaks after the response
    began (botocore retries only until it begins) is asked again, BODY_ATTEMPTS times in all."""
    if is_s3_url(url):
        import http.client

        from botocore.exceptions import ClientError

        location = parse_s3_url(url)
        for attempt in range(1, BODY_ATTEMPTS + 1):
            try:
                return (factory or S3ClientFactory()).client().get_object(Bucket=location.bucket, Key=location.prefix)["Body"].read()
            except ClientError as error:  # an answer: botocore retried what is worth retrying
                raise client_error(error, url) from None
            except (*s3_errors(), http.client.HTTPException, OSError) as error:  # broken mid-body
                if attempt == BODY_ATTEMPTS:
                    raise client_error(error, url) from None
    try:
        with open(url, "rb") as f:
            return f.read()
    except OSError as error:
        raise DataSourceError(f"{url}: {error.strerror}") from None


def write_bytes(url: str, data: bytes, factory: S3ClientFactory | None = None) -> None:
    if is_s3_url(url):
        location = parse_s3_url(url)
        try:
            (factory or S3ClientFactory()).client().put_object(Bucket=location.bucket, Key=location.prefix, Body=data)
        except s3_errors() as error:
            raise client_error(error, url) from None
        return
    os.makedirs(os.path.dirname(url) or ".", exist_ok=True)
    temporary = url + ".partial"
    with open(temporary, "wb") as f:
        f.write(data)
    os.replace(temporary, url)


class _BodyReader(io.RawIOBase):
    """A botocore StreamingBody as a raw stream, so io.BufferedReader can batch tarfile's small reads."""

    def __init__(self, body):
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._body.readinto(buffer)  # straight from the socket into the buffer, one copy

    def close(self) -> None:
        self._body.close()
        super().close()


def open_stream(url: str, factory: S3ClientFactory | None = None) -> BinaryIO:
    """A buffered read stream: the object is streamed from S3, never copied to local disk."""
    if is_s3_url(url):
        location = parse_s3_url(url)
        try:
            body = (factory or S3ClientFactory()).client().get_object(Bucket=location.bucket, Key=location.prefix)["Body"]
        except s3_errors() as error:
            raise client_error(error, url) from None
        return io.BufferedReader(_BodyReader(body), buffer_size=READ_BUFFER_BYTES)
    try:
        return open(url, "rb", buffering=READ_BUFFER_BYTES)
    except OSError as error:
        raise DataSourceError(f"{url}: {error.strerror}") from None


if __name__ == "__main__":
    for name, size in list_names(sys.argv[1]):
        print(f"{size:>12}  {name}")
