"""checkpoint_worker.py whose dumps also hold every parameter's full fp32 weights and Adam
moments (gathered across ranks), which compare across world sizes (run by test_universal.py).

    python tests/orchestrator/universal_worker.py <checkpoint_worker.py's arguments>
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import checkpoint_worker  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: E402

rank_state_of = checkpoint_worker.state_of


def state_of(engine) -> dict:
    """checkpoint_worker's state plus "full": {parameter: {fp32, exp_avg, exp_avg_sq}} (a collective)."""
    full = {
        name: {"fp32": safe_get_full_fp32_param(param),
               "exp_avg": safe_get_full_optimizer_state(param, "exp_avg"),
               "exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq")}
        for name, param in engine.module.named_parameters()
    }
    return rank_state_of(engine) | {"full": full}


if __name__ == "__main__":
    checkpoint_worker.state_of = state_of
    checkpoint_worker.main()
