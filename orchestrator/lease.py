"""One driver per run: a lease object beside the run, taken with S3's conditional writes.

    lease = RunLease(f"{run_url}/lease.json")
    lease.acquire()          # LeaseHeld (one line naming the holder) when another driver holds it
    lease.start_renewing(on_lost=...)
    ...
    lease.release()

Two drivers on the same `run_name` (the default comes from model and dataset: two people
starting the same recipe) would write into each other's steps, and retention would delete the
other's uploads in flight. The lease, `<checkpoints>/<run_name>/lease.json`, names its holder
(host, pid, a random id, when it started). It is taken with `If-None-Match: *` (S3 writes it
only if there is none: exactly one of two drivers starting at once gets it), renewed every
`ttl / 3` seconds with `If-Match: <its ETag>` (a compare-and-swap: a driver whose lease was
taken over learns it at its next renewal, and stops), and deleted at the end. A lease not
renewed for `ttl` seconds, by the server's clock (its LastModified against the Date of the
response that read it: no two machines' clocks are compared), or held by a process of this
machine that no longer exists (a driver killed and started again), is stale: its driver died
without releasing it, and the next driver takes it over, again with `If-Match`, so that of two
drivers taking over at once, one wins.

Local folders (no conditional writes) get an O_EXCL lock file with the same content and the
same staleness rule by the file's mtime.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from email.utils import parsedate_to_datetime
from typing import Callable

from data_pipelines.s3 import (
    DataSourceError, S3ClientFactory, client_error, error_code, is_s3_url, parse_s3_url, s3_errors,
)

TTL_SECONDS = 120.0


class LeaseHeld(RuntimeError):
    """Another live driver holds the run's lease: one line naming it."""


class LeaseLost(RuntimeError):
    """This driver's lease was taken over (it was not renewed in time): the run must stop."""


class LeaseUnavailable(RuntimeError):
    """The lease could not be taken: one line (the caller's usage error, exit status 2)."""


class RunLease:
    def __init__(self, url: str, *, ttl: float = TTL_SECONDS, factory: S3ClientFactory | None = None,
                 log: Callable[[str], None] = print, elsewhere: str = "another --set run_name=..."):
        """`elsewhere`: what the refusal tells the second driver to give to go its own way."""
        self.url, self.ttl, self.factory, self.log = url, ttl, factory or S3ClientFactory(), log
        self.elsewhere = elsewhere
        self.holder = {"id": uuid.uuid4().hex[:16], "host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "ttl": ttl}
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    # --- S3 -----------------------------------------------------------------------------------

    def _body(self) -> bytes:
        return json.dumps(self.holder).encode()

    def _put(self, **condition) -> str | None:
        """Write the lease under a condition; its ETag, or None when the condition failed (412/409)."""
        location = parse_s3_url(self.url)
        try:
            response = self.factory.client().put_object(Bucket=location.bucket, Key=location.prefix, Body=self._body(),
                                                        ContentType="application/json", **condition)
        except s3_errors() as error:
            code = error_code(error)
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return None
            raise client_error(error, self.url) from None
        return response["ETag"]

    def _read(self) -> tuple[dict, str, float] | None:
        """(holder, ETag, seconds since its last write by the server's clock), or None if none."""
        location = parse_s3_url(self.url)
        try:
            response = self.factory.client().get_object(Bucket=location.bucket, Key=location.prefix)
            body = response["Body"].read()
        except s3_errors() as error:
            code = error_code(error)
            if code in ("NoSuchKey", "404"):
                return None
            raise client_error(error, self.url) from None
        date = response["ResponseMetadata"]["HTTPHeaders"].get("date")
        now = parsedate_to_datetime(date).timestamp() if date else time.time()
        try:
            holder = json.loads(body)
        except ValueError:
            holder = {}
        return holder, response["ETag"], now - response["LastModified"].timestamp()

    # --- a folder -------------------------------------------------------------------------------

    def _acquire_file(self) -> None:
        os.makedirs(os.path.dirname(self.url) or ".", exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.url, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    with open(self.url, "rb") as f:
                        holder = json.loads(f.read() or b"{}")
                    age = time.time() - os.path.getmtime(self.url)
                except (OSError, ValueError):
                    continue
                if not _stale(holder, age, self.ttl):
                    raise LeaseHeld(_held_line(self.url, holder, age, self.elsewhere)) from None
                self.log(_taking_over(holder, age))
                os.remove(self.url)
                continue
            with os.fdopen(fd, "wb") as f:
                f.write(self._body())
            self._etag = "file"
            return
        raise LeaseHeld(f"{self.url}: another driver keeps taking this run's lease")

    # --- the lease ----------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease, or raise LeaseHeld naming the live driver that holds it."""
        if not is_s3_url(self.url):
            self._acquire_file()
            return
        for _ in range(3):
            etag = self._put(IfNoneMatch="*")
            if etag is not None:
                self._etag = etag
                return
            found = self._read()
            if found is None:  # released between the two requests
                continue
            holder, their_etag, age = found
            if not _stale(holder, age, self.ttl):
                raise LeaseHeld(_held_line(self.url, holder, age, self.elsewhere))
            etag = self._put(IfMatch=their_etag)  # a stale lease: take it over, unless another did first
            if etag is not None:
                self.log(_taking_over(holder, age))
                self._etag = etag
                return
        raise LeaseHeld(f"{self.url}: another driver keeps taking this run's lease")

    def renew(self) -> None:
        """Write the lease again if it is still ours; LeaseLost if another driver took it over."""
        if self._etag is None:
            raise LeaseLost(f"{self.url}: no lease held")
        if not is_s3_url(self.url):
            try:
                with open(self.url, "rb") as f:
                    ours = json.loads(f.read() or b"{}").get("id") == self.holder["id"]
            except (OSError, ValueError):
                ours = False
            if not ours:
                raise LeaseLost(f"{self.url}: this run's lease was taken over by another driver")
            os.utime(self.url)
            return
        etag = self._put(IfMatch=self._etag)
        if etag is None:
            found = self._read()
            raise LeaseLost(f"{self.url}: this run's lease was taken over by another driver"
                            + (f" ({_who(found[0])})" if found else ""))
        self._etag = etag

    def start_renewing(self, on_lost: Callable[[str], None]) -> None:
        """Renew every ttl/3 s in a thread; `on_lost(line)` once if the lease is taken over (a
        renewal that fails for another reason is retried at the next turn and logged)."""

        def loop() -> None:
            while not self._stop.wait(self.ttl / 3):
                try:
                    self.renew()
                except LeaseLost as error:
                    self.lost = str(error)
                    on_lost(self.lost)
                    return
                except DataSourceError as error:
                    self.log(f"warning: renewing the run's lease failed ({error}); trying again in {self.ttl / 3:.0f} s")

        self._thread = threading.Thread(target=loop, name="vitscale-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._etag is None or self.lost:
            return
        try:
            if is_s3_url(self.url):
                found = self._read()
                if found is not None and found[0].get("id") == self.holder["id"]:
                    location = parse_s3_url(self.url)
                    self.factory.client().delete_object(Bucket=location.bucket, Key=location.prefix)
            else:
                with open(self.url, "rb") as f:
                    if json.loads(f.read() or b"{}").get("id") == self.holder["id"]:
                        os.remove(self.url)
        except (DataSourceError, OSError, ValueError, *s3_errors()) as error:
            self.log(f"warning: the run's lease {self.url} could not be released ({error}); the next driver takes it "
                     f"over once it is {self.ttl:.0f} s old")
        self._etag = None

    def __enter__(self) -> "RunLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold(url: str, *, what: str, log: Callable[[str], None] = print,
         elsewhere: str = "another --set run_name=...") -> RunLease:
    """The lease at `url`, taken and renewed while this driver lives, for a driver's main
    thread: a lease taken over later interrupts it as Ctrl-C does (`lease.lost` says why).
    LeaseUnavailable ("<what>: <one line>") when another driver holds it or the location
    cannot be written."""
    import _thread
    import signal

    lease = RunLease(url, log=log, elsewhere=elsewhere)
    try:
        lease.acquire()
    except (LeaseHeld, DataSourceError) as error:
        raise LeaseUnavailable(f"{what}: {error}") from None
    lease.start_renewing(on_lost=lambda line: _thread.interrupt_main(signal.SIGINT))
    return lease


def _stale(holder: dict, age: float, ttl: float) -> bool:
    """Not renewed for its ttl, or held by a process of this machine that is gone (a driver
    killed and started again here need not wait out the ttl)."""
    if age > float(holder.get("ttl", ttl)):
        return True
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
    return False


def _taking_over(holder: dict, age: float) -> str:
    return f"taking over the run from a driver that is gone (its lease last renewed {age:.0f} s ago; {_who(holder)})"


def _who(holder: dict) -> str:
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"


def _held_line(url: str, holder: dict, age: float, elsewhere: str) -> str:
    return (f"another driver is running this run ({_who(holder)}; its lease {url} renewed {age:.0f} s ago): stop it "
            f"first, or give this one {elsewhere}; a driver that died leaves its lease stale after "
            f"{float(holder.get('ttl', TTL_SECONDS)):.0f} s, and the next start takes it over")
