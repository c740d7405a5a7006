"""One process of tests/orchestrator/test_engine.py: an engine built from `deepspeed_config`,
one update with NaN gradients and a finite loss, then what the worker's check sees; or
(`compiled`) what `build_engine` makes of `torch_compile`."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402


def compiled() -> None:
    from orchestrator.config import resolve_pretrain_config
    from orchestrator.engine import build_engine, init_one_rank

    init_one_rank(use_gpu=False)
    engines = {}
    for compile_model in (False, True):
        run = resolve_pretrain_config("ViT-B/16", "JFT-300M", {"workers": 1, "torch_compile": compile_model},
                                      dry_run=True)
        engines[compile_model] = build_engine(run, use_gpu=False)
    keys = {flag: list(engine.module.state_dict()) for flag, engine in engines.items()}
    print("RESULT " + json.dumps({"is_compiled": {str(f): e.is_compiled for f, e in engines.items()},
                                  "same_keys": keys[True] == keys[False], "keys": len(keys[True])}))


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


if __name__ == "__main__":
    compiled() if sys.argv[1] == "compiled" else main(sys.argv[1] == "gpu-config")
