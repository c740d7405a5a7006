"""One process of tests/orchestrator/test_engine.py: an engine built from `deepspeed_config`,
one update with NaN gradients and a finite loss, then what the worker's check sees; or
(`compiled`) what `build_engine` makes of `torch_compile`; or (`export STAGE FOLDER`) the
weights `export_weights` writes after bf16 updates; or (`adamw`) the CPU config's updates
under each ZeRO stage next to torch's reference AdamW and clipping; or (`ninja`) what a CPU
engine's start builds and which ninja it would run."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402


def compiled() -> None:
    from orchestrator.config import resolve_pretrain_config
    from orchestrator.engine import build_engine, init_one_rank

    init_one_rank(use_gpu=False)
    engines, compiler_loaded = {}, {}
    for compile_model in (False, True):
        run = resolve_pretrain_config("ViT-B/16", "JFT-300M", {"workers": 1, "torch_compile": compile_model},
                                      dry_run=True)
        engines[compile_model] = build_engine(run, use_gpu=False)
        compiler_loaded[str(compile_model)] = "torch._inductor.compile_fx" in sys.modules
    from deepspeed.runtime.zero.muon import original_muon

    keys = {flag: list(engine.module.state_dict()) for flag, engine in engines.items()}
    print("RESULT " + json.dumps({"is_compiled": {str(f): e.is_compiled for f, e in engines.items()},
                                  "same_keys": keys[True] == keys[False], "keys": len(keys[True]),
                                  "compiler_loaded": compiler_loaded,
                                  "muon_deferred": hasattr(original_muon.muon_update, "__wrapped__")}))


def main(as_gpu: bool) -> None:
    import deepspeed

    from orchestrator.config import resolve_pretrain_config
    from orchestrator.engine import deepspeed_config, init_one_rank
    from orchestrator.train_loop import gradient_norm_finite

    init_one_rank(use_gpu=False)
    run = resolve_pretrain_config("ViT-B/16", "JFT-300M", {"workers": 1, "global_batch_size": 4, "micro_batch_size": 4},
                                  dry_run=True)
    # The GPU config as the recipe makes it (bf16 and its overflow setting), less the CUDA-only
    # fused Adam: DeepSpeed runs bf16 on its CPU accelerator too.
    config = deepspeed_config(run, use_gpu=as_gpu)
    config["optimizer"]["params"]["torch_adam"] = True
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    dtype = torch.bfloat16 if as_gpu else torch.float32
    x = torch.randn(4, 8, dtype=dtype)
    result = {"bf16": config["bf16"]["enabled"], "before_any_update": gradient_norm_finite(engine)}
    loss = engine(x).float().square().mean()
    engine.backward(loss)
    engine.step()
    result["after_clean_update"] = gradient_norm_finite(engine)
    loss = engine(x).float().square().mean()
    loss = loss + torch.sqrt(loss * 0)  # as train_loop's nan_grad_at: finite loss, NaN gradients
    result["loss_finite"] = bool(torch.isfinite(loss))
    engine.backward(loss)
    engine.step()
    result["after_nan_update"] = gradient_norm_finite(engine)
    result["parameters_finite"] = all(bool(torch.isfinite(p).all()) for p in engine.module.parameters())
    print("RESULT " + json.dumps(result))


def export(zero_stage: int, folder: str) -> None:
    """bf16 (the GPU config on DeepSpeed's CPU accelerator): a few updates, then export_weights."""
    import deepspeed
    from safetensors import safe_open
    from safetensors.torch import load_file

    from orchestrator.checkpoint import export_weights
    from orchestrator.config import resolve_pretrain_config
    from orchestrator.engine import deepspeed_config, init_one_rank

    init_one_rank(use_gpu=False)
    run = resolve_pretrain_config("ViT-B/16", "JFT-300M", {"workers": 1, "global_batch_size": 4, "micro_batch_size": 4,
                                                           "zero_stage": zero_stage}, dry_run=True)
    config = deepspeed_config(run, use_gpu=True)
    config["optimizer"]["params"].update(torch_adam=True, lr=1e-3)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 2))
    model.register_buffer("scale", torch.tensor([0.1, 0.7]))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    for _ in range(3):
        loss = engine(x).float().square().mean()
        engine.backward(loss)
        engine.step()
    metadata = {"model": "ViT-B/16", "num_classes": "2", "image_size": "224", "step": "3"}
    digest = export_weights(engine, os.path.join(folder, "model.safetensors"), metadata=metadata,
                            staging_dir=os.path.join(folder, "staging"))
    # Exported again, the same state is the same file (safetensors orders metadata at random).
    again = [export_weights(engine, os.path.join(folder, f"again-{i}.safetensors"), metadata=metadata,
                            staging_dir=os.path.join(folder, "staging")) for i in range(4)]
    masters = {name: deepspeed.utils.safe_get_full_fp32_param(p) for name, p in engine.module.named_parameters()}
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            working = {k: v.clone() for k, v in engine.module.state_dict().items()}
    else:
        working = {k: v.clone() for k, v in engine.module.state_dict().items()}
    exported = load_file(os.path.join(folder, "model.safetensors"))
    print("RESULT " + json.dumps({
        "digest": digest is not None,
        "same_digest": all(d == digest for d in again),
        "metadata": safe_open(os.path.join(folder, "model.safetensors"), "pt").metadata() == metadata,
        "keys": sorted(exported) == sorted(working),
        "dtypes": sorted({str(t.dtype) for k, t in exported.items() if k in masters}),
        "working_dtypes": sorted({str(t.dtype) for k, t in working.items() if k in masters}),
        "masters": all(torch.equal(exported[k], m.cpu()) for k, m in masters.items()),
        "off_bf16": sum(not torch.equal(exported[k], working[k].float()) for k in masters),
        "parameters": len(masters),
        "buffer": exported["scale"].tolist() == working["scale"].tolist(),
    }))


def adamw() -> None:
    """A few clipped updates of the CPU config under ZeRO-0..3 against torch's AdamW (its
    default, unfused implementation) and clip_grad_norm_ with the recipe's settings."""
    import deepspeed

    from orchestrator.config import resolve_pretrain_config
    from orchestrator.engine import deepspeed_config, init_one_rank

    init_one_rank(use_gpu=False)
    x, y = torch.randn(4, 8), torch.randn(4, 2)

    def fresh_model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 2))

    def loss_of(model):  # large enough that every update is clipped
        return (model(x) - 10 * y).square().mean()

    result = {}
    for stage in (0, 1, 2, 3):
        run = resolve_pretrain_config("ViT-B/16", "JFT-300M", {"workers": 1, "global_batch_size": 4,
                                                               "micro_batch_size": 4, "zero_stage": stage,
                                                               "base_lr": 1e-2}, dry_run=True)
        model = fresh_model()
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=deepspeed_config(run, use_gpu=False))
        reference = fresh_model()
        optimizer = torch.optim.AdamW(reference.parameters(), lr=run.base_lr, betas=(run.adam_beta1, run.adam_beta2),
                                      eps=1e-8, weight_decay=run.weight_decay)
        norms = []
        for _ in range(3):
            loss = loss_of(engine)
            engine.backward(loss)
            engine.step()
            optimizer.zero_grad()
            loss_of(reference).backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), run.grad_clip_norm)))
            optimizer.step()
        base = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
        # Under ZeRO-3 each rank holds a partition; GatheredParameters is a no-op below it.
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
            trained = [p.detach().clone() for p in engine.module.parameters()]
        result[stage] = {
            "optimizer": type(base).__name__, "fused": base.defaults.get("fused"), "min_norm": min(norms),
            # What the engine's optimizer applies, not what the config asked for.
            "weight_decay": min(group["weight_decay"] for group in base.param_groups),
            "asked_weight_decay": run.weight_decay,
            "max_difference": max(float((a - b).abs().max()) for a, b in zip(trained, reference.parameters())),
            "moved": max(float((a - b).abs().max()) for a, b in zip(trained, fresh_model().parameters())),
        }
    print("RESULT " + json.dumps(result))


def ninja() -> None:
    """A CPU rank's process group as every engine starts it, then a step of a ZeRO-1 engine: which
    ninja a JIT build would run, and whether DeepSpeed's CPU communication op was built or loaded."""
    import shutil

    import deepspeed.comm.comm as dist

    from orchestrator.config import resolve_pretrain_config
    from orchestrator.engine import build_engine, init_one_rank

    init_one_rank(use_gpu=False)
    config = resolve_pretrain_config("ViT-B/16", "JFT-300M", {"workers": 1, "zero_stage": 1}, dry_run=True)
    engine = build_engine(config, use_gpu=False)
    loss = engine(torch.randn(2, 3, config.image_size, config.image_size)).float().square().mean()
    engine.backward(loss)
    engine.step()
    print("RESULT " + json.dumps({"comm_op": dist.cdb.shm_comm_op is not None, "ninja": shutil.which("ninja"),
                                  "first_on_path": os.environ["PATH"].split(os.pathsep)[0]}))


if __name__ == "__main__":
    if sys.argv[1] == "ninja":
        ninja()
    elif sys.argv[1] == "compiled":
        compiled()
    elif sys.argv[1] == "adamw":
        adamw()
    elif sys.argv[1] == "export":
        export(int(sys.argv[2]), sys.argv[3])
    else:
        main(sys.argv[1] == "gpu-config")
    # Done, RESULT printed: leave without the interpreter's teardown. Once (a clean-clone CI run)
    # a C++ thread of the process group was still joinable at static destruction and aborted the
    # process after its RESULT ("terminate called without an active exception", exit -6).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
