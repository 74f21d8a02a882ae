import math

import numpy as np
import pytest
import torch

from ensemble_kernel.testing import dense_kernel
from ensemble_kernel.core._engine import _compute_kernel
from ensemble_kernel.errors import InputError, NonFiniteError
from ensemble_kernel.core._kernel import exact_float32_matmul

from conftest import make_ensemble


def test_hand_computed_three_examples():
    # Two runs, two classes, log-softmax off. With two runs each standardised output is
    # +-1/sqrt(2) (unbiased std), so K is easy to write down by hand.
    a = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]],
                      [[3.0, 0.0], [0.0, 0.0], [5.0, 1.0]]])  # (2 runs, 3 examples, 2 classes)
    with pytest.warns(RuntimeWarning, match="3 \\(example, class\\) outputs"):
        kernel = _compute_kernel(a, a, log_softmax=False, memory_budget=1 << 26)
    # z for each example/class over the two runs: sign pattern / sqrt(2); a constant
    # output (example 0 class 1, example 2 class 0) is 0.
    s = 1 / math.sqrt(2)
    z = torch.tensor([[[-s, 0.0], [0.0, s], [0.0, s]],
                      [[s, 0.0], [0.0, -s], [0.0, -s]]])
    expected = torch.einsum("mac,mbc->ab", z, z) / 4
    assert expected[0, 0] == pytest.approx(0.25)  # one live class of two, (n-1)/n = 1/2
    assert expected[1, 2] == pytest.approx(0.25)
    assert expected[0, 1] == 0
    torch.testing.assert_close(kernel, expected.float())


def test_self_kernel_diagonal_is_n_minus_one_over_n():
    ens = make_ensemble(n_models=5)
    kernel = _compute_kernel(ens.train, ens.train, memory_budget=1 << 26)
    torch.testing.assert_close(kernel.diagonal(), torch.full((120,), 4 / 5), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernel, kernel.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_engine_kernel_matches_dense_for_every_dtype(dtype):
    ens = make_ensemble(n_models=4, n_classes=3)
    a, b = ens.test.to(dtype), ens.train.to(dtype)
    got = _compute_kernel(a, b, memory_budget=1 << 26, chunk_models=3)
    torch.testing.assert_close(got.double(), dense_kernel(a, b), rtol=1e-5, atol=2e-6)


def test_numpy_input_and_options():
    ens = make_ensemble(n_models=3, n_classes=4)
    a, b = ens.test.numpy(), ens.train.numpy()
    for options in ({"log_softmax": False}, {"classes": [1, 3]}, {"classes": [2]}):
        got = _compute_kernel(a, b, memory_budget=1 << 26, **options)
        want = dense_kernel(torch.from_numpy(a), torch.from_numpy(b), **options)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-6)


def test_per_class_kernels_sum_to_the_kernel():
    ens = make_ensemble(n_models=4, n_classes=3)
    whole = _compute_kernel(ens.test, ens.train, memory_budget=1 << 26)
    parts = sum(_compute_kernel(ens.test, ens.train, classes=[c], memory_budget=1 << 26)
                for c in range(3)) / 3
    torch.testing.assert_close(whole, parts, rtol=1e-4, atol=1e-5)


def test_zero_variance_contributes_zero_with_a_warning():
    ens = make_ensemble(n_models=4, n_classes=3)
    a = ens.test.clone()
    a[:, 5, :] = torch.tensor([1.0, 2.0, 3.0])  # example 5: identical in every run
    with pytest.warns(RuntimeWarning, match=r"3 \(example, class\) outputs of the query split"):
        got = _compute_kernel(a, ens.train, memory_budget=1 << 26)
    assert bool(torch.isfinite(got).all())
    assert bool((got[5] == 0).all())
    torch.testing.assert_close(got.double(), dense_kernel(a, ens.train), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_names_run_and_example(bad):
    ens = make_ensemble(n_models=4)
    b = ens.train.clone()
    b[2, 17, 1] = bad
    with pytest.raises(NonFiniteError, match=r"run 2 .*example 17, class 1 is"):
        _compute_kernel(ens.test, b, memory_budget=1 << 26, chunk_models=3)


def test_shape_errors():
    ens = make_ensemble(n_models=4, n_classes=3)
    with pytest.raises(InputError, match="the query split has 3 runs but the reference split has 4"):
        _compute_kernel(ens.test[:3], ens.train)
    with pytest.raises(InputError, match="at least 2 runs"):
        _compute_kernel(ens.test[:1], ens.train[:1])
    with pytest.raises(InputError, match="has 2 classes but the reference split has 3"):
        _compute_kernel(ens.test[..., :2], ens.train)
    with pytest.raises(InputError, match="must have shape"):
        _compute_kernel(ens.test[0, 0], ens.train)
    with pytest.raises(InputError, match="floating-point"):
        _compute_kernel(np.zeros((2, 3, 4), dtype=np.int32), ens.train)
    with pytest.raises(InputError, match=r"classes must lie in 0..2, got \[5\]"):
        _compute_kernel(ens.test, ens.train, classes=[5])


def test_precision_setting_is_restored():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with exact_float32_matmul("cpu"):
            pass
        assert torch.get_float32_matmul_precision() == "high"
        ens = make_ensemble()
        _compute_kernel(ens.test, ens.train, memory_budget=1 << 26)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_exact_mode_product_is_float32_accurate():
    # Even when the caller asked for 'medium' (bfloat16 products on CPUs with AMX), the
    # products exact mode runs (mm, addmm_, bmm) keep float32 accuracy inside the context.
    g = torch.Generator().manual_seed(1)
    a = torch.randn(64, 2048, generator=g, dtype=torch.float64)
    b = torch.randn(96, 2048, generator=g, dtype=torch.float64)
    want = a @ b.T
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        with exact_float32_matmul("cpu"):
            mm = (a.float() @ b.float().T).double()
            addmm = torch.zeros(64, 96).addmm_(a.float(), b.float().T).double()
            bmm = torch.bmm(b.float()[None].expand(64, 96, 2048), a.float()[:, :, None])
    finally:
        torch.set_float32_matmul_precision(before)
    for got in (mm, addmm, bmm.squeeze(2).double()):
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5

def test_the_plain_twin_takes_outputs_an_ulp_apart():
    # float64 outputs around 1 that differ by about an ulp: torch's batched std returned 0
    # for some of them and the twin NaN. Now finite and standardised: each example's
    # kernel value with itself is (runs - 1) / runs times its share of varying outputs.
    # (The engine takes logits at float32 precision, where these are all 1: not compared.)
    g = torch.Generator().manual_seed(3)
    x = 1 + 1e-16 * torch.randn(3, 16, 5, generator=g, dtype=torch.float64)
    varying = ~(x == x[:1]).all(0)
    assert bool((x.std(0) == 0).logical_and(varying).any())  # the case
    twin = dense_kernel(x, x, log_softmax=False)
    assert bool(torch.isfinite(twin).all())
    expected = (2 / 3) * varying.double().mean(dim=1)
    assert torch.allclose(twin.diagonal(), expected, rtol=1e-9)


def _adversarial_logit_rows() -> torch.Tensor:
    """Rows meant to break the log-softmax: tied maxima (two, all ten), confident rows (a
    margin of 60 and of 90, where float32's 1 + s loses s), huge offsets, a maximum an ulp
    above its neighbour, and random rows between them."""
    g = torch.Generator().manual_seed(5)
    rows = [[3.0, 3.0] + [1.0] * 8, [7.0] * 10, [0.0] * 9 + [90.0], [60.0] + [0.0] * 9,
            [1e6 + 2, 1e6, 1e6 + 2] + [1e6 + 1] * 7, [-1e4] * 5 + [-1e4 + 3] * 5,
            [1.0, math.nextafter(1.0, 2.0)] + [-5.0] * 8]
    rows += (torch.randn(40, 10, generator=g) * torch.logspace(-3, 2, 40)[:, None]).tolist()
    rows += torch.randint(-2, 3, (40, 10), generator=g).float().tolist()  # many ties
    return torch.tensor(rows, dtype=torch.float32)


def test_log_softmax_is_accurate_against_float64_with_ties_and_confident_rows():
    from ensemble_kernel.core._kernel import _log_softmax_

    x = _adversarial_logit_rows()
    got = x.clone()
    mass = _log_softmax_(got)
    # float64 twin written independently: fsum of every class but one maximum, log1p.
    for row, out, m in zip(x.double().tolist(), got.double(), mass.double()):
        top = max(row)
        rest = [math.exp(v - top) for v in row]
        rest.remove(1.0)  # one maximum (exp(0) == 1 exactly) left out
        s = math.fsum(rest)
        want = torch.tensor([v - top - math.log1p(s) for v in row], dtype=torch.float64)
        u = 2.0**-24
        # x - max rounds once (u|y|), the mass's float32 sum and exp at most ~11u relative,
        # log1p then contributes at most that times s / (1 + s), and the last subtraction u.
        tol = (2 * u * (want.abs() + math.log1p(s)) + 12 * u * s / (1 + s)
               + 1e-45)
        assert ((out - want).abs() <= tol).all(), (row, out, want)
        assert abs(float(m) - s) <= 12 * u * s + 1e-45


def test_log_softmax_of_a_row_does_not_depend_on_its_block():
    """Every row gets the same float32 bits however it is batched (the statistics pass and
    the feature pass read an example in blocks of different shapes)."""
    from ensemble_kernel.core._kernel import _log_softmax_

    x = _adversarial_logit_rows()
    whole = x.clone()
    _log_softmax_(whole)
    for rows in (slice(0, 1), slice(3, 9), slice(0, 47), slice(50, None)):
        part = x[rows].clone()
        _log_softmax_(part)
        assert torch.equal(part, whole[rows])
    # runs-first blocks, (runs, examples, classes), as the statistics pass holds them
    stacked = x[:87].reshape(3, 29, 10).clone()
    _log_softmax_(stacked)
    assert torch.equal(stacked.reshape(-1, 10), whole[:stacked.numel() // 10])
