"""Damaged run files: the same results as the intact file, or one line and exit 2.

A small valid `.npz` and a small valid `.pt` run file are cut short at several points,
have single bytes flipped at seeded positions (anywhere, and inside each zip member's
data, where only a checksum can tell), and are replaced by garbage. After each mutation,
`info FILE` and `evaluate FILE` either print exactly what they print for the intact file
(a byte nothing reads, such as a timestamp in the zip's directory) or exit with status 2
and one line on stderr: never a traceback, never other numbers.

Bounded by default (seeded, about 40 mutations per file). ENSEMBLE_KERNEL_FUZZ=N flips N
random bytes per file instead, and cuts at more points: a larger sweep.
"""

from __future__ import annotations

import os
import struct
import traceback
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_ensemble

N_FLIPS = int(os.environ.get("ENSEMBLE_KERNEL_FUZZ", "16"))
COMMANDS = (["info"], ["evaluate", "--k", "3", "--weighted-k", "5"])


def _write(kind: str, path: Path) -> Path:
    ens = make_ensemble(seed=3, n_models=3, n_train=24, n_test=10, n_classes=3)
    if kind == "npz":
        np.savez(path, logits_train=ens.train.numpy(), logits_test=ens.test.numpy(),
                 labels_train=ens.labels_train.numpy(), labels_test=ens.labels_test.numpy())
    else:
        torch.save({"logits": ens.test, "logits_train": ens.train, "labels_test": ens.labels_test,
                    "labels_train": ens.labels_train}, path)
    return path


def _member_data(data: bytes, path: Path) -> list[tuple[str, int, int]]:
    """(name, start, size) of each zip member's stored bytes."""
    out = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            off = info.header_offset
            n, m = struct.unpack("<HH", data[off + 26:off + 30])
            out.append((info.filename, off + 30 + n + m, info.compress_size))
    return out


def mutations(data: bytes, path: Path, seed: int) -> list[tuple[str, bytes]]:
    """Named mutated copies of `data` (the bytes of the file at `path`)."""
    rng = np.random.default_rng(seed)
    n = len(data)
    out = []
    cuts = {0, 1, 30, n // 4, n // 2, 3 * n // 4, n - 22, n - 1}  # n - 22: the zip's end record
    if N_FLIPS > 16:
        cuts |= set(int(c) for c in rng.integers(1, n, N_FLIPS // 4))
    out += [(f"cut at {c}", data[:c]) for c in sorted(cuts)]

    def flip(at: int, why: str) -> None:
        mutated = bytearray(data)
        mutated[at] ^= int(rng.integers(1, 256))
        out.append((f"byte {at} flipped ({why})", bytes(mutated)))

    for at in rng.integers(0, n, N_FLIPS):
        flip(int(at), "anywhere")
    for name, start, size in _member_data(data, path):
        if size:  # inside the member's data: the npy header or a tensor's bytes
            flip(start + int(rng.integers(0, size)), name)
            flip(start + size - 1, f"last byte of {name}")
    out += [("random bytes", rng.bytes(n)), ("empty", b""), ("zeros", bytes(n)),
            ("a zip's signature, then random bytes", b"PK\x03\x04" + rng.bytes(n - 4))]
    return out


def _run(args: list[str]):
    from typer.testing import CliRunner

    from ensemble_kernel.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("kind", ["npz", "pt"])
def test_mutated_run_file_gives_the_same_results_or_one_line(tmp_path, kind):
    path = _write(kind, tmp_path / f"run.{kind}")
    data = path.read_bytes()
    want = {}
    for command in COMMANDS:
        result = _run([*command, path])
        assert result.exit_code == 0, result.stderr
        want[command[0]] = result.stdout
    found = mutations(data, path, seed={"npz": 1, "pt": 2}[kind])
    assert len(found) >= 30
    problems, refused = [], 0
    for name, mutated in found:
        path.write_bytes(mutated)
        for command in COMMANDS:
            result = _run([*command, path])
            if result.exit_code == 0 and result.stdout == want[command[0]]:
                continue
            lines = result.stderr.splitlines()
            if result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "):
                refused += 1
                continue
            crashed = result.exception is not None and not isinstance(result.exception,
                                                                      SystemExit)
            detail = ("".join(traceback.format_exception(*result.exc_info)) if crashed
                      else f"stdout {result.stdout!r}, stderr {result.stderr!r}")
            problems.append(f"{command[0]} after {name}: exit {result.exit_code}: {detail}")
    assert not problems, f"{len(problems)} of {2 * len(found)} runs:\n" + "\n".join(problems)
    assert refused >= len(found)  # (most mutations are caught, not read past)
