"""What each product precision buys on this machine, at the engine's shapes.

    python benchmarks/matmul_peaks.py                  # about 5 x 3 s
    python benchmarks/matmul_peaks.py --seconds 1      # quicker, noisier
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python benchmarks/matmul_peaks.py              # as on an AVX2-only CPU

(10,000 x d) @ (d x 10,000) with d = 770 (a block of 77 runs x 10 classes), as the engine
runs them: float32 with 'highest' and 'medium' precision, bfloat16 alone and with its
bfloat16 output added into a float32 accumulator, and int8 (torch._int_mm, int32 out).
Each row is cut into blocks of rows and capped at --seconds (plus one block): an
emulated precision stops early and reports the rate of what it did. Rows are printed as
they are measured, then every rate as a ratio of float32 'highest'.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe, header, probe_products  # noqa: E402


def ratios(rates) -> list[str]:
    base = rates[0].gflops
    return [f"  {r.name:<42} {r.gflops / base:6.2f}x float32 'highest'" for r in rates[1:]
            if math.isfinite(r.gflops)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0, help="time cap per row (s)")
    p.add_argument("--n", type=int, default=10_000, help="rows and columns of the product")
    p.add_argument("--width", type=int, default=770, help="the contracted dimension")
    args = p.parse_args()
    if args.seconds <= 0 or args.n < 1 or args.width < 1:
        p.error("--seconds, --n and --width must be positive")
    print(header(describe()), flush=True)
    print(f"shape ({args.n} x {args.width}) @ ({args.width} x {args.n}), "
          f"at most {args.seconds:g} s per row:", flush=True)
    rates = probe_products(args.n, args.n, args.width, seconds=args.seconds,
                           report=lambda r: print(r.line(), flush=True))
    print("ratios:")
    print("\n".join(ratios(rates)))


if __name__ == "__main__":
    main()
