"""Official ViT weights in (big_vision / vision_transformer .npz, timm), our exports out to timm.

    python launch/import_weights.py --input ViT-B_16.npz --model ViT-B/16 --output s3://b/imported/vit-b-16
    python launch/import_weights.py --input s3://b/runs/r/weights/model.safetensors --to timm --output vit.safetensors

In: writes a vitscale export (`<output>/weights/model.safetensors` + `model.json`) that
`launch/finetune.py --weights` takes; its path is the last line printed. Out (`--to timm`):
a timm state dict (safetensors) that `timm.create_model(NAME, pretrained=False, **ARGS)` loads
with strict=True; NAME and ARGS are printed and kept in the file's metadata. In: ViT, R50+ViT
and BiT .npz files and timm state dicts; out: the zoo models timm builds (model/foreign.py).
Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orchestrator.command_line import EXIT_USAGE, OneLineParser  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="import_weights.py", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="a file or s3:// URL: .npz, .safetensors, .pth/.pt/.bin")
    p.add_argument("--output", required=True, help="folder or s3:// prefix of the export (or, with --to timm, the file)")
    p.add_argument("--model", help="the zoo model, e.g. ViT-B/16 (default: the one whose shapes the file has)")
    p.add_argument("--format", default="auto", choices=["auto", "npz", "timm", "vitscale"])
    p.add_argument("--to", default="vitscale", choices=["vitscale", "timm"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from data_pipelines.s3 import DataSourceError
    from model.foreign import ForeignWeightsError
    from model.specs import MODEL_NAMES
    from orchestrator.imports import export_to_timm, import_weights

    if args.model is not None and args.model not in MODEL_NAMES:
        print(f"import_weights.py: error: unknown model {args.model!r}; valid: {', '.join(MODEL_NAMES)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.to == "timm":
            name, kwargs = export_to_timm(args.input, args.output, args.format)
            call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            print(f"timm: timm.create_model({name!r}, pretrained=False, {call}) loads it with strict=True")
            print(args.output)
            return 0
        record = import_weights(args.input, args.output, args.model, args.format)
    except (ForeignWeightsError, DataSourceError) as error:
        print(f"import_weights.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(f"imported {record['model']} from {record['source_format']} ({record['num_classes']} classes, "
          f"{record['image_size']} px, sha256 {record['sha256'][:12]}): {json.dumps(record['source'])}")
    print(record["weights"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
