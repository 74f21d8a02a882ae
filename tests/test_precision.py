"""precision='auto': the choice, its cache, and that every choice returns exact mode's
neighbours. The probe is injected (no timing here): `measure_rates` is replaced by a fake
that counts its calls, and `SMALL_JOB_FLOP` is lowered so that these small jobs count as
large enough to probe."""

from __future__ import annotations

import json

import pytest
import torch

from ensemble_kernel import top_k_neighbors

from ensemble_kernel.testing import dense_kernel

from ensemble_kernel.core import _engine as engine

from ensemble_kernel.core import _precision as precision
from ensemble_kernel.errors import InputError
from ensemble_kernel.core import _pilot as pilot
from ensemble_kernel.core._engine import _top_k_neighbors
from ensemble_kernel.core._plan import plan_memory
from ensemble_kernel.core._precision import (Rates, choose_precision, fast_plan, machine_key,
                                      predict_times, probe)
from ensemble_kernel.core._sources import as_source

from conftest import assert_same_neighbors, make_ensemble, run_cli, save_pt

# Rates under which fast mode clearly pays (bfloat16 1000x float32), and under which it
# cannot (an AVX2-only CPU: bfloat16 emulated, 7x slower than float32).
FAST_PAYS = Rates(float32=1e9, bfloat16=1e12, normalize=1e12, gather=1e12, select_exact=1e12,
                  select_fast=1e12, probe_s=0.1)
FAST_LOSES = Rates(float32=110e9, bfloat16=16e9, normalize=1e9, gather=1e9, select_exact=1e9,
                   select_fast=0.5e9, probe_s=0.1)
CIFAR = dict(n_queries=10_000, n_references=50_000, n_models=500, n_classes=10, k=20,
             memory_budget=1536 << 20)


@pytest.fixture
def fake_probe(monkeypatch):
    """Replace the measurement with `rates` (set `.rates`); `.calls` counts the probes."""
    class Fake:
        calls = 0
        rates = FAST_PAYS

        def __call__(self, device="cpu", seconds=precision.PROBE_SECONDS):
            Fake.calls += 1
            return self.rates

    fake = Fake()
    monkeypatch.setattr(precision, "measure_rates", fake)
    monkeypatch.setattr(precision, "SMALL_JOB_FLOP", 0.0)
    return fake


def adversarial_ensemble():
    """References with exact duplicates (ties), a near-copy 1e-6 away, and an outlier run."""
    ens = make_ensemble(seed=3, n_models=6, n_train=90, n_test=30)
    train = ens.train.clone()
    train[:, 10] = train[:, 40]  # an exact tie between references 10 and 40
    train[:, 11] = train[:, 41] * (1 + 1e-6)  # nearly equal to 41
    train[2] *= 30  # one run far larger than the others
    return ens.test, train


# ---- the choice returns exact mode's neighbours -------------------------------------

@pytest.mark.parametrize("rates, path", [(FAST_PAYS, "fast"), (FAST_LOSES, "exact")])
def test_auto_returns_exact_modes_neighbours_whichever_path(fake_probe, monkeypatch, rates, path):
    fake_probe.rates = rates
    fast_runs = []
    real_fast = engine._fast_search
    monkeypatch.setattr(engine, "_fast_search",
                        lambda *a, **kw: fast_runs.append(1) or real_fast(*a, **kw))
    test, train = adversarial_ensemble()
    got = top_k_neighbors(train, test, 5, precision="auto", memory_budget=64 << 20)
    assert bool(fast_runs) == (path == "fast")  # the path the probe picked ran
    assert_same_neighbors(got.indices, got.values, dense_kernel(test, train), 5)
    fast_runs.clear()
    forced = top_k_neighbors(train, test, 5, precision=path, memory_budget=64 << 20)
    assert torch.equal(got.indices, forced.indices) and torch.equal(got.values, forced.values)
    exact = top_k_neighbors(train, test, 5, precision="exact", memory_budget=64 << 20)
    # Exact mode's neighbours: same indices but where values tie within float32 rounding.
    differ = got.indices != exact.indices
    torch.testing.assert_close(got.values[differ], exact.values[differ], rtol=1e-5, atol=1e-6)


def test_auto_leave_one_out_matches_exact(fake_probe):
    _, train = adversarial_ensemble()
    got = top_k_neighbors(train, None, 3, precision="auto")
    kernel = dense_kernel(train, train)
    kernel.fill_diagonal_(float("-inf"))
    assert_same_neighbors(got.indices, got.values, kernel, 3)
    assert fake_probe.calls == 1


def test_small_job_resolves_to_exact_without_a_probe(monkeypatch):
    def no_probe(*a, **kw):
        raise AssertionError("a small job must not be probed")

    monkeypatch.setattr(precision, "measure_rates", no_probe)
    choice = choose_precision("auto", n_queries=40, n_references=120, n_models=6, n_classes=5,
                              k=3)
    assert choice.precision == "exact" and choice.rates is None and "small job" in choice.reason
    ens = make_ensemble()
    assert top_k_neighbors(ens.train, ens.test, 3).indices.shape == (40, 3)  # default: auto
    forced = choose_precision("fast", n_queries=40, n_references=120, n_models=6, n_classes=5,
                              k=3)
    assert forced.precision == "fast"


@pytest.mark.parametrize("rates, expected", [(FAST_PAYS, "fast"), (FAST_LOSES, "exact")])
def test_choice_follows_the_predicted_times(fake_probe, rates, expected):
    fake_probe.rates = rates
    choice = choose_precision("auto", **CIFAR)
    assert choice.precision == expected
    assert (choice.predicted_fast_s * precision.SAFETY < choice.predicted_exact_s) == (
        expected == "fast")
    assert choice.as_dict()["rates"]["float32_gflops"] == pytest.approx(rates.float32 / 1e9)


def test_re_score_cost_can_make_fast_lose_despite_faster_products(fake_probe):
    """This machine's trap: bfloat16 products 1.7x faster than float32, but the re-score's
    gather slow: the product rates alone would pick fast mode wrongly."""
    fake_probe.rates = Rates(float32=270e9, bfloat16=470e9, normalize=1e9, gather=0.35e9,
                             select_exact=1e9, select_fast=1e9, probe_s=0.1)
    slow_gather = choose_precision("auto", **CIFAR)
    assert slow_gather.precision == "exact"
    fake_probe.rates = Rates(float32=270e9, bfloat16=4 * 270e9, normalize=10e9, gather=50e9,
                             select_exact=1e9, select_fast=1e9, probe_s=0.1)
    precision_dir = precision.cache_dir()
    for path in precision_dir.glob("probe-*.json"):
        path.unlink()
    assert choose_precision("auto", **CIFAR).precision == "fast"


def test_a_kernel_without_log_softmax_is_predicted_at_its_own_normalising_rate(fake_probe):
    """Standardising raw logits is several times faster than log-softmax first: a kernel
    without log-softmax (`--no-log-softmax`, the report's ablation) is predicted at the
    probe's `normalize_raw`, where fast mode's second normalising pass costs little. The
    report's ablation once ran exact this way, 1.2-1.4x slower than fast on this CPU."""
    slow_softmax = dict(float32=400e9, bfloat16=1450e9, normalize=0.1e9, gather=7.6e9,
                        select_exact=1e9, select_fast=0.35e9, probe_s=0.1,
                        bfloat16_one_block=1450e9)
    shape = dict(CIFAR, n_queries=2000, k=3, memory_budget=1 << 30)
    fake_probe.rates = Rates(**slow_softmax, normalize_raw=2e9)
    with_softmax = choose_precision("auto", **shape)
    raw = choose_precision("auto", **shape, log_softmax=False)
    assert with_softmax.precision == "exact" and raw.precision == "fast"
    assert raw.predicted_exact_s < with_softmax.predicted_exact_s
    # Not measured (a rate of 0, as in an older cache): log-softmax's rate stands in.
    exact_s, fast_s = predict_times(Rates(**slow_softmax), **shape, log_softmax=False)
    assert (exact_s, fast_s) == predict_times(Rates(**slow_softmax), **shape)
    assert fake_probe.calls == 1  # one probe, cached, for both


def test_auto_takes_exact_where_only_exact_fits_the_budget(fake_probe):
    from ensemble_kernel.errors import BudgetError
    from ensemble_kernel.core._plan import plan_memory

    shape = {k: v for k, v in CIFAR.items() if k != "memory_budget"}

    def fits(p, budget):
        try:
            plan_memory(10_000, 50_000, 500, 10, k_keep=20 if p == "exact" else 148,
                        budget=budget, precision=p, raw_bytes=2)
            return True
        except BudgetError:
            return False

    lo, hi = 1 << 20, 1 << 36  # the smallest budget fast mode's plan fits
    while hi - lo > 1:
        lo, hi = (lo, (lo + hi) // 2) if fits("fast", (lo + hi) // 2) else ((lo + hi) // 2, hi)
    assert fits("exact", lo) and not fits("fast", lo)
    choice = choose_precision("auto", memory_budget=lo, **shape)
    assert choice.precision == "exact" and "budget" in choice.reason
    assert choose_precision("auto", memory_budget=hi, **shape).precision == "fast"


def test_precision_typo_is_refused():
    ens = make_ensemble()
    with pytest.raises(InputError, match="precision must be 'auto', 'exact' or 'fast', got 'fats'"):
        top_k_neighbors(ens.train, ens.test, 3, precision="fats")
    with pytest.raises(InputError, match="got 'Auto'"):
        choose_precision("Auto", n_queries=1, n_references=1, n_models=2, n_classes=2, k=1)


# ---- the cache ----------------------------------------------------------------------

def test_probe_is_cached_and_reused(fake_probe):
    first, from_cache = probe(torch.device("cpu"))
    assert (first, from_cache, fake_probe.calls) == (FAST_PAYS, False, 1)
    files = list(precision.cache_dir().glob("probe-*.json"))
    assert len(files) == 1
    entry = json.loads(files[0].read_text())
    assert entry["key"] == machine_key("cpu") and entry["rates"]["float32"] == FAST_PAYS.float32
    again, from_cache = probe(torch.device("cpu"))
    assert (again, from_cache, fake_probe.calls) == (FAST_PAYS, True, 1)
    choice = choose_precision("auto", **CIFAR)
    assert choice.from_cache and fake_probe.calls == 1


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ENSEMBLE_KERNEL_CACHE_DIR", str(tmp_path / "mine"))
    assert precision.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("ENSEMBLE_KERNEL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert precision.cache_dir() == tmp_path / "xdg" / "ensemble-kernel"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert precision.cache_dir() == tmp_path / "home" / ".cache" / "ensemble-kernel"


def _change_torch_version(monkeypatch):
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")


def _change_threads(monkeypatch):
    threads = torch.get_num_threads() + 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)


def _change_cpu(monkeypatch):
    monkeypatch.setattr(precision, "_cpu_description", lambda: ("Some Other CPU", {"avx2"}))


def _change_isa_env(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")


def _change_device(monkeypatch):
    real = precision.machine_key
    monkeypatch.setattr(precision, "machine_key",
                        lambda device="cpu": {**real(device), "device": "cuda:0",
                                              "gpu": "Fake GPU (sm_90)"})


@pytest.mark.parametrize("change", [_change_torch_version, _change_threads, _change_cpu,
                                    _change_isa_env, _change_device])
def test_cache_is_invalidated_when_the_key_changes(fake_probe, monkeypatch, change):
    probe(torch.device("cpu"))
    assert fake_probe.calls == 1
    before = machine_key("cpu")
    with monkeypatch.context() as m:
        change(m)
        assert precision.machine_key("cpu") != before
        _, from_cache = probe(torch.device("cpu"))
        assert not from_cache and fake_probe.calls == 2
        _, from_cache = probe(torch.device("cpu"))
        assert from_cache and fake_probe.calls == 2
    _, from_cache = probe(torch.device("cpu"))  # the first machine's entry is still there
    assert from_cache and fake_probe.calls == 2


def test_key_names_machine_torch_threads_and_device():
    key = machine_key("cpu")
    assert key["torch"] == torch.__version__ and key["threads"] == torch.get_num_threads()
    assert key["device"] == "cpu" and key["cpu"] and isinstance(key["isa"], list)


def _entry(**rates):
    """A cache file for this machine, every rate valid but those given."""
    return json.dumps({"key": machine_key("cpu"), "rates": {
        "float32": 1.0, "bfloat16": 1.0, "normalize": 1.0, "gather": 1.0, "select_exact": 1.0,
        "select_fast": 1.0, "probe_s": 1.0, "bfloat16_one_block": 0.0, "normalize_raw": 2.0,
        **rates}})


def _huge_rate() -> bytes:
    """A rate past float's range: JSON reads it as an int that float() refuses."""
    return _entry(float32=0.5).replace("0.5", "1" + "0" * 400).encode()


def _old_entry() -> bytes:
    """A cache file of the previous probe, without the selection rates."""
    entry = json.loads(_entry())
    del entry["rates"]["select_exact"], entry["rates"]["select_fast"]
    return json.dumps(entry).encode()


def test_a_valid_cache_file_is_read_as_it_is(fake_probe):
    """The twin of the corrupt files below: `_entry()` itself is taken, without a probe."""
    probe(torch.device("cpu"))
    (path,) = precision.cache_dir().glob("probe-*.json")
    path.write_text(_entry(float32=3.0, normalize_raw=0))
    rates, from_cache = probe(torch.device("cpu"))
    assert from_cache and fake_probe.calls == 1
    assert rates.float32 == 3.0 and rates.normalize_rate(False) == rates.normalize == 1.0


@pytest.mark.parametrize("content", [
    b"", b"{not json", b"[]", b"\x00\xff\xfe garbage", b'{"key": 1}', b'{"rates": {}}',
    _entry(float32=-5.0).encode(), _entry(gather=0.0).encode(),
    _entry(bfloat16="fast").encode(), _entry(normalize=None).encode(),
    _entry(float32=float("nan")).encode(), _entry(gather=float("inf")).encode(),
    json.dumps({"key": machine_key("cpu"), "rates": [1, 2]}).encode(),
    _huge_rate(), b"[" * 200_000, _old_entry(),
    _entry(float32="5e8").encode(), _entry(gather=True).encode(), _entry(normalize=1e-300).encode(),
    _entry(normalize_raw="abc").encode(), _entry(normalize_raw=-1.0).encode(),
    _entry(normalize_raw=0.5).encode(), _entry(bfloat16_one_block=float("nan")).encode(),
])
def test_a_corrupt_cache_file_is_ignored_and_rewritten(fake_probe, content):
    probe(torch.device("cpu"))
    (path,) = precision.cache_dir().glob("probe-*.json")
    path.write_bytes(content)
    rates, from_cache = probe(torch.device("cpu"))
    assert (rates, from_cache, fake_probe.calls) == (FAST_PAYS, False, 2)
    assert json.loads(path.read_text())["rates"]["float32"] == FAST_PAYS.float32
    assert probe(torch.device("cpu"))[1]  # the rewritten file is read next time


def test_an_unwritable_cache_does_not_crash(fake_probe, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ENSEMBLE_KERNEL_CACHE_DIR", str(blocker / "cache"))
    assert probe(torch.device("cpu")) == (FAST_PAYS, False)
    assert probe(torch.device("cpu")) == (FAST_PAYS, False)  # measured again, no crash
    assert fake_probe.calls == 2


def test_the_real_probe_returns_valid_rates():
    """The measurement itself, with a tiny time allowance (no timing asserted)."""
    from conftest import REAL_MEASURE_RATES

    rates = REAL_MEASURE_RATES("cpu", seconds=0.2)
    assert rates.valid() and rates.probe_s > 0 and rates.normalize_raw > 0


# ---- the command line ---------------------------------------------------------------

def _src(tmp_path):
    ens = make_ensemble()
    return save_pt(tmp_path / "runs.pt", ens.train, ens.test, labels_train=ens.labels_train,
                   labels_test=ens.labels_test)


def test_cli_precision_typo_lists_the_choices(tmp_path):
    code, out, err = run_cli("evaluate", _src(tmp_path), "--precision", "fats")
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert "--precision takes auto, exact or fast, got 'fats'" in err


def test_cli_json_and_verbose_show_the_probe(fake_probe, tmp_path):
    fake_probe.rates = FAST_LOSES
    src = _src(tmp_path)
    code, out, err = run_cli("evaluate", src, "--json", "-v")
    assert code == 0
    first = json.loads(out)["precision"]
    assert first["requested"] == "auto" and first["chosen"] == "exact"
    assert first["from_cache"] is False
    assert first["rates"]["bfloat16_gflops"] == pytest.approx(16)
    assert first["predicted_exact_s"] < first["predicted_fast_s"]
    assert json.loads(out)["options"]["precision"] == "exact"
    (line,) = err.splitlines()
    assert line.startswith("precision auto -> exact") and "bfloat16 16 GFLOP/s" in line
    code, out, err = run_cli("evaluate", src, "--json")
    assert json.loads(out)["precision"]["from_cache"] is True and err == ""
    assert fake_probe.calls == 1


@pytest.mark.parametrize("rates, warns", [(FAST_LOSES, True), (FAST_PAYS, False)])
def test_forced_fast_warns_only_where_the_probe_says_slower(fake_probe, tmp_path, rates, warns):
    fake_probe.rates = rates
    code, out, err = run_cli("evaluate", _src(tmp_path), "--precision", "fast", "-q")
    assert code == 0 and "kernel accuracy" in out
    lines = err.splitlines()
    if warns:
        (line,) = lines
        assert line.startswith("warning: --precision fast is predicted slower than exact")
        assert "float32 110 GFLOP/s, bfloat16 16 GFLOP/s" in line
    else:
        assert lines == []


def test_neighbors_records_the_choice(fake_probe, tmp_path):
    import numpy as np

    fake_probe.rates = FAST_PAYS
    out = tmp_path / "n.npz"
    code, _, _ = run_cli("neighbors", _src(tmp_path), "--out", out, "--k", 3, "-q")
    assert code == 0
    meta = json.loads(str(np.load(out)["meta"]))
    assert meta["options"]["precision"] == "fast" and meta["precision"]["chosen"] == "fast"


def test_a_slow_candidate_selection_can_make_fast_lose(fake_probe):
    """bfloat16 products 3x faster and a fast re-score, but keeping 148 candidates per tile
    (widening the block, a wider top-k) costs more per pair than the products save."""
    rates = dict(float32=300e9, bfloat16=900e9, normalize=10e9, gather=50e9,
                 select_exact=1.5e9, probe_s=0.1)
    fake_probe.rates = Rates(**rates, select_fast=1.5e9)
    assert choose_precision("auto", **CIFAR).precision == "fast"
    for path in precision.cache_dir().glob("probe-*.json"):
        path.unlink()
    fake_probe.rates = Rates(**rates, select_fast=0.03e9)  # 17 s for CIFAR's 5e8 pairs
    slow = choose_precision("auto", **CIFAR)
    assert slow.precision == "exact"
    assert slow.predicted_fast_s > slow.predicted_exact_s


# ---- the pilot: how crowded the data's candidates are ----------------------------------

def crowded_ensemble(n_models=40, n_train=600, n_test=50, seed=0):
    """References all nearly alike (one shared pattern, tiny noise): each test example's
    kernel values to them differ by far less than fast mode's bound, so every candidate
    window is crowded."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n_models, 1, 5, generator=g) * 2
    train = shared + 1e-4 * torch.randn(n_models, n_train, 5, generator=g)
    test = torch.randn(n_models, n_test, 5, generator=g)
    return train, test


def separated_ensemble(n_models=40, seed=0):
    """20 clusters of 30 references; each test example a near copy of one reference."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_models, 20, 5, generator=g) * 3
    train = centres.repeat_interleave(30, 1) + torch.randn(n_models, 600, 5, generator=g)
    test = train[:, ::12] + 0.01 * torch.randn(n_models, 50, 5, generator=g)
    return train, test


def _share(train, test, k, chunk_models=None):
    """The pilot's share for test -> train (test None: leave-one-out within train), for
    fast mode's plan (with blocks of `chunk_models` runs: the worst-case block rounding)."""
    queries = train if test is None else test
    plan = plan_memory(queries.shape[1], train.shape[1], train.shape[0], 5, k_keep=148,
                       budget=64 << 20, precision="fast", chunk_models=chunk_models)
    return pilot.crowded_share(queries, None if test is None else train, k, plan,
                                        n_candidates=None, log_softmax=True, classes=None,
                                        memory_budget=64 << 20, device="cpu")


def test_the_pilot_tells_crowded_candidates_from_separated_ones(exact_rows):
    train, test = crowded_ensemble()
    assert _share(train, test, 20) == 1.0
    # ... as fast mode itself finds: every row computed whole
    _top_k_neighbors(test, train, 20, precision="fast", memory_budget=64 << 20)
    assert exact_rows.total() == test.shape[1]
    train, test = separated_ensemble()
    assert _share(train, test, 1) == 0.0
    assert _share(train, test, 1, chunk_models=2) == 0.0  # several blocks of runs
    # every reference a candidate: nothing to crowd
    assert _share(train[:, :100], test, 1) == 0.0


def test_the_pilot_samples_spans_of_a_large_split(monkeypatch):
    # More references than the sample: it reads spread spans, and still sees the crowding.
    monkeypatch.setattr(pilot, "PILOT_REFERENCES", 256)
    monkeypatch.setattr(pilot, "PILOT_QUERIES", 16)
    train, test = crowded_ensemble(n_train=2000)
    assert _share(train, test, 20) == 1.0
    train, test = separated_ensemble()
    assert _share(train, test, 1) == 0.0
    # leave-one-out (the references are the queries)
    assert _share(train, None, 1) == pytest.approx(0.0, abs=0.2)


def test_spans_read_as_one_source():
    data = torch.arange(2 * 100 * 3, dtype=torch.float32).reshape(2, 100, 3)
    spans = pilot.spread_spans(100, 30, 4)
    assert len(spans) == 4 and spans[0][0] == 0 and spans[-1][1] == 100  # window 120 > 100
    assert all(b - a == 7 for a, b in spans)
    assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:]))  # disjoint, in order
    source = pilot.Spans(as_source(data, "x"), spans)
    whole = torch.cat([data[:, a:b] for a, b in spans], dim=1)
    assert source.n_examples == 28
    for e0, e1 in [(0, 28), (3, 9), (6, 8), (7, 14), (13, 27), (27, 28)]:
        assert torch.equal(source.read(slice(0, 2), slice(e0, e1)), whole[:, e0:e1])
    assert source.read(slice(0, 2), slice(5, 5)).shape == (2, 0, 3)  # empty, as arrays do
    assert pilot.spread_spans(50, 60, 8) == [(0, 50)]
    # a large split: spans within the first chunk-sized window, which one read covers
    big = pilot.spread_spans(50_000, 4096, 8)
    assert big[0][0] == 0 and big[-1][1] == pilot.PILOT_WINDOW
    assert sum(b - a for a, b in big) == 4096


def test_auto_asks_the_pilot_only_when_the_products_favour_fast(fake_probe):
    asked = []

    def pilot(share):
        def crowding(plan):
            asked.append(plan)
            return share
        return crowding
    fake_probe.rates = FAST_LOSES
    assert choose_precision("auto", **CIFAR, crowding=pilot(0.0)).precision == "exact"
    assert asked == []
    for path in precision.cache_dir().glob("probe-*.json"):
        path.unlink()
    fake_probe.rates = Rates(float32=300e9, bfloat16=1000e9, normalize=10e9, gather=50e9,
                             select_exact=1.5e9, select_fast=1e9, probe_s=0.1)
    separated = choose_precision("auto", **CIFAR, crowding=pilot(0.0))
    assert separated.precision == "fast" and separated.crowded_share == 0.0
    assert asked and asked[0] == precision.fast_plan(**CIFAR)  # fast mode's own plan
    crowded = choose_precision("auto", **CIFAR, crowding=pilot(1.0))
    assert crowded.precision == "exact" and "pilot found 100%" in crowded.reason
    assert crowded.predicted_fast_s > crowded.predicted_exact_s
    assert crowded.as_dict()["crowded_share"] == 1.0


def test_auto_takes_exact_on_crowded_data_end_to_end(fake_probe, exact_rows):
    # Products that favour fast mode, data that defeats it: auto runs exact mode.
    fake_probe.rates = Rates(float32=1e9, bfloat16=1e12, normalize=1e12, gather=1e12,
                             select_exact=1e12, select_fast=1e12, probe_s=0.1)
    train, test = crowded_ensemble()
    stages = []
    _top_k_neighbors(test, train, 20, precision="auto", memory_budget=64 << 20,
                     progress=lambda p: stages.append(p.stage))
    assert "rescore" not in stages  # exact mode ran
    train, test = separated_ensemble()
    stages.clear()
    _top_k_neighbors(test, train, 1, precision="auto", memory_budget=64 << 20,
                     progress=lambda p: stages.append(p.stage))
    assert "rescore" in stages


def test_the_prediction_takes_the_one_block_rate_where_the_plan_has_one_block():
    # Fast mode's plan at CIFAR/500 with 1.5 GiB is one block of every run: its product is
    # predicted at the one-block rate (nothing added into float32); with several blocks
    # (20,000 runs) at the rate with the float32 sum; unmeasured (0), the latter stands in.
    base = dict(float32=300e9, bfloat16=900e9, normalize=100e6, gather=6e9,
                select_exact=900e6, select_fast=300e6, probe_s=2.0)
    slow, quick = Rates(**base), Rates(**base, bfloat16_one_block=2700e9)
    assert fast_plan(**CIFAR).chunk_models == 500
    assert predict_times(quick, **CIFAR)[1] < predict_times(slow, **CIFAR)[1]
    assert predict_times(quick, **CIFAR)[0] == predict_times(slow, **CIFAR)[0]
    wide = {**CIFAR, "n_models": 20_000, "memory_budget": 4 << 30}
    assert fast_plan(**wide).chunk_models < 20_000
    assert predict_times(quick, **wide) == predict_times(slow, **wide)
    assert Rates(**base).valid() and not Rates(**base, bfloat16_one_block=-1.0).valid()


@pytest.mark.parametrize("via", ["library", "evaluate", "neighbors", "predict"])
def test_no_log_softmax_reaches_the_prediction(fake_probe, monkeypatch, tmp_path, via):
    """Every path that resolves auto for a kernel without log-softmax predicts it so."""
    seen = []
    real = precision.predict_times
    monkeypatch.setattr(precision, "predict_times",
                        lambda *a, **kw: seen.append(kw.get("log_softmax", True)) or real(*a, **kw))
    ens = make_ensemble()
    if via == "library":
        top_k_neighbors(ens.train, ens.test, 3, log_softmax=False, precision="auto")
        top_k_neighbors(ens.train, ens.test, 3, precision="auto")
        assert seen and seen[0] is False and seen[-1] is True
        return
    src = _src(tmp_path)
    out = {"evaluate": [], "neighbors": ["--out", tmp_path / "n.npz"],
           "predict": ["--out", tmp_path / "p.csv"]}[via]
    code, _, err = run_cli(via, src, "--no-log-softmax", "--precision", "auto", *out, "-q")
    assert code == 0, err
    assert seen and not any(seen)
