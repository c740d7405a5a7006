"""One training worker's whole step, outside Ray, on this machine's GPU: `bench worker_step_vs_in_memory_step`.

    .venv/bin/python benchmarks/worker_step.py [--model ViT-B/16] [--batch 256] [--steps 12] [--compile] [--cpu]

A check of the worker's GPU path that needs neither Ray nor S3 (a GPU machine may have
neither): synthetic shards in a local folder; `train_loop._Worker`, the class Ray Train runs
on every worker, with `under_ray=False` in a process of its own (torch.distributed of one
rank: NCCL on a GPU, as Ray Train sets it up), streaming them through its DataLoader workers
as uint8 pixels, DeepSpeed as the recipe configures it (bf16, ZeRO-1), checkpoints to a local
folder and metrics on loopback. It trains `--steps` steps and commits a checkpoint; a second
worker process resumes from it ("resumed from step N") and trains `--steps` more.

The ratio: the median step of those workers (from their progress lines, every step logged;
warm-up and checkpoint steps left out) against the same engine and batch stepped on
in-memory tensors in another process. Without a GPU it says so and prints no figure; `--cpu`
runs the same on the CPU with a small model, to check the script.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WARM_UP = 3  # steps of each worker left out (the first steps, and a compile)


def run_config(args, data: str, checkpoints: str, max_steps: int):
    from orchestrator.config import resolve_pretrain_config

    overrides = {
        "model": args.model, "image_size": args.image_size, "workers": 1, "global_batch_size": args.batch,
        "micro_batch_size": args.batch, "num_classes": 10, "dropout": 0.0, "gpus_per_worker": 0.0 if args.cpu else 1.0,
        "torch_compile": args.compile, "data": data, "checkpoints": checkpoints, "run_name": "worker-step",
        "max_steps": max_steps, "checkpoint_every": args.steps, "log_every": 1, "data_workers": args.data_workers,
        "metrics_address": "127.0.0.1", "metrics_port": args.port, "train_examples": args.samples, "warmup_steps": 2,
        "epochs": 100,
    }
    return resolve_pretrain_config(args.model, "JFT-300M", overrides, dry_run=True)


def worker(args) -> None:
    """One worker process: train to `max_steps`, resuming from the newest checkpoint."""
    from orchestrator.engine import init_one_rank
    from orchestrator.train_loop import _Worker, worker_config

    init_one_rank(use_gpu=not args.cpu)
    config = run_config(args, args.data, args.checkpoints, args.max_steps)
    _Worker(worker_config(config, staging_dir=args.staging), rank=0, world_size=1).run()


def in_memory(args) -> None:
    """The same engine and batch on in-memory tensors; prints the median step seconds."""
    import torch

    from orchestrator.engine import build_engine, init_one_rank
    from orchestrator.objectives import classification_loss

    use_gpu = not args.cpu
    init_one_rank(use_gpu=use_gpu)
    config = run_config(args, "unused", "unused", args.steps)
    engine = build_engine(config, use_gpu=use_gpu)
    dtype = torch.bfloat16 if use_gpu else torch.float32
    x = torch.randn(args.batch, 3, config.image_size, config.image_size, device=engine.device, dtype=dtype)
    y = (torch.rand(args.batch, config.num_classes, device=engine.device) < 0.2).float()
    times = []
    for _ in range(WARM_UP + args.steps):
        began = time.perf_counter()
        loss = classification_loss(engine(x).float(), y, multi_label=True)
        engine.backward(loss)
        engine.step()
        loss.item()  # the worker waits for its loss every step too
        times.append(time.perf_counter() - began)
    print(f"SECONDS {statistics.median(times[WARM_UP:])}")


def spawn(role: str, args, **extra) -> str:
    argv = [sys.executable, os.path.abspath(__file__), "--role", role, *sys.argv[1:]]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        sys.exit(f"worker_step.py: the {role} process failed (exit {proc.returncode}):\n"
                 + proc.stdout[-3000:] + proc.stderr[-5000:])
    return proc.stdout


def step_seconds(log: str, batch: int, skip_steps: set[int]) -> list[float]:
    """Seconds of each logged step (images_per_second is the global batch over one step's
    seconds with log_every 1), the skipped steps left out."""
    out = []
    for step, rate in re.findall(r"^step (\d+) .*?images_per_second ([\d.e+]+)", log, re.M):
        if int(step) not in skip_steps:
            out.append(batch / float(rate))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="default: ViT-B/16 on a GPU, ViT-Ti/16 with --cpu")
    p.add_argument("--batch", type=int, default=None, help="default: 256 on a GPU, 8 with --cpu")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--data-workers", type=int, default=None, help="DataLoader processes (default: cores - 2, at most 12)")
    p.add_argument("--compile", action="store_true", help="the config's torch_compile")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (a check of the script, not a figure)")
    p.add_argument("--port", type=int, default=0, help="metrics port base (default: a free one)")
    for hidden in ("role", "data", "checkpoints", "staging", "max-steps", "samples"):
        p.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.model = args.model or ("ViT-Ti/16" if args.cpu else "ViT-B/16")
    args.batch = args.batch or (8 if args.cpu else 256)
    args.data_workers = args.data_workers if args.data_workers is not None else max(1, min(12, (os.cpu_count() or 2) - 2))
    args.samples = int(args.samples) if args.samples else args.batch * (2 * args.steps + 4)
    args.max_steps = int(args.max_steps) if args.max_steps else args.steps
    if args.role and not args.port:  # each worker process picks its own
        from orchestrator.local_prometheus import free_ports

        args.port = free_ports(2)
    if args.role == "worker":
        return worker(args)
    if args.role == "in-memory":
        return in_memory(args)

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("# no GPU on this machine: worker_step_vs_in_memory_step not measured (--cpu checks the script)")
        return
    from data_pipelines.synthetic import write_synthetic

    with tempfile.TemporaryDirectory(prefix="worker-step-") as tmp:
        data, checkpoints, staging = (os.path.join(tmp, d) for d in ("data", "checkpoints", "staging"))
        began = time.perf_counter()
        write_synthetic("multi_label", data, num_samples=args.samples, num_classes=10, image_size=32,
                        samples_per_shard=max(64, args.batch))
        print(f"# {args.samples} samples written in {time.perf_counter() - began:.1f} s")
        paths = {"data": data, "checkpoints": checkpoints, "staging": staging, "samples": args.samples}
        first = spawn("worker", args, max_steps=args.steps, **paths)
        second = spawn("worker", args, max_steps=2 * args.steps, **paths)
        resumed = f"resumed from step {args.steps}"
        if resumed not in second:
            sys.exit(f"worker_step.py: the second worker did not say '{resumed}':\n{second[-3000:]}")
        skip = set(range(1, WARM_UP + 1)) | set(range(args.steps + 1, args.steps + WARM_UP + 1)) | {args.steps, 2 * args.steps}
        worker_times = step_seconds(first, args.batch, skip) + step_seconds(second, args.batch, skip)
        if len(worker_times) < 4:
            sys.exit(f"worker_step.py: too few progress lines to time:\n{first[-2000:]}\n{second[-2000:]}")
        bare = float(re.search(r"^SECONDS (\S+)", spawn("in-memory", args), re.M).group(1))
    worker_seconds = statistics.median(worker_times)
    device = "CPU" if args.cpu else torch.cuda.get_device_name(0)
    print(f"# {args.model} batch {args.batch} {args.image_size}px on {device}{', compiled' if args.compile else ''}: "
          f"worker {worker_seconds * 1000:.1f} ms/step (median of {len(worker_times)}; {args.data_workers} data "
          f"workers), in-memory {bare * 1000:.1f} ms/step; {resumed}")
    tag = "worker_step_vs_in_memory_step" + ("_cpu_check" if args.cpu else "")
    print(f"bench {tag} {bare / worker_seconds:.3f}")


if __name__ == "__main__":
    main()
