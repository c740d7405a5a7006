"""Fine-tune a vitscale export on every dataset of the seed's second table: the fan-out.

    python launch/finetune.py --weights s3://b/runs/vit-b-16-jft-300m/weights/model.safetensors \
        --data-root s3://b/downstream [--datasets CIFAR10,VTAB] [--workers-per-trial 8 --gpus-per-worker 1]
    python launch/finetune.py --print-plan [--datasets ...] [--steps-scale 0.01]

Per dataset: the LR sweep on a held-out part of train, the best LR retrained on all of train
and scored on test; VTAB-1k's tasks at their one LR. The results table goes beside the run
(`<run>/finetune/results.md`, `.json`, one plot per swept dataset) and into
runs/<run>/finetune/; its path is the last line printed. The same command again schedules
nothing for finished trials. Usage and config errors print one line and exit with status 2;
a dataset left without a final figure makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orchestrator.command_line import EXIT_USAGE, OneLineParser, setting  # noqa: E402
from orchestrator.config import ConfigError  # noqa: E402





def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="finetune.py", description=__doc__.split("\n")[0])
    p.add_argument("--weights", help="a vitscale export: <checkpoints>/<run>/weights/model.safetensors")
    p.add_argument("--data-root", dest="data_root", help="folder or s3:// prefix holding the datasets' shards")
    p.add_argument("--datasets", help="comma-separated names of the table (default: all; VTAB: its 19 tasks)")
    p.add_argument("--results", help="where results go (default: <checkpoints>/<run>/finetune beside the weights)")
    p.add_argument("--workers-per-trial", type=int, dest="workers_per_trial")
    p.add_argument("--gpus-per-worker", type=float, dest="gpus_per_worker")
    p.add_argument("--max-concurrent-trials", type=int, dest="max_concurrent_trials")
    p.add_argument("--steps-scale", type=float, dest="steps_scale", default=1.0,
                   help="multiply every trial's steps and warm-up (1: the table)")
    p.add_argument("--set", action="append", type=setting, default=[], metavar="FIELD=VALUE",
                   help="any other setting (repeatable): image_size, batch_size, steps (a dataset's steps in place "
                        "of the table's x --steps-scale, e.g. steps='{\"CIFAR10\": 3000}'), micro_batch_size, zero_stage, "
                        "data_workers, checkpoint_every, max_failures, cpus_per_worker, metrics_address, metrics_port")
    p.add_argument("--print-plan", action="store_true", help="print the trials as JSON and exit (contacts nothing)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from orchestrator import finetuning

    settings = dict(args.set)
    plan_size = {k: settings.pop(k) for k in ("image_size", "batch_size", "steps") if k in settings}
    try:
        trials = finetuning.plan_trials(finetuning.select_datasets(args.datasets), steps_scale=args.steps_scale,
                                        **plan_size)
    except ConfigError as err:
        print(f"finetune.py: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.print_plan:
        print(json.dumps([t.public() for t in trials], indent=1))
        return 0
    try:
        if not args.weights or not args.data_root:
            raise ConfigError("--weights and --data-root are required (only --print-plan runs without them)")
        from orchestrator.imports import export_for

        args.weights = export_for(args.weights)  # a foreign file (.npz, timm) imported on the way
        record = finetuning.read_weights_record(args.weights)
        config = finetuning.settings_for(
            args.weights, record, args.data_root, results=args.results, workers_per_trial=args.workers_per_trial,
            gpus_per_worker=args.gpus_per_worker, max_concurrent_trials=args.max_concurrent_trials, **settings)
        summary, out = finetuning.run_fanout(config, trials)
    except ConfigError as err:
        print(f"finetune.py: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except finetuning.FanoutStopped as err:
        print(f"finetune.py: {err}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        print("finetune.py: interrupted: finished trials keep their results; the same command runs the rest",
              file=sys.stderr)
        return 130
    print(os.path.join(out, "results.md"), flush=True)
    return 0 if summary.get("complete") else 1


if __name__ == "__main__":
    sys.exit(main())
