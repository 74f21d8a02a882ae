"""What each product precision buys on this machine, at the engine's shapes.

    python benchmarks/matmul_peaks.py

(10,000 x d) @ (d x 10,000) with d = 770 (a block of ~77 runs x 10 classes), as the
engine runs them: float32 with 'highest' and 'medium' precision, bfloat16 with its
bfloat16 output added into a float32 accumulator, and int8 (torch._int_mm, int32 out).
"""

import time

import torch


def rate(fn, flop, reps=3):
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return flop / ((time.perf_counter() - t0) / reps) / 1e9


def main():
    n, d = 10_000, 770
    flop = 2 * n * n * d
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    acc = torch.zeros(n, n)
    rows = []
    previous = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "medium"):
            torch.set_float32_matmul_precision(precision)
            rows.append((f"float32 addmm ({precision})", rate(lambda: acc.addmm_(a, b.T), flop)))
    finally:
        torch.set_float32_matmul_precision(previous)
    ab, bb = a.bfloat16(), b.bfloat16()
    rows.append(("bfloat16 product only (B^T strided)", rate(lambda: ab @ bb.T, flop)))
    rows.append(("bfloat16 product + add into float32",
                 rate(lambda: acc.add_(ab @ bb.T.contiguous()), flop)))
    ai = torch.randint(-127, 128, (n, d), dtype=torch.int8, generator=g)
    bi = torch.randint(-127, 128, (d, n), dtype=torch.int8, generator=g)
    try:
        rows.append(("int8 torch._int_mm (int32 out)", rate(lambda: torch._int_mm(ai, bi), flop)))
    except RuntimeError as e:
        rows.append((f"int8 torch._int_mm unavailable: {e}", float("nan")))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, shape "
          f"({n} x {d}) @ ({d} x {n})")
    for name, gflops in rows:
        print(f"  {name:<40} {gflops:7.0f} GFLOP/s")


if __name__ == "__main__":
    main()
