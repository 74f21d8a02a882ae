"""The statistics pass holds for any finite input: outlier runs, extreme scales, saturation.

The kernel depends on the logits only through per-(example, class) standardisation, so
scaling every logit by s (without log-softmax) must leave it unchanged, and so must moving
an outlier run from last to first. The float64 twin is the judge.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from ensemble_kernel.testing import dense_kernel
from ensemble_kernel.core._engine import _compute_kernel, _top_k_neighbors
from ensemble_kernel.errors import InputError, NonFiniteError

from conftest import assert_same_neighbors, make_ensemble

MiB = 1 << 20


def kernel_error(test, train, **options) -> float:
    got = _compute_kernel(test, train, memory_budget=256 * MiB, **options).double()
    twin = dense_kernel(test, train, log_softmax=options.get("log_softmax", True))
    return float((got - twin).abs().max())


@pytest.mark.parametrize("log_softmax", [True, False])
@pytest.mark.parametrize("where", [0, -1])
def test_an_outlier_run_first_or_last_gives_the_same_kernel(log_softmax, where):
    # The old accumulator shifted by the first run: an outlier there cost 3e-5.
    ens = make_ensemble(seed=2, n_models=300, n_train=60, n_test=20, n_classes=10)
    train, test = ens.train.clone(), ens.test.clone()
    train[where] *= 3000
    test[where] *= 3000
    assert kernel_error(test, train, log_softmax=log_softmax) < 1e-5


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30])
def test_the_kernel_does_not_depend_on_the_scale_of_the_logits(scale):
    # 1e20: squared deviations overflow float32; 1e-30: they underflow. Both used to be
    # taken for constant outputs, silently.
    ens = make_ensemble(seed=4, n_models=7, n_train=50, n_test=20)
    got = _compute_kernel(ens.test * scale, ens.train * scale, log_softmax=False,
                         memory_budget=64 * MiB).double()
    want = dense_kernel(ens.test, ens.train, log_softmax=False)
    assert float((got - want).abs().max()) < 1e-5


def test_constant_outputs_stay_exactly_constant():
    ens = make_ensemble(seed=5, n_models=9, n_train=40, n_test=10)
    train = ens.train.clone()
    train[:, 3, :] = torch.tensor([0.1, 1 / 3, 7.0, -2.2, 1e-3])  # every run the same
    with pytest.warns(RuntimeWarning, match="5 .example, class. outputs of the reference"):
        got = _compute_kernel(ens.test, train, log_softmax=False, memory_budget=64 * MiB)
    assert bool((got[:, 3] == 0).all())


def test_logits_at_float32s_limits_give_the_twins_kernel():
    # x - max overflows float32 here: the block is computed in float64, not refused.
    ens = make_ensemble(seed=6, n_models=5, n_train=30, n_test=10)
    train = ens.train.clone()
    train[2, 17, 1], train[2, 17, 3] = 3e38, -3e38
    assert kernel_error(ens.test, train) < 1e-5


@pytest.mark.parametrize("log_softmax", [True, False])
def test_logits_beyond_float32_name_run_example_and_class(log_softmax):
    ens = make_ensemble(seed=6, n_models=5, n_train=30, n_test=10)
    train = ens.train.double()
    train[2, 17, 3] = 1e300
    # Without log-softmax the conversion overflows; with it, the float64 block's spread.
    with pytest.raises(InputError, match=r"run \d.*example 17, class \d.*(does not fit|beyond) "
                                         r"float32.*rescale the logits"):
        _top_k_neighbors(ens.test.double(), train, 3, log_softmax=log_softmax,
                        memory_budget=64 * MiB)


@pytest.mark.parametrize("chunk", [1, 2, 7])
def test_a_spread_near_float32s_range_gives_the_twins_kernel(chunk):
    # Deviations beyond float32's range: computed in float64, whatever the blocks (it was
    # refused, or not, depending on how the plan cut the runs).
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 5, 4, generator=g).clamp(-3.3, 3.3) * 1e38
    got = _compute_kernel(x, x, log_softmax=False, chunk_models=chunk, memory_budget=64 * MiB)
    twin = dense_kernel(x, x, log_softmax=False)
    assert float((got.double() - twin).abs().max()) < 1e-5


@pytest.mark.parametrize("log_softmax", [True, False])
@pytest.mark.parametrize("offset,std", [(1000.0, 1e-3), (10.0, 1e-5), (-50.0, 2e-5),
                                        (1e6, 0.25), (1e20, 1e14)])
def test_outputs_far_from_zero_relative_to_their_spread(log_softmax, offset, std):
    # float32 cannot centre (or log-softmax) these to float32 accuracy: a float32 mean
    # alone is off by half an ulp of the offset, a large part of the std.
    g = torch.Generator().manual_seed(7)
    x = (offset + std * torch.randn(16, 6, 3, generator=g, dtype=torch.float64)).float()
    for chunk in (1, 5, None):
        got = _compute_kernel(x, x, log_softmax=log_softmax, chunk_models=chunk,
                             memory_budget=64 * MiB).double()
        twin = dense_kernel(x, x, log_softmax=log_softmax)
        assert float((got - twin).abs().max()) < 1e-5, chunk


def test_nan_is_still_named():
    ens = make_ensemble(seed=6, n_models=5, n_train=30, n_test=10)
    train = ens.train.clone()
    train[3, 8, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"run 3.*example 8, class 0 is nan"):
        _top_k_neighbors(ens.test, train, 3, memory_budget=64 * MiB)


@st.composite
def hard_ensembles(draw):
    """Logits with outlier runs, extreme scales, saturated softmax and constant entries."""
    seed = draw(st.integers(0, 10_000))
    n_models = draw(st.integers(3, 40))
    n_classes = draw(st.integers(2, 6))
    ens = make_ensemble(seed=seed, n_models=n_models, n_train=25, n_test=8,
                        n_classes=n_classes)
    train, test = ens.train.clone(), ens.test.clone()
    g = torch.Generator().manual_seed(seed)
    for _ in range(draw(st.integers(0, 3))):  # outlier runs, anywhere in the order
        run = draw(st.integers(0, n_models - 1))
        factor = draw(st.sampled_from([30.0, 3000.0, -500.0]))
        train[run] *= factor
        test[run] *= factor
    if draw(st.booleans()):  # saturated softmax: one class far ahead (float32 holds a gap of 60)
        gap = draw(st.sampled_from([20.0, 40.0, 60.0]))
        train[:, :, 0] += gap
        test[:, :, 0] += gap
    if draw(st.booleans()):  # constant entries
        train[:, 0, :] = torch.randn(n_classes, generator=g)
        test[:, 1, -1] = 2.5
    if draw(st.booleans()):  # outputs far from 0 relative to their spread across runs
        offset = draw(st.sampled_from([30.0, 1e3, 1e6]))
        squeeze = draw(st.sampled_from([1e-2, 1e-4]))
        train = offset + squeeze * train
        test = offset + squeeze * test
    log_softmax = draw(st.booleans())
    if not log_softmax:
        scale = draw(st.sampled_from([1.0, 1e-25, 1e25]))
        train, test = train * scale, test * scale
    return test, train, log_softmax, draw(st.sampled_from([None, 1, 2, 7]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hard_ensembles())
def test_kernel_matches_the_twin_on_hard_inputs(case):
    test, train, log_softmax, chunk = case
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant entries are expected here
        got = _compute_kernel(test, train, log_softmax=log_softmax, chunk_models=chunk,
                             memory_budget=64 * MiB).double()
    twin = dense_kernel(test, train, log_softmax=log_softmax)
    assert float((got - twin).abs().max()) < 2e-5


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_an_output_whose_runs_round_to_one_float32_value_is_checked_in_float64(precision):
    """Found by the option property test (test_fast_mode): two runs whose log-softmax
    outputs differ by less than one float32 ulp (1.2e-7 at -1.097) round to one value, so
    float32 saw a constant output and gave it 0, where the float64 twin standardises the
    difference to a whole feature (kernel values 0.5 apart). The example is now passed
    again in float64, as one float32 cannot standardise."""
    from ensemble_kernel.core._kernel import prepare

    ens = make_ensemble(seed=0, n_models=2, n_train=20, n_test=1, n_classes=3, noise=0.05)
    x = -60.0 + 1e-3 * ens.train
    one = prepare(x[:, 1:2], log_softmax=True, classes=(0,), runs_first=True)
    assert one[0, 0, 0] == one[1, 0, 0]  # the collapse this test is about
    assert torch.log_softmax(x[:, 1].double(), -1)[0, 0] != \
        torch.log_softmax(x[:, 1].double(), -1)[1, 0]
    kernel = dense_kernel(x, x, classes=[0])
    kernel.fill_diagonal_(float("-inf"))
    got = _top_k_neighbors(x, None, 1, exclude_self=True, classes=[0], precision=precision,
                           memory_budget=64 * MiB)
    assert_same_neighbors(got.indices, got.values, kernel, 1, atol=2e-5)


def test_outputs_constant_in_float64_too_stay_float32_and_constant():
    """The float64 check of a constant output costs nothing after: truly constant outputs
    (every run the same logits) keep their float32 statistics, and no example is marked
    for float64 features."""
    from ensemble_kernel.core._engine import _prepare_engine

    ens = make_ensemble(seed=5, n_models=9, n_train=40, n_test=10)
    train = ens.train.clone()
    train[:, 3, :] = torch.tensor([0.1, 1 / 3, 7.0, -2.2, 1e-3])  # every run the same
    with pytest.warns(RuntimeWarning, match="5 .example, class. outputs of the reference"):
        engine = _prepare_engine(ens.test, train, 3, log_softmax=True, classes=None,
                                 exclude_self=False, precision="exact", memory_budget=64 * MiB,
                                 device="cpu", chunk_models=None, tile_size=None,
                                 progress=None, k_keep=3)
    assert engine.stats_r.precise is None and bool((engine.stats_r.scale[3] == 0).all())


def test_a_sub_ulp_spread_in_one_class_gives_the_twins_kernel():
    """Classes 1 and 2 swap between runs; one logit of run 1 is one ulp up, so class 0's
    log-softmax moves by a fraction of a float32 ulp: one float32 value in every run."""
    ens = make_ensemble(seed=3, n_models=4, n_train=30, n_test=6, n_classes=3)
    train = ens.train.clone()
    train[:, 1] = torch.tensor([[0.0, 0.5, -0.7], [0.0, -0.7, 0.5]]).repeat(2, 1)
    train[1, 1, 1] = torch.nextafter(train[1, 1, 1], torch.tensor(9.0))
    test = ens.test.clone()
    test[:, 0] = train[:, 1]  # a query that matches it
    assert kernel_error(test, train) < 1e-5
