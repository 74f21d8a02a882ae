"""Peak RSS of `sweep`, `report` and `compare` against --memory-budget: the README's figures.

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

from test_memory_budget import MiB, _store, feature_files, peak_rss, sweep_args  # noqa: E402


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
    # Large features (6,000 x 2,048 float32) against tiny ones, at a 128 MiB budget.
    files = {name: feature_files(root, name, n_train, n_test, dim)
             for name, n_train, n_test, dim in (("tiny", 60, 48, 8), ("big", 6000, 100, 2048))}
    for name in ("compare", "report"):
        peaks = {}
        for size, (logits, features) in files.items():
            out = root / (f"{name}-{size}.html" if name == "report" else f"{name}-{size}")
            peaks[size] = peak_rss([name, logits, "--features", features, "--memory-budget",
                                    "128MiB", "--out", out], root)
        print(f"{name} with features: tiny {peaks['tiny'] / MiB:.0f} MiB, 6,000 x 2,048 at "
              f"128 MiB {peaks['big'] / MiB:.0f} MiB (+{(peaks['big'] - peaks['tiny']) / MiB:.0f}"
              " MiB)")


if __name__ == "__main__":
    main()
