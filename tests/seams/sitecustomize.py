"""Test-side seams for the processes a test starts: on PYTHONPATH (see conftest.seam_env),
Python imports this at start-up, and it slows the program where a crash test needs a wide
window, without anything of the kind in the package itself:

- ENSEMBLE_KERNEL_TEST_WRITE_DELAY (seconds): after each block of runs an append writes;
- ENSEMBLE_KERNEL_TEST_TILE_DELAY (seconds): after each tile a checkpoint saves.
"""

import os
import time

_WRITE = float(os.environ.get("ENSEMBLE_KERNEL_TEST_WRITE_DELAY", "0"))
_TILE = float(os.environ.get("ENSEMBLE_KERNEL_TEST_TILE_DELAY", "0"))

if _WRITE or _TILE:
    from ensemble_kernel.storage import _checkpoint, _store

    if _WRITE:
        wrote = _store._wrote

        def _slow_wrote(step, _wrote=wrote):
            _wrote(step)
            if step.startswith("runs "):
                time.sleep(_WRITE)

        _store._wrote = _slow_wrote
    if _TILE:
        save = _checkpoint.TileCheckpoint.save

        def _slow_save(self, index, found, _save=save):
            _save(self, index, found)
            time.sleep(_TILE)

        _checkpoint.TileCheckpoint.save = _slow_save
