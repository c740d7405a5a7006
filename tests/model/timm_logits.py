"""Run by tests/model/test_timm_logits.py in a process of its own: our models and timm's own,
carrying the same (random) weights through model/foreign.py both ways, on the same images.
Prints one JSON object: {"<our name> <- timm" | "<our name> -> timm": max relative difference}.

timm imports torchvision, whose PyPI wheel pairing with torch 2.13 is a CUDA build: its _C.so
does not load beside the CPU torch, and its _meta_registrations.py then fails at import on
`register_fake("torchvision::nms")` for an operator nobody defined (pytorch/vision#9085; its fix,
#9086, was closed). Declaring the two operators' schemas first, with no kernel, lets the import
go on; nms itself is never called here. Both packages live in .venv/timm-only (the Makefile),
put on sys.path by this process alone, so nothing else in the suite can import them.
"""

import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, ".venv", "timm-only"))

_schemas = torch.library.Library("torchvision", "FRAGMENT")  # kept alive: the schemas live with it
for _op in ("nms", "qnms"):
    _schemas.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

import timm  # noqa: E402

from model import build_model  # noqa: E402
from model.foreign import check_state, from_timm, timm_model_args, to_timm  # noqa: E402

CASES = [("ViT-Ti/16", 32), ("R50+ViT-B/16", 64), ("R50x1", 64)]


def perturbed(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return module.eval()


def difference(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def main():
    torch.manual_seed(0)
    found = {}
    for name, size in CASES:
        images = torch.randn(2, 3, size, size)
        # Ours out: timm builds what timm_model_args names and loads to_timm's state strictly.
        ours = perturbed(build_model(name, num_classes=5, image_size=size))
        timm_name, args = timm_model_args(name, ours.state_dict())
        theirs = timm.create_model(timm_name, pretrained=False, **args).eval()
        theirs.load_state_dict(to_timm(ours.state_dict()), strict=True)
        with torch.no_grad():
            found[f"{name} -> timm"] = difference(theirs(images), ours(images))
        # timm's in: another random timm model, converted by from_timm into ours.
        theirs = perturbed(timm.create_model(timm_name, pretrained=False, **args))
        state = from_timm(theirs.state_dict())
        build = check_state(state, name)
        if build.get("representation_size") is None:
            build.pop("representation_size", None)
        back = build_model(name, **build).eval()
        back.load_state_dict(state, strict=True)
        with torch.no_grad():
            found[f"{name} <- timm"] = difference(theirs(images), back(images))
    print(json.dumps({"timm": timm.__version__, **found}))


if __name__ == "__main__":
    main()
