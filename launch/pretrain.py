"""Pretrain a ViT (or BiT / hybrid) with the paper's recipe.

    python launch/pretrain.py --model ViT-L/16 --dataset JFT-300M --epochs 14 --print-config
    python launch/pretrain.py --dry-run

Flags map to config fields; every flag given wins over the recipe and is listed in the
config's `overrides`. Usage and config errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orchestrator.command_line import EXIT_USAGE, OneLineParser, setting  # noqa: E402
from orchestrator.config import ConfigError, resolve_pretrain_config  # noqa: E402


def written_report(config, fanout) -> str | None:
    """A real run's report (orchestrator/report.py), as the dry run writes it: runs/<run>/ and
    beside the run; the seed's figures on 16 images of the run's own shards. Its path, or None
    with a warning when it could not be written: the run and its results stand without it."""
    from orchestrator.report import write_report

    try:
        return write_report(config, fanout=fanout, figure_images=config.data)
    except Exception as error:  # noqa: BLE001 (a report is not worth the run's exit status)
        said = str(error).strip().splitlines()
        print(f"warning: the run's report was not written: {type(error).__name__}{': ' + said[0] if said else ''}",
              file=sys.stderr, flush=True)
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="pretrain.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a model name from the recipe table, e.g. ViT-B/16 (default with --dry-run: ViT-B/16)")
    p.add_argument("--dataset", help="JFT-300M, ImageNet-21k or ImageNet (default with --dry-run: JFT-300M)")
    p.add_argument("--epochs", type=int, help="epochs (the table's default otherwise)")
    p.add_argument("--base-lr", type=float, dest="base_lr", help="base learning rate for the global batch")
    p.add_argument("--data", help="training shards: a folder or s3://bucket/prefix")
    p.add_argument("--checkpoints", help="where checkpoints go: a folder or s3://bucket/prefix")
    p.add_argument("--workers", type=int, help="training workers (Ray Train workers)")
    p.add_argument("--gpus-per-worker", type=float, dest="gpus_per_worker")
    p.add_argument("--micro-batch", type=int, dest="micro_batch_size", help="per-worker batch per forward")
    p.add_argument("--zero-stage", type=int, dest="zero_stage", help="DeepSpeed ZeRO stage (0-3)")
    p.add_argument("--max-steps", type=int, dest="max_steps", help="stop after this many optimizer steps")
    p.add_argument("--checkpoint-every", type=int, dest="checkpoint_every", help="steps between checkpoints")
    p.add_argument("--objective", help="supervised or masked-patch")
    p.add_argument("--no-finetune", action="store_false", dest="finetune", default=None,
                   help="stop after pretraining (no fine-tuning fan-out)")
    p.add_argument("--finetune-data", dest="finetune_data",
                   help="the fine-tuning datasets' root (folder or s3://): the fan-out runs when pretraining ends")
    p.add_argument("--set", action="append", type=setting, default=[], metavar="FIELD=VALUE",
                   help="override any other config field (repeatable; VALUE is JSON or a bare string)")
    p.add_argument("--dry-run", action="store_true", help="the recipe's debug twin, on this machine")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in {"model", "dataset", "set", "dry_run", "print_config"}}
    for field, value in args.set:
        overrides[field] = value
    model = args.model or ("ViT-B/16" if args.dry_run else None)
    dataset = args.dataset or ("JFT-300M" if args.dry_run else None)
    try:
        if model is None or dataset is None:
            raise ConfigError("--model and --dataset are required (they default only with --dry-run)")
        config = resolve_pretrain_config(model, dataset, overrides, dry_run=args.dry_run)
    except ConfigError as err:
        print(f"pretrain.py: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.print_config:
        print(config.model_dump_json(indent=2))
        return 0
    if config.epochs not in config.epochs_in_table and not config.dry_run:
        print(f"note: epochs={config.epochs} is not in the table for {config.recipe_model} on "
              f"{config.dataset} (table: {'/'.join(map(str, config.epochs_in_table))})", file=sys.stderr)
    print("config: " + config.model_dump_json(), flush=True)
    from orchestrator import dry_run, finetuning, pretraining

    if config.finetune and not config.finetune_data and not config.dry_run:
        print(f"no fine-tuning data (--finetune-data): pretraining only; the fan-out can run later with: "
              f"{finetuning.later_command(config)}", flush=True)

    # SIGTERM and SIGHUP unwind the driver as Ctrl-C does, so that what it started (the embedded
    # S3, Prometheus, a local Ray) is stopped on the way out; while it trains, run_pretraining
    # handles them the same way and says where the run stands.
    with pretraining.signals_stop_the_run() as received:
        try:
            report = None
            if config.dry_run:
                fanout, report = dry_run.run(config)
            else:
                pretraining.run_pretraining(config)
                fanout = finetuning.run_after_pretraining(config)
                report = written_report(config, fanout)
                if fanout is not None:  # the results table stays the last line (the fan-out's)
                    report = None
            # Last line: the report, or the results table when the fan-out ran in a real run; a
            # dataset without a figure: exit 1.
            if report is not None or fanout is not None:
                print(report or os.path.join(fanout[1], "results.md"), flush=True)
            if fanout is not None and not fanout[0].get("complete"):
                return 1
        except ConfigError as err:  # preflight: data, checkpoint location, cluster resources
            print(f"pretrain.py: error: {err}", file=sys.stderr)
            return EXIT_USAGE
        except pretraining.TrainingError as err:  # Interrupted among them: exit 128 + its signal
            print(f"pretrain.py: {err}", file=sys.stderr)
            return err.exit_status
        except KeyboardInterrupt:  # a signal outside training (data, preflight, Ray starting, plots)
            signum = received[-1] if received else signal.SIGINT
            print(f"pretrain.py: interrupted by {signal.Signals(signum).name} outside training; the same command "
                  f"starts the run or resumes it from its last committed checkpoint", file=sys.stderr)
            return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
