"""`precision="auto"`: choose exact or fast mode from a short probe of this machine.

Fast mode pays only where low-precision products are much faster than float32 ones
*and* that gain outweighs its extra work: a longer candidate list per tile, the exact
re-score (one dot product per candidate, and every feature normalised again unless the
plan keeps them) and the rows its proof computes whole. So the probe measures eight rates
at the engine's shapes, on the chosen device, with the engine's own code and settings:

- `float32`: a float32 product accumulated with `addmm` under `highest` precision
  (exact mode's kernel pass), FLOP/s;
- `bfloat16`: a bfloat16 product added into a float32 accumulator (fast mode's
  candidate pass with several blocks of runs), FLOP/s;
- `bfloat16_one_block`: the bfloat16 product alone (fast mode's candidate pass where its
  plan takes one block of every run: nothing is added into float32), FLOP/s;
- `normalize`: log-softmax and standardisation of float16 logits into features
  (`kernel.prepare`, `kernel.normalized_features`), feature values per second;
- `normalize_raw`: the same without log-softmax (`--no-log-softmax`, the report's
  ablation), several times faster;
- `gather`: the re-score: one float32 dot product per (query, candidate) pair, read
  from the feature rows by `torch.sparse.sampled_addmm`, feature values per second;
- `select_exact`, `select_fast`: each mode's per-tile top-k selection (21 of a float32
  block; 148 of a bfloat16 block widened to float32), pairs per second.

`predict_times` turns the rates into the time of each path for a job's shapes (the
engine's plan for each precision gives the tiles and whether query features are cached),
and `choose_precision` picks fast mode only when its predicted time, with a safety margin
and an allowance for queries recomputed exactly, is below exact mode's. Either choice
returns the same neighbours: fast mode's result is exact mode's by proof (see
`engine._fast_search`), so the choice only changes the time.

The rates are cached per machine (CPU model and ISA flags, or GPU name), torch version,
thread count, device and the environment variables that change torch's CPU kernels, in
`$ENSEMBLE_KERNEL_CACHE_DIR`, else `$XDG_CACHE_HOME/ensemble-kernel`, else
`~/.cache/ensemble-kernel`. An unreadable or corrupt cache file is ignored and rewritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch

from .._atomic import atomic_write_text
from ..errors import InputError
from ._kernel import ClassStats, bfloat16_matmul, exact_float32_matmul, normalized_features, prepare
from ._plan import Plan, default_memory_budget, plan_if_fits, plan_memory, resolve_device

__all__ = ["PRECISIONS", "Rates", "PrecisionChoice", "choose_precision", "measure_rates",
           "machine_key", "cache_dir", "predict_times"]

logger = logging.getLogger(__name__)

Precision = Literal["auto", "exact", "fast"]
PRECISIONS = ("auto", "exact", "fast")

PROBE_VERSION = 6  # bump when the probe or the model changes: old cache files are ignored
PROBE_SECONDS = 3.0  # hard cap on the whole probe (a fifth of it to each group of rates,
# two fifths to the products)
# Below this many FLOP in the kernel product the job takes about a second at float32 rates
# on a laptop: fast mode cannot gain more than the probe costs, so auto takes exact unprobed.
SMALL_JOB_FLOP = 1e11
# Fast mode must be predicted this much faster than exact mode to be chosen: the rates are
# measured on small shapes in a few seconds, on a machine that may be shared.
SAFETY = 1.25
# Share of queries whose whole row fast mode computes exactly (in the re-score's pass: their
# float32 products, nothing normalised again). It depends on the data (0.5% at CIFAR shape
# with synthetic logits, 0 on the demo's store); assume more.
FALLBACK_SHARE = 0.05
# Environment variables that change which kernels torch, oneDNN and MKL run on a CPU.
_ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
            "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE")
# CPU flags that decide whether low-precision products are fast (shown in the key).
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16",
              "amx_int8", "amx_tile")


@dataclass(frozen=True)
class Rates:
    """What the probe measured on one machine and device.

    Attributes
    ----------
    float32 : exact mode's product rate, FLOP per second.
    bfloat16 : fast mode's candidate-pass product rate (with its float32 accumulation),
        FLOP per second.
    normalize : feature values produced per second from float16 logits.
    normalize_raw : the same for kernels without log-softmax (0: not measured; `normalize`
        stands in).
    gather : re-score rate, candidate feature values gathered and multiplied per second.
    select_exact : (query, reference) pairs per second through exact mode's per-tile
        selection (`topk` of k + 1 = 21 of a float32 block).
    select_fast : the same for fast mode's (a bfloat16 block widened to float32, then
        `topk` of k + 128 = 148 candidates).
    probe_s : seconds the probe took.
    bfloat16_one_block : fast mode's product rate where its plan takes one block of every
        run: the bfloat16 product alone, nothing added into float32 (0: not measured; the
        `bfloat16` rate stands in).
    """

    float32: float
    bfloat16: float
    normalize: float
    gather: float
    select_exact: float
    select_fast: float
    probe_s: float
    bfloat16_one_block: float = 0.0
    normalize_raw: float = 0.0

    def valid(self) -> bool:
        """Every rate a finite float of at least 1 per second (the probe's smallest call
        does thousands of values: below that, no measurement, and predicted times would
        overflow); the optional ones may be 0, not measured."""
        def rate(v, optional=False):
            return isinstance(v, float) and math.isfinite(v) and (v >= 1 or optional and v == 0)
        return all(rate(v) for v in (self.float32, self.bfloat16, self.normalize, self.gather,
                                     self.select_exact, self.select_fast)) \
            and all(rate(v, optional=True) for v in (self.bfloat16_one_block, self.normalize_raw))

    def normalize_rate(self, log_softmax: bool) -> float:
        """Feature values per second for a kernel with or without log-softmax."""
        return self.normalize if log_softmax or self.normalize_raw <= 0 else self.normalize_raw


@dataclass(frozen=True)
class PrecisionChoice:
    """How a `precision` was resolved for one job.

    Scalars only: the choice, its reason and the probe's rates (no arrays).

    Attributes
    ----------
    requested : 'auto', 'exact' or 'fast', as asked.
    precision : 'exact' or 'fast', what runs.
    reason : one line, why.
    rates : the probe's figures; None where no probe was needed.
    from_cache : the rates came from the cache file (no probe ran).
    predicted_exact_s, predicted_fast_s : predicted seconds of each path for this job
        (without the statistics pass, which both share); None without rates.
    crowded_share : the share of queries the pilot found crowded (fast mode computes their
        whole rows in float32; see `choose_precision`'s `crowding`); None without a pilot.
    """

    requested: str
    precision: str
    reason: str
    rates: Rates | None = None
    from_cache: bool = False
    predicted_exact_s: float | None = None
    predicted_fast_s: float | None = None
    crowded_share: float | None = None

    def as_dict(self) -> dict:
        """A JSON-ready description (products in GFLOP/s, the others in M values/s)."""
        out = {"requested": self.requested, "chosen": self.precision, "reason": self.reason,
               "from_cache": self.from_cache,
               "predicted_exact_s": _round(self.predicted_exact_s),
               "predicted_fast_s": _round(self.predicted_fast_s),
               "crowded_share": _round(self.crowded_share), "rates": None}
        if self.rates is not None:
            r = self.rates
            out["rates"] = {"float32_gflops": _round(r.float32 / 1e9),
                            "bfloat16_gflops": _round(r.bfloat16 / 1e9),
                            "normalize_mvalues_s": _round(r.normalize / 1e6),
                            "normalize_raw_mvalues_s": _round(r.normalize_raw / 1e6 or None),
                            "gather_mvalues_s": _round(r.gather / 1e6),
                            "select_exact_mpairs_s": _round(r.select_exact / 1e6),
                            "select_fast_mpairs_s": _round(r.select_fast / 1e6),
                            "bfloat16_one_block_gflops": _round(r.bfloat16_one_block / 1e9
                                                                or None),
                            "probe_s": _round(r.probe_s)}
        return out

    def describe(self) -> str:
        """One line for `-v` and for warnings."""
        text = f"precision {self.requested} -> {self.precision}: {self.reason}"
        if self.rates is not None:
            text += f"; {describe_rates(self.rates)}"
        if self.predicted_exact_s is not None:
            text += (f"; predicted exact {self.predicted_exact_s:.3g} s, fast "
                     f"{self.predicted_fast_s:.3g} s")
        if self.rates is not None:
            text += " (cached probe)" if self.from_cache else f" (probed in {self.rates.probe_s:.2g} s)"
        return text


def describe_rates(r: Rates) -> str:
    return (f"float32 {r.float32 / 1e9:.3g} GFLOP/s, bfloat16 {r.bfloat16 / 1e9:.3g} GFLOP/s "
            f"({_measured(r.bfloat16_one_block / 1e9)} in one block), "
            f"normalise {r.normalize / 1e6:.3g} M values/s ({_measured(r.normalize_raw / 1e6)} "
            "without log-softmax), re-score gather "
            f"{r.gather / 1e6:.3g} M values/s, selection {r.select_exact / 1e6:.3g} (exact) "
            f"and {r.select_fast / 1e6:.3g} (fast) M pairs/s")


def _measured(x: float) -> str:
    return f"{x:.3g}" if x > 0 else "not measured"


def _round(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.4g}")


# ---- the decision ---------------------------------------------------------------------

def choose_precision(
    precision: str,
    *,
    n_queries: int,
    n_references: int,
    n_models: int,
    n_classes: int,
    k: int,
    n_candidates: int | None = None,
    memory_budget: int | None = None,
    device: torch.device | str = "cpu",
    raw_bytes: int = 2,
    crowding: Callable[[Plan], float] | None = None,
    log_softmax: bool = True,
) -> PrecisionChoice:
    """Resolve `precision` ('auto', 'exact' or 'fast') for one job.

    'exact' is returned as is, without a probe. 'auto' picks 'fast' only when the probe's
    rates predict it faster than 'exact' by the `SAFETY` margin, counting its re-score and
    `FALLBACK_SHARE` of the queries computed whole in float32; a job too small to pay for a probe
    (`SMALL_JOB_FLOP`) runs exact. 'fast' is kept as asked, with a `RuntimeWarning` (one
    line, with the rates) when the probe predicts it slower; a small job is not probed.

    Parameters
    ----------
    n_queries, n_references, n_models, n_classes : the job's shape (n_classes: the classes
        the kernel uses).
    k : neighbours per query; n_candidates : fast mode's list (default as the engine's).
    memory_budget : bytes, as the engine gets it (the plan decides tiles and caching).
    raw_bytes : item size of the logits read (2 for float16 stores).
    log_softmax : whether the kernel normalises log-softmax outputs (else raw logits,
        normalised several times faster: the probe's `normalize_raw`).
    crowding : for 'auto', a pilot on the data (`_pilot.crowded_share`): called with
        fast mode's plan for this job, it returns the share of queries whose
        candidates lie so close together that fast mode would compute their whole rows in
        float32. Called only when the products alone predict fast mode faster; that share
        (at least `FALLBACK_SHARE`) then replaces the assumed one. Without it, auto
        assumes `FALLBACK_SHARE`, which data with tightly packed kernel values defeats.

    Returns
    -------
    PrecisionChoice
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision must be 'auto', 'exact' or 'fast', got {precision!r}")
    if precision == "exact":
        return PrecisionChoice("exact", "exact", "asked for")
    flop = 2.0 * n_queries * n_references * n_models * n_classes
    if flop < SMALL_JOB_FLOP:  # (a forced 'fast' runs unprobed and unwarned)
        return PrecisionChoice(precision, "exact" if precision == "auto" else "fast",
                               f"small job ({flop:.2g} FLOP < {SMALL_JOB_FLOP:.0e}): "
                               "not worth a probe" if precision == "auto" else "asked for")
    device = resolve_device(device)
    rates, from_cache = probe(device)
    budget = default_memory_budget(device) if memory_budget is None else int(memory_budget)
    shape = dict(n_queries=n_queries, n_references=n_references, n_models=n_models,
                 n_classes=n_classes, k=k, n_candidates=n_candidates, memory_budget=budget,
                 raw_bytes=raw_bytes, device=device)
    exact_s, fast_s = predict_times(rates, **shape, log_softmax=log_softmax)
    pays = fast_s * SAFETY < exact_s
    share = None
    if precision == "auto" and pays and crowding is not None:
        share = float(crowding(fast_plan(**shape)))
        exact_s, fast_s = predict_times(rates, **shape, whole_share=max(share, FALLBACK_SHARE),
                                        log_softmax=log_softmax)
        pays = fast_s * SAFETY < exact_s
    if precision == "fast":
        choice = PrecisionChoice("fast", "fast", "asked for", rates, from_cache, exact_s, fast_s,
                                 share)
        if not pays and math.isfinite(fast_s):  # (a fast plan over budget: the engine says so)
            warnings.warn(
                f"--precision fast is predicted slower than exact on this machine (fast "
                f"{fast_s:.3g} s, exact {exact_s:.3g} s; {describe_rates(rates)}): "
                "leave --precision at auto, or pass exact", RuntimeWarning, stacklevel=2)
    else:
        if math.isinf(fast_s):
            reason = "fast mode does not fit the memory budget"
        elif pays:
            reason = f"fast predicted {exact_s / fast_s:.2f}x faster (needs {SAFETY}x)"
        else:
            reason = f"fast not predicted {SAFETY}x faster ({exact_s / max(fast_s, 1e-300):.2f}x)"
        if share is not None:
            reason += (f"; a pilot found {100 * share:.0f}% of the test examples' candidates "
                       "crowded (computed whole in float32)")
        choice = PrecisionChoice("auto", "fast" if pays else "exact", reason, rates,
                                 from_cache, exact_s, fast_s, share)
    logger.info("%s", choice.describe())
    return choice


def predict_times(rates: Rates, *, n_queries: int, n_references: int, n_models: int,
                  n_classes: int, k: int, n_candidates: int | None = None,
                  memory_budget: int, raw_bytes: int = 2,
                  whole_share: float = FALLBACK_SHARE,
                  log_softmax: bool = True,
                  device: torch.device | str = "cpu") -> tuple[float, float]:
    """Predicted seconds of exact and fast mode for a job (the statistics pass, which both
    share, left out).

    A path whose plan does not fit `memory_budget` is predicted to take forever (math.inf),
    and the other 0.

    exact: the float32 products, and the features normalised for them (each reference
    once; the queries once, or once per tile when the plan cannot cache them), and every
    (query, reference) pair through its top-k selection.
    fast: the same with bfloat16 products; then the re-score (every feature normalised
    again in float32 unless the plan keeps them from the candidate pass, and n_queries x
    n_candidates feature rows gathered and multiplied),
    with `whole_share` of the queries' whole rows in float32: in the same pass (their
    products only) as far as the plan's room for them goes, the rest in a second exact
    pass (their products, and every reference normalised again). Features are made at the
    probe's `normalize` rate, or `normalize_raw` for a kernel without log-softmax.
    """
    d = n_models * n_classes  # feature length
    normalize = rates.normalize_rate(log_softmax)
    n_c = min(n_references, n_candidates or max(2 * k, k + 128))
    plans = {}
    for p in ("exact", "fast"):
        # None: this path cannot run in the budget (the engine says so)
        plans[p] = plan_if_fits(n_queries, n_references, n_models, n_classes,
                                k_keep=k if p == "exact" else n_c, budget=memory_budget,
                                precision=p, raw_bytes=raw_bytes, device=device)
    if plans["exact"] is None or plans["fast"] is None:
        return (math.inf if plans["exact"] is None else 0.0,
                math.inf if plans["fast"] is None else 0.0)

    def kernel_pass(p: str, rate: float, queries: float) -> float:
        plan = plans[p]
        query_passes = 1 if (plan.cache_queries or plan.n_tiles == 1) else plan.n_tiles
        values = (n_references + queries * query_passes) * d
        return 2.0 * queries * n_references * d / rate + values / normalize

    pairs = float(n_queries) * n_references
    exact = kernel_pass("exact", rates.float32, n_queries) + pairs / rates.select_exact
    normalised_again = 0 if plans["fast"].keep_features else (n_queries + n_references) * d
    rescore = normalised_again / normalize + float(n_queries) * n_c * d / rates.gather
    whole = whole_share * n_queries
    inline = min(whole, plans["fast"].rescore_rows_bytes // (8 * n_references))
    whole_rows = 2.0 * inline * n_references * d / rates.float32
    if whole > inline:
        whole_rows += kernel_pass("exact", rates.float32, whole - inline)
    one_block = plans["fast"].chunk_models >= n_models and rates.bfloat16_one_block > 0
    fast_rate = rates.bfloat16_one_block if one_block else rates.bfloat16
    fast = (kernel_pass("fast", fast_rate, n_queries) + pairs / rates.select_fast
            + rescore + whole_rows)
    return exact, fast


def fast_plan(*, n_queries: int, n_references: int, n_models: int, n_classes: int, k: int,
              n_candidates: int | None = None, memory_budget: int, raw_bytes: int = 2,
              device: torch.device | str = "cpu", **_) -> Plan:
    """Fast mode's plan for this job (its blocks decide the error bound it will use,
    `engine.guessed_bound`)."""
    n_c = min(n_references, n_candidates or max(2 * k, k + 128))
    return plan_memory(n_queries, n_references, n_models, n_classes, k_keep=n_c,
                       budget=memory_budget, precision="fast", raw_bytes=raw_bytes,
                       device=device)


# ---- the probe and its cache ----------------------------------------------------------

def probe(device: torch.device) -> tuple[Rates, bool]:
    """This machine's rates on `device`: from the cache, or measured and cached.

    Returns
    -------
    (Rates, from_cache)
    """
    key = machine_key(device)
    path = cache_dir() / f"probe-{_digest(key)}.json"
    cached = _read_cache(path, key)
    if cached is not None:
        return cached, True
    rates = measure_rates(device)
    entry = {"key": key, "rates": dataclasses.asdict(rates),
             "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        atomic_write_text(path, json.dumps(entry, indent=2))
    except OSError as e:  # a read-only home: probe again next time, say why once
        logger.warning("could not cache the precision probe in %s: %s", path, e)
    return rates, False


def cache_dir() -> Path:
    """Where probe results are kept: $ENSEMBLE_KERNEL_CACHE_DIR, else
    $XDG_CACHE_HOME/ensemble-kernel, else ~/.cache/ensemble-kernel."""
    if os.environ.get("ENSEMBLE_KERNEL_CACHE_DIR"):
        return Path(os.environ["ENSEMBLE_KERNEL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ensemble-kernel"


def machine_key(device: torch.device | str = "cpu") -> dict:
    """What the rates depend on: the processor, torch, threads, device, ISA overrides."""
    device = torch.device(device)
    key = {"probe_version": PROBE_VERSION, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        key["gpu"] = f"{props.name} (sm_{props.major}{props.minor})"
    else:
        model, flags = _cpu_description()
        key["cpu"] = model
        key["isa"] = sorted(f for f in _ISA_FLAGS if f in flags)
        key["aten_capability"] = torch.backends.cpu.get_cpu_capability()
        key["env"] = {v: os.environ[v] for v in _ISA_ENV if v in os.environ}
    return key


def _cpu_description() -> tuple[str, set[str]]:
    """The CPU model name and its flags (Linux /proc/cpuinfo; elsewhere the platform's name)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    return model, set((fields.get("flags") or fields.get("Features") or "").split())


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _number(value) -> float:
    """A rate as the cache holds it: a JSON number (not a string, a boolean or null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"a rate must be a number, got {value!r}")
    return float(value)


def _read_cache(path: Path, key: dict) -> Rates | None:
    """The cached rates for `key`, or None when the file is missing, unreadable, corrupt,
    or for another key (it is then measured again and rewritten)."""
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        if entry["key"] != key:
            return None
        rates = Rates(**{f.name: _number(entry["rates"][f.name])
                         for f in dataclasses.fields(Rates)})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError,
            RecursionError) as e:  # (an integer past float's range; JSON nested too deep)
        logger.info("ignoring the precision probe cache %s: %s", path, e)
        return None
    return rates if rates.valid() else None


# ---- measuring ------------------------------------------------------------------------

# The probe's shapes: a block of runs 2048 features wide (fast mode's narrowest block,
# inside exact mode's 512..4096) against a tile of 2048 references; query rows grow until
# one call takes a tenth of the time allowed. At most ~150 MB are held.
_WIDTH, _TILE = 2048, 2048
_ROWS = (4, 32, 256, 1024, 4096)
_CANDIDATES = 131  # k = 3 with k + 128 candidates
_GATHER_REFERENCES = 8192
_SELECT_TILE = 16384  # references per tile of the selection step
_CLASSES = 10


def measure_rates(device: torch.device | str = "cpu", seconds: float = PROBE_SECONDS) -> Rates:
    """Measure the eight rates on `device` within about `seconds` (hard cap: each rate
    stops growing its shapes once the next size would not fit its share)."""
    device = torch.device(device)
    started = time.perf_counter()
    share = seconds / 5
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    def product(dtype, one_block=False):
        """float32 `addmm`; bfloat16 added into a float32 sum (a block of several); or,
        `one_block`, the bfloat16 product kept as it is (fast mode's single block)."""
        def make(rows):
            a, b = randn(rows, _WIDTH, dtype=dtype), randn(_TILE, _WIDTH, dtype=dtype)
            out = torch.empty(rows, _TILE, dtype=dtype, device=device) if one_block else \
                torch.zeros(rows, _TILE, device=device)
            if one_block:
                def run():
                    torch.mm(a, b.T, out=out)
            elif dtype == torch.float32:
                def run():
                    out.addmm_(a, b.T)
            else:
                def run():
                    out.add_(a @ b.T)
            return run, 2.0 * rows * _TILE * _WIDTH
        return make

    with exact_float32_matmul(device), bfloat16_matmul(device):
        # Interleaved, so that a burst of load on a shared machine slows both alike.
        float32, bfloat16, bfloat16_one_block = _rates(
            [product(torch.float32), product(torch.bfloat16),
             product(torch.bfloat16, one_block=True)], _ROWS, 2 * share,
            device)
        normalize, normalize_raw = _rates(
            [_normalize_step(randn, device, True), _normalize_step(randn, device, False)],
            (256, 1024, 4096), share, device)
        gather, = _rates([_gather_step(randn, gen, device)], (1, 4, 16, 64, 128), share, device)
        select_exact, select_fast = _rates(
            [_select_step(randn, torch.float32, 21), _select_step(randn, torch.bfloat16, 148)],
            (16, 64, 256, 1024), share, device)
    return Rates(float32, bfloat16, normalize, gather, select_exact, select_fast,
                 time.perf_counter() - started, bfloat16_one_block, normalize_raw)


def _normalize_step(randn, device, log_softmax: bool):
    runs = _WIDTH // _CLASSES

    def make(rows):
        raw = (randn(runs, rows, _CLASSES) * 3).to(torch.float16)
        stats = ClassStats.from_float64(
            torch.zeros(rows, _CLASSES, dtype=torch.float64, device=device) - 2.3,
            torch.ones(rows, _CLASSES, dtype=torch.float64, device=device), None)

        def run():
            x = prepare(raw, log_softmax=log_softmax, classes=None, device=device)
            normalized_features(x, stats)
        return run, float(runs * rows * _CLASSES)
    return make


def _select_step(randn, dtype, keep: int):
    """A tile's top-`keep` selection, as the engine's (a low-precision block widened first)."""
    def make(rows):
        block = randn(rows, _SELECT_TILE, dtype=dtype)

        def run():
            (block if dtype == torch.float32 else block.float()).topk(keep, dim=1)
        return run, float(rows * _SELECT_TILE)
    return make


def _gather_step(randn, gen, device):
    features = randn(_GATHER_REFERENCES, _WIDTH)

    def make(rows):
        queries = randn(rows, _WIDTH)
        candidates = torch.randint(0, _GATHER_REFERENCES, (rows, _CANDIDATES),
                                   generator=gen).to(device).sort(dim=1).values
        crow = torch.arange(0, rows * _CANDIDATES + 1, _CANDIDATES, device=device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            pattern = torch.sparse_csr_tensor(crow, candidates.reshape(-1),
                                              torch.zeros(rows * _CANDIDATES, device=device),
                                              (rows, _GATHER_REFERENCES),
                                              check_invariants=False)  # sorted, in range

        def run():  # as `_Engine.rescore`: one float32 dot product per (query, candidate)
            torch.sparse.sampled_addmm(pattern, queries, features.T)
        return run, float(rows * _CANDIDATES * _WIDTH)
    return make


def _rates(makes: list[Callable], sizes: tuple[int, ...], seconds: float,
           device: torch.device) -> list[float]:
    """Work per second of each `make(size)`'s call, at the largest size that fits `seconds`.

    Sizes are tried smallest first. At each size every call gets one warm-up (kernel
    selection, first touch of the buffers), then up to three rounds in which the calls are
    timed in turn (the best time of each counts). From a size's times the next size is
    chosen: the largest whose warm-ups and one round (work assumed proportional to the
    size) are predicted to fit the time left, so the probe reaches the engine's shapes
    quickly on a fast machine. A very slow product (bfloat16 emulated on an AVX2-only CPU)
    costs at most its smallest calls beyond `seconds`.
    """
    def timed(run) -> float:
        t = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    end = time.perf_counter() + seconds
    i = 0
    while True:
        built = [make(sizes[i]) for make in makes]
        best = [timed(run) for run, _ in built]  # warm-ups, counted only if nothing better
        for _ in range(3):
            if time.perf_counter() + sum(best) > end:
                break
            best = [min(b, timed(run)) for b, (run, _) in zip(best, built)]
        rates = [work / max(b, 1e-9) for b, (_, work) in zip(best, built)]
        del built
        left = end - time.perf_counter()
        fits = [j for j in range(i + 1, len(sizes)) if 2 * sum(best) * sizes[j] / sizes[i] <= left]
        if not fits:
            return [float(r) for r in rates]
        i = fits[-1]
