"""Writers: each takes a result object and a folder, writes atomically, returns the paths."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .._atomic import atomic_write, atomic_write_text
from ..analysis._sweep import SweepResult
from .plots import plot_sweep

__all__ = ["write_sweep", "sweep_json"]


def sweep_json(result: SweepResult) -> dict:
    sig = result.significance
    return {"rows": result.table(), "ablations": result.ablations,
            "significance": sig.__dict__ if sig is not None else None,
            "n_test": result.n_test, "n_test_all": result.n_test_all}


def write_sweep(result: SweepResult, folder: Path, title: str = "") -> list[Path]:
    """sweep.png, sweep.csv and sweep.json in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    png, csv_path, json_path = folder / "sweep.png", folder / "sweep.csv", folder / "sweep.json"
    fig = plot_sweep(result, title)
    atomic_write(png, lambda f: fig.savefig(f, format="png"))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(result.table()[0]))
    writer.writeheader()
    writer.writerows(result.table())
    atomic_write_text(csv_path, buffer.getvalue())
    atomic_write_text(json_path, json.dumps(sweep_json(result), indent=2))
    return [png, csv_path, json_path]
