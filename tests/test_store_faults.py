"""Fault injection: a writer dies right after write step i, for every i of an operation.

The crash is real: a forked child runs the operation with the store's `_wrote` replaced by
`os._exit` at step i, so no `finally`, no `except` and no cleanup runs after it. The
parent then checks that everything a reader sees is exactly as before the operation or
exactly as after it, and that the next ingest succeeds and gives the right content.
"""

import json
import os
import shutil

import numpy as np
import pytest
import zarr

import ensemble_kernel.storage._store as store_module
from ensemble_kernel.storage._formats import file_hash
from ensemble_kernel.storage._store import RunStore

from conftest import make_ensemble, save_pt

_NO_STEP = store_module._wrote  # the store's own: does nothing

CRASHED = 77  # the child's exit status when it died at the planned step
NAMES = [f"{kind}_{split}" for kind in ("labels", "inputs", "features")
         for split in ("train", "test")]


def view(path) -> dict:
    """Everything a reader sees: this package's reader, and plain zarr's logits array."""
    s = RunStore(path)
    n, n_examples = s.n_models, s.split_range("test")[1]
    records = s.records()
    out = {
        # The format version is bookkeeping: an upgrade (1 -> 2) changes it, not the data.
        "n_models": n, "dtype": s.dtype, "shapes": s.shapes(),
        "attrs": {k: v for k, v in s.attrs.items() if k != "format_version"},
        "logits": s.read_logits(slice(0, n), slice(0, n_examples)).tobytes(),
        "optional": {k: None if (v := s.optional(k)) is None else (v.shape, v.tobytes())
                     for k in NAMES},
        "records": records,
        "code": {h: s.code(h) for r in records if (h := r["code_sha256"])},
        "sources": [s.run_source(m) for m in range(n)],
    }
    group = zarr.open_group(path, mode="r")
    out["zarr_logits"] = (group["logits"].shape, group["logits"][...].tobytes())
    out["zarr_splits"] = group["logits"].attrs["splits"]
    return out


def crash_at(step: int, operation) -> int:
    """Run `operation()` in a forked child that dies right after its `step`-th write step."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        count = 0

        def hook(name):
            nonlocal count
            count += 1
            if count == step:
                os._exit(CRASHED)

        store_module._wrote = hook
        try:
            operation()
        except BaseException:
            os._exit(3)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def steps_of(operation) -> list[str]:
    steps = []
    store_module._wrote = steps.append
    try:
        operation()
    finally:
        store_module._wrote = _NO_STEP
    return steps


def downgrade_to_v1(path) -> None:
    """Make a store look as format version 1 wrote it: no index, no arrays list."""
    shutil.rmtree(path / "index")
    (path / "logits" / ".lock").unlink()
    meta = json.loads((path / "logits" / "zarr.json").read_text())
    meta["attributes"] = {"splits": meta["attributes"]["splits"], "format_version": 1}
    (path / "logits" / "zarr.json").write_text(json.dumps(meta))
    root = json.loads((path / "zarr.json").read_text())
    root["attributes"]["ensemble_kernel"]["format_version"] = 1
    (path / "zarr.json").write_text(json.dumps(root))


@pytest.fixture
def scene(tmp_path, monkeypatch):
    """A store with two committed files, and a third file carrying labels and new code."""
    monkeypatch.setattr(store_module, "_WRITE_BLOCK", 2)  # several run blocks per append
    ens = make_ensemble(n_models=7, n_train=40, n_test=12)
    base = tmp_path / "base"
    RunStore.create(base, n_train=40, n_test=12, n_classes=5, class_names=list("abcde"))
    for i, (a, b) in enumerate(((0, 2), (2, 4))):
        RunStore(base).append_file(save_pt(tmp_path / f"f{i}.pt", ens.train[a:b],
                                           ens.test[a:b], code="old code"))
    new = save_pt(tmp_path / "new.pt", ens.train[4:7], ens.test[4:7], code="new code",
                  labels_train=ens.labels_train, labels_test=ens.labels_test)
    inputs = {"inputs_train": np.random.default_rng(0).random((40, 4, 4, 3)),
              "inputs_test": np.random.default_rng(1).random((12, 4, 4, 3))}
    return tmp_path, base, new, inputs, ens


OPERATIONS = {
    "append a file with labels and code": lambda store, new, inputs: (
        RunStore(store).append_file(new)),
    "set inputs": lambda store, new, inputs: RunStore(store).set_arrays(inputs),
}


@pytest.mark.parametrize("version", [2, 1])
@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_a_crash_after_any_write_step_leaves_before_or_after(scene, name, version):
    tmp_path, base, new, inputs, ens = scene
    if version == 1:
        downgrade_to_v1(base)
    operation = OPERATIONS[name]
    done = tmp_path / "done"
    shutil.copytree(base, done)
    steps = steps_of(lambda: operation(done, new, inputs))
    assert "commit" in steps and len(steps) >= (3 if name == "set inputs" else 8), steps
    before, after = view(base), view(done)
    assert before != after
    for i, step in enumerate(steps, start=1):
        crashed = tmp_path / f"crash{i}"
        shutil.copytree(base, crashed)
        status = crash_at(i, lambda: operation(crashed, new, inputs))
        assert status == CRASHED, f"step {i} ({step}): child exited with {status}"
        seen = view(crashed)
        # The commit is the last step of the operation's own data: after it, "after".
        assert seen in (before, after), f"crash after step {i} ({step}): neither state"
        if step == "commit" and version == 2:
            assert seen == after
        # The next writer succeeds and gives exactly the state of an uncrashed run.
        operation(crashed, new, inputs)
        assert view(crashed) == after, f"re-run after a crash at step {i} ({step})"
        shutil.rmtree(crashed)


def test_a_crash_leaves_nothing_that_a_later_append_trusts(scene):
    """Leftovers of an append that died before its commit are overwritten, not trusted.

    The killed append left a record, an index entry and the labels of `new.pt`; another
    file then commits at the same position. `new.pt` must still be added, not skipped."""
    tmp_path, base, new, inputs, ens = scene
    steps = steps_of(lambda: RunStore(shutil.copytree(base, tmp_path / "probe")).append_file(new))
    assert crash_at(steps.index("index") + 1, lambda: RunStore(base).append_file(new)) == CRASHED
    other = save_pt(tmp_path / "other.pt", ens.train[6:7], ens.test[6:7])
    RunStore(base).append_file(other)
    store = RunStore(base)
    assert store.n_models == 5 and store.optional("labels_train") is None
    assert store.committed_runs(file_hash(new)) is None
    assert store.append_file(new).status == "added"
    store = RunStore(base)
    assert store.committed_runs(file_hash(new)) == (5, 8)
    np.testing.assert_array_equal(store.labels("train"), ens.labels_train)
    np.testing.assert_array_equal(store.read_logits(slice(5, 8), slice(0, 40)),
                                  ens.train[4:7].half().numpy())
    assert store.append_file(new).status == "skipped"


def test_a_raised_error_mid_append_is_a_crash_too(scene):
    """In-process: the hook raises after step i; the store is as before, the retry works."""
    tmp_path, base, new, inputs, ens = scene
    done = tmp_path / "done"
    shutil.copytree(base, done)
    steps = steps_of(lambda: RunStore(done).append_file(new))
    assert steps[-1] == "commit", steps
    before, after = view(base), view(done)
    for i, step in enumerate(steps[:-1]):  # every step before the commit
        crashed = shutil.copytree(base, tmp_path / f"raised{i}")

        def hook(name, stop=step):
            if name == stop:
                raise RuntimeError("injected fault")

        store_module._wrote = hook
        try:
            with pytest.raises(RuntimeError, match="injected fault"):
                RunStore(crashed).append_file(new)
        finally:
            store_module._wrote = _NO_STEP
        assert view(crashed) == before, f"fault after {step}"
        RunStore(crashed).append_file(new)
        assert view(crashed) == after
