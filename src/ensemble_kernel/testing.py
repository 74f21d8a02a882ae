"""For users' own tests: the plain float64 twin of the kernel, and the comparison that
says two lists of neighbours are the same (docs/architecture.md §1).

>>> import torch
>>> from ensemble_kernel import top_k_neighbors
>>> from ensemble_kernel.testing import assert_same_neighbors, dense_kernel
>>> g = torch.Generator().manual_seed(0)
>>> train, test = torch.randn(4, 30, 3, generator=g), torch.randn(4, 6, 3, generator=g)
>>> found = top_k_neighbors(train, test, 5)
>>> assert_same_neighbors(found.indices, found.values, dense_kernel(test, train), 5)
"""

from __future__ import annotations

import torch

from .core._kernel import dense_kernel

__all__ = ["dense_kernel", "assert_same_neighbors"]


def assert_same_neighbors(indices, values, kernel, k: int, rtol: float = 1e-5,
                          atol: float = 1e-6) -> None:
    """Assert that `indices` and `values` are the top-k of `kernel`, as the contract means
    it: the same indices, except where kernel values agree within float32 rounding.

    Parameters
    ----------
    indices : Tensor or array of shape (n_queries, k), the neighbours found.
    values : Tensor or array of shape (n_queries, k), their kernel values.
    kernel : Tensor of shape (n_queries, n_references), the exact (float64) kernel, e.g.
        `dense_kernel`; masked entries (leave-one-out) are -inf.
    k : the number of neighbours.

    Raises
    ------
    AssertionError where a value is not its index's kernel value, a neighbour is not
    among the k largest (beyond `rtol` and `atol`), or the order rule is broken (larger
    first; exactly equal values, smaller index first).
    """
    indices, values = torch.as_tensor(indices), torch.as_tensor(values)
    kernel = torch.as_tensor(kernel, dtype=torch.float64)
    want = kernel.topk(k, dim=1)
    assert indices.shape == (kernel.shape[0], k), (tuple(indices.shape), k)
    got = kernel.gather(1, indices)
    # The values reported are the kernel values of the indices reported ...
    torch.testing.assert_close(values.double(), got, rtol=rtol, atol=atol)
    # ... and they are the k largest, up to float32 rounding.
    torch.testing.assert_close(got, want.values, rtol=rtol, atol=atol)
    # Order rule: descending; exactly equal kernel values in ascending index order.
    assert bool((values[:, :-1] >= values[:, 1:]).all()), "not in descending order"
    equal = values[:, :-1] == values[:, 1:]
    assert bool((indices[:, :-1][equal] < indices[:, 1:][equal]).all()), \
        "equal values not in ascending index order"
