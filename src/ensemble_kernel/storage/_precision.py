"""No silent precision loss: refuse runs whose store dtype would round away their spread.

The kernel standardises each log-softmax output across runs, so what matters is not a
value's rounding error but that error against the run-to-run spread of the same output.
Logits near 2,000 that vary by 0.3 between runs lose their signal in float16 (its step
there is 1.0), although every value is within 0.05% of its original.

For an output (example, class) that varies, the *rounding share* is the root mean square,
over the runs, of the rounding's effect on the log-softmax output, divided by the output's
standard deviation across runs. Rounding that adds independent noise of share s to an
output lowers its correlation with the unrounded output to 1 / sqrt(1 + s^2): at the
tolerance, s = 0.1, that is 0.995, which moves a kernel value by about half a percent. An
append is refused when more than `SHARE` of the varying outputs exceed the tolerance.

What an append can see: the spread within its own runs, and within the first runs of the
store (up to `SAMPLE_RUNS` of each). A store's first single-run file has nothing to be
compared with; the next one is checked against it, and `rounding_warning` estimates the
share from the stored values alone (a float16 value is rounded by at most half its step).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import InputError

__all__ = ["TOLERANCE", "SHARE", "SAMPLE_RUNS", "RoundingCheck", "rounding_warning"]

TOLERANCE = 0.1  # rounding noise, as a share of an output's run-to-run spread (see above)
SHARE = 0.01  # the share of varying outputs that may exceed it before an append is refused
# With 2 or 3 runs a spread is a poor estimate (with 2 it is below 5% of the true one for
# 4% of outputs): there, an output counts only where rounding exceeds its whole spread,
# and a tenth of them must.
FEW_RUNS, FEW_TOLERANCE, FEW_SHARE = 4, 1.0, 0.1
SAMPLE_RUNS = 16  # runs of a file, and of the store, that the check looks at
_BLOCK = 8192  # examples at a time


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


class RoundingCheck:
    """The run-to-run spread that appends to one store are checked against.

    Holds the log-softmax outputs (float64) of up to `SAMPLE_RUNS` runs seen so far: the
    store's first runs, then those of the files checked, as the store keeps them. Once it
    is full, its spread is kept, and each further file costs a pass over its first runs.

    Parameters
    ----------
    dtype : the store's logits dtype ("float16", "float32", ...).
    where : the store, for messages.
    stored : a function giving its first runs, of shape (n_runs, n_examples, n_classes),
        or None; called only when a file needs the check.
    """

    def __init__(self, dtype: str, where: object,
                 stored: Callable[[], torch.Tensor | None] | None = None):
        self.dtype, self.where = dtype, where
        self._stored = stored
        self.sample = None
        self._spread = None  # of the full sample

    def check(self, runs: torch.Tensor, source: str) -> None:
        """Refuse (InputError) `runs` (n_runs, n_examples, n_classes: both splits, as the
        store lays them out) where the store's dtype rounds them past the tolerance; then
        add their first runs to the sample."""
        stored = _dtype(self.dtype)
        if (runs.dtype == stored or stored == torch.float64 or runs.shape[1] == 0
                or stored == torch.float32 and runs.dtype in (torch.float16, torch.bfloat16)):
            return  # the store's dtype holds every value exactly
        if self._stored is not None:  # the store's first runs, read once
            first, self._stored = self._stored(), None
            if first is not None:
                self.sample = first[:SAMPLE_RUNS].double().log_softmax(-1)
        have = 0 if self.sample is None else self.sample.shape[0]
        x = runs[:max(1, SAMPLE_RUNS - have)].double()
        exact = x.log_softmax(-1)
        if have >= SAMPLE_RUNS:
            if self._spread is None:
                self._spread = _spread(self.sample)
            spread = self._spread
        else:
            every = exact if self.sample is None else torch.cat([self.sample, exact])
            spread = _spread(every) if every.shape[0] >= 2 else None
        if spread is not None:
            self._refuse_lossy(x, exact, spread, stored, source,
                               n_runs=min(SAMPLE_RUNS, have + x.shape[0]))
        if have < SAMPLE_RUNS:
            rounded = x[:SAMPLE_RUNS - have].to(stored).double().log_softmax(-1)
            self.sample = rounded if self.sample is None else torch.cat([self.sample, rounded])

    def _refuse_lossy(self, x, exact, spread, stored, source, n_runs: int) -> None:
        tolerance, most = (TOLERANCE, SHARE) if n_runs >= FEW_RUNS else (FEW_TOLERANCE,
                                                                         FEW_SHARE)
        # A screen first: a value is rounded by at most half a step, so an output by at
        # most its example's largest step; most files pass here without the exact pass.
        largest = x.abs().amax(dim=(0, 2))[:, None]  # (n_examples, 1)
        moving = spread > 0
        if not bool(((_step(largest, stored) > tolerance * spread) & moving).any()):
            return
        error = x.to(stored).double().log_softmax(-1) - exact
        share = error.pow(2).mean(0).sqrt() / spread.clamp_min(1e-300)
        bad = moving & (share > tolerance)
        lossy, varying = int(bad.sum()), int(moving.sum())
        if not varying or lossy <= most * varying:
            return
        i, c = (int(v) for v in bad.nonzero()[0])
        raise InputError(
            f"{source}: the store {self.where} keeps logits as {self.dtype}, whose rounding "
            f"would move {lossy / varying:.1%} of the standardised outputs by more than "
            f"{tolerance:g} times their run-to-run spread (example {i}, class {c}: logits near "
            f"{float(x[:, i, c].abs().max()):.4g}, {self.dtype} steps of "
            f"{_step(float(largest[i, 0]), stored):.3g} there, a log-softmax spread of "
            f"{float(spread[i, c]):.3g}); nothing was written: ingest these runs into a new "
            "store with --dtype float32")


def _spread(outputs: torch.Tensor) -> torch.Tensor:
    """Per (example, class), the standard deviation across runs, 0 where float64 cannot
    tell the runs apart (two-pass: its error is a few ulps of the mean)."""
    spread = outputs.std(dim=0)
    return torch.where(spread > 1e-13 * outputs.mean(0).abs(), spread, 0)


def rounding_warning(store) -> str | None:
    """A warning where `store`'s own values are rounded past the tolerance, else None.

    From its first runs alone. A float16 or bfloat16 value was rounded by at most half a
    step: modelled as uniform noise of variance step^2 / 12, independent per value, which
    reaches log-softmax output c as d_c - sum_j p_j d_j (variance s_c^2 (1 - 2 p_c) +
    sum_j p_j^2 s_j^2), the rounding share is that noise's RMS over the runs divided by
    the output's spread.
    """
    stored = _dtype(store.dtype)
    if stored not in (torch.float16, torch.bfloat16):
        return None
    have = store.sample_runs(SAMPLE_RUNS)
    if have is None or have.shape[0] < FEW_RUNS:  # too few runs to estimate a spread
        return None
    lossy, varying = 0, 0
    for e0 in range(0, have.shape[1], _BLOCK):
        x = have[:, e0:e0 + _BLOCK].double()
        outputs = x.log_softmax(-1)
        spread = _spread(outputs)
        p, var = outputs.exp(), _step(x, stored).pow(2) / 12
        noise = (var * (1 - 2 * p) + (p.pow(2) * var).sum(-1, keepdim=True)).clamp_min(0)
        share = noise.mean(0).sqrt() / spread.clamp_min(1e-300)
        moving = spread > 0
        lossy += int((moving & (share > TOLERANCE)).sum())
        varying += int(moving.sum())
    if not varying or lossy <= SHARE * varying:
        return None
    return (f"{store.path}: in its first runs, {lossy} of {varying} standardised outputs "
            f"({lossy / varying:.1%}) vary between runs by less than {1 / TOLERANCE:.0f}x "
            f"the {store.dtype} rounding of their logits: the kernel there is computed from "
            "rounding noise; re-ingest the run files into a new store with --dtype float32")


def _step(value, dtype: torch.dtype):
    """The spacing of `dtype`'s values at magnitude `value` (a float or a float64 Tensor)."""
    v = torch.as_tensor(value, dtype=torch.float64).abs().clamp_min(torch.finfo(dtype).tiny)
    step = torch.exp2(torch.floor(torch.log2(v)) - _MANTISSA[dtype])
    return float(step) if step.dim() == 0 else step


_MANTISSA = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}
