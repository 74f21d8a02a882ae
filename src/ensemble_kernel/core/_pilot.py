"""The pilot of precision='auto': whether fast mode's candidates are crowded on this data.

`resolve_auto` turns 'auto' into 'exact' or 'fast' from the job's shapes, the machine's
probe (`_precision.choose_precision`) and `crowded_share`, an estimate from exact kernel
values of a sample of the data (`Spans` of examples spread by `spread_spans`). A wrong
estimate costs time, never a wrong neighbour.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from ._engine import INLINE_GAP, _prepare_engine, guessed_bound
from ._kernel import exact_float32_matmul
from ._plan import Plan
from ._precision import choose_precision
from ._sources import LogitSource, as_source, item_size

__all__ = ["resolve_auto", "crowded_share", "Spans", "spread_spans", "PILOT_QUERIES",
           "PILOT_REFERENCES", "PILOT_SPANS", "PILOT_WINDOW"]

logger = logging.getLogger(__name__)


def resolve_auto(queries, references, k, *, exclude_self, classes, n_candidates,
                  memory_budget, device, log_softmax=True) -> str:
    """'exact' or 'fast' for precision='auto', from the job's shapes, the machine's probe
    and a pilot on the data (`crowded_share`). Inputs the engine will refuse resolve to
    'exact' (the engine says why)."""
    queries = as_source(queries, "query logits")
    references = queries if (exclude_self and references is None) else as_source(
        references, "reference logits")
    n_classes = len(set(classes)) if classes is not None else queries.n_classes
    if not (isinstance(k, (int, np.integer)) and 1 <= k <= references.n_examples
            and references.n_models == queries.n_models and n_classes >= 1
            and (memory_budget is None or int(memory_budget) > 0)):
        return "exact"
    def crowding(plan: Plan) -> float:
        return crowded_share(queries, None if exclude_self else references, int(k), plan,
                              n_candidates=n_candidates, log_softmax=log_softmax,
                              classes=classes, memory_budget=memory_budget, device=device)
    return choose_precision(
        "auto", n_queries=queries.n_examples, n_references=references.n_examples,
        n_models=queries.n_models, n_classes=n_classes, k=int(k), n_candidates=n_candidates,
        memory_budget=memory_budget, device=device,
        raw_bytes=item_size(queries),
        crowding=crowding, log_softmax=log_softmax).precision


class Spans:
    """Some runs' logits at a few spans of examples, read as one source (the pilot's sample)."""

    def __init__(self, source: LogitSource, spans: list[tuple[int, int]]):
        self.source, self.spans = source, spans
        self.n_models, self.n_classes = source.n_models, source.n_classes
        self.n_examples = sum(b - a for a, b in spans)

    def read(self, models: slice, examples: slice) -> torch.Tensor:
        e0, e1, _ = examples.indices(self.n_examples)
        wanted, at = [], 0
        for a, b in self.spans:  # the parts of [e0, e1) that fall in each span
            lo, hi = max(e0, at), min(e1, at + b - a)
            if lo < hi:
                wanted.append((a + lo - at, a + hi - at))
            at += b - a
        if not wanted:  # an empty slice
            return self.source.read(models, slice(0, 0))
        # One read of the range that covers them: a store reads whole chunks of examples,
        # so reading each span apart would read a chunk once per span.
        first, last = wanted[0][0], wanted[-1][1]
        block = self.source.read(models, slice(first, last))
        return torch.cat([block[:, a - first:b - first] for a, b in wanted], dim=1)

    def describe_run(self, model: int) -> str:
        return self.source.describe_run(model)


def spread_spans(n: int, total: int, pieces: int) -> list[tuple[int, int]]:
    """`pieces` contiguous spans of about total / pieces examples, spread evenly over the
    first max(4 total, PILOT_WINDOW) of n (everything when total >= n): not one corner of
    a data set sorted by class, and within few of a store's chunks of examples (`Spans`
    reads the range that covers them)."""
    if total >= n:
        return [(0, n)]
    window = min(n, max(4 * total, PILOT_WINDOW))
    size = max(1, total // pieces)
    starts = [round(i * (window - size) / max(pieces - 1, 1)) for i in range(pieces)]
    return [(s, s + size) for s in starts]


# The pilot's sample: test examples, and references (in spans, see `spread_spans`), within
# a window of examples as wide as a store's chunk (`store.py` chunks 16,384 examples).
PILOT_QUERIES, PILOT_REFERENCES, PILOT_SPANS, PILOT_WINDOW = 128, 4096, 8, 16384


def crowded_share(queries, references, k: int, plan: Plan, *, n_candidates, log_softmax,
                   classes, memory_budget, device) -> float:
    """Estimated share of queries whose fast-mode candidates are crowded: the bfloat16 k-th
    and last candidates within `INLINE_GAP` G, so that fast mode computes their whole row
    in float32 (`_fast_search`). G is `guessed_bound` for fast mode's `plan`, with the
    bfloat16 rounding measured on some of the sample's features and each sampled query's
    largest value.

    Exact kernel values of a sample (PILOT_QUERIES test examples against PILOT_REFERENCES
    references, each in a few spread spans) stand in for the full ones: the statistics
    are per example, so the sample's kernel values are the full kernel's. Among n_r
    references the k-th and n_c-th values are the (k / n_r) and (n_c / n_r) quantiles of a
    query's row; in the sample they are its values of rank k r_s / n_r and n_c r_s / n_r.
    An estimate: a wrong one costs time, never a wrong neighbour.
    """
    queries = as_source(queries, "query logits")
    references = queries if references is None else as_source(references, "reference logits")
    leave_one_out = references is queries
    n_r = references.n_examples - leave_one_out
    n_c = min(n_r, n_candidates or max(2 * k, k + 128))
    if n_c >= n_r:  # every reference is a candidate: the proof needs no window
        return 0.0
    refs = Spans(references, spread_spans(references.n_examples, PILOT_REFERENCES,
                                            PILOT_SPANS))
    if leave_one_out:  # queries among the sampled references, each leaving itself out
        sample_q, sample_r = refs, None
    else:
        sample_q = Spans(queries, spread_spans(queries.n_examples, PILOT_QUERIES, 4))
        sample_r = refs
    r_s = refs.n_examples - leave_one_out
    rank_k = min(r_s, math.ceil(k * r_s / n_r))  # 1-based ranks in the sample
    rank_c = min(r_s, max(rank_k + 1, math.ceil(n_c * r_s / n_r)))
    if rank_c <= rank_k:
        return 0.0
    engine = _prepare_engine(sample_q, sample_r, rank_c, log_softmax=log_softmax,
                             classes=classes, exclude_self=leave_one_out, precision="exact",
                             memory_budget=memory_budget, device=device, chunk_models=None,
                             tile_size=None, progress=None, k_keep=rank_c)
    with exact_float32_matmul(engine.device):
        values = engine.search(rank_c, dtype=torch.float32).values.double()
    if leave_one_out and len(values) > PILOT_QUERIES:
        values = values[torch.linspace(0, len(values) - 1, PILOT_QUERIES).long()]
    # the values of fast mode's whole list lie about within the sample's first and last
    largest = torch.maximum(values[:, 0].abs(), values[:, rank_c - 1].abs())
    guess = torch.as_tensor(  # per query (a float where the value term does not apply)
        guessed_bound(plan, engine.n_models, engine.n_used, rounding=engine.rounding_ratio(),
                      largest=largest), dtype=torch.float64, device=values.device
    ).expand(len(values))
    gap = values[:, rank_k - 1] - values[:, rank_c - 1]
    share = float((gap <= INLINE_GAP * guess).double().mean())
    logger.info("pilot: %d test examples x %d references, ranks %d and %d: %.0f%% crowded "
                "(median G = %.3g)", len(values), r_s + leave_one_out, rank_k, rank_c,
                100 * share, float(guess.median()))
    return share
