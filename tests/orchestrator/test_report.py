"""orchestrator/report.py's reading of a run's own history (the dry run's report end to end is
tests/launch/test_pretrain_cli.py's)."""

import json
import os

from orchestrator.report import draw_history, read_history


def part(folder, name: str, entries: list[dict]) -> None:
    with open(os.path.join(folder, name), "w") as f:
        f.write("".join(json.dumps(e) + "\n" for e in entries))


def test_a_resumed_runs_history_is_its_last_attempt_from_the_checkpoint_on(tmp_path):
    """First attempt: steps 2-8 logged, step 5 committed, then killed. The second resumes from 5
    and logs 6-10: its rows replace the first's from step 6 on (a step the first logged later
    than the resume point is gone too), and the commits of both attempts are kept."""
    part(tmp_path, "000000000001000-step-00000005.jsonl",
         [{"step": s, "time": 1000 + s, "loss": 10.0 - s} for s in (2, 4)] + [{"commit": 5, "time": 1006}])
    part(tmp_path, "000000000001009-step-00000008.jsonl", [{"step": s, "time": 1000 + s, "loss": 10.0 - s} for s in (6, 8)])
    part(tmp_path, "000000000002010-step-00000010.jsonl",
         [{"step": s, "time": 2000 + s, "loss": 20.0 - s} for s in (6, 10)] + [{"commit": 10, "time": 2011}])
    rows, commits = read_history(str(tmp_path))
    assert [(r["step"], r["loss"]) for r in rows] == [(2, 8.0), (4, 6.0), (6, 14.0), (10, 10.0)]
    assert [c["commit"] for c in commits] == [5, 10]
    path = draw_history(rows, commits, str(tmp_path / "h.png"), "t")
    assert open(path, "rb").read(4) == b"\x89PNG"


def test_no_history_is_no_rows(tmp_path):
    assert read_history(str(tmp_path / "absent")) == ([], [])
