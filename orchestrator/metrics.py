"""Prometheus metrics of a run: one table of families, served over HTTP by every worker and the driver.

Every family is prefixed `vitscale_`. Worker families carry the labels `run`, `rank`, `node`;
driver families carry `run` and the labels of their own the table lists (`vitscale_run_info`
its `model` and `dataset`). Nothing unbounded (no step, no key, no pid, no error text) is ever
a label value.

The pretraining driver serves run info, workers and restarts (DriverMetrics). The fine-tuning
fan-out's driver serves the `vitscale_finetune_*` families (FanoutMetrics) under the
pretraining run's name: trials by `state` (four states) and accuracies by downstream `dataset`
(the fan-out's fixed list of names, such as "CIFAR10" or "VTAB/Caltech101"). Each trial is a
training run of its own whose workers serve the worker families under the trial's run name,
`<run>-ft-<dataset slug>-<stage>-lr<lr>`: a few dozen names per run (at most ~44), bounded too.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from typing import Any


@dataclasses.dataclass(frozen=True)
class Family:
    name: str        # as exposed (counters end in _total; histograms expose _bucket/_sum/_count)
    kind: str        # counter | gauge | histogram
    help: str
    source: str      # worker | driver
    labels: tuple[str, ...] = ()  # beyond WORKER_LABELS / DRIVER_LABELS (gauges only); each bounded


WORKER_LABELS = ("run", "rank", "node")
DRIVER_LABELS = ("run",)

FAMILIES: tuple[Family, ...] = (
    # progress and throughput
    Family("vitscale_step", "gauge", "Optimizer steps completed (falls back on a rollback).", "worker"),
    Family("vitscale_images_total", "counter", "Images trained on by this rank.", "worker"),
    Family("vitscale_images_per_second", "gauge", "Images per second of the whole run, from this rank's last step.", "worker"),
    Family("vitscale_step_seconds", "histogram", "Wall seconds of one optimizer step, data wait included.", "worker"),
    Family("vitscale_data_wait_seconds", "histogram", "Seconds one optimizer step waited for its batches.", "worker"),
    Family("vitscale_mfu_ratio", "gauge", "Model FLOPs utilisation estimate: model FLOPs per second over the device's peak.", "worker"),
    # training quality
    Family("vitscale_loss", "gauge", "Training loss of the last optimizer step.", "worker"),
    Family("vitscale_learning_rate", "gauge", "Learning rate of the last optimizer step.", "worker"),
    Family("vitscale_grad_norm", "gauge", "Global gradient norm of the last optimizer step, before clipping.", "worker"),
    Family("vitscale_nonfinite_steps_total", "counter", "Micro-batches skipped because the loss was not finite.", "worker"),
    Family("vitscale_rollbacks_total", "counter", "Rollbacks to the last committed checkpoint.", "worker"),
    # resources and data
    Family("vitscale_accelerator_memory_bytes", "gauge", "Accelerator memory in use (process resident memory on CPU).", "worker"),
    Family("vitscale_accelerator_memory_peak_bytes", "gauge", "Peak accelerator memory (peak resident memory on CPU).", "worker"),
    Family("vitscale_samples_skipped_total", "counter", "Samples skipped as corrupt or missing from their shard.", "worker"),
    # checkpoints
    Family("vitscale_checkpoint_save_seconds", "histogram", "Training seconds one checkpoint save took (the stall).", "worker"),
    Family("vitscale_checkpoint_upload_seconds", "histogram", "Seconds one background checkpoint upload took.", "worker"),
    Family("vitscale_checkpoint_uploaded_bytes_total", "counter", "Checkpoint bytes uploaded by this rank.", "worker"),
    Family("vitscale_checkpoint_failures_total", "counter", "Checkpoint saves that failed to commit.", "worker"),
    Family("vitscale_checkpoint_retention_failures_total", "counter",
           "Deletions of old checkpoints that failed after a commit (the commit stands; retried at the next).", "worker"),
    Family("vitscale_checkpoint_last_committed_step", "gauge", "Step of the newest committed checkpoint (0: none yet).", "worker"),
    Family("vitscale_checkpoint_last_commit_timestamp_seconds", "gauge",
           "Unix time the newest checkpoint committed; the worker's start time until one does.", "worker"),
    # lifecycle
    Family("vitscale_worker_start_time_seconds", "gauge", "Unix time this worker process started training.", "worker"),
    Family("vitscale_run_info", "gauge", "Always 1; labels name the run's model and dataset.", "driver",
           ("model", "dataset")),
    Family("vitscale_workers", "gauge", "Training workers the run asked for.", "driver"),
    Family("vitscale_restarts_total", "counter", "Times the worker group was started again after a failure.", "driver"),
    # the fine-tuning fan-out (its driver's; `run` is the pretraining run)
    Family("vitscale_finetune_trials", "gauge",
           "Fine-tuning trials of the fan-out in each state (pending, running, done, failed).", "driver", ("state",)),
    Family("vitscale_finetune_best_heldout_accuracy", "gauge",
           "Best held-out accuracy (fraction) of the dataset's learning-rate sweep so far.", "driver", ("dataset",)),
    Family("vitscale_finetune_test_accuracy", "gauge",
           "Test accuracy (fraction) of the dataset's final trial, once it finished.", "driver", ("dataset",)),
)

FAMILY_NAMES = tuple(f.name for f in FAMILIES)
# What each exporter serves. DriverMetrics adds run info and restarts, which it builds itself.
WORKER_FAMILIES = tuple(f.name for f in FAMILIES if f.source == "worker")
FANOUT_FAMILIES = tuple(n for n in FAMILY_NAMES if n.startswith("vitscale_finetune_"))
DRIVER_FAMILIES = tuple(f.name for f in FAMILIES if f.source == "driver" and f.name not in FANOUT_FAMILIES
                        and f.name not in ("vitscale_run_info", "vitscale_restarts_total"))
TRIAL_STATES = ("pending", "running", "done", "failed")

# Histogram buckets (seconds), from a fast CPU step to a slow checkpoint of a huge model.
BUCKETS = {
    "vitscale_step_seconds": (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0),
    "vitscale_data_wait_seconds": (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0),
    "vitscale_checkpoint_save_seconds": (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
    "vitscale_checkpoint_upload_seconds": (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0),
}

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s), matched against
# torch.cuda.get_device_name(). Anything else is measured (see `device_peak_flops`).
DATASHEET_PEAK_FLOPS = (
    ("B200", 2.25e15), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
)


def metrics_port(config_port: int, local_rank: int | None) -> int:
    """The driver serves on `config_port`, the worker with local rank i on config_port + 1 + i."""
    return config_port if local_rank is None else config_port + 1 + local_rank


def bind_address(setting: str) -> str | None:
    """`metrics_address` as an address to bind: "node" is this Ray node's IP (the pod IP on
    Kubernetes), "off" serves nothing (None), anything else is taken as given."""
    if setting == "off":
        return None
    if setting == "node":
        import ray.util

        return ray.util.get_node_ip_address()
    return setting


def device_peak_flops(device: "torch.device", dtype: "torch.dtype") -> tuple[float, str]:
    """Peak FLOP/s for MFU, and where the figure comes from: the datasheet for known GPUs,
    otherwise a measured matrix-multiply rate in `dtype` (an achievable, not a theoretical,
    peak): the best of five 50-ms windows, so that a neighbour busy for part of the 0.25 s
    (the other ranks of a node start together) does not set it low for the whole run."""
    import time

    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in DATASHEET_PEAK_FLOPS:
            if key in name:
                return peak, f"datasheet ({name})"
    n = 1024 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = 0.0
    for _ in range(5):
        runs, began = 0, time.perf_counter()
        while runs == 0 or time.perf_counter() - began < 0.05:
            torch.mm(a, b)
            runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * n**3 * runs / (time.perf_counter() - began))
    return best, f"measured {n}x{n} matmul on {device.type}"


def accelerator_memory(device: "torch.device") -> tuple[int, int]:
    """(in use, peak) bytes: the CUDA allocator's on a GPU, the process's resident memory on CPU."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    with open("/proc/self/statm") as f:
        resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resident, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Exporter:
    """A private registry of `families` served over HTTP; `log(metrics, step)` / `close()` like
    any logger. `labels` are the values every series carries (run, and rank and node on a worker)."""

    def __init__(self, families: tuple[str, ...], labels: dict[str, str], *, address: str | None, port: int):
        from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector,
                                       disable_created_metrics)

        disable_created_metrics()  # no *_created series: they double every counter and histogram
        self.labels = labels
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._metrics: dict[str, Any] = {}
        self._totals: dict[str, float] = {}
        for family in map(_family, families):
            names = tuple(labels) + family.labels
            if family.kind == "counter":
                metric = Counter(family.name.removesuffix("_total"), family.help, names, registry=self.registry)
            elif family.kind == "histogram":
                metric = Histogram(family.name, family.help, names, buckets=BUCKETS[family.name], registry=self.registry)
            else:
                metric = Gauge(family.name, family.help, names, registry=self.registry)
            # Counters and histograms start at zero; a gauge appears once it has a value (a loss
            # of 0 before the first step would be a lie on the dashboard). A family with labels of
            # its own is a gauge, set through `_child`.
            self._metrics[family.name] = (family.kind, metric.labels(**labels) if family.kind != "gauge" else metric)
        self.address, self.port, self._server = address, port, None
        if address is not None:
            self._serve()

    def _serve(self) -> None:
        """prometheus_client's WSGI app, served by one long-lived thread that answers scrapes in
        turn. Its own `start_http_server` starts a thread per scrape, and a thread starting or
        ending while the DataLoader forks its workers can hang the child in Python 3.11's fork
        (see train_loop._next_batch)."""
        import socket
        import threading
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        from prometheus_client import make_wsgi_app

        class Quiet(WSGIRequestHandler):
            timeout = 10  # a client that stalls cannot hold the other scrapes up for long

            def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
                pass

        class Server(WSGIServer):
            address_family = socket.AF_INET6 if ":" in (self.address or "") else socket.AF_INET

        try:
            server = make_server(self.address, self.port, make_wsgi_app(self.registry), Server, handler_class=Quiet)
        except OSError as error:
            raise MetricsError(f"cannot serve metrics on {self.address}:{self.port}: {error.strerror or error}; "
                               f"set metrics_port to a free port or metrics_address=off") from None
        threading.Thread(target=server.serve_forever, name="metrics-exporter", daemon=True).start()
        self._server = server

    @property
    def url(self) -> str | None:
        return None if self._server is None else f"http://{self.address}:{self._server.server_port}/metrics"

    def _child(self, name: str, **labels: str):
        """The series of gauge `name` with these values of its own labels."""
        return self._metrics[name][1].labels(**self.labels, **labels)

    def log(self, metrics: dict[str, float | list[float]], step: int | None = None) -> None:
        """Keys are family names: a gauge is set, a histogram observes the value (or each value
        of a list), a counter is given its running total and advances by the difference."""
        for name, value in metrics.items():
            kind, metric = self._metrics[name]
            if kind == "gauge":
                metric.labels(**self.labels).set(value)
            elif kind == "histogram":
                for v in value if isinstance(value, (list, tuple)) else [value]:
                    metric.observe(v)
            else:
                delta = value - self._totals.get(name, 0)
                self._totals[name] = value
                if delta > 0:
                    metric.inc(delta)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class MetricsError(RuntimeError):
    """Metrics cannot be served as configured."""


class WorkerMetrics(_Exporter):
    """One training worker's families, labelled run / rank / node."""

    def __init__(self, run: str, rank: int, node: str, *, address: str | None, port: int):
        super().__init__(WORKER_FAMILIES, {"run": run, "rank": str(rank), "node": node}, address=address, port=port)


class DriverMetrics(_Exporter):
    """The driver's families: run info, the workers asked for, worker-group restarts.

    `starts` is called at scrape time and returns how many times the worker group has started
    (the first start is not a restart)."""

    def __init__(self, run: str, *, model: str, dataset: str, workers: int, starts, address: str | None, port: int):
        from prometheus_client import Gauge
        from prometheus_client.registry import Collector

        super().__init__(DRIVER_FAMILIES, {"run": run}, address=None, port=port)
        info = _family("vitscale_run_info")
        Gauge(info.name, info.help, DRIVER_LABELS + info.labels,
              registry=self.registry).labels(run=run, model=model, dataset=dataset).set(1)
        self.log({"vitscale_workers": workers})

        class Restarts(Collector):
            def collect(self):
                from prometheus_client.core import CounterMetricFamily

                family = CounterMetricFamily("vitscale_restarts", _family("vitscale_restarts_total").help, labels=["run"])
                try:
                    family.add_metric([run], max(0, starts() - 1))
                except Exception:  # noqa: BLE001 - the counter is absent from a scrape rather than wrong
                    return
                yield family

        self.registry.register(Restarts())
        self.address = address
        if address is not None:
            self._serve()


class FanoutMetrics(_Exporter):
    """The fine-tuning fan-out driver's families, labelled with the pretraining run's name (the
    trials' own workers serve the worker families under their trial run names).

        metrics = FanoutMetrics("vit-b-16-jft-300m", address=bind_address(setting), port=metrics_port(9400, None))
        metrics.set_trials(pending=40, running=4, done=0, failed=0)
        metrics.set_best_heldout("CIFAR10", 0.981)
        metrics.set_test_accuracy("CIFAR10", 0.985)

    Accuracies are fractions. A dataset's accuracy series appears once it is first set."""

    def __init__(self, run: str, *, address: str | None, port: int):
        super().__init__(FANOUT_FAMILIES, {"run": run}, address=address, port=port)

    def set_trials(self, pending: int, running: int, done: int, failed: int) -> None:
        """How many trials are in each state now; from the first call on, all four states are
        served, 0 included (the alert on failed trials also resolves on a 0)."""
        for state, count in zip(TRIAL_STATES, (pending, running, done, failed)):
            self._child("vitscale_finetune_trials", state=state).set(count)

    def set_best_heldout(self, dataset: str, accuracy: float) -> None:
        """The best held-out accuracy among `dataset`'s finished sweep trials so far."""
        self._child("vitscale_finetune_best_heldout_accuracy", dataset=dataset).set(accuracy)

    def set_test_accuracy(self, dataset: str, accuracy: float) -> None:
        """The test accuracy of `dataset`'s final trial."""
        self._child("vitscale_finetune_test_accuracy", dataset=dataset).set(accuracy)


def _family(name: str) -> Family:
    return next(f for f in FAMILIES if f.name == name)


class WorkerGroupStarts:
    """How many times a run's worker group has started: rank 0 records each start under a key
    prefix the driver picks per run in the Ray cluster's key-value store (the GCS's; what Ray's
    own libraries keep such state in), and the driver's restart counter counts the keys. No
    actor, so no Ray worker process of its own beside the run (each costs ~80 MB and ~1% of a
    core). The prefix is new per driver, so a resumed run's count starts afresh."""

    NAMESPACE = "vitscale"

    def __init__(self, prefix: str):
        self.prefix = prefix

    @classmethod
    def for_run(cls, run: str) -> "WorkerGroupStarts":
        return cls(f"worker-group-starts/{run}/{uuid.uuid4().hex}/")

    def record(self) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(self.prefix + uuid.uuid4().hex, b"", namespace=self.NAMESPACE)

    def count(self) -> int:
        from ray.experimental import internal_kv

        return len(internal_kv._internal_kv_list(self.prefix, namespace=self.NAMESPACE))

    def clear(self) -> None:
        from ray.experimental import internal_kv

        if internal_kv._internal_kv_initialized():
            internal_kv._internal_kv_del(self.prefix, del_by_prefix=True, namespace=self.NAMESPACE)
