"""S3 access: URL parsing, a picklable boto3 client factory, and clear one-line errors.

    python -m data_pipelines.storage s3://bucket/prefix   # list a prefix with this configuration

Configuration is boto3's standard chain and nothing else: `AWS_ENDPOINT_URL` (or
`AWS_ENDPOINT_URL_S3`, or `endpoint_url` in the profile), `AWS_PROFILE` / a named profile,
environment credentials, the shared credentials file, instance or pod IAM roles. The retry
mode is `standard` unless `AWS_RETRY_MODE` (or the profile) says `adaptive`.

Paths are plain `str`: `s3://bucket/prefix` is S3, anything else is a local folder.
"""

from __future__ import annotations

import dataclasses
import os
import threading

DEFAULT_MAX_ATTEMPTS = 5


class DataSourceError(Exception):
    """The data location cannot be used: one line that says what and where, never a secret.
    `permanent`: S3 said no in a way that asking again will not change (access denied, no such
    bucket, unknown credentials), as opposed to a slow or failing server."""

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.code = code
        self.permanent = code in PERMANENT_CODES


# S3 error codes that retrying cannot cure: credentials revoked or wrong, a policy that refuses,
# a bucket that is gone. botocore's retry modes do not retry them either.
PERMANENT_CODES = frozenset({
    "AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket",
    "AllAccessDisabled", "AccountProblem", "NoCredentialsError", "InvalidBucketName",
})
# How long a client waits to connect and for each read before it counts the try as failed (and
# the retry mode tries again); botocore's own defaults are 60 s each. A stalled server is
# noticed in seconds, not minutes; a slow one still has time. VITSCALE_S3_CONNECT_TIMEOUT and
# VITSCALE_S3_READ_TIMEOUT (seconds) set others.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading slash; "" for the bucket root; joined with "/" by `key`

    def key(self, name: str) -> str:
        return f"{self.prefix.rstrip('/')}/{name}" if self.prefix.strip("/") else name

    def url(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(name) if name else self.prefix}"


def is_s3_url(url: str) -> bool:
    return url.startswith("s3://")


def parse_s3_url(url: str) -> S3Location:
    """`s3://bucket/some/prefix` -> S3Location("bucket", "some/prefix")."""
    if not is_s3_url(url):
        raise DataSourceError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise DataSourceError(f"no bucket in {url!r}")
    return S3Location(bucket, prefix.strip("/"))


def join_location(url: str, name: str) -> str:
    """A file name inside a folder or prefix, as a str (pathlib would mangle `s3://`)."""
    if is_s3_url(url):
        return parse_s3_url(url).url(name)
    return os.path.join(url, name)


@dataclasses.dataclass(frozen=True)
class S3ClientFactory:
    """Makes boto3 S3 clients from the standard configuration, one per process.

    Holds only plain settings, so it pickles into Ray workers and DataLoader workers; the
    client itself is created lazily in whichever process first asks (boto3 clients must not
    cross a fork). Explicit keys are for tests and the embedded server only; in production
    leave them None and let boto3 find credentials. `repr` never shows the secret.
    """

    endpoint_url: str | None = None
    profile: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = dataclasses.field(default=None, repr=False)
    max_pool_connections: int = 32
    connect_timeout: float | None = None  # None: VITSCALE_S3_CONNECT_TIMEOUT, else CONNECT_TIMEOUT
    read_timeout: float | None = None  # None: VITSCALE_S3_READ_TIMEOUT, else READ_TIMEOUT

    def client(self):
        cache, key = _process_clients(), self._key()
        client = cache.get(key)
        if client is None:
            with _clients_lock:  # botocore sessions are not thread-safe while making clients
                client = cache.get(key)
                if client is None:
                    client = cache[key] = self._new_client(key)
        return client

    def _key(self) -> tuple:
        """This factory under the environment boto3 reads now: a client (and session) made
        under other values of it is not handed out. A dry run sets AWS_ENDPOINT_URL to its
        embedded server; a second dry run in the same process (a notebook, the tests) got the
        first one's client, pointing at a server that was gone."""
        return self, tuple(os.environ.get(name) for name in BOTO3_ENVIRONMENT)

    def _new_client(self, key: tuple | None = None):
        import boto3
        import botocore.session
        from botocore.config import Config

        # The session (configuration, credential chain, parsed service models) is kept across
        # forks: a DataLoader worker then makes its client in ~5 ms instead of ~70 ms. The
        # client, which owns the connections, is always this process's own.
        key = key or self._key()
        session = _sessions.get(key)
        if session is None:
            # One boto3 session per factory: boto3 registers its handlers on the botocore
            # session it wraps, so wrapping the same botocore session twice would register
            # them twice ("Cannot inject class attribute upload_file").
            session = _sessions[key] = boto3.session.Session(
                botocore_session=botocore.session.Session(profile=self.profile),
                aws_access_key_id=self.access_key_id,
                aws_secret_access_key=self.secret_access_key,
                region_name=self.region,
            )
        core = session._session
        # AWS_RETRY_MODE / the profile's retry_mode win; botocore's own default, "legacy", does not.
        retry_mode = core.get_config_variable("retry_mode")
        config = Config(
            retries={
                "mode": retry_mode if retry_mode in ("standard", "adaptive") else "standard",
                "max_attempts": int(core.get_config_variable("max_attempts") or DEFAULT_MAX_ATTEMPTS),
            },
            max_pool_connections=self.max_pool_connections,
            connect_timeout=_seconds(self.connect_timeout, "VITSCALE_S3_CONNECT_TIMEOUT", CONNECT_TIMEOUT),
            read_timeout=_seconds(self.read_timeout, "VITSCALE_S3_READ_TIMEOUT", READ_TIMEOUT),
            region_name=None if session.region_name else "us-east-1",
            # Path-style addressing works with every S3-compatible server behind a custom endpoint.
            s3={"addressing_style": "path"} if self.endpoint_url or core.get_config_variable("endpoint_url") else None,
            # botocore's default since 1.36 ("when_supported") CRC32s every upload and every
            # object read: CPU the data workers and checkpoint uploads need. Integrity is ours
            # (sha256 in the shard and checkpoint manifests, checked where it matters); TCP and
            # S3's Content-MD5/ETag cover transit. AWS_{REQUEST,RESPONSE}_CHECKSUM_* or the
            # profile still win.
            request_checksum_calculation=core.get_config_variable("request_checksum_calculation")
            if _set_by_user(core, "request_checksum_calculation") else "when_required",
            response_checksum_validation=core.get_config_variable("response_checksum_validation")
            if _set_by_user(core, "response_checksum_validation") else "when_required",
        )
        return session.client("s3", endpoint_url=self.endpoint_url, config=config)


def _seconds(given: float | None, variable: str, default: float) -> float:
    if given is not None:
        return given
    value = os.environ.get(variable)
    try:
        seconds = float(value) if value else default
    except ValueError:
        raise DataSourceError(f"{variable}={value!r}: not a number of seconds") from None
    if not seconds > 0:
        raise DataSourceError(f"{variable}={value!r}: must be > 0 seconds")
    return seconds


def _set_by_user(core, name: str) -> bool:
    """Whether the environment or the profile sets this botocore setting (not its default)."""
    if os.environ.get(f"AWS_{name.upper()}"):
        return True
    try:
        return name in core.get_scoped_config()
    except Exception:  # noqa: BLE001 - a missing profile is reported where the client is used
        return False


# The variables boto3 takes S3 settings from (besides the files they may name).
BOTO3_ENVIRONMENT = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS",
    "VITSCALE_S3_CONNECT_TIMEOUT", "VITSCALE_S3_READ_TIMEOUT",
)
_clients_lock = threading.Lock()
_clients: dict[int, dict[tuple, object]] = {}  # pid -> clients made in that process, by S3ClientFactory._key
_sessions: dict[tuple, object] = {}  # boto3 sessions, inherited by forked children


def _forget_parent_clients() -> None:
    global _clients_lock
    _clients_lock = threading.Lock()  # a parent thread may have held it at the fork
    _clients.clear()


os.register_at_fork(after_in_child=_forget_parent_clients)


def _process_clients() -> dict:
    pid = os.getpid()
    if pid not in _clients:
        with _clients_lock:
            if pid not in _clients:
                _clients.clear()  # inherited across a fork: never reuse a parent's connections
                _clients[pid] = {}
    return _clients[pid]


def s3_errors() -> tuple[type[BaseException], ...]:
    """What boto3 raises for a failed S3 call (imported lazily: boto3 is slow to import)."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError, S3UploadFailedError)


def client_error(error: Exception, url: str) -> DataSourceError:
    """The DataSourceError for a botocore error on `url`: its one line, and its code."""
    return DataSourceError(describe_client_error(error, url), code=error_code(error))


def error_code(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")) or type(error).__name__


def describe_client_error(error: Exception, url: str) -> str:
    """One line for a botocore error on `url`: the code and what it usually means, no secrets."""
    code = error_code(error)
    meaning = {
        "NoSuchBucket": "the bucket does not exist",
        "404": "not found (missing bucket or object)",
        "NotFound": "not found (missing bucket or object)",
        "NoSuchKey": "the object does not exist",
        "AccessDenied": "access denied: check the credentials and the bucket policy",
        "403": "access denied: check the credentials and the bucket policy",
        "InvalidAccessKeyId": "the access key is not known to the server: wrong credentials",
        "SignatureDoesNotMatch": "the signature does not match: wrong secret key",
        "NoCredentialsError": "no credentials found (environment, profile or IAM role)",
        "EndpointConnectionError": "cannot connect to the S3 endpoint",
        "ConnectTimeoutError": "no connection to the S3 endpoint within the connect timeout, after retries "
                               "(VITSCALE_S3_CONNECT_TIMEOUT sets it)",
        "ReadTimeoutError": "the S3 endpoint did not answer within the read timeout, after retries "
                            "(VITSCALE_S3_READ_TIMEOUT sets it)",
    }.get(code, "")
    endpoint = str((getattr(error, "kwargs", None) or {}).get("endpoint_url") or "")
    if meaning and endpoint:  # its host, never a user:password@ it might carry
        meaning = meaning.replace("the S3 endpoint", f"the S3 endpoint {_without_userinfo(endpoint)}")
    return f"{url}: {code}{': ' + meaning if meaning else ''}"


def _without_userinfo(endpoint: str) -> str:
    import urllib.parse

    parts = urllib.parse.urlsplit(endpoint)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def list_objects(factory: S3ClientFactory, location: S3Location) -> list[tuple[str, int]]:
    """(name relative to the prefix, size) for every object under the prefix, sorted."""
    client = factory.client()
    prefix = location.key("") if location.prefix else ""
    found = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            found.append((item["Key"][len(prefix):], item["Size"]))
    return sorted(found)


