"""Where runs live: run-file formats, the store, checkpoints, and opening either.

Imports `core` (for the LogitSource protocol and the neighbours a checkpoint keeps) and
the base modules, never `analysis` or the interfaces (tests/test_layers.py).

- `_formats`: `.pt` and `.npz` run files, read safely; labels, inputs, features files;
- `_configs`: training configurations by the SHA-256 of their code;
- `_store` (with `_checks`, `_io`, `_meta`, `_precision`): the zarr store, its commit,
  its checksums and its float16 check (docs/store.md);
- `_verify`: `verify_store`, `repair_file`, `upgrade_store`;
- `_checkpoint`: finished tiles of a `neighbors` job;
- `_runs`: `open_runs`, a store or run files as one `Runs`;
- `_cifar`: the published CIFAR-10 labels in the runs' order.
"""

from ._runs import Runs, open_runs
from ._store import RunStore, is_store
from ._verify import repair_file, upgrade_store, verify_store

__all__ = ["open_runs", "Runs", "RunStore", "is_store", "verify_store", "repair_file",
           "upgrade_store"]
