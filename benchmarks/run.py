"""Benchmark: the model card's computation against our engine, each in its own process.

    python benchmarks/run.py                 # CIFAR shape: 10,000 x 50,000, 10 classes, 500 runs
    python benchmarks/run.py --runs 100 --n-train 5000 --n-test 1000   # smaller
    python benchmarks/run.py --device cuda --cases reference,exact,fast,auto --budget 16GiB

Cases (each a fresh `python` process, so peak RSS is its own):
  reference  the card's code moved to the CPU: normalise everything in float32, one
             product per class into the full kernel, topk, mode.
  exact      our engine, float32 products, under --memory-budget.
  fast       our engine, bfloat16 products + exact float32 re-score.
  peak       the machine's product rate per precision at the engine's shapes, each row
             capped at --probe-seconds (the denominators of the rate ratios).
Any other precision the engine accepts may be named in --cases (e.g. auto where it exists).

With --device cuda the reference is the card's code as the card runs it, on the GPU (its
inputs moved there before the clock starts), the engine's products run there under a
--budget of GPU memory, and the probe times the products there; each case also reports
its peak GPU memory (torch.cuda.max_memory_allocated).

Every case runs under --case-timeout: one that does not finish (fast mode where bfloat16
is emulated, on an AVX2-only CPU) is stopped and reported as such, and the others go on.
The machine's description (CPU, ISA flags, torch threads) is printed first, each probe row
and each case as soon as it is measured, then every ratio.

Writes benchmarks/results.md and benchmarks/results.json (or --out-dir), and prints the table.
Logits are generated (float16, class-structured, seeded) under benchmarks/_data/, which
git ignores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from machine import describe, header, probe_products, rates_json  # noqa: E402
from synthetic import class_signal, noisy_runs  # noqa: E402


# ---- data ---------------------------------------------------------------------------

def generate(data_dir: Path, n_models: int, n_train: int, n_test: int, n_classes: int,
             seed: int = 0) -> dict:
    """Float16 logits with class structure (benchmarks/synthetic.py), memory-mapped .npy."""
    data_dir.mkdir(parents=True, exist_ok=True)
    tag = f"m{n_models}_tr{n_train}_te{n_test}_c{n_classes}_s{seed}"
    paths = {s: data_dir / f"{tag}_{s}.npy" for s in ("train", "test")}
    labels_path = data_dir / f"{tag}_labels.npz"
    if all(p.exists() for p in paths.values()) and labels_path.exists():
        return {"train": str(paths["train"]), "test": str(paths["test"]), "labels": str(labels_path)}
    rng = np.random.default_rng(seed)
    labels = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y, signal = class_signal(rng, n, n_classes)
        out = np.lib.format.open_memmap(paths[split].with_suffix(".tmp.npy"), mode="w+",
                                        dtype=np.float16, shape=(n_models, n, n_classes))
        noisy_runs(rng, signal, n_models, out=out)
        out.flush()
        del out
        os.replace(paths[split].with_suffix(".tmp.npy"), paths[split])
        labels[split] = y
    np.savez(labels_path, labels_train=labels["train"], labels_test=labels["test"])
    return {"train": str(paths["train"]), "test": str(paths["test"]), "labels": str(labels_path)}


# ---- cases (run in child processes) --------------------------------------------------

def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _peak_gpu_bytes(device: str) -> int | None:
    import torch

    return torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None


def case_reference(data: dict, k: int, device: str = "cpu") -> dict:
    """The model card's computation as it is written there, on `device`."""
    import torch

    t0 = time.perf_counter()
    logits_train = torch.from_numpy(np.load(data["train"])).to(device)  # the card loads everything
    logits_test = torch.from_numpy(np.load(data["test"])).to(device)
    _sync(device)
    t_load = time.perf_counter() - t0

    def normalize(logits):
        logits = logits.float()
        logits = logits.log_softmax(-1)
        return (logits - logits.mean(0, keepdim=True)) / logits.std(0, keepdim=True)

    t0 = time.perf_counter()
    a, b = normalize(logits_test), normalize(logits_train)
    n_classes = a.shape[2]
    kernel = torch.zeros(a.shape[1], b.shape[1], device=device)
    for c in range(n_classes):
        kernel += (a[..., c].T @ b[..., c]) / len(a) / n_classes
    labels_train = torch.from_numpy(np.load(data["labels"])["labels_train"])
    indices = kernel.topk(k, dim=1).indices.cpu()
    prediction = labels_train[indices].mode(1).values
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "load_s": t_load, "peak_rss": _peak_rss_bytes(),
            "peak_gpu": _peak_gpu_bytes(device),
            "prediction": prediction.tolist(), "indices_head": indices[:200].tolist()}


class FastModeCounts(logging.Handler):
    """Collects, from fast mode's log line ("fast mode: %d pairs re-scored, %d queries
    computed whole in the same pass; %d of %d queries recomputed exactly"), the test
    examples it computed whole in the re-score and those it recomputed exactly."""

    def __init__(self):
        super().__init__()
        self.found: list[tuple[int, int]] = []
        self.choice: str | None = None  # auto's choice, as the precision module logs it

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("fast mode:"):
            self.found.append((int(record.args[1]), int(record.args[2])))
        elif record.getMessage().startswith("precision "):
            self.choice = record.getMessage()


def case_engine(data: dict, k: int, precision: str, budget: int, device: str = "cpu") -> dict:
    import torch

    from ensemble_kernel.core._engine import _top_k_neighbors
    from ensemble_kernel.core._engine import plan_memory

    # Memory-mapped: the engine reads blocks of runs, the pages come and go.
    train = torch.from_numpy(np.load(data["train"], mmap_mode="r"))
    test = torch.from_numpy(np.load(data["test"], mmap_mode="r"))
    labels_train = torch.from_numpy(np.load(data["labels"])["labels_train"])

    if device != "cpu":  # the CUDA context is made before the clock starts, as for the card
        torch.zeros(1, device=device)
        _sync(device)
    counts = FastModeCounts()
    engine_log = logging.getLogger("ensemble_kernel.core._engine")
    engine_log.setLevel(logging.INFO)
    engine_log.addHandler(counts)
    choice_log = logging.getLogger("ensemble_kernel.core._precision")
    choice_log.setLevel(logging.INFO)
    choice_log.addHandler(counts)
    stages: dict[str, list[float]] = {}  # stage -> [first report, last report], seconds

    def progress(p):
        now = time.perf_counter() - t0
        stages.setdefault(p.stage, [now, now])[1] = now

    t0 = time.perf_counter()
    found = _top_k_neighbors(test, train, k, precision=precision, memory_budget=budget,
                             device=device, progress=progress)
    indices = found.indices.cpu()
    prediction = labels_train[indices].mode(1).values
    wall = time.perf_counter() - t0
    try:
        plan = plan_memory(test.shape[1], train.shape[1], train.shape[0], train.shape[2],
                           k_keep=k, budget=budget, precision=precision)
        plan = {"n_tiles": plan.n_tiles, "tile_size": plan.tile_size,
                "chunk_models": plan.chunk_models}
    except (TypeError, ValueError, KeyError):  # a precision the planner does not take (auto)
        plan = None
    return {"wall_s": wall, "peak_rss": _peak_rss_bytes(), "peak_gpu": _peak_gpu_bytes(device),
            "prediction": prediction.tolist(),
            "recomputed": counts.found[0] if counts.found else None,
            "indices_head": indices[:200].tolist(),
            "choice": counts.choice,
            "stages": {name: [round(a, 3), round(b, 3)] for name, (a, b) in stages.items()},
            "plan": plan}


def case_peak(n_queries: int, n_references: int, seconds: float, device: str = "cpu") -> dict:
    """Product rates per precision at the engine's shapes, each row printed as measured."""
    rates = probe_products(min(n_queries, 10_000), min(n_references, 10_000), 770,
                           seconds=seconds, device=device,
                           report=lambda r: print(r.line(), flush=True))
    return {"float32": rates[0].gflops, "float32_medium": rates[1].gflops,
            "bfloat16_alone": rates[2].gflops, "bfloat16": rates[3].gflops,
            "int8": rates[4].gflops, "rows": rates_json(rates)}


def child_main(args) -> None:
    data = json.loads(args.child_data)
    if args.child == "reference":
        result = case_reference(data, args.k, args.device)
    elif args.child == "peak":
        result = case_peak(data["n_test"], data["n_train"], args.probe_seconds, args.device)
    else:
        result = case_engine(data, args.k, args.child, args.budget, args.device)
    print("RESULT " + json.dumps(result))


def run_child(case: str, data: dict, args) -> dict:
    """Run one case in a fresh process, echoing its output live; stop it at --case-timeout."""
    cmd = [sys.executable, __file__, "--child", case, "--child-data", json.dumps(data),
           "--k", str(args.k), "--budget", str(args.budget),
           "--probe-seconds", str(args.probe_seconds), "--device", args.device]
    print(f"running {case} (at most {args.case_timeout:g} s) ...", flush=True)
    result = []
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)

        def pump():
            for line in proc.stdout:
                if line.startswith("RESULT "):
                    result.append(json.loads(line[len("RESULT "):]))
                else:
                    print(line, end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        t0 = time.perf_counter()
        try:
            proc.wait(timeout=args.case_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            reader.join()
            print(f"  {case}: stopped after {args.case_timeout:g} s", flush=True)
            return {"timed_out": True, "wall_s": time.perf_counter() - t0}
        reader.join()
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"case {case} failed:\n{err.read()[-3000:]}")
    return result[0]


# ---- driver ---------------------------------------------------------------------------

def _bytes(text: str) -> int:
    """--budget: bytes, or a size with a unit as --memory-budget takes it (2GB, 512MiB)."""
    from ensemble_kernel.cli.common import parse_size
    from ensemble_kernel.errors import InputError

    try:
        return parse_size(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e).replace("--memory-budget", "--budget")) from None


def add_shape_options(p: argparse.ArgumentParser, n_classes: bool = True) -> None:
    """--runs, --n-train, --n-test (and --n-classes) of the generated logits: CIFAR's shape
    with 500 runs by default (shared by the benchmarks that call `generate`)."""
    p.add_argument("--runs", type=int, default=500)
    p.add_argument("--n-train", type=int, default=50_000)
    p.add_argument("--n-test", type=int, default=10_000)
    if n_classes:
        p.add_argument("--n-classes", type=int, default=10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_options(p)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--budget", type=_bytes, default=1 << 30,
                   help="engine memory budget (host memory, or GPU memory with --device "
                        "cuda): bytes, or with a unit (1.5GiB, 16GB)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--cases", default="reference,exact,fast",
                   help="reference and engine precisions, comma-separated")
    p.add_argument("--case-timeout", type=float, default=900,
                   help="seconds after which a case is stopped and reported unfinished")
    p.add_argument("--probe-seconds", type=float, default=3.0,
                   help="time cap per product-rate row (s)")
    p.add_argument("--data-dir", type=Path, default=HERE / "_data")
    p.add_argument("--out-dir", type=Path, default=HERE)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_main(args)
    if min(args.runs - 1, args.n_train, args.n_test, args.n_classes - 1, args.k) < 1 \
            or args.case_timeout <= 0 or args.probe_seconds <= 0:
        p.error("--runs and --n-classes must be at least 2; --n-train, --n-test, --k, "
                "--case-timeout and --probe-seconds positive")
    cases = args.cases.split(",")
    from ensemble_kernel.core._precision import PRECISIONS

    unknown = [c for c in cases if c not in ("reference", *PRECISIONS)]
    if unknown:
        p.error(f"--cases {args.cases}: {', '.join(map(repr, unknown))} is not a case; "
                f"name reference or a precision ({', '.join(PRECISIONS)}), comma-separated")
    if args.device != "cpu":
        import torch

        try:
            device = torch.device(args.device)
            ok = device.type == "cuda" and torch.cuda.is_available() \
                and (device.index or 0) < torch.cuda.device_count()
        except RuntimeError:
            ok = False
        if not ok:
            p.error(f"--device {args.device}: takes cpu or cuda[:N], and cuda needs a CUDA "
                    f"device (this torch {torch.__version__} sees "
                    f"{torch.cuda.device_count()})")
    from ensemble_kernel.errors import BudgetError
    from ensemble_kernel.core._plan import plan_memory

    try:  # a budget the engine would refuse, refused before any data is written
        for precision in {"exact", "fast"} & set(cases):
            plan_memory(args.n_test, args.n_train, args.runs, args.n_classes, k_keep=args.k,
                        budget=args.budget, precision=precision)
    except BudgetError as e:
        p.error(str(e).replace("--memory-budget", "--budget"))

    machine = describe()
    print(header(machine), flush=True)
    print(f"generating logits: {args.runs} runs, {args.n_train} train, {args.n_test} test, "
          f"{args.n_classes} classes (float16)", flush=True)
    data = {**generate(args.data_dir, args.runs, args.n_train, args.n_test, args.n_classes),
            "n_train": args.n_train, "n_test": args.n_test}
    results = {"peak": run_child("peak", data, args)}
    flop = 2.0 * args.n_test * args.n_train * args.runs * args.n_classes
    rows = []
    print(TABLE_HEAD, flush=True)
    for case in cases:
        results[case] = run_child(case, data, args)
        if results[case].get("recomputed") is not None:
            whole, again = results[case]["recomputed"]
            print(f"  fast mode: of {args.n_test} test examples, its error bound left {whole} "
                  f"to compute whole in the re-score and {again} to recompute exactly",
                  flush=True)
        if results[case].get("choice"):
            print(f"  {results[case]['choice']}", flush=True)
        if results[case].get("stages"):
            print("  progress reports (first, last; s): " + ", ".join(
                f"{name} {a:.2f}-{b:.2f}" for name, (a, b) in results[case]["stages"].items()),
                flush=True)
        rows.append(make_row(case, results, flop))
        print(format_row(rows[-1], args.n_test), flush=True)
    report = render(args, machine, results, rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.md").write_text(report)
    slim = {k: {kk: vv for kk, vv in v.items() if kk not in ("prediction", "indices_head")}
            for k, v in results.items()}
    (args.out_dir / "results.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine,
         "rows": rows, "raw": slim}, indent=2))
    print(report)


def make_row(case: str, results: dict, flop: float) -> dict:
    """One case's figures, with its ratios to the product rates and to the reference."""
    r, peak, ref = results[case], results["peak"], results.get("reference")
    if r.get("timed_out"):
        return {"case": case, "timed_out": True, "wall_s": r["wall_s"]}
    rate = flop / r["wall_s"] / 1e9
    row = {"case": case, "wall_s": r["wall_s"], "peak_rss_gib": r["peak_rss"] / 2**30,
           "gflops": rate, "of_float32_rate": rate / peak["float32"],
           "of_bfloat16_rate": rate / peak["bfloat16"]}
    if "exact" in results and not results["exact"].get("timed_out") and case != "exact":
        row["wall_vs_exact"] = r["wall_s"] / results["exact"]["wall_s"]
    if ref and not ref.get("timed_out"):
        row["speedup"] = ref["wall_s"] / r["wall_s"]
        row["rss_ratio"] = r["peak_rss"] / ref["peak_rss"]
        row["same_3nn_predictions"] = sum(a == b for a, b in zip(r["prediction"], ref["prediction"]))
    return row


def format_row(r: dict, n: int) -> str:
    """A markdown table row; '-' where a ratio does not apply (the bfloat16 rate to the
    float32 cases, the exact wall time to exact itself)."""
    if r.get("timed_out"):
        return f"| {r['case']} | not finished in {r['wall_s']:.0f} s | | | | | | | | |"

    def cell(key, spec, scale=1.0, suffix=""):
        return f"{scale * r[key]:{spec}}{suffix}" if key in r else "-"

    low = r["case"] not in ("reference", "exact")
    return (f"| {r['case']} | {r['wall_s']:.1f} | {r['peak_rss_gib']:.2f} | "
            f"{cell('speedup', '.2f', suffix='x')} | {cell('rss_ratio', '.2f')} | "
            f"{cell('wall_vs_exact', '.2f')} | {r['gflops']:.0f} | "
            f"{cell('of_float32_rate', '.0f', 100, '%')} | "
            f"{cell('of_bfloat16_rate', '.0f', 100, '%') if low else '-'} | "
            f"{r.get('same_3nn_predictions', '-')}/{n} |")


TABLE_HEAD = ("| case | wall (s) | peak RSS (GiB) | speed-up vs reference | RSS vs reference "
              "| wall vs exact | GFLOP/s | of float32 rate | of bfloat16+add rate "
              "| same 3-NN predictions |\n"
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")


def render(args, machine: dict, results: dict, rows: list[dict]) -> str:
    peak = results["peak"]
    f32 = peak["float32"]
    lines = [
        "# Benchmark results",
        "",
        f"Command: `python benchmarks/run.py --runs {args.runs} --n-train {args.n_train} "
        f"--n-test {args.n_test} --k {args.k} --budget {args.budget} --cases {args.cases}"
        + (f" --device {args.device}`" if args.device != "cpu" else "`"),
        "",
        "```", header(machine), "```",
        "",
        "Product rates at the engine's shapes (GFLOP/s, median over blocks, capped at "
        f"{args.probe_seconds:g} s a row), and each as a ratio of float32 'highest':",
        "",
    ]
    lines += [f"- {r['name']}: {r['gflops']:.1f} ({r['low']:.1f} to {r['high']:.1f}), "
              f"{r['gflops'] / f32:.2f}x" for r in peak["rows"]]
    lines += [
        "",
        f"Engine memory budget: {args.budget / 2**30:.2f} GiB"
        f"{' of GPU memory' if args.device != 'cpu' else ''}; logits memory-mapped from .npy. "
        f"The job is {2.0 * args.n_test * args.n_train * args.runs * args.n_classes:.2e} FLOP; "
        "a case's rate is that over its wall time.",
        "",
        TABLE_HEAD,
    ]
    lines += [format_row(r, args.n_test) for r in rows]
    for case, r in results.items():
        if isinstance(r, dict) and r.get("peak_gpu") is not None:
            lines.append(f"\n{case}: peak GPU memory {r['peak_gpu'] / 2**30:.2f} GiB")
        if isinstance(r, dict) and r.get("plan"):
            lines.append(f"\n{case} plan: {r['plan']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
