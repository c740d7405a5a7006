"""One rank of a small DeepSpeed run that checkpoints through CheckpointManager (run by tests).

    RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 \
        python tests/orchestrator/checkpoint_worker.py --url s3://b/run --staging /tmp/s --zero-stage 1 \
        --steps 4 --save-at 2,4 --dumps /tmp/dumps

Each save also dumps this rank's parameters, optimizer state and the next RNG draw to
`--dumps/step-<N>-rank-<R>.pt`; a run that restores dumps the same right after restoring, as
`restored-rank-<R>.pt`, so the test can compare the two exactly. `--hang-in-commit N` stalls
rank 0 in step N's commit, `--hang-in-restore R` rank R in its restore.
"""

import argparse
import gc
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import deepspeed  # noqa: E402
import torch  # noqa: E402

from model import build_model  # noqa: E402
from orchestrator import checkpoint  # noqa: E402


def state_of(engine) -> dict:
    """Full parameters (gathered under ZeRO-3) and this rank's optimizer tensors."""
    params = list(engine.module.parameters())
    gather = deepspeed.zero.GatheredParameters(params) if engine.zero_optimization_stage() == 3 else torch.no_grad()
    with gather:
        weights = {k: v.detach().clone() for k, v in engine.module.named_parameters()}
    optimizer = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    moments = {
        f"{i}.{name}": value.detach().clone()
        for i, state in enumerate(optimizer.state.values())
        for name, value in state.items()
        if torch.is_tensor(value)
    }
    return {"weights": weights, "optimizer": moments, "global_steps": engine.global_steps}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--staging", required=True)
    p.add_argument("--dumps", required=True)
    p.add_argument("--zero-stage", type=int, default=1)
    p.add_argument("--model", default="ViT-Mu/4", help="ViT-Ti/16: files past the 16 MiB multipart threshold")
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--save-at", default="")
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--keep-every", type=int, default=0)
    p.add_argument("--failure-budget", type=int, default=3)
    p.add_argument("--upload-attempts", type=int, default=3)
    p.add_argument("--commit-timeout", type=float, default=60.0)
    p.add_argument("--hang-in-commit", type=int, default=-1,
                   help="rank 0 stalls for good in the commit of this step, its report written, before the manifest")
    p.add_argument("--hang-in-restore", type=int, default=-1, help="this rank stalls for good while it downloads its files")
    p.add_argument("--break-upload", default="", help="STEP:RANK: that rank's upload of that step raises a RuntimeError")
    p.add_argument("--fresh", action="store_true", help="do not look for a checkpoint to restore")
    p.add_argument("--restore-again", action="store_true", help="after the restore and its dump, restore once more")
    p.add_argument("--memory-room", type=int, default=None, help="pretend this many bytes of memory are left")
    args = p.parse_args()
    if args.memory_room is not None:
        checkpoint.memory_room = lambda: args.memory_room

    from orchestrator.engine import cpu_collectives_through_gloo, use_the_interpreters_ninja

    use_the_interpreters_ninja()  # what every CPU engine of vitscale does first: see their comments
    cpu_collectives_through_gloo()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(0)
    model = build_model(args.model, 10, image_size=32)
    config = {
        "train_batch_size": 4 * world, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": args.zero_stage},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

    if args.hang_in_commit >= 0 and rank == 0:
        real_commit = checkpoint.CheckpointManager._commit

        def commit_or_hang(self, step, step_url, config):
            if step == args.hang_in_commit:
                open(os.path.join(args.dumps, "hanging-in-commit"), "w").close()
                time.sleep(3600)
            return real_commit(self, step, step_url, config)

        checkpoint.CheckpointManager._commit = commit_or_hang

    if args.hang_in_restore == rank:
        def download_and_hang(self, manifest):
            open(os.path.join(args.dumps, f"hanging-in-restore-rank-{rank}"), "w").close()
            time.sleep(3600)

        checkpoint.CheckpointManager._download_verified = download_and_hang

    if args.break_upload:
        broken_step, broken_rank = map(int, args.break_upload.split(":"))
        working_upload = checkpoint.upload_images

        def upload_or_break(uploads, factory=None):
            if rank == broken_rank and any(f"/{checkpoint.step_name(broken_step)}/" in url for _, url in uploads):
                raise RuntimeError("injected: not a storage error")
            return working_upload(uploads, factory)

        checkpoint.upload_images = upload_or_break

    manager = checkpoint.CheckpointManager(
        args.url, staging_dir=args.staging, rank=rank, world_size=world, keep_last=args.keep_last,
        keep_every=args.keep_every, failure_budget=args.failure_budget, commit_timeout=args.commit_timeout,
        upload_attempts=args.upload_attempts,
    )
    os.makedirs(args.dumps, exist_ok=True)
    start = 0
    restored = None if args.fresh else manager.restore(engine)
    if restored is not None:
        start = restored.step
        manager.wait()
        gc.collect()
        assert not checkpoint.still_mapped(args.staging), checkpoint.still_mapped(args.staging)
        # Of the downloaded memory, only what DeepSpeed kept as tensors stays (a page or two
        # more for each kept tensor's ends), once the restore's release is over.
        kept, resident = manager.restore_kept_bytes, manager.restore_resident_bytes
        assert resident <= kept + 64 * 4096, (resident, kept)
        print(f"rank {rank}: restore kept {kept} bytes of tensors in {resident} bytes of memory", flush=True)
        dump = state_of(engine) | {"loader_state": restored.loader_state, "rng_draw": torch.rand(3)}
        torch.save(dump, os.path.join(args.dumps, f"restored-rank-{rank}.pt"))
        if args.restore_again:
            # Into an engine with Adam moments now (a rollback's restore): the state the load
            # replaces is held past the load, and freed by the restore's release.
            from torch.multiprocessing.reductions import StorageWeakRef

            replaced = [StorageWeakRef(t.untyped_storage()) for t in checkpoint._optimizer_state_tensors(engine)]
            assert replaced and manager.restore(engine).step == restored.step
            manager.wait()
            assert all(ref.expired() for ref in replaced), f"{sum(not r.expired() for r in replaced)} of {len(replaced)} live"
            again = state_of(engine)
            for name in ("weights", "optimizer"):
                for key, value in dump[name].items():
                    assert torch.equal(value, again[name][key]), (name, key)
    save_at = {int(s) for s in args.save_at.split(",") if s}
    for step in range(start + 1, args.steps + 1):
        generator = torch.Generator().manual_seed(1000 * step + rank)
        images = torch.randn(4, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 10, (4,), generator=generator)
        loss = torch.nn.functional.cross_entropy(engine(images), labels)
        engine.backward(loss)
        engine.step()
        if step in save_at:
            loader_state = {"consumed": step * 4 * world, "rank": rank}
            try:
                manager.save(engine, step, loader_state=loader_state, config={"zero_stage": args.zero_stage})
            except checkpoint.CheckpointError as error:
                print(f"CheckpointError: {error}", flush=True)
                sys.exit(3)
            dump = state_of(engine) | {"loader_state": loader_state, "rng_draw": torch.rand(3)}
            torch.save(dump, os.path.join(args.dumps, f"step-{step}-rank-{rank}.pt"))
    manager.close()
    print(f"rank {rank}: failures_total={manager.failures_total} last_committed={manager.last_committed_step} "
          f"stall={manager.stall_seconds:.3f}", flush=True)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
