"""A pretraining run's progress bar in its driver: steps done of the run's steps, with the loss,
learning rate and images per second that rank 0 last logged.

    with progress_bar(ray, run, total=config.steps, initial=resumed_at) as key:
        ...                                     # the driver: the key goes to the workers
    report(key, row)                            # rank 0, at each progress line (log_every)

Rank 0 already writes a progress line every `log_every` steps; it also puts that row under a key
in the Ray cluster's key-value store (the GCS's, as metrics.WorkerGroupStarts does: no actor, so
no Ray worker process beside the run). A thread of the driver reads the key twice a second and
moves a tqdm bar to the step it holds. The bar follows the step rank 0 reports across worker
restarts and resumes (backwards too, after a rollback to a checkpoint). As tqdm does by default,
it is drawn only on a terminal: logs and CI output keep their lines, unchanged.
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from typing import Any, Iterator

NAMESPACE = "vitscale"


def report(key: str | None, row: dict[str, Any]) -> None:
    """Rank 0's newest progress row, for its driver's bar. Nothing for a run without one (outside
    Ray); a store that cannot take it now costs the bar an update, never the run a step."""
    if not key:
        return
    from ray.experimental import internal_kv

    with contextlib.suppress(Exception):
        internal_kv._internal_kv_put(key, json.dumps(row).encode(), overwrite=True, namespace=NAMESPACE)


def report_fatal(key: str | None, message: str) -> None:
    """Any rank: the run cannot go on and restarting its workers will not change that (a
    refusal from S3, a staging disk too small). The driver stops the run with this line instead
    of letting Ray Train restart the group into the same wall (progress_bar)."""
    if not key:
        return
    from ray.experimental import internal_kv

    with contextlib.suppress(Exception):
        internal_kv._internal_kv_put(f"{key}/fatal", message.encode(), overwrite=False, namespace=NAMESPACE)


def fatal_reported(key: str | None) -> str | None:
    """The line a worker reported with report_fatal under `key`, or None (none, or no store)."""
    if not key:
        return None
    from ray.experimental import internal_kv

    try:
        value = internal_kv._internal_kv_get(f"{key}/fatal", namespace=NAMESPACE)
    except Exception:
        return None
    return value.decode(errors="replace") if value else None


def forget_fatal(key: str | None) -> None:
    if key:
        from ray.experimental import internal_kv

        with contextlib.suppress(Exception):
            internal_kv._internal_kv_del(f"{key}/fatal", namespace=NAMESPACE)


def latest(key: str) -> dict[str, Any] | None:
    """The row rank 0 last reported under `key`, or None."""
    from ray.experimental import internal_kv

    value = internal_kv._internal_kv_get(key, namespace=NAMESPACE)
    return json.loads(value) if value else None


def describe(row: dict[str, Any]) -> dict[str, str]:
    """The bar's postfix for a row: loss, lr, img/s."""
    shown = {}
    for name, label, form in (("loss", "loss", ".3g"), ("lr", "lr", ".3g"), ("images_per_second", "img/s", ".0f")):
        value = row.get(name)
        if isinstance(value, (int, float)):
            shown[label] = format(value, form)
    return shown


class Progress(str):
    """The key the workers report under (a str, as worker_config takes it); `fatal`: the line a
    worker reported with report_fatal, once the driver has seen it."""

    fatal: str | None = None
    last: dict | None = None  # the newest row rank 0 reported (run_pretraining returns it)


@contextlib.contextmanager
def progress_bar(ray, run: str, *, total: int, initial: int = 0, interval: float = 0.5, file=None,
                 disable: bool | None = None) -> Iterator[Progress]:
    """A tqdm bar "pretraining <run>" over the run's steps, moved by a thread that reads rank 0's
    reports; yields their key (for the workers: worker_config(progress=...)). On the way out the
    bar takes the last report, closes, and the key is deleted.

    The same thread watches for a worker's report_fatal: it then sets the key's `fatal` and
    interrupts the main thread as Ctrl-C does (Ray Train's handler aborts the run's controller
    and workers), so that `fit` returns at once; the caller reports `fatal`, not a signal."""
    from ray.experimental import internal_kv
    from tqdm import tqdm

    key = Progress(f"progress/{run}/{uuid.uuid4().hex}")
    bar = tqdm(total=total, initial=initial, desc=f"pretraining {run}", unit="step", dynamic_ncols=True, file=file,
               disable=disable)
    last: list[dict | None] = [None]

    def follow() -> None:
        if not ray.is_initialized():  # shut down (a stopped run): never start a Ray again by asking
            return
        try:
            row = latest(key)
            fatal = None if key.fatal else internal_kv._internal_kv_get(f"{key}/fatal", namespace=NAMESPACE)
        except Exception:  # the GCS is gone (the run is ending): keep the bar as it is
            return
        if fatal and not stop.is_set():
            import _thread
            import signal

            key.fatal = fatal.decode(errors="replace")
            _thread.interrupt_main(signal.SIGINT)
        if row is None or row == last[0]:
            return
        last[0] = key.last = row
        bar.update(int(row.get("step", bar.n)) - bar.n)
        bar.set_postfix(describe(row), refresh=True)

    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            follow()

    thread = threading.Thread(target=loop, name="vitscale-progress", daemon=True)
    thread.start()
    try:
        yield key
    finally:
        stop.set()
        thread.join(timeout=5)
        follow()  # a last report that came after the thread's last look
        bar.close()
        if ray.is_initialized():
            with contextlib.suppress(Exception):
                internal_kv._internal_kv_del(key, namespace=NAMESPACE)
                internal_kv._internal_kv_del(f"{key}/fatal", namespace=NAMESPACE)
