
import numpy as np
import pytest
import torch

from ensemble_kernel.errors import InputError, RunFileError
from ensemble_kernel.formats import find_run_files, open_runs, read_run_file

from conftest import make_ensemble, save_pt


def test_single_run_and_batched_pt_files(tmp_path):
    ens = make_ensemble(n_models=3)
    save_pt(tmp_path / "one.pt", ens.train[0], ens.test[0])  # 2-D: one run
    save_pt(tmp_path / "batch.pt", ens.train[1:], ens.test[1:], code="print('hi')")
    run = read_run_file(tmp_path / "batch.pt")
    assert run.n_runs == 2 and run.code == "print('hi')"
    runset = open_runs([tmp_path / "one.pt", tmp_path / "batch.pt"])
    assert runset.n_models == 3
    assert torch.equal(runset.train.read(slice(0, 3), slice(0, 120)), ens.train)


def test_directory_is_searched_recursively_in_lexicographic_order(tmp_path):
    ens = make_ensemble(n_models=4)
    for i, rel in enumerate(["b/x.pt", "a/z.pt", "a/y/w.pt", "c.pt"]):
        save_pt(tmp_path / rel, ens.train[i], ens.test[i])
    (tmp_path / "notes.txt").write_text("ignored")
    files = find_run_files(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a/y/w.pt", "a/z.pt", "b/x.pt", "c.pt"]
    runset = open_runs([tmp_path])
    assert torch.equal(runset.test.read(slice(0, 4), slice(0, 40)), ens.test[[2, 1, 0, 3]])


def test_npz_with_labels(tmp_path):
    ens = make_ensemble(n_models=2)
    np.savez(tmp_path / "r.npz", logits_train=ens.train.numpy(), logits_test=ens.test.numpy(),
             labels_train=ens.labels_train.numpy(), labels_test=ens.labels_test.numpy())
    runset = open_runs([tmp_path / "r.npz"])
    assert torch.equal(runset.labels_test, ens.labels_test)


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pt_that_needs_code_execution_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"logits": Evil(), "logits_train": torch.zeros(2, 3)}, path)
    with pytest.raises(RunFileError, match="evil.pt: refusing to load, it would need to run code"):
        read_run_file(path)
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("obj,match", [
    ([torch.zeros(2, 3)], "expected a dict with 'logits' and 'logits_train', got list"),
    ({"logits_train": torch.zeros(2, 3)},
     r"missing logits \(test\) \(logits or logits_test\); keys found: \['logits_train'\]"),
    ({"logits": torch.zeros(2, 3), "logits_train": "text"}, "'logits_train' must be an array"),
    ({"logits": torch.zeros(2, 3, 4, 5), "logits_train": torch.zeros(2, 3, 4)}, "must have shape"),
    ({"logits": torch.zeros(3, 4, 5), "logits_train": torch.zeros(2, 4, 5)},
     "2 runs of train logits but 3 of test logits \\('logits'\\)"),
    ({"logits": torch.zeros(2, 4, 5), "logits_train": torch.zeros(2, 4, 6)},
     "train logits have 6 classes but test logits \\('logits'\\) have 5"),
    ({"logits": torch.zeros(2, 3, dtype=torch.int64), "logits_train": torch.zeros(2, 3)},
     "floating-point"),
])
def test_malformed_pt_files(tmp_path, obj, match):
    path = tmp_path / "bad.pt"
    torch.save(obj, path)
    with pytest.raises(RunFileError, match=match):
        read_run_file(path)


def test_truncated_unknown_and_empty(tmp_path):
    ens = make_ensemble(n_models=2)
    good = save_pt(tmp_path / "good.pt", ens.train, ens.test)
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(RunFileError, match="cut.pt: not a readable PyTorch file"):
        read_run_file(tmp_path / "cut.pt")
    np.savez(tmp_path / "r.npz", logits_train=ens.train.numpy(), logits_test=ens.test.numpy())
    npz = (tmp_path / "r.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(npz[: len(npz) // 2])
    with pytest.raises(RunFileError, match="cut.npz: not a readable .npz file"):
        read_run_file(tmp_path / "cut.npz")
    (tmp_path / "runs.h5").write_bytes(b"x")
    with pytest.raises(RunFileError, match="unknown file type '.h5'"):
        read_run_file(tmp_path / "runs.h5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFileError, match="empty: no .pt run files in this directory"):
        open_runs([tmp_path / "empty"])
    with pytest.raises(RunFileError, match="missing: no such file or directory"):
        open_runs([tmp_path / "missing"])


def test_legacy_pt_format_is_read_without_mmap(tmp_path):
    ens = make_ensemble(n_models=2)
    path = tmp_path / "legacy.pt"
    torch.save({"logits": ens.test, "logits_train": ens.train}, path,
               _use_new_zipfile_serialization=False)
    assert torch.equal(read_run_file(path).test, ens.test)


def test_runs_of_different_shapes_are_refused(tmp_path):
    ens = make_ensemble(n_models=2)
    save_pt(tmp_path / "a.pt", ens.train, ens.test)
    save_pt(tmp_path / "b.pt", ens.train[:, :100], ens.test)
    with pytest.raises(InputError, match=r"b.pt: train logits are 100 examples x 5 classes but .*a.pt has 120 x 5"):
        open_runs([tmp_path])


def test_labels_are_checked(tmp_path):
    ens = make_ensemble(n_models=2)
    save_pt(tmp_path / "a.pt", ens.train, ens.test)
    np.savez(tmp_path / "short.npz", labels_train=np.zeros(5, int), labels_test=np.zeros(40, int))
    with pytest.raises(InputError, match="train labels have length 5 but the train split has 120"):
        open_runs([tmp_path / "a.pt"], labels=tmp_path / "short.npz")
    np.savez(tmp_path / "range.npz", labels_train=np.zeros(120, int),
             labels_test=np.full(40, 7))
    with pytest.raises(InputError, match=r"test labels must lie in 0..4, got values from 7 to 7"):
        open_runs([tmp_path / "a.pt"], labels=tmp_path / "range.npz")
    np.savez(tmp_path / "nolabels.npz", other=np.zeros(3))
    with pytest.raises(InputError, match="missing labels_train, labels_test"):
        open_runs([tmp_path / "a.pt"], labels=tmp_path / "nolabels.npz")


def test_pt_with_numpy_arrays_and_scalars_in_other_keys_loads(tmp_path):
    ens = make_ensemble(n_models=2)
    path = save_pt(tmp_path / "np.pt", ens.train, ens.test, accuracy=np.float64(0.93),
                   epoch=np.int64(17), history=np.array([0.5, 0.7, 0.93]),
                   mask=np.array([True, False]), labels_test=ens.labels_test.numpy())
    run = read_run_file(path)
    assert torch.equal(run.train, ens.train) and torch.equal(run.labels_test, ens.labels_test)


class Shell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_pt_with_a_malicious_pickle_beside_numpy_is_refused_in_one_line(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"logits": torch.zeros(2, 3), "logits_train": torch.zeros(2, 3),
                "history": np.array([1.0]), "payload": Shell(marker)}, path)
    with pytest.raises(RunFileError) as raised:
        read_run_file(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: refusing to load, it would need to run code to "
                              "unpickle posix.system")
    assert "\n" not in message and "\x1b" not in message
    assert not marker.exists()


@pytest.mark.parametrize("kind,shape,match", [
    ("features", (6, 2, 2), r"features must be \(n, D\), got shape \(6, 2, 2\)"),
    ("inputs", (6,), r"rank 1"),
    ("inputs", (6, 3, 3, 4), "drop the alpha channel"),
    ("inputs", (5, 8), "5 rows but the split has 6 examples"),
])
def test_extra_arrays_are_checked_when_read(tmp_path, kind, shape, match):
    from ensemble_kernel.formats import read_extras

    np.savez(tmp_path / "x.npz", **{f"{kind}_train": np.zeros(shape),
                                   f"{kind}_test": np.zeros((2, *shape[1:]))})
    with pytest.raises(InputError, match=rf"x.npz '{kind}_train': .*{match}"):
        read_extras(tmp_path / "x.npz", kind, {"train": 6, "test": 2})
    nan = np.zeros((6, 4))
    nan[3, 1] = np.nan
    np.savez(tmp_path / "nan.npz", **{f"{kind}_train": nan, f"{kind}_test": np.zeros((2, 4))})
    with pytest.raises(InputError, match=f"{kind} of example 3 are not finite"):
        read_extras(tmp_path / "nan.npz", kind, {"train": 6, "test": 2})
