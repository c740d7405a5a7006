"""Turn an image folder, an image list or a downloaded fine-tuning dataset into webdataset shards plus a manifest.

    python launch/make_shards.py --input /data/imagenet/train --output s3://bucket/imagenet/train \
        --samples-per-shard 1000 --resize-shorter 512 --workers 8
    ray job submit --working-dir . -- python launch/make_shards.py \
        --input s3://bucket/raw/imagenet21k/train --output s3://bucket/imagenet21k/train --resize-shorter 512
    python launch/make_shards.py --input s3://bucket/raw/jft/images.tsv --output s3://bucket/jft --ray
    ray job submit --working-dir . -- python launch/make_shards.py \
        --input 's3://bucket/raw/jft/train-{00000..00999}.tsv' --output s3://bucket/jft/train
    python launch/make_shards.py --input cifar-10-batches-py --output s3://bucket/cifar10
    python launch/make_shards.py --input vtab-1k/caltech101 --output s3://bucket/vtab/caltech101

--format (default auto, told from the input folder's files):
  imagefolder  an ImageFolder tree (one subfolder per class) in a folder or under an
               s3://bucket/prefix, a folder of images with labels.json (file name -> list of
               class names), or a list file (.tsv: URL<TAB>label[,label...]; .csv:
               URL,label[,label...]; local or on S3), or a list in parts named by a brace
               pattern (as webdataset names shards): the parts are counted first, then
               converted one after another, so the driver holds one part's images at a
               time; see data_pipelines/image_inputs.py.
               The work is cut into whole shards with fixed names, written by --workers
               processes here, or by Ray tasks with --ray (a local Ray) or on the cluster this
               runs in (a Ray job, or RAY_ADDRESS). A run again after an interruption keeps the
               shards that are written and verify, and writes the rest; the manifest is last.
  cifar        cifar-10-batches-py/ or cifar-100-python/ (the python pickles): writes
               OUTPUT/train/ and OUTPUT/test/; see data_pipelines/downstream.py.
  vtab         a VTAB-1k task folder (images plus train800.txt, val200.txt, train800val200.txt,
               test.txt): writes OUTPUT/train800/, val200/, train800val200/, test/.
One summary line is printed per folder written. S3 is configured the standard boto3 way
(AWS_ENDPOINT_URL, AWS_PROFILE, IAM roles). Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orchestrator.command_line import EXIT_USAGE, OneLineParser  # noqa: E402
from data_pipelines.image_inputs import is_list_file  # noqa: E402
from data_pipelines.s3 import DataSourceError, is_s3_url  # noqa: E402
from data_pipelines.downstream import FORMATS, detect_format, write_downstream  # noqa: E402
from data_pipelines.shard_writer import ShardWriteError, make_shards  # noqa: E402


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="make_shards.py", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True,
                   help="ImageFolder tree (a folder or s3://bucket/prefix), folder of images with labels.json, "
                        "list file (.tsv/.csv, local or s3://, or its parts: 'train-{000..099}.tsv'), CIFAR python folder "
                        "or VTAB-1k task folder")
    p.add_argument("--output", required=True, help="a folder or s3://bucket/prefix (CIFAR, VTAB: one below it per split)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="input layout (default: told from its files)")
    p.add_argument("--samples-per-shard", type=_positive, default=1000)
    p.add_argument("--resize-shorter", type=_positive, default=None, metavar="PX",
                   help="shrink images whose shorter side exceeds PX (bytes are kept unchanged otherwise)")
    p.add_argument("--workers", type=_positive, default=None,
                   help="processes writing shards (default 1), or Ray tasks at once (default: the cluster's CPUs); "
                        "CIFAR: unused")
    p.add_argument("--ray", action="store_true",
                   help="write the shards as Ray tasks on a local Ray (on by itself in a Ray job or with RAY_ADDRESS)")
    args = p.parse_args(argv)
    local_only = args.format in ("cifar", "vtab")
    if local_only and (is_s3_url(args.input) or is_list_file(args.input)):
        p.error(f"--format {args.format} reads a local folder, not {args.input}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    folder = not (is_s3_url(args.input) or is_list_file(args.input))  # S3 trees and lists: image inputs
    fmt = detect_format(args.input) if args.format == "auto" and folder else args.format
    try:
        if fmt in ("imagefolder", "auto"):
            print(make_shards(args.input, args.output, samples_per_shard=args.samples_per_shard,
                              resize_shorter=args.resize_shorter, workers=args.workers,
                              ray=args.ray or bool(os.environ.get("RAY_ADDRESS"))).line())
        else:
            write_downstream(args.input, args.output, fmt, samples_per_shard=args.samples_per_shard,
                             resize_shorter=args.resize_shorter, workers=args.workers or 1,
                             report=lambda summary: print(summary.line(), flush=True))
    except (ShardWriteError, DataSourceError) as error:
        print(f"make_shards.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
