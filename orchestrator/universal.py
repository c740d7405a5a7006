"""Resuming on another number of workers: DeepSpeed's universal checkpoint, made on the fly.

    restored = manager.restore(engine)   # CheckpointManager comes here when the world size changed

A ZeRO checkpoint is cut into one optimizer shard per rank of the run that wrote it, and
DeepSpeed loads it only on that many ranks. When a run resumes on another number of
workers, CheckpointManager downloads all of the step's files (each checked against the
manifest's sha256 before anything reads it); they are converted with DeepSpeed's own
`ds_to_universal` (one file per parameter and state: fp32 weights, Adam's moments, step)
and loaded with DeepSpeed's universal loading, which cuts every tensor anew for this
world size. One rank per machine (the lowest on that host name) downloads and converts, into
scratch space under the staging folder its other ranks share, and they all load from there;
it is gone once every rank has loaded. So a resize costs each machine the whole checkpoint:
downloaded, read, and on its disk twice at the peak (the download, then the universal copy),
where an ordinary restore fetches a rank's own shard. Without ZeRO (stage 0) nothing is
partitioned and the files load as they are.

DeepSpeed's converter and universal loader call `torch.load(weights_only=False)`;
`weights_only_loads` makes every load they do weights-only with DeepSpeed's allow-list, so
loading a checkpoint still never unpickles anything but tensors and a few known classes.

A rank that existed in the old run restores its own RNG state. A rank that did not gets a
fresh one derived from rank 0's saved state and its own number: resuming twice draws the
same numbers, and no two ranks draw the same ones.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import random
import shutil
from typing import Callable

import numpy as np
import torch

from orchestrator.checkpoint import (
    _RANK_FILE, CheckpointError, Manifest, Restored, _deepspeed_safe_globals, checkpoint_files, restore_rng, step_name,
)

# Processes per conversion pass. One keeps the conversion in this process, where the
# weights-only loads apply (a child process would not inherit them), and every rank is
# converting at the same time anyway.
CONVERT_WORKERS = 1


@contextlib.contextmanager
def weights_only_loads():
    """Every `torch.load` in the block is weights-only (DeepSpeed's classes allowed), whatever
    its caller passes: DeepSpeed's converter and universal loader pass weights_only=False.
    Process-wide while it lasts, which only makes other loads stricter; `restore` runs it on
    the main thread before training starts."""
    real, allowed = torch.load, _deepspeed_safe_globals()

    def load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **pickle_load_args):
        # Per call: torch's allow-list is one global set, and leaving any safe_globals block
        # (ours or a caller's, nested) removes the classes it named.
        with torch.serialization.safe_globals(allowed):
            return real(f, map_location=map_location, weights_only=True, mmap=mmap, **pickle_load_args)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def convert(folder: str, output: str) -> None:
    """DeepSpeed's ds_to_universal from the checkpoint in `folder` to `output`, which must lie
    outside `folder` (the converter reads every file under its input); it also writes
    `latest_universal` beside `output`. Its progress output goes into a note on the error, if any."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=folder, output_folder=output, num_extract_workers=CONVERT_WORKERS,
        num_merge_workers=CONVERT_WORKERS, keep_temp_folder=False, strict=True,
        # Models that declare no UNIVERSAL_CHECKPOINT_INFO (ours) get the version-only default.
        inject_missing_state=True,
    )
    said = io.StringIO()
    try:
        with weights_only_loads(), contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            ds_to_universal.main(args)
    except Exception as error:
        error.add_note(f"ds_to_universal's last output:\n{said.getvalue()[-2000:]}")
        raise


def load_universal(engine, root: str, tag: str) -> None:
    """`engine.load_checkpoint` of the universal checkpoint `root/tag`, universal for this load only."""
    config = engine._config  # DeepSpeed reads "checkpoint": {"load_universal"} from here on every load
    was = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    checkpoint_files(engine)  # DeepSpeed's own loads of the model-state file: weights-only too
    try:
        with weights_only_loads():
            path, _ = engine.load_checkpoint(root, tag=tag, load_module_strict=True)
    finally:
        config.load_universal_checkpoint = was
    if path is None:
        raise CheckpointError(f"DeepSpeed found no universal checkpoint in {os.path.join(root, tag)}")


def restore_rng_for(manifest: Manifest, rank: int) -> str:
    """Restore this rank's RNG state from the manifest; says where it came from."""
    own = next((r for r in manifest.ranks if r.rank == rank), None)
    if own is not None:
        restore_rng(own.rng)
        return f"rank {rank} restored its own RNG state"
    first = min(manifest.ranks, key=lambda r: r.rank)
    seed = int.from_bytes(hashlib.sha256(f"{first.rng['torch']}/rank-{rank}".encode()).digest()[:8], "little")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return f"rank {rank} is new: its RNG state is derived from rank {first.rank}'s and its rank"


def restore_resized(engine, manifest: Manifest, *, folder: str, scratch: str, converts: bool, rank: int,
                    world_size: int, agree: Callable[[str | None], list[str]] | None = None,
                    log: Callable[[str], None] = print) -> Restored:
    """Load the step in `folder` (every file of it, verified) into `engine` on this world size.

    One rank per machine (`converts`) has downloaded the step into `folder` and converts it
    into `scratch`, which its other ranks share: they load what it made. `agree(problem)`
    gathers every rank's problem (None: fine; the manager's `_gather_problems`) after the
    conversion and again after the load, so that all ranks stop together rather than some
    waiting in a collective for one that failed, and so that the converting rank removes
    `scratch` (with `folder` in it) only once every rank has loaded. The loader state handed
    back is this rank's own, or {} for a rank the old run did not have: a resized run takes
    its data position from every rank's state (`manifest.ranks`).
    """
    agree = agree or (lambda problem: [problem] if problem else [])
    step, tag = manifest.step, step_name(manifest.step)
    root = os.path.join(scratch, "universal")
    partitioned = any(_RANK_FILE.search(f.name) for f in manifest.files)
    what = (f"checkpoint step {step} ({_workers(manifest.world_size)}) could not be resumed on "
            f"{_workers(world_size)} (ZeRO stage {engine.zero_optimization_stage()})")
    try:
        if partitioned:
            failure = None
            if converts:
                try:
                    convert(folder, os.path.join(root, tag))
                except Exception as error:
                    failure = error
                shutil.rmtree(folder, ignore_errors=True)  # the universal copy replaces it
            problems = agree(f"rank {rank}: {type(failure).__name__}: {_first_line(failure)}" if failure else None)
            if problems:
                raise CheckpointError(f"{what}: DeepSpeed's ds_to_universal failed on {problems[0]}") from failure
        failure = None
        try:
            if partitioned:
                load_universal(engine, root, tag)
            else:  # no ZeRO shards: every rank wrote the whole state, which loads on any world size
                checkpoint_files(engine)
                with weights_only_loads():
                    path, _ = engine.load_checkpoint(os.path.dirname(folder), tag=os.path.basename(folder),
                                                     load_module_strict=True)
                if path is None:
                    raise CheckpointError(f"DeepSpeed found no checkpoint in {folder}")
        except Exception as error:
            failure = error
        problems = agree(f"rank {rank}: {type(failure).__name__}: {_first_line(failure)}" if failure else None)
        if problems:
            raise CheckpointError(f"{what}: DeepSpeed could not load it on {problems[0]}") from failure
    finally:
        if converts:
            shutil.rmtree(scratch, ignore_errors=True)
    rng = restore_rng_for(manifest, rank)
    how = (f"converted from {_workers(manifest.world_size)} to {world_size}" if partitioned else
           f"written by {_workers(manifest.world_size)}, loaded on {world_size}: no ZeRO shards to convert")
    log(f"resumed from step {step} ({how}); {rng}")
    own = next((r for r in manifest.ranks if r.rank == rank), None)
    return Restored(step=step, loader_state=own.loader_state if own is not None else {}, manifest=manifest)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"


def _workers(count: int) -> str:
    return f"{count} worker" if count == 1 else f"{count} workers"
