import pytest
import torch

from ensemble_kernel.errors import InputError
from ensemble_kernel.core._neighbors import (Neighbors, empty_topk, knn_scores, merge_topk,
                                       predict_from_scores, topk_block, weighted_scores)


def test_topk_block_breaks_exact_ties_by_smaller_index():
    block = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1, 0.5]])
    got = topk_block(block, 3, offset=10)
    assert got.indices.tolist() == [[11, 10, 12]]
    assert got.values.tolist() == [[pytest.approx(0.9), 0.5, 0.5]]


def test_merge_keeps_the_best_k_under_the_order_rule():
    a = Neighbors(torch.tensor([[4, 7]]), torch.tensor([[0.8, 0.3]]))
    b = Neighbors(torch.tensor([[2, 9]]), torch.tensor([[0.3, 0.2]]))
    got = merge_topk(merge_topk(empty_topk(1, 3), a, 3), b, 3)
    assert got.indices.tolist() == [[4, 2, 7]]


def test_majority_vote_tie_goes_to_the_smallest_label():
    labels = torch.tensor([3, 1, 3, 1, 2])
    found = Neighbors(torch.tensor([[0, 1, 4], [0, 1, 2]]), torch.ones(2, 3))
    scores = knn_scores(found, labels, 4)
    prediction, margin = predict_from_scores(scores)
    assert prediction.tolist() == [1, 3]  # row 0: 3,1,2 all once -> 1; row 1: 3 twice
    assert margin.tolist() == pytest.approx([0.0, 1 / 3])


def test_weighted_vote_by_hand():
    labels = torch.tensor([0, 1, 1])
    found = Neighbors(torch.tensor([[0, 1, 2]]), torch.tensor([[0.9, 0.6, 0.6]]))
    scores = weighted_scores(found, labels, 2, power=4)
    assert scores.tolist()[0] == pytest.approx([0.9**4 / 3, 2 * 0.6**4 / 3])
    assert predict_from_scores(scores)[0].tolist() == [0]  # 0.656 > 0.259
    assert predict_from_scores(weighted_scores(found, labels, 2, power=1))[0].tolist() == [1]
    with pytest.raises(InputError, match="power must be a positive integer, got 0"):
        weighted_scores(found, labels, 2, power=0)


def _by_rule(block: torch.Tensor, k: int, offset: int) -> tuple[list, list]:
    """The plain twin of the order rule: sort each row's (value, index) pairs in Python."""
    indices, values = [], []
    for row in block.tolist():
        best = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
        indices.append([j + offset for j in best])
        values.append([row[j] for j in best])
    return indices, values


@pytest.mark.parametrize("k", [1, 2, 7, 19, 20])
def test_topk_block_follows_the_order_rule_on_heavily_tied_blocks(k):
    # Few runs give kernel values on a few levels: most rows tie at the k-th place. Mix in
    # rows tied everywhere, rows with no tie, -inf (self, left out), and -0.0 beside 0.0;
    # more rows than one repair chunk.
    g = torch.Generator().manual_seed(k)
    levels = torch.tensor([-0.5, -0.0, 0.0, 0.05, 0.1, 0.25, 0.25 + 2**-24, float("-inf")])
    block = levels[torch.randint(len(levels), (150, 21), generator=g)]
    block[0] = 0.1  # every value tied
    block[1] = torch.arange(21, dtype=torch.float32)  # no tie at all
    block[2, :] = float("-inf")
    block[2, 5] = 0.0
    got = topk_block(block, k, offset=1000, row_chunk=16)
    want_indices, want_values = _by_rule(block, k, 1000)
    assert got.indices.tolist() == want_indices
    assert got.values.tolist() == want_values
    # bit for bit: the sign of a zero kept as well
    assert torch.equal(torch.signbit(got.values),
                       torch.signbit(torch.tensor(want_values, dtype=torch.float32)))
