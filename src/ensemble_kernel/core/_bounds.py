"""Rigorous bounds on the rounding error of the engine's products (README, "Fast mode").

Fast mode finds candidates with bfloat16 products and re-scores them in float32. It
returns exact mode's neighbours only if no reference left out of the candidate list could
belong to the top-k, and that needs a bound on |approximate - exact| that holds for every
(query, reference) pair, including those never re-scored. This module derives it from
the unit roundoff of each format, and (`low_precision_error`) from what the engine measures:
the norms of the feature rows and the distance of each row from its bfloat16 rounding.

Notation: `a`, `b` are one query's and one reference's float32 feature rows of length
d = n_models * n_used_classes, cut into `n_blocks` blocks of at most `width` entries (one
block of runs each). `u` is the unit roundoff of the low-precision format (bfloat16:
2**-8), `v` that of float32 (2**-24), and gamma(n) = n v / (1 - n v) the standard bound of
an n-term float32 sum (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1).

1. Inputs: a_hat = fl(a) with |a_hat - a| <= u |a|, the same for b, so
   |a_hat b_hat - a b| <= (2u + u**2) |a b| term by term.
2. Each block's product is accumulated in float32 (bfloat16 products are exact in float32),
   in any order: error <= gamma(width) * sum |a_hat b_hat| <= gamma(width) (1+u)**2 sum |a b|.
3. Each block's result s is rounded to bfloat16 once: error <= u |s| with
   |s| <= (1 + gamma(width)) (1+u)**2 sum_block |a b|.
4. The blocks are added in float32: error <= gamma(n_blocks) * sum |block results|
   <= gamma(n_blocks) (1+u)**3 (1 + gamma(width)) sum |a b|.
5. The sum is multiplied by 1/(n_models * n_classes), itself rounded: two more float32
   roundings, (1+v)**2.

Summing 1-4 gives a coefficient c with |approx - exact| <= c * sum_j |a_j b_j| <= c ||a|| ||b||
(Cauchy-Schwarz), scaled as the kernel is. For bfloat16, c is about 3u = 1.2% of
||a|| ||b|| / (n_models n_classes), which is about 1.2% of the largest possible kernel value.
That is the worst case; `low_precision_error` replaces step 1 by the measured rounding and,
with one block, step 3 by the computed value, which is usually far less.
The float32 re-score has the same form with u = 0 (no input or output rounding).

The re-score recomputes the features, and a feature is computed in float32 or in float64
depending on its block (`kernel.prepare`); both ways agree to within 5 float32 roundings
(relative; plus 2**-42 absolute from the low half of the float32 mean pair, which
`ABSOLUTE_SLACK` covers), so the input error of the candidate pass, against the re-score's features, is
at most u + 8v (`RECOMPUTED_ROUNDOFF`), which the fast search uses.

Flushing subnormal results to zero (AMX, AVX512-BF16) adds at most 2**-126 per operation;
`ABSOLUTE_SLACK` covers it for any d below 2**60, and the 2**-42 above.
"""

from __future__ import annotations

import torch

__all__ = [
    "BFLOAT16_ROUNDOFF",
    "FLOAT32_ROUNDOFF",
    "RECOMPUTED_ROUNDOFF",
    "RECOMPUTED_SLACK",
    "ABSOLUTE_SLACK",
    "NORM_SLACK",
    "gamma",
    "product_error_coefficient",
    "low_precision_error",
    "squared_norm_upper",
    "norm_unit",
]

BFLOAT16_ROUNDOFF = 2.0**-8  # 8 significant bits, round to nearest
FLOAT32_ROUNDOFF = 2.0**-24
RECOMPUTED_SLACK = 8 * FLOAT32_ROUNDOFF  # candidate pass's float32 features vs the re-score's
RECOMPUTED_ROUNDOFF = BFLOAT16_ROUNDOFF + RECOMPUTED_SLACK
ABSOLUTE_SLACK = 2.0**-40  # subnormal flushes and the mean pair's low half, generously


def gamma(n: int, unit: float = FLOAT32_ROUNDOFF) -> float:
    """The bound n u / (1 - n u) on the relative error of an n-term sum in any order."""
    if n * unit >= 1:
        raise ValueError(f"a {n}-term sum has no useful error bound at unit roundoff {unit}")
    return n * unit / (1 - n * unit)


def product_error_coefficient(*, width: int, n_blocks: int, unit: float,
                              output_rounding: bool) -> float:
    """c such that |computed - exact| <= c * sum_j |a_j b_j| for the engine's blocked product.

    Parameters
    ----------
    width : the largest contraction width of one block (runs per block * classes used).
    n_blocks : blocks summed in float32 after their products.
    unit : the unit roundoff of the inputs' format (0 for float32 inputs used as they are).
    output_rounding : whether each block's result is rounded to that format (bfloat16
        products on the CPU return bfloat16) before the float32 sum.

    Returns
    -------
    float: the coefficient, including the final scaling's two float32 roundings.
    """
    g_w, g_b = gamma(width), gamma(n_blocks)
    grow = (1 + unit) ** 2  # |a_hat b_hat| <= grow |a b|
    inputs = 2 * unit + unit**2
    accumulate = g_w * grow
    block_bound = (1 + g_w) * grow  # |block result before its rounding| / sum |a b|
    rounding = unit * block_bound if output_rounding else 0.0
    after_rounding = block_bound * ((1 + unit) if output_rounding else 1.0)
    blocks = g_b * after_rounding
    c = inputs + accumulate + rounding + blocks
    v = FLOAT32_ROUNDOFF
    # K = fl(sum * fl(1 / (n_models n_classes))): two float32 roundings of the scaled sum.
    return (1 + v) ** 2 * c + 2 * v + v**2


def low_precision_error(*, query_norm, reference_norm, query_rounding, reference_rounding,
                        width: int, n_blocks: int, n_terms: int, rescore_width: int,
                        rescore_blocks: int, largest=None):
    """A bound on |bfloat16 kernel value - re-scored float32 value|, in kernel units, from
    norms and the measured size of the bfloat16 rounding.

    The steps of the module docstring, with step 1 from what the candidate pass measured
    rather than from u, and step 3 from the computed value when there is one block:

    Parameters
    ----------
    query_norm, reference_norm : upper bounds on ||a|| and max_b ||b||, the re-score's
        feature rows (floats, or tensors of one value per query).
    query_rounding, reference_rounding : upper bounds on ||a_hat - a|| and max_b
        ||b_hat - b||: the inputs' rounding to bfloat16 (at most u ||a||; the candidate pass
        measures it) plus any difference between its float32 features and the re-score's.
        Then |a_hat b_hat - a b| <= Da ||b|| + ||a|| Db + Da Db (Cauchy-Schwarz), and
        ||a_hat|| ||b_hat|| <= P = (||a|| + Da)(||b|| + Db).
    width, n_blocks : the candidate pass's blocks (runs per block * classes; how many).
    n_terms : n_models * n_used, the kernel's scale.
    rescore_width, rescore_blocks : the same for the float32 re-score.
    largest : None, or (one block only) an upper bound on |computed value| over the pairs
        the bound must cover, in kernel units. With one block, the single bfloat16 rounding
        of the block's result s is at most u |s| <= u |s_hat| / (1 - u), and s_hat is the
        computed value times n_terms up to the scaling's two roundings. Without it the
        rounding is bounded by u (1 + gamma(width)) P, whatever the value; with it, by the
        smaller of the two.

    The bound at a computed value x is then nondecreasing in x (x + min(c |x|, C) is, for
    c < 1), so that every reference whose
    computed value is below a candidate's has an exact value below that candidate's
    computed value plus the bound (`engine._fast_search` relies on it).
    """
    u, v = BFLOAT16_ROUNDOFF, FLOAT32_ROUNDOFF
    g_w, g_b = gamma(width), gamma(n_blocks)
    inputs = query_rounding * reference_norm + query_norm * reference_rounding \
        + query_rounding * reference_rounding
    hat = (query_norm + query_rounding) * (reference_norm + reference_rounding)
    accumulate = g_w * hat
    value, rounding = 0.0, u * (1 + g_w) * hat
    if largest is not None and n_blocks == 1:  # the smaller of the two, in kernel units
        value = torch.minimum(
            torch.as_tensor(u / (1 - u) / (1 - v) ** 2 * largest, dtype=torch.float64),
            torch.as_tensor(rounding / n_terms, dtype=torch.float64))
        rounding = 0.0
    blocks = g_b * (1 + u) * (1 + g_w) * hat
    low = ((inputs + accumulate + rounding + blocks) / n_terms + value) * (1 + v) ** 2 \
        + (2 * v + v**2) * query_norm * reference_norm / n_terms
    exact = product_error_coefficient(width=rescore_width, n_blocks=rescore_blocks, unit=0.0,
                                      output_rounding=False)
    return low + exact * query_norm * reference_norm / n_terms + ABSOLUTE_SLACK


# Relative slack on a feature norm: the re-score's features may differ from those of the
# candidate pass by 5 float32 roundings (< 2**-21 relative). The rounding of the norm's own
# computation is in `squared_norm_upper`.
NORM_SLACK = 2.0**-20
FLOAT64_ROUNDOFF = 2.0**-53
# Smallest normal squares: a square below them may be flushed to 0 (at most this much lost).
_NORMAL_FLOOR = {FLOAT32_ROUNDOFF: 2.0**-126, FLOAT64_ROUNDOFF: 2.0**-1022}
# Blocks wider than this get float64 norms: gamma(width) in float32 would pass 1/64.
_FLOAT32_NORM_WIDTH = 2**18 - 8


def norm_unit(width: int) -> float:
    """The unit roundoff in which blocks of `width` features have their norms measured:
    float32 (ten times faster than float64 on CPUs), unless so wide that its bound would
    pass 1/64 relative."""
    return FLOAT32_ROUNDOFF if width <= _FLOAT32_NORM_WIDTH else FLOAT64_ROUNDOFF


def squared_norm_upper(measured, *, width: int, n_blocks: int, n_terms: int):
    """An upper bound on sum_i a_i**2 from the norms measured block by block.

    `measured` is sum_b r_b**2, summed in float64 over `n_blocks` blocks, where r_b is
    the norm of a block of at most `width` terms computed in the unit of
    `norm_unit(width)` (torch's `vector_norm`, in any order and with any scaling):

    - the block's squares and sums: T_b >= S_b (1 - gamma(width + 4)) - width * f, f the
      smallest normal square (a smaller square may be flushed to 0);
    - the root: r_b >= sqrt(T_b) (1 - v), and r_b**2 is exact in float64;
    - the float64 sum over blocks: measured >= sum_b r_b**2 (1 - gamma64(n_blocks)).

    So S <= (measured / (1 - gamma64(n_blocks)) + n_terms f) / (1 - gamma(width + 8)),
    the 8 covering (1 - v)**-2 with room.
    """
    unit = norm_unit(width)
    blocks = measured / (1 - gamma(max(n_blocks, 1), FLOAT64_ROUNDOFF))
    return (blocks + n_terms * _NORMAL_FLOOR[unit]) / (1 - gamma(width + 8, unit))
