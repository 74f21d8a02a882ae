"""The `ensemble-kernel` command: argument parsing and printing; no maths here.

One typer app (`common.app`); each module registers its commands on it:
`compute` (evaluate, neighbors, predict), `ingest` (ingest, info), `demo` (demo, sweep),
`views` (pairs, duplicates, failures, compare, report), `labels` (labels),
`label_issues` (label-issues).
"""

from __future__ import annotations

import sys

from . import compute, demo, ingest, label_issues, labels, views  # noqa: F401  (they register the commands)
from .common import app, err, parse_size
from .malloc import return_large_blocks

__all__ = ["app", "main", "parse_size"]


def main() -> None:
    """Entry point of the `ensemble-kernel` program."""
    return_large_blocks()  # peak RSS follows --memory-budget (see cli/malloc.py)
    try:
        app(standalone_mode=True)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
