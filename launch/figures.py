"""Draw the seed's Figure 7 (position-embedding similarity, mean attention distance) for an export.

    python launch/figures.py --weights s3://b/runs/vit-b-16-jft-300m/weights/model.safetensors \\
        [--images s3://b/imagenet/val] [--out figures/] [--samples 64]

The trained model is drawn beside its initialisation: the recipe that model.json names, built
after torch.manual_seed(0). The attention distances average over --samples images of the
shards at --images (eval crop at the export's image size), or synthetic ones. Writes four PNGs
and seed_figures.json (default folder runs/<run>/figures), prints one line saying what the
numbers show, the files, and last the folder. Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orchestrator.command_line import EXIT_USAGE, OneLineParser  # noqa: E402
from orchestrator.config import ConfigError  # noqa: E402




def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="figures.py", description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True, help="a vitscale export: <checkpoints>/<run>/weights/model.safetensors")
    p.add_argument("--images", help="folder or s3:// prefix of shards to average attention over (default: synthetic)")
    p.add_argument("--out", help="folder for the figures (default: runs/<run>/figures)")
    p.add_argument("--samples", type=int, default=64, help="how many images (default 64)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from orchestrator.seed_figures import figures_of_export

    try:
        result = figures_of_export(args.weights, images=args.images, out_dir=args.out, samples=args.samples)
    except ConfigError as err:
        print(f"figures.py: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(result["statement"])
    for path in [*result["paths"], os.path.join(result["out_dir"], "seed_figures.json")]:
        print(path)
    print(result["out_dir"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
