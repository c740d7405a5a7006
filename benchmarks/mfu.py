"""Training throughput and MFU of one worker's step on one GPU: `bench vit_b16_mfu <fraction>`.

    .venv/bin/python benchmarks/mfu.py [--model ViT-B/16] [--batch 256] [--steps 20] [--compile] [--bare] [--cpu]

The step is the one `train_loop` runs: our model, `build_engine` from the recipe's resolved
config (DeepSpeed, ZeRO-1, bf16 on a GPU, AdamW, clipping), sigmoid cross-entropy, on
in-memory tensors. MFU = 3 x forward FLOPs per image of the model trained (model/flops.py:
FLOPs = 2 x MACs; the JFT head and pre-logits included) x images per second / the device's
peak (orchestrator/metrics.py: the dense bf16 datasheet figure for known GPUs, a measured
matmul rate otherwise).

`--compile` compiles the model (the config's `torch_compile`: DeepSpeed's `engine.compile()`,
torch.compile with inductor); `--bare` steps the same model without DeepSpeed (torch autocast to bf16, fp32
weights, torch's fused AdamW, clipping): what plain PyTorch gets, for reference. Only the
default run prints `bench vit_b16_mfu`; the others print `bench vit_b16_mfu_<variant>`.
Without a GPU it says so and prints no figure; `--cpu` runs the same loop on the CPU (fp32,
against a measured matmul rate) to check the script. On a lent GPU machine without a network,
`benchmarks/device_check.sh` (prepare here, run there) installs what it lacks and runs the
variants that matter in one go.
"""

import argparse
import json
import os
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
    p.add_argument("--compile", action="store_true", help="torch.compile the model (the config's torch_compile)")
    p.add_argument("--bare", action="store_true", help="plain PyTorch (autocast bf16, fused AdamW), no DeepSpeed")
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--ds", type=json.loads, default={}, help="JSON merged into the DeepSpeed config (experiments)")
    p.add_argument("--phases", action="store_true", help="also time forward, backward and step apart")
    p.add_argument("--trace", help="write a torch.profiler trace of 3 steps here (.json.gz)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (a check of the script, not a figure)")
    args = p.parse_args()
    use_gpu = torch.cuda.is_available() and not args.cpu
    if not use_gpu and not args.cpu:
        print("# no GPU on this machine: vit_b16_mfu not measured (--cpu checks the script)")
        return

    from model import build_model, forward_flops
    from orchestrator.config import resolve_pretrain_config
    from orchestrator.metrics import device_peak_flops
    from orchestrator.objectives import classification_loss

    config = resolve_pretrain_config(args.model, "JFT-300M", {
        "workers": 1, "global_batch_size": args.batch, "micro_batch_size": args.batch, "dropout": 0.0,
        "gpus_per_worker": 1.0 if use_gpu else 0.0, "zero_stage": args.zero_stage,
        "torch_compile": args.compile})
    dtype = torch.bfloat16 if use_gpu else torch.float32
    if args.bare:
        device = torch.device("cuda" if use_gpu else "cpu")
        torch.manual_seed(config.seed)
        model = build_model(config.model, config.num_classes, image_size=config.image_size,
                            representation_size=config.representation_size).to(device)
        if args.compile:
            model.compile()
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.base_lr, betas=(config.adam_beta1, config.adam_beta2),
                                      weight_decay=config.weight_decay, fused=True)

        def forward():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_gpu):
                logits = model(x)
            return classification_loss(logits.float(), y, multi_label=True)

        def backward(loss) -> None:
            loss.backward()

        def update() -> None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        import orchestrator.engine
        from orchestrator.engine import build_engine, init_one_rank

        if args.ds:
            recipe_config = orchestrator.engine.deepspeed_config
            orchestrator.engine.deepspeed_config = lambda c, use_gpu: merged(recipe_config(c, use_gpu=use_gpu), args.ds)
        init_one_rank(use_gpu=use_gpu)
        engine = build_engine(config, use_gpu=use_gpu)
        device = engine.device

        def forward():
            return classification_loss(engine(x).float(), y, multi_label=True)

        def backward(loss) -> None:
            engine.backward(loss)

        def update() -> None:
            engine.step()

    def step() -> None:
        loss = forward()
        backward(loss)
        update()

    # Inputs in the dtype the model computes in: DeepSpeed's bf16 engine takes bf16 images,
    # autocast takes fp32 ones.
    x = torch.randn(args.batch, 3, config.image_size, config.image_size, device=device,
                    dtype=torch.float32 if args.bare else dtype)
    y = (torch.rand(args.batch, config.num_classes, device=device) < 0.01).float()

    def sync() -> None:
        if use_gpu:
            torch.cuda.synchronize()

    warm_up = time.perf_counter()
    for _ in range(3):
        step()
    sync()
    warm_up = time.perf_counter() - warm_up
    times = []
    for _ in range(args.steps):
        began = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - began)
    seconds = statistics.median(times)
    if args.phases:
        phases = {"forward": [], "backward": [], "step": []}
        for _ in range(10):
            began = time.perf_counter()
            loss = forward()
            sync()
            middle = time.perf_counter()
            backward(loss)
            sync()
            end = time.perf_counter()
            update()
            sync()
            phases["forward"].append(middle - began)
            phases["backward"].append(end - middle)
            phases["step"].append(time.perf_counter() - end)
        print("# phases, each synchronized, median ms: "
              + ", ".join(f"{k} {statistics.median(v) * 1000:.1f}" for k, v in phases.items()))
    if args.trace:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_gpu else [])
        with profile(activities=activities) as prof:
            for _ in range(3):
                step()
            sync()
        prof.export_chrome_trace(args.trace.removesuffix(".gz"))
        if args.trace.endswith(".gz"):
            import gzip
            import shutil

            with open(args.trace.removesuffix(".gz"), "rb") as src, gzip.open(args.trace, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.remove(args.trace.removesuffix(".gz"))
        sort = "self_cuda_time_total" if use_gpu else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25))
    images_per_second = args.batch / seconds
    trained = build_model(config.model, config.num_classes, image_size=config.image_size,
                          representation_size=config.representation_size, device="meta")
    flops = 3 * forward_flops(trained, config.image_size)
    peak, source = device_peak_flops(device, dtype)
    name = torch.cuda.get_device_name(device) if use_gpu else "CPU"
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if use_gpu else float("nan")
    variant = "_".join(v for v, on in [("compiled", args.compile), ("bare_torch", args.bare),
                                          (f"zero{args.zero_stage}", args.zero_stage != 1 and not args.bare),
                                          ("ds_" + "_".join(sorted(args.ds)), bool(args.ds))] if on)
    print(f"# {config.model} {'bf16' if use_gpu else 'fp32'} batch {args.batch} {variant or 'deepspeed'} on {name}: "
          f"{seconds * 1000:.1f} ms/step (min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}; "
          f"3 warm-up steps {warm_up:.1f} s), {images_per_second:.0f} images/s, {flops / 1e9:.1f} GFLOP/image "
          f"(fwd+bwd), peak {peak / 1e12:.3g} TFLOP/s ({source}), {memory:.1f} GiB peak memory")
    tag = "vit_b16_mfu" if use_gpu and config.model == "ViT-B/16" else f"mfu_check_{'gpu' if use_gpu else 'cpu'}"
    print(f"bench {tag}{'_' + variant if variant else ''} {flops * images_per_second / peak:.3f}")


def merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


if __name__ == "__main__":
    main()
