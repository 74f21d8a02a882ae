"""The benchmark scripts at a tiny scale, so that they cannot rot (no timing is asserted).

- `benchmarks/machine.py`: the CPU description and the time cap of the product probes
  (a slow path stops at its cap and reports the rate of what it did).
- `benchmarks/bench_20k.py` (`make bench-20k`): 2 files x 3 runs end to end (files in the
  published layout, ingest, neighbours equal to the library's, results with every stage
  measured); resuming skips the whole files; the disk-space refusal (with a faked free
  space) and typos in options are one line, exit 2, and write nothing.
- `benchmarks/micro.py int8`: the bounds it compares hold for every pair, outlier runs
  included, and int8's rounding is the larger.
- `benchmarks/report_bench.py`: both trees of --compare-src timed, each first in turn,
  figures in --json-out; a --compare-src without the package is refused before any work.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_20k  # noqa: E402
import machine  # noqa: E402
import micro  # noqa: E402

TINY = ["--files", "2", "--runs-per-file", "3", "--n-train", "40", "--n-test", "10",
        "--n-classes", "4", "--k", "3", "--memory-budget", "64MiB", "--probe-seconds", "0.05"]


# ---- machine.py ----------------------------------------------------------------------

def test_parse_cpuinfo_reads_the_first_processor_only():
    text = ("processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu avx2 avx512f "
            "avx512_bf16 amx_int8\n\nprocessor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
    model, flags = machine.parse_cpuinfo(text)
    assert model == "Some CPU @ 2.0GHz"
    assert flags == {"fpu", "avx2", "avx512f", "avx512_bf16", "amx_int8"}
    assert "avx512_vnni" not in flags  # a flag merely near a listed one is not listed


def test_describe_names_every_flag_and_the_threads():
    desc = machine.describe()
    assert set(desc["isa"]) == set(machine.ISA_FLAGS)
    assert desc["threads"] == torch.get_num_threads()
    text = machine.header(desc)
    assert desc["cpu"] in text and f"{desc['threads']} threads" in text


class FakeClock:
    """Time that passes only when the fake product runs: cost seconds per row."""

    def __init__(self, cost: float):
        self.now, self.cost, self.rows = 0.0, cost, []

    def __call__(self) -> float:
        return self.now

    def run(self, r0: int, r1: int) -> None:
        self.rows.append((r0, r1))
        self.now += (r1 - r0) * self.cost


def test_a_slow_product_stops_at_its_cap_with_the_rate_of_what_it_did():
    clock = FakeClock(cost=0.01)  # 10,000 rows would take 100 s
    rate = machine.capped_rate("slow", clock.run, 10_000, 1e9, seconds=2.0, clock=clock)
    assert rate.gflops == pytest.approx(100.0)  # 1e9 FLOP per row / 0.01 s
    assert 2.0 <= rate.seconds <= 2.0 + 2.0 / 8 + 1e-9  # the cap plus at most one block
    assert rate.share < 0.05
    assert clock.rows[0] == (0, 32)  # warm-up block, untimed


def test_a_fast_product_stops_after_max_products_and_wraps_around():
    clock = FakeClock(cost=1e-6)
    rate = machine.capped_rate("fast", clock.run, 1000, 1.0, seconds=60.0, max_products=2,
                               clock=clock)
    assert rate.share == 2.0 and rate.seconds < 1.0
    done = sum(r1 - r0 for r0, r1 in clock.rows[1:])
    assert done == 2000 and all(0 <= r0 < r1 <= 1000 for r0, r1 in clock.rows)


# ---- bench_20k.py --------------------------------------------------------------------

def _run(tmp_path: Path, *extra: str) -> int:
    return bench_20k.main([*TINY, "--dir", str(tmp_path / "data"),
                           "--out-dir", str(tmp_path / "out"), *extra])


def test_bench_20k_end_to_end_at_tiny_scale(tmp_path, capsys):
    from ensemble_kernel import top_k_neighbors

    assert _run(tmp_path, "--keep") == 0
    folder = next((tmp_path / "data").iterdir())
    files = sorted((folder / "files").glob("*.pt"))
    assert [f.name for f in files] == ["runs-00000.pt", "runs-00001.pt"]
    loaded = [torch.load(f, weights_only=True) for f in files]  # no pickled code
    for d in loaded:
        assert set(d) == {"logits", "logits_train"}
        assert d["logits"].shape == (3, 10, 4) and d["logits_train"].shape == (3, 40, 4)
        assert d["logits"].dtype == d["logits_train"].dtype == torch.float16
    assert not torch.equal(loaded[0]["logits_train"], loaded[1]["logits_train"])
    train = torch.cat([d["logits_train"] for d in loaded])
    test = torch.cat([d["logits"] for d in loaded])

    result = json.loads((tmp_path / "out" / "bench_20k_results.json").read_text())
    for stage in ("generate", "ingest", "neighbors"):
        assert result["stages"][stage]["wall_s"] > 0
        assert result["stages"][stage]["peak_rss_bytes"] > 10 << 20  # a Python process at least
    assert result["data"]["runs"] == 6 and result["stages"]["generate"]["files_written"] == 2
    assert result["machine"]["cpu"] in (tmp_path / "out" / "bench_20k_results.md").read_text()
    # which precision the neighbours ran (auto resolves it), from the file's record
    assert result["stages"]["neighbors"]["precision"]["chosen"] in ("exact", "fast")
    assert "| neighbors (exact" in (tmp_path / "out" / "bench_20k_results.md").read_text() or \
        "| neighbors (fast" in (tmp_path / "out" / "bench_20k_results.md").read_text()

    # The neighbours the benchmark computed from the store are the library's on the files.
    got = np.load(result["stages"]["neighbors"]["out"])
    want = top_k_neighbors(train, test, 3, precision="exact")
    assert np.array_equal(got["indices"], want.indices.numpy())
    np.testing.assert_allclose(got["values"], want.values.numpy(), rtol=1e-5, atol=1e-6)
    from ensemble_kernel.storage._store import RunStore

    assert RunStore(folder / "store").n_models == 6



def test_bench_20k_removes_its_data_without_keep(tmp_path, monkeypatch):
    # The stages are faked (the end-to-end test runs them): only main's own steps run.
    def stages(args, folder, budget):
        bench_20k.write_files(folder, bench_20k.missing_files(folder, args.files),
                              args.runs_per_file, args.n_train, args.n_test, args.n_classes,
                              args.seed)
        (folder / "store").mkdir(exist_ok=True)
        return {name: {"wall_s": 1.0, "peak_rss_bytes": 1 << 30, "files_written": 2,
                       "store_existed": False} for name in ("generate", "ingest", "neighbors")}

    monkeypatch.setattr(bench_20k, "run_stages", stages)
    assert _run(tmp_path, "--keep") == 0
    kept = list((tmp_path / "data").iterdir())
    assert len(kept) == 1 and len(list((kept[0] / "files").glob("*.pt"))) == 2
    assert _run(tmp_path) == 0
    assert list((tmp_path / "data").iterdir()) == []
    result = json.loads((tmp_path / "out" / "bench_20k_results.json").read_text())
    assert result["neighbors_gflops"] == pytest.approx(result["flop"] / 1e9)  # over 1 s


def test_a_missing_file_is_written_again_identical(tmp_path):
    folder = tmp_path / "f"
    bench_20k.write_files(folder, [0, 1], 3, 40, 10, 4, seed=5)
    first = torch.load(bench_20k.file_path(folder, 1), weights_only=True)
    stamp = bench_20k.file_path(folder, 0).stat().st_mtime_ns
    bench_20k.file_path(folder, 1).unlink()
    stale = folder / "files" / ".runs-00001.pt.abc.partial"  # as a killed write leaves it
    stale.write_bytes(b"half")
    assert bench_20k.missing_files(folder, 3) == [1, 2]
    bench_20k.write_files(folder, bench_20k.missing_files(folder, 2), 3, 40, 10, 4, seed=5)
    second = torch.load(bench_20k.file_path(folder, 1), weights_only=True)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert bench_20k.file_path(folder, 0).stat().st_mtime_ns == stamp
    assert not stale.exists()


def test_too_little_disk_space_is_refused_in_one_line_before_anything(tmp_path, capsys,
                                                                      monkeypatch):
    one = bench_20k.file_bytes(3, 40, 10, 4)
    needed = 2 * one + int(bench_20k.STORE_FACTOR * 2 * one) + bench_20k.MARGIN  # files, store
    monkeypatch.setattr(bench_20k, "free_bytes", lambda path: needed - 1)
    assert _run(tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bench_20k: needs ")
    assert str(tmp_path / "data") in err and "--dir" in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()
    # One byte more is enough: the refusal is the check, not a guess.
    monkeypatch.setattr(bench_20k, "free_bytes", lambda path: needed)
    assert bench_20k.check_space(bench_20k.parse_args([*TINY, "--dir", str(tmp_path / "d")]),
                                 tmp_path / "d" / "x")["needed_bytes"] == needed


@pytest.mark.parametrize("bad, names", [
    (["--files", "0"], "--files"),
    (["--runs-per-file", "1", "--files", "1"], "--runs-per-file"),
    (["--precision", "exakt"], "--precision"),
    (["--memory-budget", "4GX"], "--memory-budget"),
    (["--k", "41"], "--k"),
    (["--n-classes", "1"], "--n-classes"),
    (["--filez", "2"], "--filez"),
    (["--file", "2"], "--file"),  # no abbreviations: a typo is not taken for --files
    (["--files", "two"], "--files"),
])
def test_bad_options_are_one_line_and_write_nothing(tmp_path, capsys, bad, names):
    assert _run(tmp_path, *bad) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and names in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--dir", "--out-dir"])
def test_a_file_where_a_folder_goes_is_refused_before_anything(tmp_path, capsys, option):
    (tmp_path / "a-file").write_text("mine")
    assert bench_20k.main([*TINY, "--dir", str(tmp_path / "data"), "--out-dir",
                           str(tmp_path / "out"), option, str(tmp_path / "a-file")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and option in err and "a-file" in err
    assert (tmp_path / "a-file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


# ---- run.py's table ---------------------------------------------------------------------

def test_run_table_ratios_and_an_unfinished_case():
    import run

    peak = {"float32": 100.0, "bfloat16": 400.0}
    results = {"peak": peak,
               "reference": {"wall_s": 40.0, "peak_rss": 8 << 30, "prediction": [0, 1, 2, 3]},
               "exact": {"wall_s": 20.0, "peak_rss": 2 << 30, "prediction": [0, 1, 2, 3]},
               "fast": {"wall_s": 10.0, "peak_rss": 1 << 30, "prediction": [0, 1, 2, 0]},
               "auto": {"timed_out": True, "wall_s": 900.0}}
    flop = 1e12
    exact, fast = run.make_row("exact", results, flop), run.make_row("fast", results, flop)
    assert exact["speedup"] == 2.0 and exact["rss_ratio"] == 0.25
    assert exact["of_float32_rate"] == pytest.approx(0.5)  # 50 GFLOP/s of 100
    assert "wall_vs_exact" not in exact and fast["wall_vs_exact"] == 0.5
    assert fast["of_bfloat16_rate"] == pytest.approx(0.25) and fast["same_3nn_predictions"] == 3
    cells = [c.strip() for c in run.format_row(exact, 4).split("|")[1:-1]]
    assert len(cells) == len(run.TABLE_HEAD.splitlines()[0].split("|")[1:-1])
    assert cells[5] == "-" and cells[8] == "-" and cells[9] == "4/4"  # no ratio to itself
    unfinished = run.format_row(run.make_row("auto", results, flop), 4)
    assert "not finished in 900 s" in unfinished
    assert unfinished.count("|") == run.TABLE_HEAD.splitlines()[0].count("|")


def test_run_reads_fast_modes_counts_from_its_log(caplog):
    # run.py reports how many test examples fast mode computed whole and recomputed, from
    # the engine's own log line (it once reported the pairs re-scored as recomputed).
    import logging

    import run
    from ensemble_kernel.core._engine import _top_k_neighbors

    counts = run.FastModeCounts()
    log = logging.getLogger("ensemble_kernel.core._engine")
    log.addHandler(counts)
    try:
        with caplog.at_level(logging.INFO, logger="ensemble_kernel.core._engine"):
            g = torch.Generator().manual_seed(0)
            train, test = torch.randn(5, 300, 3, generator=g), torch.randn(5, 20, 3, generator=g)
            _top_k_neighbors(test, train, 2, precision="fast", memory_budget=64 << 20)
    finally:
        log.removeHandler(counts)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("fast mode:"))
    whole, again = counts.found[0]
    assert f"{whole} queries computed whole" in line and f"{again} of 20 queries" in line


def _run_py(tmp_path, *options):
    import subprocess

    return subprocess.run([sys.executable, str(BENCH / "run.py"), "--runs", "4", "--n-train",
                           "300", "--n-test", "40", "--probe-seconds", "0.05",
                           "--data-dir", str(tmp_path / "data"), "--out-dir",
                           str(tmp_path / "out"), *options], capture_output=True, text=True)


@pytest.mark.parametrize("options, says", [
    (["--budget", "12XB"], "--budget takes a size such as 2GB"),
    (["--device", "gpu"], "--device gpu: takes cpu or cuda[:N]"),
    (["--device", f"cuda:{torch.cuda.device_count()}"],  # one past the last GPU, or none
     "takes cpu or cuda[:N], and cuda needs a CUDA device"),
    (["--budget", "1KiB"], "--budget"),  # the engine's plan refuses it: so does run.py, first
    (["--cases", "reference,exact,fats"], "--cases reference,exact,fats: 'fats' is not a case"),
])
def test_run_refuses_a_bad_device_or_budget_before_any_work(tmp_path, options, says):
    done = _run_py(tmp_path, *options)
    assert done.returncode == 2 and says in done.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, says", [
    (["--precisions", "exact,fats"], "--precisions exact,fats: 'fats' is not a precision"),
    (["--repeats", "0"], "--repeats positive"),
    (["--budget", "lots"], "--budget takes a size such as 2GB"),
    ([], "needs a CUDA device") if not torch.cuda.is_available() else (["--k", "0"], "--k"),
])
def test_gpu_profile_refuses_bad_options_in_one_line_before_any_work(tmp_path, options, says):
    import subprocess

    done = subprocess.run([sys.executable, str(BENCH / "gpu_profile.py"), "--data-dir",
                           str(tmp_path / "data"), "--out-dir", str(tmp_path / "out"),
                           *options], capture_output=True, text=True)
    assert done.returncode == 2 and says in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("gpu_profile.py: error:")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


def test_run_end_to_end_at_tiny_scale_reports_stages_and_a_budget_with_a_unit(tmp_path):
    done = _run_py(tmp_path, "--cases", "reference,exact,fast", "--budget", "64MiB")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "progress reports (first, last; s): statistics" in done.stdout
    raw = json.loads((tmp_path / "out" / "results.json").read_text())["raw"]
    assert set(raw["exact"]["stages"]) >= {"statistics", "kernel"}
    assert "rescore" in raw["fast"]["stages"] and raw["exact"]["peak_gpu"] is None
    table = (tmp_path / "out" / "results.md").read_text()
    assert "--budget 67108864" in table and "40/40" in table


# ---- report_bench.py -------------------------------------------------------------------

def _report_bench(tmp_path, *options):
    import subprocess

    return subprocess.run([sys.executable, str(BENCH / "report_bench.py"), "--runs", "4",
                           "--n-train", "200", "--n-test", "40", "--n-classes", "4",
                           "--memory-budget", "64MiB", "--data-dir", str(tmp_path / "data"),
                           *options], capture_output=True, text=True)


def test_report_bench_refuses_a_compare_src_without_the_package_before_any_work(tmp_path):
    done = _report_bench(tmp_path, "--compare-src", str(tmp_path))
    assert done.returncode == 2
    error = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "--compare-src" in error[0] and "src/" in error[0]
    assert not (tmp_path / "data").exists()


def test_report_bench_times_both_trees_alternated_at_tiny_scale(tmp_path):
    src = Path(__file__).resolve().parents[1] / "src"
    out = tmp_path / "figures.json"
    done = _report_bench(tmp_path, "--repeats", "2", "--compare-src", str(src),
                         "--json-out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line.split(" repeat")[0].strip() for line in done.stdout.splitlines()
             if " repeat " in line]
    # each tree first in turn: compared, this, then this, compared
    assert lines == ["compared evaluate", "compared report", "this evaluate", "this report",
                     "this evaluate", "this report", "compared evaluate", "compared report"]
    figures = json.loads(out.read_text())
    assert len(figures["ratio_report_over_evaluate"]) == 2
    assert figures["compared"]["src"] == str(src)
    assert len(figures["compared"]["ratio_report_over_evaluate"]) == 2


# ---- micro.py int8 -------------------------------------------------------------------

def test_int8_windows_bounds_hold_for_every_pair_with_outlier_runs():
    """The README's case against an int8 pass rests on these bounds: each pair's actual
    error within its bound, and int8 rounding further than bfloat16. An outlier run (one
    run's logits 40x larger) widens int8's scale for the rows it touches."""
    g = torch.Generator().manual_seed(3)
    train = torch.randn(12, 300, 5, generator=g)
    test = torch.randn(12, 30, 5, generator=g)
    train[7, :50] *= 40  # outlier run on some training examples
    test[2, :5] *= 40
    test[:, 10] = train[:, 3]  # a test example equal to a training one: a value near 1
    runs, figures = micro.int8_windows(train, test, k=4, n_candidates=8, block=64)
    assert runs == 12 and set(figures) == {"bfloat16", "int8, a scale per row",
                                           "int8, a scale per row and 50 runs",
                                           "int8, a scale per row and 5 runs"}
    for f in figures.values():
        assert f["violations"] == 0 and 0 < f["error"] and f["pair_within_query"]
        for kind in ("query", "pair"):
            median, twice, once = f[kind]
            assert median > 0 and bool((once >= 4).all()) and bool((twice >= once).all())
    bf, i8 = figures["bfloat16"], figures["int8, a scale per row"]
    assert i8["rounding"] > 3 * bf["rounding"]
    assert bool((i8["query"][1] >= bf["query"][1]).all())
    # 12 runs: "50 runs" is one block, the row's own scale; 5 runs round no further
    assert figures["int8, a scale per row and 50 runs"]["rounding"] == i8["rounding"]
    assert figures["int8, a scale per row and 5 runs"]["rounding"] <= i8["rounding"]


@pytest.mark.parametrize("options, says", [
    (["int8", "--store", "/nonexistent/store"], "/nonexistent/store: no such store"),
    (["pilot", "--store", "/nonexistent/store"], "/nonexistent/store: no such store"),
    (["int8", "--k", "x"], "argument --k: invalid int value"),
    (["compare", "/nope/a.npz", "/nope/b.npz"], "/nope/a.npz: no such file"),
    (["faults", "--store", "/nonexistent/store", "--memory-budget", "junk"],
     "--memory-budget takes a size"),
    (["faults", "--store", "/nonexistent/store"], "/nonexistent/store: no such store"),
    (["stages", "--runs", "0"], "--runs takes a positive count"),
    (["pilot", "--store", "{store}", "--k", "0"], "--k must be at least 1"),
    (["int8", "--store", "{store}", "--k", "0"], "k must be between 1 and 40"),
    (["sweepstats", "--store", "{store}", "--memory-budget", "1KiB"], "too small"),
])
def test_micro_refuses_bad_input_in_one_line(options, says, tmp_path):
    import subprocess

    if any("{store}" in o for o in options):  # a real store, 3 runs x 40 training examples
        from conftest import make_ensemble
        from ensemble_kernel.cli import app
        from typer.testing import CliRunner

        ens = make_ensemble(n_models=3, n_train=40, n_test=10)
        np.savez(tmp_path / "runs.npz", logits_train=ens.train.numpy(),
                 logits_test=ens.test.numpy())
        assert CliRunner().invoke(app, ["ingest", str(tmp_path / "runs.npz"), "--store",
                                        str(tmp_path / "store"), "-q"]).exit_code == 0
        options = [o.replace("{store}", str(tmp_path / "store")) for o in options]
    done = subprocess.run([sys.executable, str(BENCH / "micro.py"), *options],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and says in done.stderr.strip().splitlines()[-1]
