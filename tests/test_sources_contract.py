"""One contract for every LogitSource (as zarr-python's StoreTests is one suite for every
store): each implementation, built over the same logits, must read back exactly those
values for any pair of slices, in its stored dtype, on the CPU, and describe its runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ensemble_kernel.core._sources import (ArraySource, ConcatSource, ExampleSample, RunSubset,
                                           as_source)
from ensemble_kernel.storage import RunStore, open_runs

from conftest import save_pt

N_MODELS, N_EXAMPLES, N_CLASSES = 5, 23, 3


@pytest.fixture(scope="module")
def logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return (torch.randn(N_MODELS, N_EXAMPLES, N_CLASSES, generator=g) * 4).float()


def _array(logits, tmp):
    return ArraySource(logits)


def _numpy(logits, tmp):
    return as_source(logits.numpy().astype(">f4"), "big-endian logits")  # any byte order


def _concat(logits, tmp):
    return ConcatSource((ArraySource(logits[:2]), ArraySource(logits[2:3]),
                         ArraySource(logits[3:])))


def _subset(logits, tmp):
    padded = torch.cat([torch.zeros(2, N_EXAMPLES, N_CLASSES), logits,
                        torch.ones(1, N_EXAMPLES, N_CLASSES)])
    return RunSubset(ArraySource(padded), 2, 2 + N_MODELS)


def _sample(logits, tmp):
    return ExampleSample(logits, base=ArraySource(logits))


def _store(logits, tmp):
    store = RunStore.create(tmp / "st", n_train=N_EXAMPLES, n_test=2, n_classes=N_CLASSES,
                            dtype="float32")
    store.append_arrays(logits, torch.zeros(N_MODELS, 2, N_CLASSES), source="contract")
    return RunStore(tmp / "st").source("train")


def _run_files(logits, tmp):
    files = [save_pt(tmp / f"f{i}.pt", logits[a:b], torch.zeros(b - a, 2, N_CLASSES))
             for i, (a, b) in enumerate([(0, 2), (2, 5)])]
    return open_runs(files).train


SOURCES = {"ArraySource": _array, "ArraySource (NumPy, big-endian)": _numpy,
           "ConcatSource": _concat, "RunSubset": _subset, "ExampleSample": _sample,
           "StoreSource": _store, "run files (.pt)": _run_files}

SLICES = [slice(None), slice(0, 0), slice(1, 3), slice(-2, None), slice(None, -1),
          slice(3, 99), slice(4, 2)]
EXAMPLE_SLICES = [slice(None), slice(0, 1), slice(5, 17), slice(-4, None), slice(20, 100),
                  slice(7, 7)]


@pytest.fixture(params=list(SOURCES), scope="module")
def source(request, logits, tmp_path_factory):
    return SOURCES[request.param](logits, tmp_path_factory.mktemp("source"))


def test_its_shape(source):
    assert (source.n_models, source.n_examples, source.n_classes) == (N_MODELS, N_EXAMPLES,
                                                                      N_CLASSES)


@pytest.mark.parametrize("models", SLICES, ids=str)
@pytest.mark.parametrize("examples", EXAMPLE_SLICES, ids=str)
def test_it_reads_exactly_the_values_of_any_slices(source, logits, models, examples):
    got = source.read(models, examples)
    want = logits[models, examples]
    assert isinstance(got, torch.Tensor) and got.device.type == "cpu"
    assert tuple(got.shape) == tuple(want.shape)
    assert got.dtype == torch.float32  # as stored: every source here keeps float32
    assert torch.equal(got, want)


def test_reading_twice_gives_the_same_and_changes_nothing(source, logits):
    first = source.read(slice(None), slice(None)).clone()
    again = source.read(slice(None), slice(None))
    assert torch.equal(first, again) and torch.equal(again, logits)


def test_it_describes_each_run_apart(source):
    texts = [source.describe_run(m) for m in range(N_MODELS)]
    assert all(isinstance(t, str) and t for t in texts)
    assert len(set(texts)) == N_MODELS, texts  # (a subset names its runs as its base does)


def test_a_float16_store_reads_back_its_rounded_values(tmp_path, logits):
    """The store keeps its dtype: the values are the float16 ones, read as float16."""
    store = RunStore.create(tmp_path / "st", n_train=N_EXAMPLES, n_test=2,
                            n_classes=N_CLASSES)
    store.append_arrays(logits, torch.zeros(N_MODELS, 2, N_CLASSES), source="contract")
    got = RunStore(tmp_path / "st").source("train").read(slice(1, 4), slice(3, 20))
    assert got.dtype == torch.float16
    np.testing.assert_array_equal(got.numpy(), logits[1:4, 3:20].half().numpy())
