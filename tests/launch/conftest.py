"""Shared by the entry points' tests."""

import json
import sys

from tests.conftest import run_process

# An entry point's main() called with each argv in turn, in one interpreter: a process each
# costs seconds of imports, and these calls stop before anything is started.
_MAIN_OF = """
import contextlib, io, json, runpy, sys
main = runpy.run_path(sys.argv[1])["main"]
results = []
for argv in json.loads(sys.argv[2]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def main_of(script: str, argvs: list[list[str]]) -> list[tuple[int, str]]:
    """[(exit status, stderr)] of `script`'s main(argv) for each argv (run from /)."""
    out = run_process([sys.executable, "-c", _MAIN_OF, script, json.dumps(argvs)], capture_output=True, text=True,
                         timeout=180, cwd="/")
    assert out.returncode == 0, out.stderr
    return [tuple(r) for r in json.loads(out.stdout.strip().splitlines()[-1])]
