"""Training-step speed of our ViT with SDPA attention vs the same model with textbook attention.

    .venv/bin/python benchmarks/attention.py

Prints `bench vit_sdpa_vs_manual_attention <manual step time / SDPA step time>` (above 1:
the fused kernel pays for itself). Both variants run in this process, interleaved, on
identical weights and inputs; the median of several timed steps is compared.
"""

import os
import statistics
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import build_model  # noqa: E402

MODEL, IMAGE_SIZE, BATCH, STEPS = "ViT-S/16", 224, 16, 5


def manual_attention(q, k, v, *args, **kwargs):
    weights = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
    return weights @ v


def step_seconds(model, images, labels) -> float:
    start = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    torch.manual_seed(0)
    model = build_model(MODEL, 1000, image_size=IMAGE_SIZE)
    images = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
    labels = torch.randint(0, 1000, (BATCH,))
    with torch.no_grad(), mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", manual_attention):
        manual_out = model(images)
    torch.testing.assert_close(model(images).detach(), manual_out, rtol=1e-4, atol=1e-4)

    sdpa, manual = [], []
    step_seconds(model, images, labels)  # warm-up
    for _ in range(STEPS):
        sdpa.append(step_seconds(model, images, labels))
        with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", manual_attention):
            manual.append(step_seconds(model, images, labels))
    ratio = statistics.median(manual) / statistics.median(sdpa)
    print(f"# {MODEL} {IMAGE_SIZE}px batch {BATCH}, fwd+bwd median: SDPA {statistics.median(sdpa):.3f} s, "
          f"manual {statistics.median(manual):.3f} s, {torch.get_num_threads()} threads")
    print(f"bench vit_sdpa_vs_manual_attention {ratio:.3f}")


if __name__ == "__main__":
    main()
