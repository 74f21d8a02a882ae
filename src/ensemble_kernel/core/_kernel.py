"""Pure maths: logits -> normalised features -> kernel blocks (docs/architecture.md §1).

With ``x = log_softmax(logits)`` and, per example and class, ``z = (x - mean_m x) / std_m x``
(unbiased std over the runs),

    K[a, b] = 1 / (n_models * n_classes) * sum_{m, c} zA[m, a, c] * zB[m, b, c]

which is one matrix product once models and classes are flattened into one axis:
``F[a, m * n_classes + c] = z[m, a, c]`` and ``K = FA @ FB.T / (n_models * n_classes)``.

An (example, class) whose output no run changes has std 0: it contributes 0 to the
kernel (the reference divides by zero and spreads NaN).

Nothing here touches files, prints, or leaves a torch setting changed.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..errors import InputError, NonFiniteError

__all__ = [
    "ClassStats",
    "StatsAccumulator",
    "prepare",
    "check_fits_float32",
    "needs_float64",
    "normalized_features",
    "dense_kernel",
    "exact_float32_matmul",
    "bfloat16_matmul",
    "check_classes",
]


def check_classes(classes: Sequence[int] | None, n_classes: int) -> tuple[int, ...] | None:
    """Validate a class subset; None means all classes."""
    if classes is None:
        return None
    chosen = tuple(int(c) for c in classes)
    if not chosen:
        raise InputError("classes must name at least one class, got an empty list")
    bad = [c for c in chosen if not 0 <= c < n_classes]
    if bad:
        raise InputError(f"classes must lie in 0..{n_classes - 1}, got {bad}")
    if len(set(chosen)) != len(chosen):
        raise InputError(f"classes must not repeat, got {list(chosen)}")
    return tuple(sorted(chosen))


def prepare(
    raw: torch.Tensor,
    *,
    log_softmax: bool,
    classes: tuple[int, ...] | None,
    device: torch.device | str = "cpu",
    runs_first: bool = False,
    precise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 (log-softmax) outputs of a block of raw logits, restricted to `classes`.

    The logits are taken at float32 precision. Two kinds of rows are computed in float64
    instead, and the block is then returned in float64:

    - a (run, example) row so confident that float32 cannot hold its top class's
      log-probability (the other classes' total probability below 2**-100, a logit
      margin beyond ~70): those tiny values still vary across runs;
    - every row of an example marked in `precise` (its outputs vary too little across
      runs, relative to their size, for float32 to standardise; see `ClassStats`).

    Every other row keeps its float32 value, whichever block it is read in.

    Parameters
    ----------
    raw : Tensor of shape (n_models, n_examples, n_classes), any float dtype.
    runs_first : keep the (n_models, n_examples, ...) layout (the statistics pass sums
        over runs, fastest along the leading axis).
    precise : bool Tensor of shape (n_examples,), or None.

    Returns
    -------
    Tensor of shape (n_examples, n_models, n_used_classes), float32 (float64 for a block
    with such rows), contiguous: the example-major layout the matrix product wants (or
    (n_models, n_examples, ...)).
    """
    if raw.device.type == "cpu" and torch.device(device).type == "cuda":
        raw = _to_gpu(raw, device)
    layout = raw if runs_first else raw.permute(1, 0, 2)
    # One copying conversion: everything after it works in place on our own buffer.
    x = layout.to(device=device, dtype=torch.float32, memory_format=torch.contiguous_format,
                  copy=True)
    wide = None  # rows to compute in float64, broadcastable to x
    if precise is not None and bool(precise.any()):
        wide = precise.to(x.device)[None, :, None] if runs_first else \
            precise.to(x.device)[:, None, None]
    if log_softmax:
        deep = _log_softmax_(x) < _SMALLEST_MASS  # (..., 1): rows float32 cannot hold
        if bool(deep.any()):
            wide = deep if wide is None else (deep | wide)
    if wide is not None:
        exact = layout.to(device=device, dtype=torch.float32).to(
            torch.float64, memory_format=torch.contiguous_format, copy=True)
        if log_softmax:
            _log_softmax_(exact)
        x = torch.where(wide, exact, x.double())
    if classes is not None:
        x = x[..., list(classes)]
    return x.contiguous()


def _to_gpu(raw: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`raw` on the GPU, as it was read (float16 logits: half the bytes of float32), staged
    through pinned host memory: a copy from pageable memory ran at about 8 GB/s on an H100
    machine (`benchmarks/gpu_profile.py`), converted to float32 on the CPU first. The
    conversion now runs on the GPU. PyTorch's pinned-memory cache keeps the staging block
    until the asynchronous copy has read it."""
    staged = torch.empty(raw.shape, dtype=raw.dtype, pin_memory=True)
    staged.copy_(raw)
    return staged.to(device, non_blocking=True)


_SMALLEST_MASS = 2.0**-100  # below this, float32 loses the top class's log-probability


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the last axis, in place, accurate where the output is near 0.

    ``torch.log_softmax`` computes ``y - log(sum(exp(y)))`` with ``y = x - max``; for a
    confident class the sum is ``1 + s`` with tiny ``s`` and float32 keeps few digits of
    ``s``. The standardisation then divides that error by a tiny std. Here the largest
    term is left out of the sum and ``log1p`` takes the rest: full precision. Returns the
    mass `s` of the classes left out, per row.

    Returns
    -------
    Tensor of shape x.shape[:-1] + (1,).
    """
    # One reduction for the maximum and where it is, not `amax` then `argmax` over the
    # short class axis (`python benchmarks/micro.py logsoftmax`: 0.76-0.80x the time).
    top, at = x.max(dim=-1, keepdim=True)
    x -= top  # y = x - max <= 0
    others = x.exp()
    others.scatter_(-1, at, 0.0)  # leave one maximum out
    mass = others.sum(dim=-1, keepdim=True)
    x.sub_(mass.log1p())
    return mass


@dataclass(frozen=True)
class ClassStats:
    """Per-example, per-class statistics over the runs of one split.

    Attributes
    ----------
    mean : Tensor of shape (n_examples, n_used_classes), float64.
    scale : Tensor of shape (n_examples, n_used_classes), float64: 1 / std, and 0 where
        no run changes the output (std == 0), so that those entries contribute 0.
    precise : bool Tensor of shape (n_examples,): examples whose outputs are prepared and
        standardised in float64 (see `needs_float64`); None when there are none.
    mean32, mean_low32, scale32 : for float32 blocks, the mean as a float32 pair
        (mean32 + mean_low32 holds it to ~2**-48 relative, so centring is exact to float32
        rounding of the deviation) and 1 / std in float32 (capped at float32's largest value:
        such an example is `precise`).
    """

    mean: torch.Tensor
    scale: torch.Tensor
    precise: torch.Tensor | None
    mean32: torch.Tensor
    mean_low32: torch.Tensor
    scale32: torch.Tensor

    @classmethod
    def from_float64(cls, mean: torch.Tensor, scale: torch.Tensor,
                     precise: torch.Tensor | None) -> "ClassStats":
        high = mean.to(torch.float32)
        largest = torch.finfo(torch.float32).max
        return cls(mean, scale, precise, high, (mean - high.double()).float(),
                   scale.clamp(max=largest).to(torch.float32))

    @property
    def nbytes(self) -> int:
        tensors = (self.mean, self.scale, self.precise, self.mean32, self.mean_low32,
                   self.scale32)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def rows(self, examples: slice) -> "ClassStats":
        precise = None if self.precise is None else self.precise[examples]
        return ClassStats(self.mean[examples], self.scale[examples], precise,
                          self.mean32[examples], self.mean_low32[examples],
                          self.scale32[examples])


def needs_float64(mean: torch.Tensor, scale: torch.Tensor, n_models: int) -> torch.Tensor:
    """Examples whose outputs float32 cannot standardise to float32 accuracy.

    An output whose mean is more than 64 stds from 0 (float32 log-softmax rounds it by
    ~2**-24 |mean|, up to 4e-6 std), whose std is below 2**-100 (float32's scale and
    products lose digits), or whose deviations may pass 2**120 (near float32's range).

    Parameters
    ----------
    mean, scale : Tensors of shape (n_examples, n_used_classes), float64.

    Returns
    -------
    bool Tensor of shape (n_examples,).
    """
    varies = scale > 0
    shaky = (mean.abs() * scale > 64) | (scale > 2.0**100) | (
        math.sqrt(max(n_models - 1, 1)) > 2.0**120 * scale)
    return (varies & shaky).any(dim=1)


_TINY_SQUARES = 2.0**-100  # a float32 sum of squares below this may hold subnormal terms


class StatsAccumulator:
    """Streams blocks of runs and keeps mean and M2 per (example, class).

    Within a block, the corrected two-pass formula in float32: deviations from the block's
    own mean, M2 = sum(dev**2) - sum(dev)**2 / n_b, accurate to a few float32 roundings
    relative to M2 whatever the offset or scale of the block (an outlier run first or
    last, logits near 1e6); blocks are merged in float64 (Chan's parallel update), so the
    result does not depend on the order of the runs beyond float32 accuracy. The block
    mean is taken relative to the block's first run, so an output no run changes has
    deviations exactly 0, M2 == 0 exactly, and is recognised as constant. A block whose
    float32 sums overflow (logits beyond ~1e18) or underflow (deviations below ~1e-15)
    is redone in float64 by the caller.
    """

    def __init__(self, n_examples: int, n_classes: int, device: torch.device | str = "cpu"):
        self.count = 0
        self.mean = torch.zeros(n_examples, n_classes, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(n_examples, n_classes, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> bool:
        """Add a block; return False, adding nothing, if its float32 sums cannot be trusted.

        That is: a sum is not finite (NaN or Inf in the input, or squares that overflow),
        or a sum of squares is so small that its terms may have underflowed while the
        output is not constant. The caller then names a bad input or passes the block
        again in float64.

        Parameters
        ----------
        x : Tensor of shape (n_block_models, n_examples, n_classes), float32 or float64;
            used as scratch (overwritten).
        """
        n_b = x.shape[0]
        first = x[0].clone()
        deviation = x.sub_(first)  # exactly 0 where no run changes the output
        centre = deviation.mean(dim=0)  # the block's mean, relative to its first run
        deviation.sub_(centre)  # deviations from the block mean: no cancellation below
        s1 = deviation.sum(dim=0)
        # The squares' sum over runs (the leading axis): `vector_norm(dim=0)` is 30-150x
        # slower per value for blocks of 2 to 16 runs (`python benchmarks/micro.py squares`)
        s2 = torch.mul(deviation, deviation).sum(dim=0)
        # NaN and Inf reach every sum they enter; squares that overflow give Inf.
        if not bool(torch.isfinite(s1.sum() + s2.sum())):
            return False
        if x.dtype == torch.float32:
            small = s2 < _TINY_SQUARES  # constant, or squares that may have underflowed
            if bool(small.any()) and not bool((deviation[:, small] == 0).all()):
                return False
        s1, s2 = s1.double(), s2.double()
        mean_b = first.double() + centre.double() + s1 / n_b
        m2_b = (s2 - s1.square() / n_b).clamp_(min=0)
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + delta.square() * (n_a * n_b / n)
        self.count = n
        return True

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and 1 / std (0 where no run changes the output), float64.

        Returns
        -------
        Two Tensors of shape (n_examples, n_classes).
        """
        if self.count < 2:
            raise InputError(f"the kernel needs at least 2 runs, got {self.count}")
        std = (self.m2 / (self.count - 1)).sqrt()
        return self.mean, torch.where(self.m2 <= 0, torch.zeros_like(std), 1.0 / std)


def check_fits_float32(raw: torch.Tensor, *, first_model: int, first_example: int,
                       describe) -> None:
    """Raise InputError naming the first (finite) logit beyond float32's range.

    Parameters
    ----------
    raw : Tensor of shape (n_block_models, n_examples, n_classes), finite.
    """
    bad = ~torch.isfinite(raw.to(torch.float32))
    if bool(bad.any()):
        m, e, c = (int(i) for i in bad.nonzero()[0])
        raise InputError(
            f"{describe(first_model + m)}: example {first_example + e}, class {c}: the logit "
            f"{float(raw[m, e, c]):.3g} does not fit float32, which the kernel computes in; "
            "rescale the logits"
        )


def check_finite(raw: torch.Tensor, *, first_model: int, first_example: int, describe) -> None:
    """Raise NonFiniteError naming the first run and example with NaN or Inf."""
    bad = ~torch.isfinite(raw)
    if not bool(bad.any()):
        return
    m, e, c = (int(i) for i in bad.nonzero()[0])
    value = float(raw[m, e, c])
    raise NonFiniteError(
        f"{describe(first_model + m)}: example {first_example + e}, class {c} is {value}; "
        "the logits must be finite (re-export that run, or leave it out with --runs)"
    )


def normalized_features(x: torch.Tensor, stats: ClassStats) -> torch.Tensor:
    """Standardised features of a block.

    Parameters
    ----------
    x : Tensor of shape (n_examples, n_block_models, n_used_classes), float32 or float64,
        from `prepare` (the rows of `stats.precise` examples in float64).
    stats : the rows of ClassStats for these examples.

    Returns
    -------
    Tensor of shape (n_examples, n_block_models * n_used_classes), of x's dtype. A float32
    feature and the float64 one of the same output agree to a few float32 roundings.
    """
    if x.dtype == torch.float64:
        x = x.sub_(stats.mean.unsqueeze(1)).mul_(stats.scale.unsqueeze(1))
    else:  # (x - mean) with the mean as a float32 pair: exact but for one rounding
        x = x.sub_(stats.mean32.unsqueeze(1)).sub_(stats.mean_low32.unsqueeze(1))
        x = x.mul_(stats.scale32.unsqueeze(1))
    return x.reshape(x.shape[0], -1)  # (n_examples, n_block_models * n_used_classes)


def dense_kernel(
    queries: torch.Tensor,
    references: torch.Tensor,
    *,
    log_softmax: bool = True,
    classes: Sequence[int] | None = None,
) -> torch.Tensor:
    """The plain twin: the kernel straight from the definition, in float64.

    Parameters
    ----------
    queries : Tensor of shape (n_models, n_queries, n_classes).
    references : Tensor of shape (n_models, n_references, n_classes).

    Returns
    -------
    Tensor of shape (n_queries, n_references), float64.
    """

    def standardise(logits: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(logits).to(torch.float64)
        if log_softmax:  # the definition, with log1p: float64's log(1 + s) drops s < 1e-16
            # (written out, not `_log_softmax_`: the twin shares no code with the engine)
            y = x - x.amax(-1, keepdim=True)
            others = y.exp().scatter(-1, y.argmax(-1, keepdim=True), 0.0)
            x = y - others.sum(-1, keepdim=True).log1p()
        if classes is not None:
            x = x[..., list(classes)]
        # Deviations from the first run first (exact for runs that agree to a few digits):
        # torch's batched `std` can return 0 for outputs an ulp apart, and 0 std gave NaN.
        shifted = x - x[:1]
        centred = shifted - shifted.mean(0, keepdim=True)
        std = (centred.square().sum(0, keepdim=True) / (x.shape[0] - 1)).sqrt()
        z = centred / std
        # constant (its float64 mean may be an ulp off), or a spread whose squares float64
        # cannot hold (below ~1e-154): 0, as the engine does
        constant = (x == x[:1]).all(0, keepdim=True) | (std == 0)
        return torch.where(constant, torch.zeros_like(z), z)

    za, zb = standardise(queries), standardise(references)
    n_models, _, n_used = za.shape
    return torch.einsum("mac,mbc->ab", za, zb) / (n_models * n_used)


@contextlib.contextmanager
def exact_float32_matmul(device: torch.device | str) -> Iterator[None]:
    """True float32 products (no TF32, no bfloat16 passes) around a block; restored after.

    'medium' or 'high' float32 precision lets oneDNN compute float32 products in bfloat16
    on CPUs with AMX and lets CUDA use TF32, so exact mode always asks for 'highest'.
    """
    device_type = torch.device(device).type
    previous = torch.get_float32_matmul_precision()
    cuda_tf32 = torch.backends.cuda.matmul.allow_tf32 if device_type == "cuda" else None
    try:
        torch.set_float32_matmul_precision("highest")
        if device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
        if cuda_tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = cuda_tf32


@contextlib.contextmanager
def bfloat16_matmul(device: torch.device | str) -> Iterator[None]:
    """bfloat16 products with float32 accumulation, as `bounds.py` assumes; restored after.

    CUDA may otherwise reduce split-K partial sums in bfloat16
    (`allow_bf16_reduced_precision_reduction`), which the error bound does not cover.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_bf16_reduced_precision_reduction
    try:
        matmul.allow_bf16_reduced_precision_reduction = False
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction = previous
