"""What the entry points in launch/ share: one-line usage errors (exit 2) and `--set FIELD=VALUE`.

    parser = OneLineParser(prog="finetune.py", description=...)
    parser.add_argument("--set", action="append", type=setting, default=[], metavar="FIELD=VALUE")
"""

from __future__ import annotations

import argparse
import json

EXIT_USAGE = 2  # usage and config errors, as argparse itself exits


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (no usage block) and exit with status 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def setting(text: str) -> tuple[str, object]:
    """`--set FIELD=VALUE`: VALUE as JSON, else as a bare string (a model name, a URL)."""
    field, sep, raw = text.partition("=")
    if not sep or not field:
        raise argparse.ArgumentTypeError(f"--set wants FIELD=VALUE, got {text!r}")
    try:
        return field, json.loads(raw)
    except json.JSONDecodeError:
        return field, raw
