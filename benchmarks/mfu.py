"""Training throughput and MFU of one worker's step on one GPU: `bench vit_b16_mfu <fraction>`.

    .venv/bin/python benchmarks/mfu.py [--model ViT-B/16] [--batch 256] [--steps 20] [--cpu]

The step is the one `train_loop` runs: our model, `build_engine` from the recipe's resolved
config (DeepSpeed, ZeRO-1, bf16 on a GPU, AdamW, clipping), sigmoid cross-entropy, on
in-memory tensors. MFU = 3 x forward FLOPs per image (model/flops.py: FLOPs = 2 x MACs) x
images per second / the device's peak (orchestrator/metrics.py: the dense bf16 datasheet
figure for known GPUs, a measured matmul rate otherwise). Without a GPU it says so and prints
no figure; `--cpu` runs the same loop on the CPU (fp32, against a measured matmul rate) to
check the script.
"""

import argparse
import os
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ViT-B/16")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cpu", action="store_true", help="run on the CPU (a check of the script, not a figure)")
    args = p.parse_args()
    use_gpu = torch.cuda.is_available() and not args.cpu
    if not use_gpu and not args.cpu:
        print("# no GPU on this machine: vit_b16_mfu not measured (--cpu checks the script)")
        return

    from model import forward_flops
    from orchestrator.config import resolve_pretrain_config
    from orchestrator.engine import build_engine
    from orchestrator.metrics import device_peak_flops
    from orchestrator.objectives import classification_loss

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    config = resolve_pretrain_config(args.model, "JFT-300M", {
        "workers": 1, "global_batch_size": args.batch, "micro_batch_size": args.batch, "dropout": 0.0,
        "gpus_per_worker": 1.0 if use_gpu else 0.0, "zero_stage": 1})
    engine = build_engine(config, use_gpu=use_gpu)
    device, dtype = engine.device, torch.bfloat16 if use_gpu else torch.float32
    x = torch.randn(args.batch, 3, config.image_size, config.image_size, device=device, dtype=dtype)
    y = (torch.rand(args.batch, config.num_classes, device=device) < 0.01).float()

    def step() -> None:
        loss = classification_loss(engine(x).float(), y, multi_label=True)
        engine.backward(loss)
        engine.step()

    def sync() -> None:
        if use_gpu:
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    sync()
    times = []
    for _ in range(args.steps):
        began = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - began)
    seconds = statistics.median(times)
    images_per_second = args.batch / seconds
    flops = 3 * forward_flops(config.model, config.image_size)
    peak, source = device_peak_flops(device, dtype)
    name = torch.cuda.get_device_name(device) if use_gpu else "CPU"
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if use_gpu else float("nan")
    print(f"# {config.model} {'bf16' if use_gpu else 'fp32'} batch {args.batch} on {name}: {seconds * 1000:.1f} ms/step, "
          f"{images_per_second:.0f} images/s, {flops / 1e9:.1f} GFLOP/image (fwd+bwd), peak {peak / 1e12:.3g} TFLOP/s "
          f"({source}), {memory:.1f} GiB peak memory")
    tag = "vit_b16_mfu" if use_gpu and config.model == "ViT-B/16" else f"mfu_check_{'gpu' if use_gpu else 'cpu'}"
    print(f"bench {tag} {flops * images_per_second / peak:.3f}")


if __name__ == "__main__":
    main()
