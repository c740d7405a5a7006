"""Turns for the fan-out's trials: at most N train at once while the next one gets ready.

    gate = TrialGate.start(ray, turns=2)        # the fan-out's driver, per Tuner
    wait_for_turn(gate_name, trial)             # each rank of a trial, ready to train
    leave(gate_name, trial)                     # rank 0 once result.json is written; the trial's
                                                # driver and the Tune callback again (idempotent)

Ray Tune runs one trial more than the fan-out trains at once (`max_concurrent_trials` + 1).
That trial's driver, its Ray Train controller and, where the cluster has the resources left,
its workers start while the others train: on a CPU node ~10 s of process starts and imports
per trial (Ray Train v2 starts a controller and then its workers, each a fresh process
importing ray.train and torch), which would otherwise come between one trial's last step and
the next one's first. Its workers then wait here with their engine built and their checkpoint
restored until a running trial ends. Where the cluster has no room for them (its accelerators
all taken by the running trials), Ray's placement group holds them back as before and only
the driver and controller start early.

A turn belongs to a trial, not to a process: a trial whose workers fail and restart (Ray
Train's FailureConfig) keeps its turn, and every rank of a trial goes in on it.
"""

from __future__ import annotations

import asyncio
import time
import uuid


class TrialGate:
    """The turns, in an async Ray actor (no CPU) that the fan-out's driver owns."""

    def __init__(self, turns: int):
        self.turns = turns
        self.holders: set[str] = set()
        self._changed: asyncio.Condition | None = None

    @property
    def free(self) -> int:
        return self.turns - len(self.holders)

    @property
    def changed(self) -> asyncio.Condition:
        if self._changed is None:  # made in the actor's event loop
            self._changed = asyncio.Condition()
        return self._changed

    async def enter(self, trial: str) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: trial in self.holders or self.free > 0)
            self.holders.add(trial)

    async def leave(self, trial: str) -> None:
        async with self.changed:
            if trial in self.holders:
                self.holders.discard(trial)
                self.changed.notify_all()

    async def state(self) -> dict:
        return {"free": self.free, "holders": sorted(self.holders)}

    @staticmethod
    def start(ray, turns: int):
        """The actor, under a name of its own that the trials' workers look up: (handle, name)."""
        name = f"vitscale-trial-gate-{uuid.uuid4().hex[:12]}"
        handle = ray.remote(TrialGate).options(name=name, num_cpus=0, max_concurrency=1000).remote(turns)
        ray.get(handle.state.remote())  # up before any trial asks for it
        return handle, name


def wait_for_turn(name: str, trial: str) -> float:
    """Blocks until the trial may train; returns the seconds waited."""
    import ray

    began = time.perf_counter()
    ray.get(ray.get_actor(name).enter.remote(trial))
    return time.perf_counter() - began


def leave(name: str, trial: str) -> None:
    """Gives the trial's turn back (nothing if it holds none, or the gate is gone)."""
    import ray

    try:
        ray.get(ray.get_actor(name).leave.remote(trial), timeout=30)
    except (ValueError, ray.exceptions.RayError):  # the fan-out has ended and its gate with it
        pass
