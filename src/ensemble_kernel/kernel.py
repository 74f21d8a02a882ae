"""Pure maths: logits -> normalised features -> kernel blocks (DESIGN §1).

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
import functools
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .errors import InputError, NonFiniteError

__all__ = [
    "ClassStats",
    "StatsAccumulator",
    "prepare",
    "precise_log_softmax_",
    "normalized_features",
    "dense_kernel",
    "exact_float32_matmul",
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
) -> torch.Tensor:
    """Float32 (log-softmax) outputs of a block of raw logits, restricted to `classes`.

    Parameters
    ----------
    raw : Tensor of shape (n_models, n_examples, n_classes), any float dtype.
    runs_first : keep the (n_models, n_examples, ...) layout (the statistics pass sums
        over runs, fastest along the leading axis).

    Returns
    -------
    Tensor of shape (n_examples, n_models, n_used_classes), float32, contiguous: the
    example-major layout the matrix product wants (or (n_models, n_examples, ...)).
    """
    # One copying conversion: everything after it works in place on our own buffer.
    x = (raw if runs_first else raw.permute(1, 0, 2)).to(
        device=device, dtype=torch.float32, memory_format=torch.contiguous_format, copy=True
    )
    if log_softmax:
        x = precise_log_softmax_(x)
    if classes is not None:
        x = x[..., list(classes)]
    return x.contiguous()


def precise_log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the last axis, in place, accurate where the output is near 0.

    ``torch.log_softmax`` computes ``y - log(sum(exp(y)))`` with ``y = x - max``; for a
    confident class the sum is ``1 + s`` with tiny ``s`` and float32 keeps few digits of
    ``s``. The standardisation then divides that error by a tiny std. Here the largest
    term is left out of the sum and ``log1p`` takes the rest: full float32 precision.
    """
    x -= x.amax(dim=-1, keepdim=True)  # y = x - max <= 0
    others = x.exp()
    others.scatter_(-1, x.argmax(dim=-1, keepdim=True), 0.0)  # leave one maximum out
    return x.sub_(others.sum(dim=-1, keepdim=True).log1p_())


@dataclass(frozen=True)
class ClassStats:
    """Per-example, per-class statistics over the runs of one split.

    Attributes
    ----------
    mean : Tensor of shape (n_examples, n_used_classes), float32.
    scale : Tensor of shape (n_examples, n_used_classes), float32: 1 / std, and 0 where
        no run changes the output (std == 0), so that those entries contribute 0.
    n_constant : int
        How many (example, class) entries had std == 0.
    """

    mean: torch.Tensor
    scale: torch.Tensor
    n_constant: int

    def rows(self, examples: slice) -> "ClassStats":
        return ClassStats(self.mean[examples], self.scale[examples], -1)


class StatsAccumulator:
    """Streams blocks of runs and keeps mean and M2 per (example, class).

    Within a block, sums are taken in float32 of deviations from a fixed shift (the first
    run's value), which are of the order of the std, so float32 keeps their precision;
    blocks are merged in float64 (Chan's parallel update). An output no run changes has
    deviations exactly 0, so M2 == 0 exactly and it is recognised as constant.
    """

    def __init__(self, n_examples: int, n_classes: int, device: torch.device | str = "cpu"):
        self.count = 0
        self.shift: torch.Tensor | None = None  # (n_examples, n_classes) float32
        self.mean = torch.zeros(n_examples, n_classes, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(n_examples, n_classes, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> bool:
        """Add a block; return whether all its values were finite.

        Parameters
        ----------
        x : Tensor of shape (n_block_models, n_examples, n_classes), float32; used as
            scratch (overwritten).
        """
        if self.shift is None:
            self.shift = x[0].clone()
        n_b = x.shape[0]
        deviation = x.sub_(self.shift)  # in place: x is the caller's scratch
        # float32 sums (15x faster than float64 ones here) of deviations of the order of
        # the std: their relative error stays ~1e-6; the merge below is in float64.
        s1 = deviation.sum(dim=0).double()
        if not bool(torch.isfinite(s1.sum())):  # NaN and Inf reach every sum they enter
            return False
        s2 = deviation.square_().sum(dim=0).double()
        mean_b = self.shift.double() + s1 / n_b
        m2_b = (s2 - s1.square() / n_b).clamp_(min=0)
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + delta.square() * (n_a * n_b / n)
        self.count = n
        return True

    def finalize(self) -> ClassStats:
        if self.count < 2:
            raise InputError(f"the kernel needs at least 2 runs, got {self.count}")
        constant = self.m2 <= 0
        std = (self.m2 / (self.count - 1)).sqrt()
        scale = torch.where(constant, torch.zeros_like(std), 1.0 / std)
        return ClassStats(
            mean=self.mean.to(torch.float32),
            scale=scale.to(torch.float32),
            n_constant=int(constant.sum()),
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
    x : Tensor of shape (n_examples, n_block_models, n_used_classes), float32, from `prepare`.
    stats : the rows of ClassStats for these examples.

    Returns
    -------
    Tensor of shape (n_examples, n_block_models * n_used_classes), float32.
    """
    x = x.sub_(stats.mean.unsqueeze(1)).mul_(stats.scale.unsqueeze(1))
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
        if log_softmax:
            x = x.log_softmax(-1)
        if classes is not None:
            x = x[..., list(classes)]
        std = x.std(0, keepdim=True)
        z = (x - x.mean(0, keepdim=True)) / std
        return torch.where(std == 0, torch.zeros_like(z), z)

    za, zb = standardise(queries), standardise(references)
    n_models, _, n_used = za.shape
    return torch.einsum("mac,mbc->ab", za, zb) / (n_models * n_used)


@functools.lru_cache(maxsize=None)
def _medium_precision_is_exact(device_type: str) -> bool:
    """Whether 'medium' float32 matmul precision keeps float32 accuracy on this device.

    On CPUs without AMX, 'medium' routes float32 products to oneDNN's AVX-512 kernels
    (faster, still float32). Where AMX or tensor cores exist it may compute in bfloat16
    or TF32, which exact mode must not: measure instead of trusting the name.
    """
    if device_type != "cpu":
        return False  # on CUDA 'medium' means bf16/TF32 products
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(256, 1024, generator=gen, dtype=torch.float64)
    b = torch.randn(256, 1024, generator=gen, dtype=torch.float64)
    exact = a @ b.T
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        got = (a.float() @ b.float().T).double()
    finally:
        torch.set_float32_matmul_precision(previous)
    # float32 accumulation: relative error ~1e-6; bfloat16 inputs: ~1e-3.
    return float((got - exact).abs().max() / exact.abs().max()) < 1e-5


@contextlib.contextmanager
def exact_float32_matmul(device: torch.device | str) -> Iterator[None]:
    """Set the fastest float32 product setting that stays float32-accurate; restore it after."""
    device_type = torch.device(device).type
    previous = torch.get_float32_matmul_precision()
    wanted = "medium" if _medium_precision_is_exact(device_type) else "highest"
    cuda_tf32 = torch.backends.cuda.matmul.allow_tf32 if device_type == "cuda" else None
    try:
        torch.set_float32_matmul_precision(wanted)
        if device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
        if cuda_tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = cuda_tf32
