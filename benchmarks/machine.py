"""The machine a benchmark runs on, and its product rates: one module every benchmark uses.

    python benchmarks/machine.py        # the description alone

`describe()` names the CPU, the ISA flags that decide which product precisions are fast
(AVX2, AVX-512, AVX512-BF16, AVX512-VNNI, AVX-VNNI, AMX), torch's version, thread count
and dispatch level, and the environment variables that lower it (to imitate an AVX2-only
CPU: `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`).

`probe_products()` times the products at the engine's shapes, each under a time cap: a
product is cut into blocks of rows, and a precision that is emulated (bfloat16 or int8
without the hardware, 10 to 100 times slower) stops after its time and reports the rate
of the blocks it did. No probe row takes much more than its cap plus one block.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni",
             "amx_tile", "amx_bf16", "amx_int8")
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
           "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """The CPU model and flag set from the text of /proc/cpuinfo (its first processor)."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def describe() -> dict:
    """Everything a reader needs to compare figures between machines (JSON-ready)."""
    import torch

    try:
        with open("/proc/cpuinfo") as f:
            model, flags = parse_cpuinfo(f.read())
    except OSError:
        model, flags = "", set()
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "isa": {flag: flag in flags for flag in ISA_FLAGS},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "env": {name: os.environ[name] for name in ISA_ENV if name in os.environ},
        "python": platform.python_version(),
        "gpu": _gpu(),
    }


def _gpu() -> dict | None:
    """The first CUDA device torch sees (name, compute capability, memory), or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count, "cuda": torch.version.cuda,
            "count": torch.cuda.device_count()}


def header(desc: dict) -> str:
    """Two or three lines: CPU, ISA flags, torch; plus any ISA-lowering variables set."""
    have = [f for f, on in desc["isa"].items() if on]
    lacks = [f for f, on in desc["isa"].items() if not on]
    lines = [f"CPU: {desc['cpu']}, {desc['cpus']} CPUs; torch {desc['torch']}, "
             f"{desc['threads']} threads, dispatch {desc['torch_cpu_capability']}",
             f"ISA flags: {' '.join(have) or '(none)'}; lacks: {' '.join(lacks) or '(none)'}"]
    if desc.get("gpu"):
        g = desc["gpu"]
        lines.append(f"GPU: {g['name']} (compute {g['capability']}, {g['memory_gib']} GiB, "
                     f"{g['multiprocessors']} SMs), CUDA {g['cuda']}, {g['count']} device(s)")
    if desc["env"]:
        lines.append("environment: " + " ".join(f"{k}={v}" for k, v in desc["env"].items()))
    return "\n".join(lines)


@dataclass(frozen=True)
class Rate:
    """One probe row: the rate of a product, from the blocks done within the time cap."""

    name: str  # what was multiplied
    gflops: float  # median over blocks of FLOP / s, in units of 1e9 (int8: operations)
    low: float  # slowest block's rate
    high: float  # fastest block's rate
    seconds: float  # time spent, warm-up excluded
    share: float  # how many whole products the blocks add up to (below 1: capped)

    def line(self) -> str:
        capped = f", capped: {100 * self.share:.0f}% of one product" if self.share < 1 else ""
        return (f"  {self.name:<42} {self.gflops:7.1f} GFLOP/s  ({self.low:.1f} to "
                f"{self.high:.1f} over blocks, {self.seconds:.1f} s{capped})")


def capped_rate(name: str, run: Callable[[int, int], object], n_rows: int,
                flop_per_row: float, *, seconds: float, max_products: float = 2,
                warm_rows: int = 32, clock: Callable[[], float] = time.perf_counter) -> Rate:
    """Call `run(r0, r1)` on blocks of rows until `seconds` have passed or `max_products` are done.

    `run(r0, r1)` computes rows r0:r1 of the product (`n_rows` rows make one). A first
    block of `warm_rows` rows, untimed, warms up and sizes the blocks: a block is meant to
    take about `seconds / 8`, so a slow (emulated) path stops within about an eighth of its
    cap after it, and reports the rate of the blocks it did.
    """
    warm = min(warm_rows, n_rows)
    t0 = clock()
    run(0, warm)
    t_warm = max(clock() - t0, 1e-9)
    rows = min(n_rows, max(warm, int(warm * seconds / 8 / t_warm)))
    rates, done, r0 = [], 0, 0
    start = clock()
    while done < max_products * n_rows:
        r1 = min(r0 + rows, n_rows)
        t0 = clock()
        run(r0, r1)
        rates.append(flop_per_row * (r1 - r0) / max(clock() - t0, 1e-12) / 1e9)
        done += r1 - r0
        r0 = 0 if r1 == n_rows else r1
        if clock() - start >= seconds:
            break
    return Rate(name, statistics.median(rates), min(rates), max(rates), clock() - start,
                done / n_rows)


def capped_float32_rate(n_queries: int, n_references: int, width: int, *,
                        seconds: float) -> Rate:
    """The float32 ('highest') `addmm` rate alone, as `probe_products` measures it."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n_queries, width, generator=g)
    b = torch.randn(n_references, width, generator=g)
    acc = torch.zeros(n_queries, n_references)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        return capped_rate("float32 addmm (highest)",
                           lambda r0, r1: acc[r0:r1].addmm_(a[r0:r1], b.T), n_queries,
                           2.0 * n_references * width, seconds=seconds)
    finally:
        torch.set_float32_matmul_precision(previous)


def probe_products(n_queries: int = 10_000, n_references: int = 10_000, width: int = 770,
                   *, seconds: float = 3.0, device: str = "cpu",
                   report: Callable[[Rate], object] = lambda rate: None) -> list[Rate]:
    """Rates of the engine's products, (n_queries x width) @ (width x n_references).

    float32 `addmm` under 'highest' and 'medium' (on AMX CPUs 'medium' may compute in
    bfloat16), bfloat16 alone and with its add into a float32 accumulator, and int8
    `torch._int_mm`. Each is capped at `seconds` (see `capped_rate`); `report` is called
    with each row as soon as it is measured. On a CUDA `device` every block is synchronised
    before its clock is read.
    """
    import torch

    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n_queries, width, generator=g).to(device)
    b = torch.randn(n_references, width, generator=g).to(device)
    acc = torch.zeros(n_queries, n_references, device=device)
    flop = 2.0 * n_references * width  # per row of the product
    out = []

    def measure(name, run):
        if device.type == "cuda":
            def run(r0, r1, inner=run):
                inner(r0, r1)
                torch.cuda.synchronize(device)
        try:  # (a GPU does one product in milliseconds: more of them, for a steady median)
            rate = capped_rate(name, run, n_queries, flop, seconds=seconds,
                               max_products=2 if device.type == "cpu" else 50)
        except RuntimeError as e:  # e.g. _int_mm unsupported at this shape or build
            rate = Rate(f"{name} (unavailable: {str(e).splitlines()[0][:60]})",
                        float("nan"), float("nan"), float("nan"), 0.0, 0.0)
        out.append(rate)
        report(rate)

    previous = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "medium"):
            torch.set_float32_matmul_precision(precision)
            measure(f"float32 addmm ({precision})",
                    lambda r0, r1: acc[r0:r1].addmm_(a[r0:r1], b.T))
    finally:
        torch.set_float32_matmul_precision(previous)
    ab, bbt = a.bfloat16(), b.bfloat16().T.contiguous()
    measure("bfloat16 product only", lambda r0, r1: ab[r0:r1] @ bbt)  # noqa: F821
    measure("bfloat16 product + add into float32",
            lambda r0, r1: acc[r0:r1].add_(ab[r0:r1] @ bbt))  # noqa: F821
    del ab, bbt
    ai = torch.randint(-127, 128, (n_queries, width), dtype=torch.int8, generator=g).to(device)
    bi = torch.randint(-127, 128, (width, n_references), dtype=torch.int8, generator=g).to(device)
    measure("int8 torch._int_mm (int32 out)", lambda r0, r1: torch._int_mm(ai[r0:r1], bi))
    return out


def rates_json(rates: list[Rate]) -> list[dict]:
    return [asdict(r) for r in rates]


if __name__ == "__main__":
    print(header(describe()))
