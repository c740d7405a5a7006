"""Our orchestration overhead per training step, and DeepSpeed's own, on this machine.

    .venv/bin/python benchmarks/train_step.py [--model ViT-S/16] [--batch 8] [--steps 8]

1. `bench train_step_vs_bare_deepspeed`: the full orchestrated step (launch/pretrain.py: a
   Ray Train worker running DeepSpeed, streaming shards from a loopback S3, metrics and
   checkpoint hooks) against the same model, batch and DeepSpeed config stepped in a bare loop
   on in-memory tensors. The shards hold small images (decode is cheap next to a ViT-S/16
   step) so that the ratio measures orchestration, not decoding competing for the cores.
   Both sides run one worker with every core of the machine; the median seconds of a step
   after two warm-up steps (the orchestrated worker logs every step and reports it to Ray).
   A small shared machine drifts by several percent from one minute to the next, so the two
   alternate (`--rounds` orchestrated runs, each between two bare ones) and the ratio is the
   median bare step over the median orchestrated step (one disturbed bare run does not move it).
2. `bench deepspeed_vs_bare_torch_zero<N>`: the bare DeepSpeed loop at ZeRO-0/1/2 against a
   bare torch loop with the same AdamW (torch's fused CPU kernel, as orchestrator/engine.py
   configures DeepSpeed's on CPUs), model and batch (one process).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BARE = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
import torch
from orchestrator.config import resolve_pretrain_config
from orchestrator.engine import build_engine
from orchestrator.objectives import classification_loss
args = json.loads(sys.argv[1])
config = resolve_pretrain_config("ViT-B/16", "JFT-300M", args["overrides"], dry_run=True)
x = torch.randn(config.micro_batch_size, 3, config.image_size, config.image_size)
y = (torch.rand(config.micro_batch_size, config.num_classes) < 0.2).float()
if args["kind"] == "torch":
    from model import build_model
    torch.manual_seed(0)
    model = build_model(config.model, config.num_classes, image_size=config.image_size,
                        representation_size=config.representation_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1, fused=True)
    def step():
        loss = classification_loss(model(x), y, multi_label=True)
        opt.zero_grad(set_to_none=True); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
else:
    from orchestrator.engine import init_one_rank
    init_one_rank(use_gpu=False)
    engine = build_engine(config, use_gpu=False)
    def step():
        loss = classification_loss(engine(x), y, multi_label=True)
        engine.backward(loss); engine.step()
for _ in range(2):
    step()
times = []
for _ in range(args["steps"]):
    start = time.perf_counter(); step(); times.append(time.perf_counter() - start)
print("STEP_SECONDS", json.dumps(times))
"""


def bare_seconds(kind: str, overrides: dict, steps: int) -> float:
    out = subprocess.run([sys.executable, "-c", BARE.format(root=ROOT), json.dumps(
        {"kind": kind, "overrides": overrides, "steps": steps})], capture_output=True, text=True, timeout=1200)
    match = re.search(r"STEP_SECONDS (.*)", out.stdout)
    if not match:
        raise RuntimeError(f"bare {kind} loop failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return statistics.median(json.loads(match.group(1)))


def orchestrated_seconds(overrides: dict, batch: int, steps: int) -> float:
    """Median seconds per step after two warm-up steps, as for the bare loop: the worker logs
    every step (log_every=1), each line's images_per_second being that one step's rate."""
    from data_pipelines.embedded_s3 import EmbeddedS3
    from data_pipelines.synthetic import write_synthetic

    sets = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    with EmbeddedS3(grace_seconds=2) as s3:
        # 32 px JPEGs: decoding is negligible next to a ViT-S/16 step at 224 px.
        data = f"{s3.create_bucket('bench')}/tiny"
        write_synthetic("multi_label", data, num_samples=1024, num_classes=10, image_size=32,
                        factory=s3.client_factory(), progress=False)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3.environment()
        args = [sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), "--dry-run", "--no-finetune",
                "--max-steps", str(steps), "--checkpoint-every", "1000000", "--data", data,
                "--checkpoints", "s3://bench/runs", *[a for s in sets for a in ("--set", s)]]
        out = subprocess.run(args, capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT)
    print("# " + "".join(re.findall(r"training .*? CPU threads", out.stdout + out.stderr)[:1]))
    rates = [float(r) for r in re.findall(r"images_per_second ([\d.]+)", out.stdout + out.stderr)]
    if out.returncode != 0 or len(rates) < 2:
        raise RuntimeError(f"orchestrated run failed:\n{(out.stdout + out.stderr)[-3000:]}")
    # The first two steps warm up (as the bare loop's); Ray may print a line twice, which
    # leaves the median where it is.
    return batch / statistics.median(rates[2:])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ViT-S/16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="orchestrated runs, each between two bare ones")
    p.add_argument("--skip-orchestrated", action="store_true")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    common = {"model": args.model, "image_size": 224, "global_batch_size": args.batch, "micro_batch_size": args.batch,
              "workers": 1, "warmup_steps": 2, "train_examples": 1024, "zero_stage": 1}
    if not args.skip_orchestrated:
        orchestrated_overrides = common | {"cpus_per_worker": cores, "data_workers": 1, "log_every": 1, "num_classes": 10}
        bare, orchestrated = [bare_seconds("deepspeed", common, args.steps)], []
        for _ in range(args.rounds):
            orchestrated.append(orchestrated_seconds(orchestrated_overrides, args.batch, args.steps + 2))
            bare.append(bare_seconds("deepspeed", common, args.steps))
        listing = lambda xs: "/".join(f"{x:.3f}" for x in xs)  # noqa: E731
        print(f"# {args.model} batch {args.batch}, ZeRO-1, 1 worker, {cores} cores: orchestrated {listing(orchestrated)} s/step, "
              f"bare DeepSpeed {listing(bare)} s/step (in the order they ran, alternating)")
        print(f"bench train_step_vs_bare_deepspeed {statistics.median(bare) / statistics.median(orchestrated):.3f}")
    torch_seconds = bare_seconds("torch", common, args.steps)
    for stage in (0, 1, 2):
        ds = bare_seconds("deepspeed", common | {"zero_stage": stage}, args.steps)
        print(f"# ZeRO-{stage}: DeepSpeed {ds:.3f} s/step, bare torch {torch_seconds:.3f} s/step")
        print(f"bench deepspeed_vs_bare_torch_zero{stage} {torch_seconds / ds:.3f}")


if __name__ == "__main__":
    main()
