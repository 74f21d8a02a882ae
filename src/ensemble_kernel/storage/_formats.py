"""Readers for run files: the published `.pt` layout, `.npz`, and directories of them.

A run file from elsewhere is untrusted: `.pt` files are loaded with
``torch.load(weights_only=True)`` (memory-mapped where the zip format allows), and
`.npz` files are read member by member through `zipfile`, never unpickled. Neither can
execute code. Every member of a zip (`.npz`, or a `.pt` written by ``torch.save``) is
checked against its CRC-32 when read, so a damaged file is refused rather than read as
other numbers (torch's own zip reader checks none: a `.pt` is read through once more
for it); an `.npz` member whose header declares more data than the member holds is
refused before anything is allocated. Arrays in another byte order are converted to the
machine's.

Layouts (docs/architecture.md §3):

- `.pt`: a dict whose ``logits`` holds test outputs and ``logits_train`` train outputs,
  each (n_examples, n_classes) for one run or (n_runs, n_examples, n_classes) for a
  batch; optional ``labels_train`` / ``labels_test`` (or ``labels``), ``code``, others.
- `.npz`: arrays ``logits_train`` and ``logits_test``, optional ``labels_train`` and
  ``labels_test``.
- a directory: every `.pt` below it, in lexicographic order of relative paths.

`test_key` names another array as the test split (the published ``logits_tta``: the
test-time-augmented outputs). A file without ``logits_train`` holds one split only: its
train split has 0 examples (the larger published set is test logits only).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import math
import os
import pickle
import re
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ._configs import code_groups, code_hash, resolve_code, warn_if_mixed
from ..errors import InputError, RunFileError
from ..core._sources import _FLOAT_DTYPES, ArraySource, LogitSource, sequence_of

__all__ = ["RunFile", "RunSet", "read_run_file", "find_run_files", "open_runs", "read_labels",
           "load_npz", "check_labels", "check_extra", "extra_dims", "read_extras"]

_TEST_KEYS = ("logits", "logits_test")
_LABEL_KEYS = {"train": ("labels_train",), "test": ("labels_test", "labels")}


@dataclass(frozen=True)
class RunFile:
    """The runs of one file.

    Attributes
    ----------
    path : where it was read from.
    train, test : logits of shape (n_runs, n_examples, n_classes) (memory-mapped for `.pt`);
        `train` has 0 examples when the file holds no train split.
    labels_train, labels_test : int64 labels of shape (n_examples,), or None if absent.
    code : the training code string, if the file has one.
    """

    path: Path
    train: torch.Tensor
    test: torch.Tensor
    labels_train: torch.Tensor | None
    labels_test: torch.Tensor | None
    code: str | None = None

    @property
    def n_runs(self) -> int:
        return self.train.shape[0]

    @property
    def code_sha256(self) -> str | None:
        """SHA-256 of `code` (the training configuration), or None without code."""
        return code_hash(self.code)


@dataclass(frozen=True)
class RunSet:
    """Runs gathered from one or more sources: the references (train) and queries (test).

    Attributes
    ----------
    train, test : LogitSource of shape (n_models, n_examples, n_classes); `train` has 0
        examples when the source holds one split only (see `has_train`).
    labels_train, labels_test : Tensor of shape (n_examples,), int64, or None.
    sources : the files, in the order their runs were concatenated.
    codes : {code sha256 or None: run count} of the runs used, in order of appearance.
    """

    train: LogitSource
    test: LogitSource
    labels_train: torch.Tensor | None
    labels_test: torch.Tensor | None
    sources: tuple[str, ...]
    codes: dict = dataclasses.field(default_factory=dict)

    @property
    def has_train(self) -> bool:
        """False for a single-split source (test logits only)."""
        return self.train.n_examples > 0

    @property
    def n_models(self) -> int:
        return self.train.n_models

    @property
    def n_classes(self) -> int:
        return self.train.n_classes


_EXPECTED_LOGITS = ("a dense floating-point tensor or array (float16, bfloat16, float32 or "
                    "float64; on any device)")


def _native(array: np.ndarray) -> np.ndarray:
    """`array` in the machine's byte order (a copy if it was in the other one)."""
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _tensor_problem(tensor: torch.Tensor) -> str | None:
    """What keeps `tensor` from being read as dense data, or None."""
    if tensor.is_nested:
        return "a nested tensor"
    if tensor.layout != torch.strided:
        return f"a {str(tensor.layout).replace('torch.', '')} tensor"
    if tensor.device.type == "meta":
        return "a meta tensor (a shape without data)"
    return None


def _as_runs(value, path: Path, key: str) -> torch.Tensor:
    where = f"{path}: '{key}' must hold the logits as {_EXPECTED_LOGITS}"
    if isinstance(value, np.ndarray):
        if value.dtype.kind != "f" or value.dtype.itemsize not in (2, 4, 8):
            raise RunFileError(f"{where}, got a NumPy array of dtype {value.dtype}")
        tensor = torch.from_numpy(_native(value))
    elif isinstance(value, torch.Tensor):
        tensor = value
        problem = _tensor_problem(tensor)
        if problem is not None:
            raise RunFileError(f"{where}, got {problem}")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise RunFileError(f"{where}, got {str(tensor.dtype).replace('torch.', '')}")
    else:
        raise RunFileError(f"{where}, got {type(value).__name__}")
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 3:
        raise RunFileError(
            f"{path}: '{key}' must have shape (n_examples, n_classes) or "
            f"(n_runs, n_examples, n_classes), got {tuple(tensor.shape)}"
        )
    return tensor


_INT64_MAX = np.iinfo(np.int64).max


def _as_labels(value, where: str) -> torch.Tensor:
    bad = f"{where}: labels must be a 1-D integer array"
    if isinstance(value, torch.Tensor):
        problem = _tensor_problem(value)
        if problem is not None:
            raise InputError(f"{bad}, got {problem}")
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise InputError(f"{bad}, got {str(value.dtype).replace('torch.', '')} of shape "
                             f"{tuple(value.shape)}")
        try:
            array = value.detach().cpu().numpy()
        except (TypeError, RuntimeError) as e:  # (a dtype NumPy lacks: quantized, ...)
            raise InputError(f"{bad}, got {str(value.dtype).replace('torch.', '')}") from e
    else:
        try:
            array = np.asarray(value)
        except (ValueError, TypeError) as e:
            raise InputError(f"{bad}, got {type(value).__name__} ({e})") from e
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise InputError(f"{bad}, got {array.dtype} of shape {array.shape}")
    if array.dtype.kind == "u" and array.dtype.itemsize == 8 and array.size \
            and array.max() > _INT64_MAX:
        i = int(np.argmax(array > _INT64_MAX))
        raise InputError(f"{where}: label {int(array[i])} (example {i}) is not a class index: "
                         "labels must lie in 0..n_classes-1")
    return torch.from_numpy(array.astype(np.int64))


def _numpy_globals() -> list:
    """What unpickling plain NumPy arrays and scalars needs, and nothing that runs code.

    `_reconstruct` and `scalar` only build arrays and scalars from bytes; the dtype classes
    are the numeric, boolean and text ones (no object or structured dtypes, which could
    hold other objects). Names are given for NumPy 1 (`numpy.core`) and 2 (`numpy._core`).
    """
    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy 1
        from numpy.core import multiarray  # type: ignore[no-redef]
    out: list = [np.ndarray, np.dtype]
    for name in ("_reconstruct", "scalar"):
        fn = getattr(multiarray, name)
        out += [(fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    dtypes = getattr(np, "dtypes", None)  # NumPy >= 1.25
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")
                and n not in ("ObjectDType", "VoidDType")]
    return out


def _torch_load(path: Path, mmap: bool):
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    context = safe_globals(_numpy_globals()) if safe_globals else contextlib.nullcontext()
    with context, warnings.catch_warnings():
        # (torch warns about a pickle protocol it may not read; its error then says so)
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _first_line(e: BaseException) -> str:
    """An exception's first meaningful line, without terminal escape codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _torch_reason(e: BaseException) -> str:
    """Why torch.load refused a file, in one line, without torch's advice to load it
    with weights_only=False (which would let the file run code: never ours to give)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if detail is not None:
        return detail.group(1).strip()
    line = _first_line(e)
    return "the safe (tensors-only) load refused it" if "weights_only" in line else line


# Where the bytes of a file are damaged, zipfile and the readers can raise any of these.
_DAMAGED = (zipfile.BadZipFile, EOFError, OSError, ValueError, struct.error, zlib.error,
            NotImplementedError, RuntimeError, OverflowError, KeyError, IndexError, TypeError,
            SyntaxError)
_ZIP_MAGIC = b"PK\x03\x04"
_CHUNK = 1 << 22


def _check_zip_members(path: Path) -> bool:
    """Read every member of a zip-format `.pt` through, so that zipfile checks its CRC-32
    (torch's reader checks none: a damaged byte in a tensor would load as another number).
    Returns False for a file that is not a zip (the legacy format, which has no checksums).

    A full read: about 40 ms per 100 MB from the page cache, where the engine will read
    the same pages anyway.
    """
    try:
        with open(path, "rb") as f:
            if f.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:  # as torch tells the formats apart
                return False
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as member:
                    while member.read(_CHUNK):
                        pass
    except _DAMAGED as e:
        raise RunFileError(f"{path}: not a readable PyTorch file (truncated or damaged?): "
                           f"{_first_line(e)}") from e
    return True


def _pickle_refusal(path: Path, e: pickle.UnpicklingError) -> RunFileError:
    blocked = re.search(r"(?:GLOBAL|but got <class) '?([\w.]+)", str(e))
    if blocked is not None or "GLOBAL" in str(e):
        what = blocked.group(1) if blocked else "an object that is not plain data"
        return RunFileError(
            f"{path}: refusing to load, it would need to run code to unpickle {what} "
            "(only tensors, NumPy arrays, dicts, lists, numbers and strings are allowed); "
            "re-save the file with plain tensors")
    if "Weights only load failed" in str(e) or "WeightsUnpickler" in str(e):
        return RunFileError(
            f"{path}: a pickle that cannot be loaded safely ({_torch_reason(e)}): it is not a "
            "tensors-only torch.save file. If you trust its source, convert it once in your "
            "own Python session: obj = pickle.load(f) (or torch.load(f, weights_only=False) "
            "for an old torch.save file), then torch.save(obj, 'run.pt') writes a file that "
            "loads safely; ensemble-kernel never unpickles code")
    return RunFileError(f"{path}: not a readable PyTorch file (truncated or damaged?): "
                        f"{_torch_reason(e)}")


def _load_pt(path: Path) -> dict:
    zipped = _check_zip_members(path)
    try:
        try:
            obj = _torch_load(path, mmap=zipped)
        except RuntimeError as e:
            if not zipped or "mmap" not in str(e):
                raise
            obj = _torch_load(path, mmap=False)  # a zip torch cannot memory-map
    except pickle.UnpicklingError as e:
        raise _pickle_refusal(path, e) from e
    except Exception as e:  # noqa: BLE001 - whatever torch makes of bytes from elsewhere
        if isinstance(e, MemoryError):
            raise
        raise RunFileError(
            f"{path}: not a readable PyTorch file (truncated or damaged?): {_torch_reason(e)}"
        ) from e
    if not isinstance(obj, dict):
        raise RunFileError(
            f"{path}: expected a dict with 'logits' and 'logits_train', got {type(obj).__name__}"
        )
    return obj


_NPY_MAGIC = b"\x93NUMPY"
_MAX_NPY_HEADER = 10_000  # NumPy's own limit without allow_pickle
_MAX_DEFLATE_RATIO = 1032  # deflate expands its input this much at most


def _npy_header(f, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from a `.npy` header, validated; RunFileError if bad."""
    magic = f.read(8)
    if len(magic) < 8 or magic[:6] != _NPY_MAGIC or magic[6] not in (1, 2, 3):
        raise RunFileError(f"{where}: not a NumPy array (no .npy header): the file is damaged, "
                           "or not written by np.savez")
    size_bytes = 2 if magic[6] == 1 else 4
    raw = f.read(size_bytes)
    size = int.from_bytes(raw, "little") if len(raw) == size_bytes else -1
    if not 0 < size <= _MAX_NPY_HEADER:
        raise RunFileError(f"{where}: damaged .npy header (length {size})")
    text = f.read(size)
    try:
        header = ast.literal_eval(text.decode("utf8" if magic[6] == 3 else "latin1"))
        shape, fortran = header["shape"], header["fortran_order"]
        if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)
                and isinstance(fortran, bool)):
            raise ValueError(f"shape {shape!r}, fortran_order {fortran!r}")
        dtype = np.lib.format.descr_to_dtype(header["descr"])
    except (*_DAMAGED, RecursionError, MemoryError) as e:
        raise RunFileError(f"{where}: damaged .npy header ({_first_line(e)})") from e
    return shape, fortran, dtype


def _read_npz_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str,
                     file_size: int) -> np.ndarray:
    """One member as an array, its size checked against its header before allocating and
    its CRC-32 checked by reading it to the end."""
    if info.header_offset + info.compress_size > file_size:
        raise RunFileError(f"{where}: truncated: the zip's directory places "
                           f"{info.compress_size} bytes of it beyond the end of the file")
    if info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + (1 << 16):
        raise RunFileError(f"{where}: damaged: the zip's directory claims {info.file_size} "
                           f"bytes from {info.compress_size} compressed")
    with archive.open(info) as f:
        shape, fortran, dtype = _npy_header(f, where)
        if dtype.hasobject:
            raise RunFileError(f"{where}: an array of Python objects (dtype {dtype}), which only "
                               "unpickling could load: run files hold numbers; save them with "
                               "np.savez(file, name=numeric_array)")
        want = math.prod(shape) * dtype.itemsize
        have = info.file_size - f.tell()
        if want != have:
            raise RunFileError(f"{where}: damaged or truncated: its header declares shape "
                               f"{shape} of {dtype} ({want} bytes of data) but the member holds "
                               f"{have} bytes")
        array = np.empty(math.prod(shape), dtype)
        buffer = array.view(np.uint8) if dtype.itemsize else np.empty(0, np.uint8)
        done = 0
        while done < want:
            n = f.readinto(buffer[done:done + _CHUNK])
            if not n:
                raise RunFileError(f"{where}: truncated: {done} of {want} bytes of data")
            done += n
        if f.read(1):  # (also makes zipfile check the CRC-32 at the member's end)
            raise RunFileError(f"{where}: damaged: more data than its header declares")
    array = array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
    return _native(array)


def load_npz(path: Path) -> dict:
    """Every array of an `.npz` file: {name: array}, in the machine's byte order.

    Read through `zipfile`, never unpickled: a member whose header declares more data than
    it holds (a damaged or hand-made file asking for terabytes), an array of Python
    objects, or a member that fails its CRC-32 check is a RunFileError naming the member.
    """
    path = Path(path)
    try:
        file_size = os.stat(path).st_size
        with zipfile.ZipFile(path) as archive:
            out = {}
            for info in archive.infolist():
                if info.is_dir():
                    continue
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                out[key] = _read_npz_member(archive, info, f"{path} '{key}'", file_size)
            return out
    except RunFileError:
        raise
    except _DAMAGED as e:
        raise RunFileError(f"{path}: not a readable .npz file (truncated or damaged?): "
                           f"{_first_line(e)}") from e


def read_run_file(path: str | Path, *, test_key: str | None = None) -> RunFile:
    """Read one `.pt` or `.npz` run file (see the module docstring for the layouts).

    Parameters
    ----------
    path : the file.
    test_key : the array that holds the test split (e.g. ``logits_tta``); default
        ``logits`` (or ``logits_test``) for `.pt`, ``logits_test`` for `.npz`.

    Returns
    -------
    RunFile; its train logits have 0 examples when the file has no ``logits_train``.
    """
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".pt" or suffix == ".pth":
        obj = _load_pt(path)
        default_keys = _TEST_KEYS
    elif suffix == ".npz":
        obj = load_npz(path)
        default_keys = ("logits_test",)
    else:
        raise RunFileError(
            f"{path}: unknown file type '{path.suffix}'; expected a .pt or .npz run file, "
            "a directory of .pt files, or a store"
        )
    train_key = "logits_train"
    if test_key is not None:
        if test_key not in obj:
            raise RunFileError(f"{path}: --test-key {test_key}: no such array in this file; "
                               f"keys found: {sorted(map(str, obj))}")
    else:
        test_key = next((k for k in default_keys if k in obj), None)
    if test_key is None:
        raise RunFileError(f"{path}: missing logits (test) ({' or '.join(default_keys)}); "
                           f"keys found: {sorted(map(str, obj))}")
    test = _as_runs(obj[test_key], path, test_key)
    if train_key in obj:
        train = _as_runs(obj[train_key], path, train_key)
    else:  # one split only: a train split of 0 examples
        train = torch.empty((test.shape[0], 0, test.shape[2]), dtype=test.dtype)
    if train.shape[0] != test.shape[0]:
        raise RunFileError(f"{path}: {train.shape[0]} runs of train logits but {test.shape[0]} "
                           f"of test logits ('{test_key}'); each run needs both")
    if train.shape[2] != test.shape[2]:
        raise RunFileError(f"{path}: train logits have {train.shape[2]} classes but test "
                           f"logits ('{test_key}') have {test.shape[2]}")
    labels = {}
    for split, keys in _LABEL_KEYS.items():
        key = next((k for k in keys if k in obj), None)
        labels[split] = None if key is None else _as_labels(obj[key], f"{path} '{key}'")
    code = obj.get("code")
    return RunFile(path, train, test, labels["train"], labels["test"],
                   code if isinstance(code, str) else None)


def find_run_files(src: str | Path) -> list[Path]:
    """SRC as a list of run files: a file itself, or every `.pt` below a directory."""
    src = Path(src)
    if src.is_file():
        return [src]
    if src.is_dir():
        files = sorted((p for p in src.rglob("*") if p.suffix.lower() == ".pt" and p.is_file()),
                       key=lambda p: p.relative_to(src).as_posix())
        if not files:
            raise RunFileError(f"{src}: no .pt run files in this directory (searched recursively)")
        return files
    raise RunFileError(f"{src}: no such file or directory")


def read_labels(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels from an `.npz` with arrays `labels_train` and `labels_test`."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise InputError(f"{path}: --labels takes an .npz file with labels_train and labels_test")
    arrays = load_npz(path) if path.is_file() else None
    if arrays is None:
        raise InputError(f"{path}: no such labels file")
    missing = [k for k in ("labels_train", "labels_test") if k not in arrays]
    if missing:
        raise InputError(f"{path}: missing {', '.join(missing)}; keys found: {sorted(arrays)}")
    return (_as_labels(arrays["labels_train"], f"{path} 'labels_train'"),
            _as_labels(arrays["labels_test"], f"{path} 'labels_test'"))


def check_labels(labels: torch.Tensor | None, n_examples: int, n_classes: int, split: str) -> None:
    """Raise InputError unless labels fit the split: length n_examples, values in range."""
    if labels is None:
        return
    if labels.shape != (n_examples,):
        raise InputError(f"{split} labels have length {labels.shape[0] if labels.ndim else 0} "
                         f"but the {split} split has {n_examples} examples")
    if n_examples and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise InputError(f"{split} labels must lie in 0..{n_classes - 1}, got values from "
                         f"{int(labels.min())} to {int(labels.max())}")


def _merge_labels(current: torch.Tensor | None, new: torch.Tensor | None, where: str, split: str):
    if new is None or current is None:
        return current if new is None else new
    if current.shape != new.shape or not torch.equal(current, new):
        raise InputError(f"{where}: {split} labels differ from those of the files before it")
    return current


def _refuse_repeats(files: Sequence[Path]) -> None:
    """InputError when one file comes twice (named twice, or also found in a directory
    given): its runs would be counted twice. Files are compared as `os.path.samefile`
    does (device and inode), so links and other spellings of a path are found too."""
    seen: dict = {}
    for f in files:
        st = os.stat(f)
        key = (st.st_dev, st.st_ino) if st.st_ino else str(Path(f).resolve())
        if key in seen:
            same = "" if str(seen[key]) == str(f) else f" (as {seen[key]} and {f})"
            raise InputError(f"{f} is given twice{same}: its runs would be counted twice; "
                             "name each run file once")
        seen[key] = f


def open_runs(srcs: Sequence[str | Path], *, labels: str | Path | None = None,
              test_key: str | None = None, code: str | None = None) -> RunSet:
    """Gather the runs of every SRC (files or directories) into one RunSet.

    Parameters
    ----------
    srcs : run files and directories of `.pt` files; their runs are concatenated.
    labels : an `.npz` with labels_train and labels_test, replacing the files' labels.
    test_key : the array that holds the test split in every file (e.g. ``logits_tta``).
    code : a prefix of a code sha256: keep only the files of that training
        configuration. Without it, files whose code differs are used together, with a
        warning that lists the configurations.
    """
    if not srcs:
        raise InputError("no SRC given: name a .pt or .npz run file, or a directory of .pt files")
    files = [f for src in srcs for f in find_run_files(src)]
    _refuse_repeats(files)
    runs = [read_run_file(f, test_key=test_key) for f in files]
    groups = code_groups([(r.code_sha256, r.n_runs) for r in runs])
    where = ", ".join(map(str, srcs))
    if code is not None:
        chosen = resolve_code(code, groups, where)
        runs = [r for r in runs if r.code_sha256 == chosen]
        files = [r.path for r in runs]
        groups = {chosen: groups[chosen]}
    else:
        warn_if_mixed(groups, where)
    first = runs[0]
    for run in runs[1:]:
        for split in ("train", "test"):
            a, b = getattr(first, split), getattr(run, split)
            if a.shape[1:] != b.shape[1:]:
                raise InputError(
                    f"{run.path}: {split} logits are {b.shape[1]} examples x {b.shape[2]} classes "
                    f"but {first.path} has {a.shape[1]} x {a.shape[2]}: all runs must match"
                    + (" (a file without logits_train has no train split)"
                       if split == "train" and 0 in (a.shape[1], b.shape[1]) else "")
                )
    labels_train = labels_test = None
    for run in runs:
        labels_train = _merge_labels(labels_train, run.labels_train, str(run.path), "train")
        labels_test = _merge_labels(labels_test, run.labels_test, str(run.path), "test")
    if labels is not None:
        labels_train, labels_test = read_labels(labels)
    train = sequence_of([ArraySource(r.train, str(r.path)) for r in runs])
    test = sequence_of([ArraySource(r.test, str(r.path)) for r in runs])
    if train.n_examples == 0 and labels_train is not None and labels_train.numel() > 0:
        labels_train = None  # one split only: train labels (from labels.npz) have no use
    check_labels(labels_train, train.n_examples, train.n_classes, "train")
    check_labels(labels_test, test.n_examples, test.n_classes, "test")
    return RunSet(train, test, labels_train, labels_test, tuple(str(f) for f in files), groups)


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def extra_dims(kind: str, ndim: int) -> tuple[str, ...]:
    """Dimension names of an extra array (inputs or features), checked by `check_extra`."""
    if kind == "features":
        return ("example", "feature")
    return {2: ("example", "position"), 3: ("example", "height", "width"),
            4: ("example", "height", "width", "channel")}[ndim]


def check_extra(kind: str, values: np.ndarray, n_examples: int | None, where: str) -> np.ndarray:
    """Raise InputError unless `values` are valid `kind` ("inputs" or "features") for a split.

    inputs: (n, L) signals, (n, H, W) grayscale or (n, H, W, C) images with C in {1, 3};
    features: (n, D). Numeric, finite, one row per example (unless `n_examples` is None).
    `where` names the array (file and key) in the message.
    """
    values = np.asarray(values)
    shape = tuple(values.shape)
    if kind == "inputs":
        if values.ndim not in (2, 3, 4):
            raise InputError(f"{where}: inputs must be (n, L) signals, (n, H, W) grayscale or "
                             f"(n, H, W, C) colour images, got shape {shape} (rank "
                             f"{values.ndim}); reshape them to one of these")
        if values.ndim == 4 and shape[3] not in (1, 3):
            hint = ("drop the alpha channel with x[..., :3]" if shape[3] == 4 else
                    "convert them to grayscale (n, H, W) or RGB (n, H, W, 3)")
            raise InputError(f"{where}: colour images must have 1 or 3 channels (last axis), "
                             f"got shape {shape} with {shape[3]}; {hint}")
    elif values.ndim != 2:
        raise InputError(f"{where}: features must be (n, D), got shape {shape}")
    if values.dtype.kind not in "biuf":
        raise InputError(f"{where}: {kind} must be numbers, got dtype {values.dtype}")
    if n_examples is not None and shape[0] != n_examples:
        raise InputError(f"{where}: {shape[0]} rows but the split has {n_examples} examples")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        index = np.argwhere(~np.isfinite(values))[0]
        raise InputError(f"{where}: {kind} of example {index[0]} are not finite "
                         f"({values[tuple(index)]}); replace NaN and Inf before ingesting")
    return values


def read_extras(path: str | Path, kind: str, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """`kind`_train and `kind`_test from an `.npz`, checked against the splits' `sizes`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such {kind} file")
    arrays = load_npz(path)
    out = {}
    for split, n in sizes.items():
        key = f"{kind}_{split}"
        if key not in arrays:
            raise InputError(f"{path}: missing {key}; keys found: {sorted(arrays)}")
        out[key] = check_extra(kind, arrays[key], n, f"{path} '{key}'")
    return out
