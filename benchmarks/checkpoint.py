"""Checkpoint save, restore and background-save stall against bare s3transfer, on loopback S3.

    .venv/bin/python benchmarks/checkpoint.py [--model ViT-B/16]

One DeepSpeed rank (ZeRO-1, fp32 Adam on the CPU: ViT-B/16 makes a ~1 GB checkpoint) against
an embedded SeaweedFS. Prints:
  bench checkpoint_save_vs_raw_upload        bare upload seconds / our save seconds (local
                                             save + upload + sha256 + commit), same bytes
  bench checkpoint_restore_vs_raw_download   bare download seconds / our restore seconds
                                             (download + sha256 + load into the engine)
  bench checkpoint_async_stall_fraction      training time lost to a background save /
                                             time a synchronous save takes
"""

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from data_pipelines.embedded_s3 import EmbeddedS3  # noqa: E402
from data_pipelines.transfer import download_file, list_prefix, upload_file  # noqa: E402
from model import build_model  # noqa: E402
from orchestrator.checkpoint import CheckpointManager, step_name  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_for(model_name: str):
    import deepspeed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    deepspeed.init_distributed(dist_backend="gloo")
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ViT-B/16")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="vitscale-bench-ckpt-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    quiet = lambda message: None  # noqa: E731
    try:
        with EmbeddedS3(grace_seconds=2) as s3:
            factory = s3.client_factory()
            bucket = s3.create_bucket("bench")
            engine = engine_for(args.model)
            train_step(engine)

            # Our save, synchronous: local save + per-file upload with sha256 + manifest commit.
            manager = CheckpointManager(f"{bucket}/ours", staging_dir=f"{work}/staging", factory=factory, log=quiet)
            start = time.perf_counter()
            manager.save(engine, 1, loader_state={}, config={})
            manager.wait()
            ours_save = time.perf_counter() - start
            assert manager.last_committed_step == 1, manager.last_error
            total_bytes = sum(list_prefix(f"{bucket}/ours", factory).values())

            # The same bytes, bare s3transfer, files already on local disk.
            engine.save_checkpoint(f"{work}/raw", tag="t", save_latest=False)
            files = sorted(os.listdir(f"{work}/raw/t"))
            start = time.perf_counter()
            for name in files:
                upload_file(f"{work}/raw/t/{name}", f"{bucket}/raw/{name}", factory)
            raw_upload = time.perf_counter() - start

            start = time.perf_counter()
            for name in files:
                download_file(f"{bucket}/raw/{name}", f"{work}/down/{name}", factory)
            raw_download = time.perf_counter() - start

            start = time.perf_counter()
            restored = manager.restore(engine)
            ours_restore = time.perf_counter() - start
            assert restored is not None and restored.step == 1

            # Stall: a background save while training goes on vs the synchronous save above.
            manager.save(engine, 2, loader_state={}, config={})
            stall = manager.last_stall_seconds
            steps = 0
            while manager._thread is not None and manager._thread.is_alive():
                train_step(engine)
                steps += 1
            manager.close()
            assert manager.last_committed_step == 2, manager.last_error

            print(f"# {args.model}: {total_bytes / 1e9:.2f} GB; save {ours_save:.2f} s vs raw upload {raw_upload:.2f} s; "
                  f"restore {ours_restore:.2f} s vs raw download {raw_download:.2f} s; background save stalled "
                  f"training {stall:.2f} s while {steps} steps ran")
            print(f"bench checkpoint_save_vs_raw_upload {raw_upload / ours_save:.3f}")
            print(f"bench checkpoint_restore_vs_raw_download {raw_download / ours_restore:.3f}")
            print(f"bench checkpoint_async_stall_fraction {stall / ours_save:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
