"""What the fine-tuning fan-out costs over its trials' bare training loops: `bench finetune_fanout_overhead`.

    .venv/bin/python benchmarks/finetune_fanout.py [--steps-scale 0.05] [--concurrency 1] [--rounds 1] [--quick]

A real pretraining export (the dry run's model, 4 steps) on an embedded S3, and digits standing
in for CIFAR-10 under `<root>/cifar10/{train,test}`. The trials are CIFAR-10's sweep, one per
LR of its grid (4), at 32 px and batch 32 with the table's steps times `--steps-scale` (the
default trains about a minute per trial on a 2-core machine; `--quick` about 10 s). In turns,
over `--rounds`, each side writing to a fresh results prefix so no trial is skipped as
finished:

- the fan-out: `finetuning.run_fanout` on those trials (Ray Tune over Ray Train trials of
  the pretraining worker, `--concurrency` at once), timed from the call to its return, on a
  local Ray started once beforehand (by the pretraining run);
- bare: the same trials' TrialConfigs (`finetuning.trial_config`) run back to back by
  `train_loop._Worker(under_ray=False)` in one process of its own (torch.distributed of one
  rank on gloo, as benchmarks/worker_step.py), timed from the first worker's start to the
  last one's end. Both sides' workers take cpus_per_worker torch threads (1 here: a CPU
  trial worker sets them itself, since Ray 2.60 sets no OMP_NUM_THREADS).

Both sides train, evaluate and write each trial's result.json the same way; its
wall_seconds (the worker's own time, from its metrics' start to the record) splits the
fan-out's wall into time in the trials' workers and time around them (Tune, Train, worker
processes starting). The figure is
(fan-out wall - bare total / C) / (bare total / C) over the medians, C the concurrency: what
the fan-out adds to ideal C-wide parallel training. On a 2-core machine C is 1 (each CPU
trial worker takes a core, and the fan-out's driver and the S3 server share the other).
"""

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_STEPS_SCALE = 0.05  # CIFAR-10's 10000 steps -> 500: about a minute per trial on a 2-core machine
QUICK_STEPS_SCALE = 0.008  # -> 80 steps: about 10 s
RUN = "fanout-bench"  # the pretraining run's name, so the trials' Ray run names are this benchmark's own


def bare(args) -> None:
    """The bare side, in a process of its own: every trial's worker back to back."""
    from orchestrator.config import TrialConfig
    from orchestrator.engine import init_one_rank
    from orchestrator.train_loop import _Worker, worker_config

    with open(args.configs) as f:
        configs = [TrialConfig.model_validate(c) for c in json.load(f)]
    init_one_rank(use_gpu=False)
    began = time.perf_counter()
    for config in configs:
        start = time.perf_counter()
        worker = _Worker(worker_config(config, staging_dir=args.staging), rank=0, world_size=1, under_ray=False)
        worker.run()
        del worker  # its loaders' worker processes end with it, as a trial's do with its process
        gc.collect()
        print(f"TRIAL {config.trial} {time.perf_counter() - start:.3f}", flush=True)
    print(f"SECONDS {time.perf_counter() - began:.3f}", flush=True)


def run_bare(configs, tmp: str, round_: int) -> tuple[float, list[float]]:
    path = os.path.join(tmp, f"bare-{round_}.json")
    with open(path, "w") as f:
        json.dump([c.model_dump(mode="json") for c in configs], f)
    argv = [sys.executable, os.path.abspath(__file__), "--role", "bare", "--configs", path,
            "--staging", os.path.join(tmp, f"staging-bare-{round_}")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=7200)
    total = re.search(r"^SECONDS (\S+)", proc.stdout, re.M)
    if proc.returncode != 0 or total is None:
        sys.exit(f"finetune_fanout.py: the bare process failed (exit {proc.returncode}):\n"
                 + proc.stdout[-3000:] + proc.stderr[-5000:])
    threads = re.search(r"(\d+) CPU threads", proc.stdout)
    print(f"# round {round_}: bare workers on {threads.group(1) if threads else '?'} CPU threads", flush=True)
    return float(total.group(1)), [float(s) for s in re.findall(r"^TRIAL .* (\S+)$", proc.stdout, re.M)]


def worker_seconds(configs, side: str) -> float:
    """The trials' workers' own seconds (their result.json's wall_seconds), summed."""
    from orchestrator import finetuning

    records = {c.trial: finetuning.read_result(c) for c in configs}
    missing = [name for name, record in records.items() if record is None]
    if missing:
        sys.exit(f"finetune_fanout.py: the {side} side left no result.json for {', '.join(missing)}")
    return sum(record["wall_seconds"] for record in records.values())


def export_and_data(bucket: str) -> tuple[str, str]:
    """A pretraining run's export (4 steps of the dry run's model) and the downstream digits."""
    from data_pipelines.synthetic import write_synthetic
    from orchestrator.config import resolve_pretrain_config
    from orchestrator.local_prometheus import free_ports
    from orchestrator.pretraining import run_pretraining
    from orchestrator.train_loop import weights_url

    data = f"{bucket}/synth"
    write_synthetic("multi_label", data, num_samples=128, num_classes=10, image_size=48, samples_per_shard=64)
    overrides = {"workers": 1, "data": data, "checkpoints": f"{bucket}/runs", "run_name": RUN, "max_steps": 4,
                 "checkpoint_every": 4, "log_every": 4, "train_examples": 128, "global_batch_size": 16,
                 "micro_batch_size": 8, "warmup_steps": 1, "data_workers": 1, "epochs": 2,
                 "metrics_address": "127.0.0.1", "metrics_port": free_ports(2)}
    config = resolve_pretrain_config("ViT-B/16", "JFT-300M", overrides, dry_run=True)
    run_pretraining(config, log=lambda line: None)  # starts the local Ray the fan-out then uses
    root = f"{bucket}/downstream"
    for split in ("train", "test"):
        write_synthetic("digits", f"{root}/cifar10/{split}", image_size=32, samples_per_shard=256, split=split)
    return weights_url(config), root


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps-scale", type=float, default=None,
                   help=f"times the table's 10000 CIFAR-10 steps (default {DEFAULT_STEPS_SCALE}: ~1 min a trial here)")
    p.add_argument("--quick", action="store_true", help=f"steps scale {QUICK_STEPS_SCALE}: ~10 s a trial")
    p.add_argument("--concurrency", type=int, default=1, help="max_concurrent_trials (1 on a 2-core machine)")
    p.add_argument("--rounds", type=int, default=1)
    for hidden in ("role", "configs", "staging"):
        p.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "bare":
        return bare(args)
    scale = args.steps_scale or (QUICK_STEPS_SCALE if args.quick else DEFAULT_STEPS_SCALE)

    from data_pipelines.embedded_s3 import EmbeddedS3
    from orchestrator import finetuning
    from orchestrator.local_prometheus import free_ports

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="finetune-fanout-") as tmp, EmbeddedS3(grace_seconds=2) as s3:
        # Before Ray starts, so its workers see them too.
        os.environ.update(s3.environment(), VITSCALE_STAGING_DIR=os.path.join(tmp, "staging-fanout"))
        bucket = s3.create_bucket("vitscale-bench")
        weights, root = export_and_data(bucket)
        record = finetuning.read_weights_record(weights)
        trials = [t for t in finetuning.plan_trials(["CIFAR10"], steps_scale=scale, image_size=32, batch_size=32)
                  if t.stage == "sweep"]  # no final: nothing the bare side would have to pick
        classes = finetuning.check_data(trials, root)
        print(f"# {len(trials)} trials of {trials[0].steps} steps (batch {trials[0].batch_size}, "
              f"{trials[0].image_size} px, {record['model']}), {args.concurrency} at once; "
              f"set up in {time.perf_counter() - began:.1f} s", flush=True)

        def settings(results: str):
            return finetuning.settings_for(weights, record, root, results=results, micro_batch_size=16, data_workers=1,
                                           max_concurrent_trials=args.concurrency, metrics_address="127.0.0.1",
                                           metrics_port=free_ports(10))

        fanout_times, bare_times, in_workers = [], [], {}
        for round_ in range(args.rounds):
            for side in (("fanout", "bare") if round_ % 2 == 0 else ("bare", "fanout")):
                chosen = settings(f"{bucket}/{side}-{round_}")
                configs = [finetuning.trial_config(t, chosen, classes.get(t.dataset)) for t in trials]
                if side == "fanout":
                    here = os.getcwd()
                    os.chdir(tmp)  # its results.json/md and plots go to ./runs/: keep them out of the tree
                    start = time.perf_counter()

                    def log(line: str) -> None:  # Tune's trial starts and ends, timed
                        if line.startswith("trial "):
                            print(f"# round {round_}: {time.perf_counter() - start:6.1f} s {line}", flush=True)

                    try:
                        finetuning.run_fanout(chosen, trials, log=log)
                        fanout_times.append(time.perf_counter() - start)
                    finally:
                        os.chdir(here)
                else:
                    total, each = run_bare(configs, tmp, round_)
                    bare_times.append(total)
                    print(f"# round {round_}: bare trials " + " ".join(f"{s:.1f}" for s in each) + " s", flush=True)
                in_workers[side] = worker_seconds(configs, side)
                print(f"# round {round_}: {side} done; load average {os.getloadavg()[0]:.2f} / {os.getloadavg()[1]:.2f} "
                      f"(1 / 5 min) on {os.cpu_count()} cores: above {args.concurrency + 1} means other work "
                      f"shares them", flush=True)
            print(f"# round {round_}: fan-out {fanout_times[-1]:.1f} s ({in_workers['fanout']:.1f} in its trials' "
                  f"workers), bare {bare_times[-1]:.1f} s ({in_workers['bare']:.1f} in the workers)", flush=True)

        import ray

        ray.shutdown()
    fanout, total = statistics.median(fanout_times), statistics.median(bare_times)
    ideal = total / args.concurrency
    print(f"# medians over {args.rounds} round(s): fan-out {fanout:.1f} s, bare {total:.1f} s "
          f"(/{args.concurrency} = {ideal:.1f} s); whole benchmark {time.perf_counter() - began:.0f} s")
    print(f"bench finetune_fanout_seconds_per_trial_fanout {fanout / len(trials):.2f}")
    print(f"bench finetune_fanout_seconds_per_trial_bare {total / len(trials):.2f}")
    print(f"bench finetune_fanout_overhead {(fanout - ideal) / ideal:.3f}")


if __name__ == "__main__":
    main()
