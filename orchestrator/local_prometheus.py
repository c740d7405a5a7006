"""A real Prometheus on loopback, scraping a run on this machine: the dry run and the tests.

    with LocalPrometheus(["127.0.0.1:9400", "127.0.0.1:9401"], data_dir=out) as prometheus:
        ...                                         # the run
        prometheus.query_range('vitscale_loss', start, end)

Uses the `prometheus` binary on PATH (Debian's `prometheus` package). Targets are scraped
every second under `job="vitscale"`; queries go through Prometheus's HTTP API.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

from data_pipelines.embedded_s3 import die_with_parent, terminate

SCRAPE_INTERVAL_SECONDS = 1


class PrometheusError(RuntimeError):
    pass


# Ray's workers listen on 10002-19999 by default; above them, below the ephemeral range, no
# port is handed out by the kernel.
FIRST_QUIET_PORT = 20000


def first_ephemeral_port() -> int:
    """Where the kernel's range for ports bound to 0 starts (Linux's sysctl; its default
    elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int) -> int:
    """A base port p with p .. p + count - 1 free on 127.0.0.1 right now.

    Picked at random between Ray's worker ports and the kernel's ephemeral range: the ports
    are taken only later (a worker binds its own once it runs), and meanwhile Ray, SeaweedFS
    and every client bind ports the kernel hands out from the ephemeral range (a dry run's
    worker once found the port picked for it there taken by then). Where that range leaves
    no room below it, a port the kernel hands out is the base. VITSCALE_PORTS="LOW-HIGH" narrows
    the range (processes that pick ports at once on one machine, e.g. parallel test workers,
    each get a range of their own).
    """
    low, high = FIRST_QUIET_PORT, first_ephemeral_port() - count
    if span := os.environ.get("VITSCALE_PORTS"):
        try:
            low, top = (int(p) for p in span.split("-"))
        except ValueError:
            raise PrometheusError(f"VITSCALE_PORTS={span!r}: not LOW-HIGH (e.g. 20000-26000)") from None
        high = top - count
    pick = random.SystemRandom()  # not the random module's state, which a run may have seeded
    for _ in range(50):
        if high > low:
            base = pick.randint(low, high)
        else:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                base = probe.getsockname()[1]
        if base + count > 65000:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise PrometheusError(f"found no {count} consecutive free ports on 127.0.0.1")


class LocalPrometheus:
    def __init__(self, targets: list[str], *, data_dir: str | None = None, binary: str = "prometheus",
                 startup_timeout: float = 30.0, grace_seconds: float = 5.0):
        self.targets, self.binary = targets, binary
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="vitscale-prometheus-")
        self.startup_timeout, self.grace_seconds = startup_timeout, grace_seconds
        self.url: str | None = None
        self._process: subprocess.Popen | None = None

    @staticmethod
    def available(binary: str = "prometheus") -> bool:
        return shutil.which(binary) is not None

    def __enter__(self) -> "LocalPrometheus":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "LocalPrometheus":
        if not self.available(self.binary):
            raise PrometheusError(f"no `{self.binary}` on PATH (Debian: apt-get install prometheus)")
        os.makedirs(self.data_dir, exist_ok=True)
        config = os.path.join(self.data_dir, "prometheus.yml")
        with open(config, "w") as f:  # JSON is YAML
            json.dump({
                "global": {"scrape_interval": f"{SCRAPE_INTERVAL_SECONDS}s", "evaluation_interval": f"{SCRAPE_INTERVAL_SECONDS}s"},
                "scrape_configs": [{"job_name": "vitscale", "scrape_timeout": f"{SCRAPE_INTERVAL_SECONDS}s",
                                    "static_configs": [{"targets": self.targets}]}],
            }, f, indent=1)
        port = free_ports(1)
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(os.path.join(self.data_dir, "prometheus.log"), "ab")
        self._process = subprocess.Popen(
            [self.binary, f"--config.file={config}", f"--storage.tsdb.path={os.path.join(self.data_dir, 'tsdb')}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent,
        )
        atexit.register(self.stop)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            status = self._process.poll()
            if status is not None:
                log = os.path.join(self.data_dir, "prometheus.log")
                self._own_dir = False  # keep the log to read
                self.stop()
                raise PrometheusError(f"prometheus exited with status {status} while starting; see {log}")
            try:
                urllib.request.urlopen(self.url + "/-/ready", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise PrometheusError(f"prometheus at {self.url} was not ready within {self.startup_timeout:.0f} s")

    def stop(self) -> None:
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        terminate(process, self.grace_seconds)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            body = json.load(error)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        return self._api("query", query=expr, **({"time": f"{at:.3f}"} if at is not None else {}))["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = SCRAPE_INTERVAL_SECONDS) -> list[dict]:
        """A range query: [{"metric": {...}, "values": [[t, "v"], ...]}, ...]."""
        return self._api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}")["result"]

    def targets_up(self) -> dict[str, bool]:
        return {t["scrapeUrl"]: t["health"] == "up" for t in self._api("targets")["activeTargets"]}
