"""Checkpoint save, restore and background-save stall against bare s3transfer, on loopback S3.

    .venv/bin/python benchmarks/checkpoint.py [--model ViT-B/16]

One DeepSpeed rank (ZeRO-1, fp32 Adam on the CPU: ViT-B/16 makes a ~1.4 GB checkpoint) against
an embedded SeaweedFS on 127.0.0.1 that keeps its store in /dev/shm, as the local files are.
The baseline is bare s3transfer (`client.upload_file` / `client.download_file`, no hashing)
of the very files DeepSpeed writes for the same state, with the same TransferConfig as ours,
measured in the same run. An untimed bare upload and an untimed save warm things up first, and
each comparison runs ours, bare, bare, ours (restores: three times over, after an untimed
one of each) so that a drift in the shared machine's speed weighs on both sides alike; a
ratio is the sum of the bare times over the sum of ours. Prints:
  bench checkpoint_save_vs_raw_upload        bare upload seconds / our synchronous save seconds
                                             (`save` + `wait`: snapshot, serialization (the
                                             tensors by reference), upload from there with
                                             sha256, rank report, manifest commit,
                                             retention), after an untimed first save that
                                             allocated the snapshot buffers every later save
                                             of a run reuses
  bench checkpoint_restore_vs_raw_download   bare download seconds / our restore seconds
                                             (newest manifest, ranged download of all its
                                             files into memory with sha256 verify,
                                             weights-only load into the engine: until
                                             training can go on). The memory the restore no
                                             longer needs is given back after it, in the
                                             background (printed; ~0.2 s for ViT-B/16),
                                             and that is over before the next timed transfer
  bench checkpoint_async_stall_fraction      seconds the training thread is blocked in a
                                             background `save` (the snapshot copy) / mean
                                             synchronous save seconds. The upload thread and
                                             the server still compete with training for CPU
                                             on a small machine; that slowdown is not counted.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from data_pipelines.embedded_s3 import EmbeddedS3  # noqa: E402
from data_pipelines.s3 import parse_s3_url  # noqa: E402
from data_pipelines.transfer import list_prefix, transfer_config  # noqa: E402
from model import build_model  # noqa: E402
from orchestrator.checkpoint import CheckpointManager  # noqa: E402


def engine_for(model_name: str):
    import deepspeed

    from orchestrator.engine import init_one_rank

    init_one_rank(use_gpu=False)
    model = build_model(model_name, 1000, image_size=32 if model_name.endswith("/4") else 64)
    config = {
        "train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "zero_optimization": {"stage": 1},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def train_step(engine) -> None:
    size = engine.module.image_size
    loss = engine(torch.randn(2, 3, size, size)).logsumexp(-1).mean()
    engine.backward(loss)
    engine.step()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ViT-B/16")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="vitscale-bench-ckpt-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    quiet = lambda message: None  # noqa: E731
    try:
        # The server's store in memory too (tmpfs where there is one): on disk, this VM's
        # proactive page reclaim made the same download take 1.7 s once and 3.4 s the next.
        with EmbeddedS3(f"{work}/s3", grace_seconds=2) as s3:
            factory = s3.client_factory()
            bucket = s3.create_bucket("bench")
            client, name_of_bucket, config = factory.client(), parse_s3_url(bucket).bucket, transfer_config()
            engine = engine_for(args.model)
            train_step(engine)

            # The bare side's files: what DeepSpeed writes for the same state, on local disk.
            engine.save_checkpoint(f"{work}/raw", tag="t", save_latest=False)
            files = sorted(os.listdir(f"{work}/raw/t"))

            def raw_upload(prefix: str) -> None:
                for name in files:
                    client.upload_file(f"{work}/raw/t/{name}", name_of_bucket, f"{prefix}/{name}", Config=config)

            def raw_download() -> None:
                for name in files:
                    client.download_file(name_of_bucket, f"raw-1/{name}", f"{work}/down/{name}", Config=config)

            os.makedirs(f"{work}/down")
            raw_upload("warm-up")  # untimed: the server grows its first volumes here

            manager = CheckpointManager(f"{bucket}/ours", staging_dir=f"{work}/staging", factory=factory, log=quiet)

            def ours_save(step: int):
                def save() -> None:
                    manager.save(engine, step, loader_state={}, config={})
                    manager.wait()
                    assert manager.last_committed_step == step, manager.last_error
                return save

            # Untimed, as the bare side's first upload: the first save allocates the host
            # buffers every later save snapshots into (0.26-0.39 s of page faults here, once
            # per run), so the timed saves are the steady state of a run's hundreds of saves.
            ours_save(1)()
            first_stall = manager.last_stall_seconds
            saves, uploads, stalls = [], [], []
            saves.append(timed(ours_save(2)))
            stalls.append(manager.last_stall_seconds)
            uploads.append(timed(lambda: raw_upload("raw-1")))
            uploads.append(timed(lambda: raw_upload("raw-2")))
            saves.append(timed(ours_save(3)))
            stalls.append(manager.last_stall_seconds)
            total_bytes = sum(size for name, size in list_prefix(f"{bucket}/ours", factory).items()
                              if name.startswith("step-00000003/"))
            raw_bytes = sum(os.path.getsize(f"{work}/raw/t/{name}") for name in files)

            restores, downloads = [], []

            def ours_restore() -> None:
                restored = manager.restore(engine)
                assert restored is not None and restored.step == 3

            releases = []

            def released() -> None:
                # Untimed: what the restore gives back in the background while training would
                # go on; over before the next timed transfer, so that it slows neither side.
                manager.wait()
                releases.append(manager.restore_release_seconds)

            # Untimed, one of each: the server's first read of an object was the slowest
            # (SeaweedFS looks its chunks up and caches them), which fell on whichever side
            # came first.
            raw_download()
            ours_restore()
            released()
            releases.clear()
            for _ in range(3):  # a restore is short next to this machine's swings: three rounds
                restores.append(timed(ours_restore))
                released()
                downloads.append(timed(raw_download))
                downloads.append(timed(raw_download))
                restores.append(timed(ours_restore))
                released()

            # Stall: a background save while training goes on.
            manager.save(engine, 4, loader_state={}, config={})
            stall = manager.last_stall_seconds
            steps = 0
            while manager._thread is not None and manager._thread.is_alive():
                train_step(engine)
                steps += 1
            manager.close()
            assert manager.last_committed_step == 4, manager.last_error

            listing = lambda xs: "/".join(f"{x:.2f}" for x in xs)  # noqa: E731
            print(f"# {args.model}: {total_bytes / 1e9:.2f} GB per checkpoint (bare files {raw_bytes / 1e9:.2f} GB); "
                  f"save {listing(saves)} s vs bare upload {listing(uploads)} s; restore {listing(restores)} s vs "
                  f"bare download {listing(downloads)} s (after each restore, memory given back in the background: "
                  f"{listing(releases)} s); a background save blocked training {stall:.2f} s while "
                  f"{steps} steps ran (the synchronous saves' snapshot copies: {listing(stalls)} s; the untimed first "
                  f"save's, into fresh buffers: {first_stall:.2f} s)")
            print(f"# for reference, the restores with their background release counted: "
                  f"{sum(downloads) / (sum(restores) + sum(releases)):.3f} of the bare download's speed")
            print(f"bench checkpoint_save_vs_raw_upload {sum(uploads) / sum(saves):.3f}")
            print(f"bench checkpoint_restore_vs_raw_download {sum(downloads) / sum(restores):.3f}")
            print(f"bench checkpoint_async_stall_fraction {stall / (sum(saves) / len(saves)):.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
