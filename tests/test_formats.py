
import numpy as np
import pytest
import torch

from ensemble_kernel.errors import InputError, RunFileError
from ensemble_kernel.storage._formats import find_run_files, open_runs, read_run_file

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
    ({"logits": torch.zeros(2, 3), "logits_train": "text"},
     "'logits_train' must hold the logits as a dense floating-point tensor .*, got str"),
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
    from ensemble_kernel.storage._formats import read_extras

    np.savez(tmp_path / "x.npz", **{f"{kind}_train": np.zeros(shape),
                                   f"{kind}_test": np.zeros((2, *shape[1:]))})
    with pytest.raises(InputError, match=rf"x.npz '{kind}_train': .*{match}"):
        read_extras(tmp_path / "x.npz", kind, {"train": 6, "test": 2})
    nan = np.zeros((6, 4))
    nan[3, 1] = np.nan
    np.savez(tmp_path / "nan.npz", **{f"{kind}_train": nan, f"{kind}_test": np.zeros((2, 4))})
    with pytest.raises(InputError, match=f"{kind} of example 3 are not finite"):
        read_extras(tmp_path / "nan.npz", kind, {"train": 6, "test": 2})


# ---- "Nothing silent": run files from elsewhere --------------------------------------

def _npz(path, ens, **overrides):
    arrays = dict(logits_train=ens.train.numpy(), logits_test=ens.test.numpy(),
                  labels_train=ens.labels_train.numpy(), labels_test=ens.labels_test.numpy())
    np.savez(path, **{**arrays, **overrides})
    return path


def test_big_endian_npz_arrays_read_as_native(tmp_path):
    from conftest import run_cli

    ens = make_ensemble(n_models=3)
    good = _npz(tmp_path / "good.npz", ens)
    big = _npz(tmp_path / "big.npz", ens, logits_train=ens.train.numpy().astype(">f4"),
               logits_test=ens.test.numpy().astype(">f8"),
               labels_train=ens.labels_train.numpy().astype(">i8"),
               labels_test=ens.labels_test.numpy().astype(">u2"))
    run = read_run_file(big)
    assert torch.equal(run.train, ens.train) and torch.equal(run.test, ens.test.double())
    assert torch.equal(run.labels_train, ens.labels_train)
    assert torch.equal(run.labels_test, ens.labels_test)
    for command in (["info"], ["evaluate"]):
        want, got = run_cli(*command, good), run_cli(*command, big)
        assert got[0] == 0, got[2]
        assert got[1].replace("big.npz", "good.npz").replace("float64", "float32") == want[1]
    code, _, stderr = run_cli("ingest", big, "--store", tmp_path / "store")
    assert code == 0, stderr
    assert run_cli("evaluate", tmp_path / "store")[1] == run_cli("evaluate", good)[1]


def test_big_endian_arrays_in_the_python_api():
    import ensemble_kernel as ek

    ens = make_ensemble(n_models=3)
    xtr, xte = ens.train.numpy(), ens.test.numpy()
    ytr, yte = ens.labels_train.numpy(), ens.labels_test.numpy()
    want = ek.KernelKNN(k=3).fit(xtr, ytr).score(xte, yte)
    model = ek.KernelKNN(k=3).fit(xtr.astype(">f4"), ytr.astype(">i8"))
    assert model.score(xte.astype(">f4"), yte.astype(">u4")) == want
    with pytest.raises(InputError, match="train logits must hold floating-point logits .* "
                                         "got dtype float128"):
        ek.KernelKNN(k=3).fit(xtr.astype(np.longdouble), ytr)
    with pytest.raises(InputError, match="must be a dense tensor of logits, got a sparse_coo"):
        ek.KernelKNN(k=3).fit(ens.train.to_sparse(), ytr)


def _huge_npz(path, keys, shape=(1000, 1000_000, 1000)):
    """An .npz whose members' headers ask for 3.6 TiB each, and hold no data (492 bytes)."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for key in keys:
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                header, {"descr": "<f4", "fortran_order": False, "shape": shape})
            archive.writestr(f"{key}.npy", header.getvalue())
    return path


def test_npz_member_declaring_a_huge_shape_is_refused_before_allocating(tmp_path):
    from ensemble_kernel.storage._formats import read_extras, read_labels

    ens = make_ensemble(n_models=2)
    save_pt(tmp_path / "a.pt", ens.train, ens.test)
    huge = r"'{}': damaged or truncated: its header declares shape \(1000, 1000000, 1000\) " \
           r"of float32 \(4000000000000 bytes of data\) but the member holds 0 bytes"
    path = _huge_npz(tmp_path / "runs.npz", ["logits_train", "logits_test"])
    assert path.stat().st_size == 492
    with pytest.raises(RunFileError, match=huge.format("logits_train")):
        read_run_file(path)
    path = _huge_npz(tmp_path / "labels.npz", ["labels_train", "labels_test"])
    with pytest.raises(RunFileError, match=huge.format("labels_train")):
        read_labels(path)
    path = _huge_npz(tmp_path / "inputs.npz", ["inputs_train", "inputs_test"])
    with pytest.raises(RunFileError, match=huge.format("inputs_train")):
        read_extras(path, "inputs", {"train": 120, "test": 40})


def test_npz_member_size_is_checked_against_its_header(tmp_path):
    import zipfile

    from ensemble_kernel.storage._formats import load_npz

    np.savez(tmp_path / "x.npz", a=np.arange(12, dtype="<f8").reshape(3, 4),
             f=np.asfortranarray(np.arange(6, dtype=">i2").reshape(2, 3)))
    arrays = load_npz(tmp_path / "x.npz")
    assert np.array_equal(arrays["a"], np.arange(12).reshape(3, 4))
    assert np.array_equal(arrays["f"], np.arange(6).reshape(2, 3)) and arrays["f"].dtype.isnative
    with zipfile.ZipFile(tmp_path / "x.npz") as archive:  # a header asking for more rows
        data = archive.read("a.npy").replace(b"(3, 4)", b"(9, 4)")
    with zipfile.ZipFile(tmp_path / "y.npz", "w") as archive:
        archive.writestr("a.npy", data)
    with pytest.raises(RunFileError, match=r"y.npz 'a': damaged or truncated: .*\(9, 4\) of "
                                           r"float64 \(288 bytes of data\) but the member "
                                           r"holds 96 bytes"):
        load_npz(tmp_path / "y.npz")


@pytest.mark.parametrize("logits,match", [
    ("hello", "got str"),
    (torch.zeros(3, 5).to(torch.float8_e4m3fn), "got float8_e4m3fn"),
    (torch.zeros(3, 5).to_sparse(), "got a sparse_coo tensor"),
    (torch.empty(3, 5, device="meta"), r"got a meta tensor \(a shape without data\)"),
    (torch.zeros(3, 5, dtype=torch.complex64), "got complex64"),
    (np.zeros((3, 5), dtype=np.float128), "got a NumPy array of dtype float128"),
])
def test_pt_logits_that_are_not_dense_float_tensors(tmp_path, logits, match):
    path = tmp_path / "odd.pt"
    torch.save({"logits": logits, "logits_train": torch.zeros(2, 3, 5)}, path)
    with pytest.raises(RunFileError, match=r"odd.pt: 'logits' must hold the logits as a dense "
                                           r"floating-point tensor or array \(float16, "
                                           r"bfloat16, float32 or float64; on any device\), "
                       + match):
        read_run_file(path)


def test_float8_logits_are_refused_by_ingest_in_one_line(tmp_path):
    from conftest import run_cli

    path = tmp_path / "f8.pt"
    torch.save({"logits": torch.zeros(3, 5).to(torch.float8_e5m2),
                "logits_train": torch.zeros(4, 5).to(torch.float8_e5m2)}, path)
    code, _, stderr = run_cli("ingest", path, "--store", tmp_path / "store")
    assert code == 2 and stderr.count("\n") == 1
    assert "f8.pt: 'logits' must hold the logits as a dense floating-point" in stderr


@pytest.mark.parametrize("array,match", [
    (np.array([["a", "b"], ["c", "d"]]), "got a NumPy array of dtype <U1"),
    (np.array([[1.0, None]], dtype=object), r"an array of Python objects \(dtype object\)"),
])
def test_npz_logits_of_strings_or_objects(tmp_path, array, match):
    np.savez(tmp_path / "odd.npz", logits_train=array, logits_test=np.zeros((1, 2)))
    with pytest.raises(RunFileError, match=f"odd.npz.*'logits_train'.*{match}"):
        read_run_file(tmp_path / "odd.npz")


def test_labels_in_a_pt_that_are_not_integer_arrays(tmp_path):
    ens = make_ensemble(n_models=2)
    path = save_pt(tmp_path / "a.pt", ens.train, ens.test,
                   labels_test=ens.labels_test.to(torch.bfloat16))
    with pytest.raises(InputError, match="'labels_test': labels must be a 1-D integer array, "
                                         r"got bfloat16 of shape \(40,\)"):
        read_run_file(path)


def test_a_pickled_pt_is_refused_without_advising_an_unsafe_load(tmp_path):
    import pickle

    from conftest import run_cli

    ens = make_ensemble(n_models=2)
    path = tmp_path / "pickled.pt"
    path.write_bytes(pickle.dumps({"logits": ens.test.numpy(), "logits_train": ens.train.numpy()},
                                  protocol=4))
    with pytest.raises(RunFileError) as raised:
        read_run_file(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: a pickle that cannot be loaded safely")
    assert "torch.save(obj, 'run.pt')" in message and "If you trust its source" in message
    for advice in ("Re-running", "will likely succeed", "add_safe_globals", "\n", "\x1b"):
        assert advice not in message
    code, _, stderr = run_cli("info", path)
    assert code == 2 and stderr.count("\n") == 1 and "pickle protocol" not in stderr


def test_uint64_labels_beyond_int64_are_refused_with_their_value(tmp_path):
    ens = make_ensemble(n_models=2)
    labels = ens.labels_train.numpy().astype(np.uint64)
    labels[7] = 2**64 - 1
    path = _npz(tmp_path / "u.npz", ens, labels_train=labels)
    with pytest.raises(InputError, match=r"'labels_train': label 18446744073709551615 "
                                         r"\(example 7\) is not a class index"):
        read_run_file(path)
    fits = _npz(tmp_path / "v.npz", ens, labels_train=ens.labels_train.numpy().astype(np.uint64))
    assert torch.equal(read_run_file(fits).labels_train, ens.labels_train)


def test_the_same_file_given_twice_is_refused(tmp_path):
    ens = make_ensemble(n_models=2)
    a = save_pt(tmp_path / "d" / "a.pt", ens.train, ens.test)
    save_pt(tmp_path / "d" / "b.pt", ens.train, ens.test)
    with pytest.raises(InputError, match=r"a.pt is given twice: its runs would be counted twice"):
        open_runs([a, a])
    with pytest.raises(InputError, match=r"a.pt is given twice \(as .*d/a.pt and .*\.\./d/a.pt\)"):
        open_runs([a, tmp_path / "d" / ".." / "d" / "a.pt"])
    with pytest.raises(InputError, match=r"a.pt is given twice"):
        open_runs([tmp_path / "d", a])
    (tmp_path / "link.pt").symlink_to(a)
    with pytest.raises(InputError, match=r"link.pt is given twice \(as .*d/a.pt and .*link.pt"):
        open_runs([a, tmp_path / "link.pt"])
    assert open_runs([tmp_path / "d"]).n_models == 4


def _member_data_offset(path, name_end):
    """Where the data of the zip member whose name ends with `name_end` starts."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(name_end))
    data = path.read_bytes()
    n, m = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + n + m, info.compress_size


def test_a_flipped_byte_in_tensor_data_is_refused_not_read(tmp_path):
    ens = make_ensemble(n_models=2)
    path = save_pt(tmp_path / "a.pt", ens.train, ens.test)
    start, size = _member_data_offset(path, "data/0")
    data = bytearray(path.read_bytes())
    data[start + size // 2] ^= 0x04  # a tensor's byte: torch's own reader does not notice
    path.write_bytes(bytes(data))
    with pytest.raises(RunFileError, match=r"a.pt: not a readable PyTorch file \(truncated or "
                                           r"damaged\?\): Bad CRC-32 for file '.*data/0'"):
        read_run_file(path)
    npz = _npz(tmp_path / "r.npz", ens)
    start, size = _member_data_offset(npz, "logits_test.npy")
    data = bytearray(npz.read_bytes())
    data[start + size - 3] ^= 0x04
    npz.write_bytes(bytes(data))
    with pytest.raises(RunFileError, match=r"r.npz: not a readable .npz file .*Bad CRC-32 for "
                                           r"file 'logits_test.npy'"):
        read_run_file(npz)
