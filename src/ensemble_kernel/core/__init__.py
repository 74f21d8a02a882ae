"""The maths and the engine: the kernel, its bounds, the memory plan, the choice of
precision, and the streamed, tiled computation of neighbours.

Imports only `ensemble_kernel.errors`, `ensemble_kernel.results` and
`ensemble_kernel._atomic` (the layer test, tests/test_layers.py, says so). Reads logits
through the `LogitSource` protocol; where they come from is `storage`'s business.

- `_kernel`: log-softmax, standardising, the float64 twin `dense_kernel`;
- `_bounds`: the rounding bounds behind fast mode's exactness;
- `_plan`: tile and block sizes within a memory budget;
- `_precision`: the probe and `auto`'s choice;
- `_engine`: statistics, features, products, top-k, re-scoring;
- `_neighbors`: top-k lists, their merge, the votes;
- `_sources`: the LogitSource protocol and in-memory sources;
- `_distributed`: tiles shared over torchrun ranks;
- `_vector_math`: the oneMKL dispatch fix applied at import.
"""

from ._engine import Plan, Progress, ProgressCallback, compute_kernel, plan_memory, top_k_neighbors
from ._kernel import dense_kernel
from ._neighbors import Neighbors, knn_scores, predict_from_scores, weighted_scores
from ._precision import PrecisionChoice, choose_precision
from ._sources import ArraySource, ConcatSource, LogitSource, as_source

__all__ = ["top_k_neighbors", "compute_kernel", "dense_kernel", "plan_memory", "Plan",
           "Progress", "ProgressCallback", "Neighbors", "knn_scores", "weighted_scores",
           "predict_from_scores", "choose_precision", "PrecisionChoice", "LogitSource",
           "ArraySource", "ConcatSource", "as_source"]
