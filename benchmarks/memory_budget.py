"""Peak RSS of `sweep` and `report` against --memory-budget: the figures the README quotes.

    .venv/bin/python benchmarks/memory_budget.py

Uses the helpers of tests/test_memory_budget.py: the same stores (16 runs, 4 classes;
tiny: 60 train / 48 test examples; big: 2,000 / 6,000) and the same measurement (the
program's own VmHWM, written as it exits). Prints each peak and its excess over the
tiny store's baseline.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_memory_budget import MiB, _store, peak_rss, sweep_args  # noqa: E402


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="ek-memory-"))
    tiny, big = _store(root / "tiny", 60, 48), _store(root / "big", 2000, 6000)
    commands = {
        "sweep": lambda src: sweep_args(src, root / "sweep"),
        "report": lambda src: ["report", src, "--ranks", "0:8", "--out", root / "r.html"],
    }
    for name, make in commands.items():
        base = peak_rss(make(tiny), root)
        print(f"{name}: tiny store {base / MiB:.0f} MiB")
        for budget in ("64MiB", "1GiB"):
            peak = peak_rss([*make(big), "--memory-budget", budget], root)
            print(f"{name}: --memory-budget {budget}: {peak / MiB:.0f} MiB "
                  f"(+{(peak - base) / MiB:.0f} MiB)")


if __name__ == "__main__":
    main()
