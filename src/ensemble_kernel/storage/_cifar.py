"""CIFAR-10 labels in the order of the published runs, from files the user already has.

The published CIFAR-10 runs (`logs_saveoutputs_main/<uuid>/log.pt`) carry no labels.
Their `logits_train` rows follow torchvision's `CIFAR10(train=True)` order (the five
training batches, `data_batch_1` to `data_batch_5`, concatenated) and `logits` /
`logits_tta` rows follow `CIFAR10(train=False)` (`test_batch`).

Two readers, the same labels:

- ``torchvision``: `torchvision.datasets.CIFAR10(root, train=..., download=False)`
  (the optional extra ``ensemble-kernel[cifar]``); it never downloads.
- ``pickle``: the standard python batches (`cifar-10-batches-py/`) read by a restricted
  unpickler that resolves no global at all. The batches are dicts of plain lists, strings
  and one NumPy array (`data`, the pixels, which is not needed): the array's
  reconstruction is replaced by an inert placeholder, never by NumPy's code, and any
  other global is refused. Nothing in the file can run code.

Nothing is downloaded: missing files are a one-line error that says where to get them.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

__all__ = ["CifarLabels", "read_cifar10_labels", "find_cifar10_batches", "safe_unpickle",
           "CIFAR10_CLASSES"]

BATCH_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
# torchvision's checksums of the published files (torchvision/datasets/cifar.py)
MD5 = {"data_batch_1": "c99cafc152244af753f735de768cd75f",
       "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
       "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
       "data_batch_4": "634d18415352ddfa80567beed471001a",
       "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
       "test_batch": "40351d587109b95175f43aff81a1287e",
       "batches.meta": "5ff9c542aee3614f3951f8cda6e48888"}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
WHERE_TO_GET = ("download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/"
                "cifar.html and extract it there (it makes cifar-10-batches-py/)")
# The globals a pickled NumPy array names (the published batches are Python 2 pickles; a
# copy re-pickled by Python 3 also names _codecs.encode for the array's bytes); each
# becomes an inert placeholder, never the function it names.
_ARRAY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray",
                  "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"),
                  ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                  ("_codecs", "encode")}


@dataclass(frozen=True)
class CifarLabels:
    """CIFAR-10's labels in torchvision's order.

    Attributes
    ----------
    labels_train : ndarray of shape (50000,), int64, the training batches 1 to 5 in order.
    labels_test : ndarray of shape (10000,), int64, the test batch.
    class_names : the ten names, index = label.
    reader : 'torchvision' or 'pickle', whichever read them.
    """

    labels_train: np.ndarray
    labels_test: np.ndarray
    class_names: tuple[str, ...]
    reader: str


class _Opaque:
    """What a pickled array becomes: it accepts its arguments and state and keeps none."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _Refused(pickle.UnpicklingError):
    """A global the unpickler will not resolve."""


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ARRAY_GLOBALS:
            return _Opaque  # never NumPy's own function: the pixels are not needed
        raise _Refused(f"global '{module}.{name}' is not allowed")


def safe_unpickle(data: bytes, where: str):
    """Unpickle `data` resolving no global (arrays become inert placeholders).

    Raises InputError naming `where` if the pickle needs anything else (a class, a
    function) or is damaged.
    """
    try:
        return _NoGlobals(io.BytesIO(data), encoding="latin1").load()
    except _Refused as e:
        raise InputError(f"{where}: refusing to read it, the pickle names a global that is "
                         f"not plain data ({e}); it is not a CIFAR-10 python batch") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError, RecursionError) as e:
        raise InputError(f"{where}: not a readable CIFAR-10 python batch (truncated or "
                         f"damaged?): {type(e).__name__}: {e}") from e


def find_cifar10_batches(root: str | Path) -> Path:
    """The folder holding the python batches: ROOT/cifar-10-batches-py, or ROOT itself."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"--root {root}: no such directory; point it at the folder that "
                         f"holds {BATCH_FOLDER}/ (torchvision's root), or {WHERE_TO_GET}")
    for folder in (root / BATCH_FOLDER, root):
        if all((folder / name).is_file() for name in (*TRAIN_BATCHES, TEST_BATCH)):
            return folder
    missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH) if not (root / BATCH_FOLDER / n).is_file()]
    raise InputError(f"--root {root}: no CIFAR-10 python batches under it ({BATCH_FOLDER}/ "
                     f"lacks {', '.join(missing)}); {WHERE_TO_GET}")


def _batch_labels(path: Path, modified: list[str]) -> np.ndarray:
    data = path.read_bytes()
    if hashlib.md5(data).hexdigest() != MD5.get(path.name):
        modified.append(path.name)
    entry = safe_unpickle(data, str(path))
    if isinstance(entry, dict):
        entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    labels = entry.get("labels") if isinstance(entry, dict) else None
    if not isinstance(labels, list) or not all(type(v) is int for v in labels):
        raise InputError(f"{path}: expected a dict with a list of integer 'labels' (a CIFAR-10 "
                         f"python batch), got {type(entry).__name__}"
                         + (f" with keys {sorted(map(str, entry))}" if isinstance(entry, dict)
                            else ""))
    array = np.asarray(labels, dtype=np.int64)
    if array.size and (array.min() < 0 or array.max() > 9):
        raise InputError(f"{path}: labels must lie in 0..9, got values from {array.min()} to "
                         f"{array.max()}")
    return array


def _class_names(folder: Path) -> tuple[str, ...]:
    path = folder / META
    if not path.is_file():
        return CIFAR10_CLASSES
    entry = safe_unpickle(path.read_bytes(), str(path))
    names = entry.get("label_names") if isinstance(entry, dict) else None
    if not isinstance(names, list) or len(names) != 10 or \
            not all(isinstance(n, str) for n in names):
        raise InputError(f"{path}: expected a dict with ten 'label_names'")
    return tuple(names)


def _read_pickles(root: Path) -> CifarLabels:
    folder = find_cifar10_batches(root)
    modified: list[str] = []
    train = np.concatenate([_batch_labels(folder / name, modified) for name in TRAIN_BATCHES])
    test = _batch_labels(folder / TEST_BATCH, modified)
    if modified:
        warnings.warn(f"{folder}: the MD5 of {', '.join(modified)} is not that of the published "
                      "file (a modified copy?); their labels are used as they are",
                      stacklevel=3)
    return CifarLabels(train, test, _class_names(folder), "pickle")


def _read_torchvision(root: Path) -> CifarLabels:
    try:
        from torchvision.datasets import CIFAR10
    except ImportError as e:
        raise InputError("--reader torchvision needs torchvision: pip install "
                         "'ensemble-kernel[cifar]', or use --reader pickle (no torchvision "
                         "needed)") from e
    folder = find_cifar10_batches(root)  # the same one-line error when files are missing
    if folder.name != BATCH_FOLDER:
        raise InputError(f"--root {root}: torchvision reads the batches from a folder named "
                         f"{BATCH_FOLDER}/, and these are in {folder.name}/: rename it, or use "
                         "--reader pickle")
    try:  # torchvision's root is the folder that holds cifar-10-batches-py/
        train = CIFAR10(str(folder.parent), train=True, download=False)
        test = CIFAR10(str(folder.parent), train=False, download=False)
    except RuntimeError as e:  # "Dataset not found or corrupted": a checksum differs
        raise InputError(f"--root {root}: torchvision refused the files ({e}); "
                         f"{WHERE_TO_GET}, or use --reader pickle") from e
    return CifarLabels(np.asarray(train.targets, dtype=np.int64),
                       np.asarray(test.targets, dtype=np.int64), tuple(train.classes),
                       "torchvision")


def read_cifar10_labels(root: str | Path, *, reader: str = "auto") -> CifarLabels:
    """CIFAR-10's train and test labels, in the order of the published runs.

    Parameters
    ----------
    root : the folder that holds `cifar-10-batches-py/` (torchvision's `root`), or that
        folder itself.
    reader : 'torchvision' (needs the extra ``[cifar]``), 'pickle' (the built-in safe
        reader) or 'auto' (torchvision when installed, else pickle).

    Returns
    -------
    CifarLabels with labels_train of shape (50000,) and labels_test of shape (10000,).
    """
    root = Path(root)
    if reader not in ("auto", "torchvision", "pickle"):
        raise InputError(f"--reader takes auto, torchvision or pickle, got {reader!r}")
    if reader == "auto":
        try:
            import torchvision  # noqa: F401
            reader = "torchvision"
        except ImportError:
            reader = "pickle"
    return _read_torchvision(root) if reader == "torchvision" else _read_pickles(root)
