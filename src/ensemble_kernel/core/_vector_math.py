"""A guard against a race in oneMKL's vector math: its first call, made concurrently.

torch routes float unary functions on contiguous CPU tensors (exp, log, log1p, sqrt, ...)
to oneMKL's vector math (VML), each intra-op thread calling it on its chunk. oneMKL picks
each function's kernel lazily, at its first call; when that call runs on several threads
at once, one thread can run a low-accuracy kernel for its whole chunk of that one call
(pytorch/pytorch#188792; oneMKL 2024.2, the version torch 2.13's wheels bundle). Later
calls are accurate, but a fresh process's first sizeable `exp` can be wrong: in 9 of 40
processes on a 2-core machine here, with relative errors up to 1.5e-4 instead of 6e-8
(`python benchmarks/micro.py vmlrace`). The engine's first `exp` is the log-softmax of
the statistics pass, so such a command computed every kernel value beyond the contract's
tolerance against its float64 twin.

`resolve_dispatch` calls each function once, on one element (one thread), so that oneMKL
has chosen every kernel before any concurrent call. `ensemble_kernel` runs it at import
(about 5 ms; 0 of 40 processes inaccurate after it, same command).
"""

from __future__ import annotations

import torch

# The float unary functions torch may hand to VML (a superset: calling one that does not
# go there costs nothing). Here one warm call resolved the race for every function, but
# pytorch#188792 describes the choice as per function and precision, so each gets its own.
_FUNCTIONS = ("exp", "expm1", "log", "log1p", "log2", "log10", "sqrt", "rsqrt", "tanh",
              "sigmoid", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "erf",
              "erfc", "erfinv", "lgamma", "ceil", "floor", "round", "trunc")


def resolve_dispatch() -> None:
    """Have oneMKL choose its kernels now, from this one thread (a few milliseconds)."""
    for dtype in (torch.float32, torch.float64):  # oneMKL chooses per precision
        one = torch.full((1,), 0.5, dtype=dtype)
        for name in _FUNCTIONS:
            getattr(torch, name)(one)
