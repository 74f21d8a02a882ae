"""Several writers at once: every committed run present exactly once, records match the logits.

Real processes (not threads): each one opens the store like a fresh `ingest` would and
appends its own files, round after round, while the others do the same. A small write
delay widens the window in which two appends overlap.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble_kernel.storage._formats import file_hash
from ensemble_kernel.storage._store import RunStore

from conftest import save_pt, seam_env

N_TRAIN, N_TEST, N_CLASSES = 30, 10, 3

WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from ensemble_kernel.storage._store import RunStore
    store, files = sys.argv[1], sys.argv[2:]
    for f in files:  # one fresh open per file: the committed count it saw is soon stale
        RunStore(store).append_file(Path(f))
""")


def _file_logits(writer: int, index: int, n_runs: int):
    g = torch.Generator().manual_seed(1000 * writer + index)
    train = torch.randn(n_runs, N_TRAIN, N_CLASSES, generator=g) + 10 * writer + index
    test = torch.randn(n_runs, N_TEST, N_CLASSES, generator=g) - 10 * writer - index
    return train, test


def _check_store(store: Path, expected: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Every file exactly once, records contiguous, each record's runs hold that file's logits."""
    reader = RunStore(store)
    records = reader.records()
    hashes = [r["sha256"] for r in records]
    lost = set(expected) - set(hashes)
    assert not lost, f"{len(lost)} committed files lost; {reader.n_models} runs in the store"
    assert len(hashes) == len(set(hashes)) == len(expected), "a file is stored twice"
    position = 0
    for r in records:
        assert r["runs"][0] == position, f"records overlap or leave a gap at run {position}"
        position = r["runs"][1]
    assert position == reader.n_models == sum(t.shape[0] for t, _ in expected.values())
    for r in records:
        train, test = expected[r["sha256"]]
        a, b = r["runs"]
        got = reader.read_logits(slice(a, b), slice(0, N_TRAIN + N_TEST))
        want = torch.cat([train, test], dim=1).half().numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"runs {a}..{b} of {r['source']}")


@pytest.mark.slow
def test_four_processes_appending_at_once_lose_nothing(tmp_path):
    n_writers, n_files = 4, 12
    expected = {}
    seed = save_pt(tmp_path / "seed.pt", *_file_logits(99, 0, 1))
    expected[file_hash(seed)] = _file_logits(99, 0, 1)
    store = tmp_path / "st"
    RunStore.create(store, n_train=N_TRAIN, n_test=N_TEST, n_classes=N_CLASSES)
    RunStore(store).append_file(seed)
    lists = []
    for w in range(n_writers):
        files = []
        for i in range(n_files):
            logits = _file_logits(w, i, 1 + (w + i) % 3)
            path = save_pt(tmp_path / f"w{w}" / f"f{i:02d}.pt", *logits)
            expected[file_hash(path)] = logits
            files.append(str(path))
        lists.append(files)
    env = seam_env(write_delay=0.01)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(store), *files], env=env,
                              stderr=subprocess.PIPE, text=True) for files in lists]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    _check_store(store, expected)


@pytest.mark.slow
def test_four_ingest_commands_creating_one_store_at_once(tmp_path):
    """The store does not exist yet: one process creates it, the others append to it."""
    expected, dirs = {}, []
    for w in range(4):
        for i in range(3):
            logits = _file_logits(w, i, 2)
            path = save_pt(tmp_path / f"w{w}" / f"f{i}.pt", *logits)
            expected[file_hash(path)] = logits
        dirs.append(tmp_path / f"w{w}")
    store = tmp_path / "st"
    cmd = [sys.executable, "-m", "ensemble_kernel", "ingest", "--store", str(store), "-q"]
    env = seam_env(write_delay=0.05)
    procs = [subprocess.Popen(cmd + [str(d)], env=env, stderr=subprocess.PIPE, text=True)
             for d in dirs]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    _check_store(store, expected)
