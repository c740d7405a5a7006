"""What Ray Train's helpers that a run leaves out (orchestrator/trainer.py) cost at start-up.

    .venv/bin/python benchmarks/run_startup.py [--workers 2] [--rounds 3]

As launch/pretrain.py does, a fresh process starts a local Ray (orchestrator.pretraining.
connect_ray) and fits a trainer whose workers only report once; in turns, Ray Train's plain
TorchTrainer (with DatasetManager, PlacementGroupCleaner, the autoscaler coordinator and their
processes) and the run's trainer (`build_trainer(local=True)`). Each fit is timed from `fit()`
to its result; the actors it made are counted from the GCS's actor table. Prints
`bench run_startup_plain_over_ours`: the median plain fit over the median of ours (above 1:
ours is up sooner).
"""

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def report_once(config):
    import ray.train

    ray.train.report({"rank": ray.train.get_context().get_world_rank()})


def actors(ray) -> collections.Counter:
    return collections.Counter(a["ActorClassName"] for a in ray._private.state.actors().values())


def fit_once(kind: str, workers: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.config import resolve_pretrain_config
    from orchestrator.pretraining import connect_ray, ray_started_here
    from orchestrator.trainer import build_trainer

    ray = connect_ray(resolve_pretrain_config("ViT-B/16", "JFT-300M", {"workers": workers}, dry_run=True))
    assert ray_started_here(ray)
    kwargs = dict(train_loop_config={}, scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
                  run_config=RunConfig(name=kind, storage_path="/tmp/vitscale-bench-startup"))
    if kind == "plain":
        trainer = TorchTrainer(report_once, **kwargs)
    else:
        trainer = build_trainer(report_once, local=True, **kwargs)
    start = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - start
    made = actors(ray)
    ray.shutdown()
    if result.error is not None:
        raise SystemExit(f"{kind} run failed: {result.error}")
    return {"seconds": seconds, "actors": made}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--one", choices=["plain", "ours"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(fit_once(args.one, args.workers)), flush=True)
        return
    seconds, made = collections.defaultdict(list), {}
    for _ in range(args.rounds):
        for kind in ("plain", "ours"):
            out = subprocess.run([sys.executable, __file__, "--one", kind, "--workers", str(args.workers)],
                                 capture_output=True, text=True, timeout=600)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{kind} run failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
            result = json.loads(line[len("RESULT "):])
            seconds[kind].append(result["seconds"])
            made[kind] = result["actors"]
    for kind in ("plain", "ours"):
        listing = "/".join(f"{s:.2f}" for s in seconds[kind])
        print(f"# {kind}: fit {listing} s ({args.workers} workers, in turns); actors made: "
              + ", ".join(f"{name} {n}" for name, n in sorted(made[kind].items())))
    print(f"bench run_startup_plain_over_ours {statistics.median(seconds['plain']) / statistics.median(seconds['ours']):.3f}")


if __name__ == "__main__":
    main()
