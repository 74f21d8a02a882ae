"""The CUDA path, on a GPU: every precision returns exact mode's neighbours, auto's probe
measures and caches the GPU's rates, and the commands give with --device cuda what they
give on the CPU. Marked `gpu`; skipped where torch sees no CUDA device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ensemble_kernel import top_k_neighbors

from ensemble_kernel.testing import dense_kernel

from ensemble_kernel.core import _precision as precision
from ensemble_kernel.core._engine import _top_k_neighbors

from conftest import assert_same_neighbors, make_ensemble, run_cli, save_labels, save_pt

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MiB = 1 << 20


def hard_ensemble(seed: int = 3):
    """Ties, a near-copy one part in 1e6 away, an outlier run, a constant class column and
    float16-representable logits beside values one float32 ulp away from them."""
    ens = make_ensemble(seed=seed, n_models=9, n_train=700, n_test=120)
    train, test = ens.train.clone(), ens.test.clone()
    train[4] *= 40  # one run far larger than the others (one model's logits, both splits)
    test[4] *= 40
    train[:, :, 0] = 1.5  # a class column with no spread across examples of one run
    test[:, :, 0] = 1.5
    train[:, 10] = train[:, 40]  # an exact tie between references 10 and 40
    train[:, 11] = train[:, 41] * (1 + 1e-6)  # nearly equal to 41
    train[:, 12] = train[:, 42].half().float()
    train[:, 13] = torch.nextafter(train[:, 12], torch.full_like(train[:, 12], 1e9))
    test[:, 5] = train[:, 40]  # a query equal to both tied references
    return ens, test, train


def test_the_hard_ensemble_is_what_it_says():
    _, test, train = hard_ensemble()
    assert torch.equal(test[:, 5], train[:, 40]) and torch.equal(train[:, 10], train[:, 40])
    assert bool((torch.nextafter(train[:, 12], torch.full_like(train[:, 12], 1e9))
                 == train[:, 13]).all())
    top = dense_kernel(test, train)[5].topk(2).indices
    assert set(top.tolist()) == {10, 40}  # the query's two nearest are the tied pair


@pytest.mark.parametrize("prec", ["exact", "fast", "auto"])
@pytest.mark.parametrize("chunk_models", [None, 2])
def test_every_precision_returns_exact_modes_neighbours(prec, chunk_models):
    _, test, train = hard_ensemble()
    kernel = dense_kernel(test, train)
    got = _top_k_neighbors(test, train, 7, device="cuda", precision=prec, tile_size=96,
                           chunk_models=chunk_models, memory_budget=64 * MiB)
    assert got.indices.device.type == "cuda"
    assert_same_neighbors(got.indices.cpu(), got.values.cpu(), kernel, 7)
    cpu = _top_k_neighbors(test, train, 7, precision="exact", memory_budget=64 * MiB)
    # The same neighbours as on the CPU, where values differ by more than rounding.
    differ = got.indices.cpu() != cpu.indices
    torch.testing.assert_close(got.values.cpu()[differ], cpu.values[differ], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prec", ["exact", "fast"])
def test_leave_one_out_on_cuda(prec):
    _, _, train = hard_ensemble()
    kernel = dense_kernel(train, train)
    kernel.fill_diagonal_(float("-inf"))
    got = _top_k_neighbors(train, None, 5, exclude_self=True, device="cuda", precision=prec,
                           tile_size=128, memory_budget=64 * MiB)
    assert_same_neighbors(got.indices.cpu(), got.values.cpu(), kernel, 5)
    assert not bool((got.indices.cpu() == torch.arange(len(kernel))[:, None]).any())


def test_the_probe_measures_the_gpu_and_caches_it(monkeypatch):
    monkeypatch.setattr(precision, "SMALL_JOB_FLOP", 0.0)
    device = torch.device("cuda")
    rates, from_cache = precision.probe(device)
    assert not from_cache and rates.valid()
    assert precision.machine_key(device)["gpu"]  # the card names the cache entry
    again, from_cache = precision.probe(device)
    assert from_cache and again == rates
    _, cpu_from_cache = precision.probe(torch.device("cpu"))
    assert not cpu_from_cache  # the GPU's entry is not the CPU's
    _, test, train = hard_ensemble()
    got = top_k_neighbors(train, test, 5, precision="auto", device="cuda",
                          memory_budget=64 * MiB)
    assert_same_neighbors(got.indices.cpu(), got.values.cpu(), dense_kernel(test, train), 5)


def _cli_json(*args) -> dict:
    code, out, err = run_cli(*args, "--json", "-q")
    assert code == 0, err
    return json.loads(out)


def test_evaluate_and_sweep_on_cuda_give_the_cpus_figures(tmp_path):
    ens = make_ensemble(seed=1, n_models=8, n_train=400, n_test=100)
    src = save_pt(tmp_path / "runs.pt", ens.train, ens.test)
    labels = save_labels(tmp_path / "labels.npz", ens)
    figures = ("single_model_accuracy", "ensemble_accuracy", "knn_accuracy", "weighted_accuracy")
    for prec in ("exact", "fast", "auto"):
        gpu = _cli_json("evaluate", src, "--labels", labels, "--device", "cuda",
                        "--precision", prec)
        cpu = _cli_json("evaluate", src, "--labels", labels, "--precision", "exact")
        assert {f: gpu[f] for f in figures} == {f: cpu[f] for f in figures}
    gpu = _cli_json("sweep", src, "--labels", labels, "--device", "cuda", "--out",
                    tmp_path / "gpu")
    cpu = _cli_json("sweep", src, "--labels", labels, "--out", tmp_path / "cpu")
    assert gpu["ablations"] == cpu["ablations"]
    # Two runs standardise every logit to +-1 up to rounding, so the 2-run kernel takes a
    # few dozen values and every query's nearest references tie: each device's rounding
    # picks among them (both exact mode's neighbours, DESIGN section 1). From 4 runs on
    # the values are distinct and the figures must agree.
    assert len(dense_kernel(ens.test[:2], ens.train[:2]).unique()) < 100
    assert [r for r in gpu["rows"] if r["n_models"] >= 4] == \
        [r for r in cpu["rows"] if r["n_models"] >= 4]
    assert len([r for r in cpu["rows"] if r["n_models"] >= 4]) >= 8


def test_report_on_cuda_gives_the_cpus_tables(tmp_path):
    ens = make_ensemble(seed=2, n_models=6, n_train=300, n_test=60)
    src = save_pt(tmp_path / "runs.pt", ens.train, ens.test)
    labels = save_labels(tmp_path / "labels.npz", ens)
    tables = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / device / "r.html"
        code, _, err = run_cli("report", src, "--labels", labels, "--device", device,
                               "--out", out, "-q")
        assert code == 0, err
        assert out.stat().st_size > 10_000
        tables[device] = json.loads((out.parent / "r_files" / "sweep.json").read_text())
    gpu, cpu = tables["cuda"], tables["cpu"]
    assert gpu["ablations"] == cpu["ablations"] and gpu["significance"] == cpu["significance"]
    assert [r for r in gpu["rows"] if r["n_models"] >= 4] == \
        [r for r in cpu["rows"] if r["n_models"] >= 4]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
@pytest.mark.parametrize("prec", ["exact", "fast"])
def test_many_small_pieces_and_stored_dtypes_on_cuda(monkeypatch, dtype, prec):
    # Pieces of a few rows (tail pieces, non-contiguous slices copied through pinned
    # memory), from float16 logits as stores keep them and from float64 ones.
    from ensemble_kernel.core import _engine as engine

    plain = make_ensemble(seed=4, n_models=9, n_train=700, n_test=120)
    _, test, train = hard_ensemble()
    common = dict(device="cuda", precision=prec, tile_size=96, chunk_models=4,
                  memory_budget=64 * MiB)
    for queries, references in ((test, train), (plain.test, plain.train)):
        queries, references = queries.to(dtype), references.to(dtype)
        sizes = []
        real_rows = engine._scratch_rows
        with monkeypatch.context() as m:
            m.setattr(engine, "_GPU_BYTES_PER_VALUE", 1 << 17)  # a few rows a piece
            m.setattr(engine, "_scratch_rows",
                      lambda *a: sizes.append(real_rows(*a)) or sizes[-1])
            got = _top_k_neighbors(queries, references, 7, **common)
        assert sizes and max(sizes) < 96  # every block was cut into several pieces
        assert_same_neighbors(got.indices.cpu(), got.values.cpu(),
                              dense_kernel(queries, references), 7)
    # Where no row needs float64 (which widens its whole piece, and so its standardisation),
    # a row's values do not depend on its piece: the same bits in one piece per block.
    whole = _top_k_neighbors(queries, references, 7, **common)
    assert torch.equal(got.indices, whole.indices) and torch.equal(got.values, whole.values)


@pytest.mark.parametrize("budget", [1 << 30, 200_000])
def test_the_sweeps_shared_statistics_on_cuda_are_the_cpus(budget):
    # One pass for every subset, on the GPU (pieces of the scratch, tiny blocks of rows at
    # the small budget): each subset's statistics as the CPU's pass gives them, and left
    # to the engine for the same subsets.
    from ensemble_kernel.core._engine import shared_statistics
    from ensemble_kernel.core._sources import ArraySource

    plain = make_ensemble(seed=5, n_models=16, n_train=300, n_test=10, noise=2.0)
    source = ArraySource(plain.train.half())  # as a store keeps them
    parts = [slice(0, 2), slice(2, 4), slice(0, 4), slice(4, 8), slice(0, 8), slice(8, 16),
             slice(0, 16)]
    on_gpu = shared_statistics(source, parts, device=torch.device("cuda"), budget=budget)
    on_cpu = shared_statistics(source, parts, device=torch.device("cpu"), budget=1 << 30)
    assert [g is None for g in on_gpu] == [c is None for c in on_cpu]
    assert sum(g is not None for g in on_gpu) >= 4
    for g, c in zip(on_gpu, on_cpu):
        if g is not None:
            assert g[0].device.type == "cuda"
            for got, want in zip(g, c):
                torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two nccl processes need two GPUs")
def test_two_nccl_processes_match_one(tmp_path):
    ens = make_ensemble(n_models=6, n_train=1500, n_test=120)
    src = save_pt(tmp_path / "runs.pt", ens.train, ens.test)
    args = ["neighbors", str(src), "--k", "5", "--device", "cuda", "--precision", "exact", "-q"]
    one = subprocess.run([sys.executable, "-m", "ensemble_kernel", *args,
                          "--out", str(tmp_path / "one.npz")], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node=2", "-m", "ensemble_kernel", *args,
                          "--out", str(tmp_path / "two.npz")], env=dict(os.environ),
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert np.array_equal(a["indices"], b["indices"])
        assert np.array_equal(a["values"], b["values"])
