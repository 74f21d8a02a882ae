"""Finished tiles on disk, so that a killed `neighbors` resumes instead of starting over.

Next to the output `OUT` lives `OUT.partial/`: `manifest.json` (everything the result
depends on: sources, runs, options and the tile plan) and one `tile-NNNNN.npz` per
finished tile, each written atomically. A restart with a matching manifest reuses the
tiles; with any difference it starts over. The folder is removed once `OUT` is written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write, atomic_write_text
from .neighbors import Neighbors

__all__ = ["TileCheckpoint"]

logger = logging.getLogger(__name__)
_TEST_DELAY = float(os.environ.get("ENSEMBLE_KERNEL_TEST_TILE_DELAY", "0"))  # crash tests


class TileCheckpoint:
    """The `OUT.partial/` folder of one computation, described by `manifest`."""

    def __init__(self, out: Path, manifest: dict):
        self.folder = out.with_name(out.name + ".partial")
        self.manifest = manifest

    def load(self, reset: bool = True) -> dict[int, Neighbors]:
        """Tiles finished by an earlier run with the same manifest; otherwise start afresh.

        With `reset=False` (the other ranks of a torchrun job) a mismatching folder is left
        alone: rank 0 resets it.
        """
        path = self.folder / "manifest.json"
        if path.is_file():
            try:
                same = json.loads(path.read_text()) == self.manifest
            except ValueError:
                same = False
            if same:
                tiles = {}
                for f in sorted(self.folder.glob("tile-*.npz")):
                    with np.load(f) as data:
                        tiles[int(f.stem.split("-")[1])] = Neighbors(
                            torch.from_numpy(data["indices"]), torch.from_numpy(data["values"]))
                logger.info("resuming: %d finished tiles in %s", len(tiles), self.folder)
                return tiles
        if not reset:
            return {}
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        atomic_write_text(self.folder / "manifest.json", json.dumps(self.manifest))
        return {}

    def save(self, index: int, found: Neighbors) -> None:
        """Write one finished tile (atomically)."""
        atomic_write(self.folder / f"tile-{index:05d}.npz", lambda f: np.savez(
            f, indices=found.indices.cpu().numpy(), values=found.values.cpu().numpy()))
        if _TEST_DELAY:
            import time

            time.sleep(_TEST_DELAY)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
