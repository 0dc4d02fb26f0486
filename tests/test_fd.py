"""The finite-difference fallback: schemes, colouring, laziness, parallelism and errors."""
import concurrent.futures
import warnings

import numpy as np
import pytest
import scipy.sparse
import torch
from torch.autograd import gradcheck

from bridges import ForeignError, NoisyGradientWarning, fd2pytorch
from bridges._fd import color_columns, noise_from_table
from bridges.problems.noisy import noisy_map, noisy_map_jacobian


def coupled(x):
    """R^n -> R^n with a dense-ish Jacobian; propagates complex numbers."""
    return np.sin(x) * np.roll(x, 1) + x ** 3 / 3 + np.exp(0.1 * x).sum()


def coupled_jacobian(x):
    n = x.size
    jac = np.diag(np.cos(x) * np.roll(x, 1) + x ** 2)
    jac[np.arange(n), np.arange(n) - 1] += np.sin(x)
    return jac + 0.1 * np.exp(0.1 * x)[None, :]


def tridiagonal(x):
    return -2 * x + np.r_[0, x[:-1]] + np.r_[x[1:], 0] + x ** 3


def tridiagonal_jacobian(x):
    n = x.size
    return np.diag(-2 + 3 * x ** 2) + np.eye(n, k=1) + np.eye(n, k=-1)


@pytest.mark.parametrize("scheme", ["central", "complex"])
def test_gradcheck_n50(scheme):
    f = fd2pytorch(coupled, scheme=scheme)
    x = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(1),
                    requires_grad=True)
    assert gradcheck(f, (x,), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scheme,tol", [("forward", 1e-6), ("central", 1e-9), ("complex", 1e-13)])
def test_jacobian_accuracy_against_analytic(scheme, tol):
    x = np.linspace(-1.5, 2.0, 20)
    jac = fd2pytorch(coupled, scheme=scheme).jacobian_at(x)
    expected = coupled_jacobian(x)
    assert np.abs(jac - expected).max() / np.abs(expected).max() < tol


def test_banded_sparsity_n1000_in_at_most_five_evaluations():
    n = 1000
    pattern = scipy.sparse.diags([1, 1, 1], [-1, 0, 1], shape=(n, n), dtype=bool)
    f = fd2pytorch(tridiagonal, scheme="forward", sparsity=pattern)
    x = torch.linspace(-1, 1, n, dtype=torch.float64, requires_grad=True)
    y = f(x)
    y.backward(torch.ones(n, dtype=torch.float64))
    assert f.evaluations <= 5 and len(f.groups) == 3
    jac = f.jacobian_at(x.detach().numpy()).toarray()
    expected = tridiagonal_jacobian(x.detach().numpy())
    assert np.abs(jac - expected).max() / np.abs(expected).max() <= 1e-6
    torch.testing.assert_close(x.grad, torch.from_numpy(expected.sum(0)), rtol=1e-6, atol=1e-6)


def test_central_cost_is_two_evaluations_per_group():
    n = 40
    pattern = scipy.sparse.diags([1, 1, 1], [-1, 0, 1], shape=(n, n), dtype=bool)
    f = fd2pytorch(tridiagonal, scheme="central", sparsity=pattern)
    f(torch.zeros(n, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert f.evaluations == 1 + 2 * 3 + 2  # (+ the first Jacobian's check of the pattern)
    f(torch.full((n,), 0.5, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert f.evaluations == 2 * (1 + 2 * 3) + 2


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_a_sparsity_pattern_missing_a_dependence_is_named(scheme):
    """out0 = x0 + x1 with a diagonal pattern: x0 and x1 share a colour, so out0's change was
    silently credited to x0 alone (gradient [3, 1] for [1, 2]); x2 -> out2 is left out
    outright. Both are caught, and a correct pattern passes."""
    x = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64, requires_grad=True)
    mixed = fd2pytorch(lambda v: np.array([v[0] + v[1], v[1], 3.0]), scheme=scheme,
                       sparsity=np.diag([True, True, False]), name="mixed")
    with pytest.raises(ForeignError, match=r"mixed: output 0 changed along a random mix of all "
                                           r"inputs.*leaves out a dependence"):
        mixed(x).sum().backward()
    dropped = fd2pytorch(lambda v: np.array([v[0], v[1], v[2] ** 2]), scheme=scheme,
                         sparsity=np.diag([True, True, False]), name="dropped")
    with pytest.raises(ForeignError, match=r"dropped: output 2 changed when inputs \[0, 1, 2\] "
                                           r"were perturbed"):
        dropped(x).sum().backward()
    right = fd2pytorch(lambda v: np.array([v[0] + v[1], v[1], v[2] ** 2]), scheme=scheme,
                       sparsity=np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]], bool))
    right(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64),
                               rtol=1e-6, atol=0)


def test_coloring_groups_share_no_row():
    rng = np.random.default_rng(0)
    pattern = rng.random((30, 25)) < 0.1
    groups = color_columns(pattern)
    assert sorted(np.concatenate(groups).tolist()) == list(range(25))
    for cols in groups:
        assert (pattern[:, cols].sum(axis=1) <= 1).all()


def test_jacobian_is_lazy_and_reused_for_every_vjp():
    f = fd2pytorch(coupled, scheme="forward")
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    y = f(x)
    assert f.evaluations == 1  # forward only: no Jacobian yet
    y.sum().backward(retain_graph=True)
    assert f.evaluations == 1 + 6
    (y ** 2).sum().backward()
    assert f.evaluations == 1 + 6
    expected = coupled_jacobian(x.detach().numpy()).T @ (1 + 2 * y.detach().numpy())
    np.testing.assert_allclose(x.grad.numpy(), expected, atol=1e-6 * np.abs(expected).max())


def test_jacrev_builds_one_jacobian():
    f = fd2pytorch(coupled, scheme="central")
    x = torch.linspace(-1, 1, 8, dtype=torch.float64)
    jac = torch.func.jacrev(f)(x)
    np.testing.assert_allclose(jac.numpy(), coupled_jacobian(x.numpy()), rtol=1e-8, atol=1e-8)
    assert f.evaluations == 1 + 2 * 8


@pytest.mark.parametrize("scheme,extra", [("forward", 1), ("central", 2), ("complex", 1)])
def test_jvp_costs_one_or_two_evaluations(scheme, extra):
    f = fd2pytorch(coupled, scheme=scheme)
    x = torch.linspace(-1, 1, 10, dtype=torch.float64)
    v = torch.linspace(0.5, -0.3, 10, dtype=torch.float64)
    _, tangent = torch.func.jvp(f, (x,), (v,))
    assert f.evaluations == 1 + extra
    expected = coupled_jacobian(x.numpy()) @ v.numpy()
    np.testing.assert_allclose(tangent.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("workers", [2, "executor"])
def test_parallel_evaluation_gives_the_same_jacobian(workers):
    x = np.linspace(-1, 1, 12)
    serial = fd2pytorch(coupled).jacobian_at(x)
    if workers == "executor":
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            parallel = fd2pytorch(coupled, workers=pool).jacobian_at(x)
    else:
        parallel = fd2pytorch(coupled, workers=workers).jacobian_at(x)
    np.testing.assert_array_equal(parallel, serial)


def test_input_of_any_shape_and_float32():
    f = fd2pytorch(lambda x: np.array([x.sum(), (x ** 2).sum()]))
    x = torch.ones(2, 3, dtype=torch.float32, requires_grad=True)
    y = f(x)
    assert y.dtype == torch.float32 and y.shape == (2,)
    y[1].backward()
    assert x.grad.shape == (2, 3)
    torch.testing.assert_close(x.grad, torch.full((2, 3), 2.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("workers", [None, 2])
def test_a_black_box_reusing_its_buffers_or_changing_its_input_gets_its_own_copies(workers):
    """A black box that returns one output buffer for every call (as f2py and ctypes wrappers
    often do) gave zero derivatives; one that works in place on its argument changed the
    caller's tensor and differentiated at the changed point."""
    buffer = np.zeros(3)

    def reused(x):
        buffer[:] = 2 * np.sin(x)
        return buffer

    def in_place(x):
        x *= 2.0
        return x ** 2
    x = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    y = fd2pytorch(reused, workers=workers)(x)
    value = y.detach().clone()
    y.sum().backward()
    torch.testing.assert_close(x.grad, 2 * torch.cos(x.detach()), rtol=1e-6, atol=0)
    assert torch.equal(y.detach(), value)
    x = torch.tensor([1.0, 3.0], dtype=torch.float64, requires_grad=True)
    fd2pytorch(in_place, workers=workers)(x).sum().backward()
    assert torch.equal(x.detach(), torch.tensor([1.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(x.grad, 8 * x.detach(), rtol=1e-6, atol=0)


def test_a_complex_input_is_refused_by_name():
    with pytest.raises(TypeError, match=r"box: the input is complex \(torch.complex128\)"):
        fd2pytorch(lambda x: x ** 2, name="box")(torch.ones(2, dtype=torch.complex128))


def test_nan_from_a_perturbation_names_it():
    def log_sum(x):
        return np.array([np.log(x[0] - 1.0) if x[0] >= 1.0 else np.nan, x[1]])
    f = fd2pytorch(log_sum, scheme="central", name="log_sum")
    x = torch.tensor([1.0, 3.0], dtype=torch.float64, requires_grad=True)
    with pytest.raises(ForeignError, match=r"log_sum: the black box returned nan \(output index 0.*"
                                           r"at x - h for columns \[0\] \(central scheme\)"):
        f(x + torch.tensor([1e-9, 0.0], dtype=torch.float64)).sum().backward()


def test_a_black_box_raising_outside_its_domain_is_treated_like_one_returning_nan():
    """Defined for x[0] <= 1 only: a noise probe beyond it (returning nan there fell back to
    fixed steps) no longer aborts backward; a difference beyond it names where it was."""
    def table(x):
        if x[0] > 1.0:
            raise ValueError("outside the table")
        return x ** 2
    x = torch.tensor([0.999, 2.0], dtype=torch.float64, requires_grad=True)
    fd2pytorch(table)(x).sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.detach(), rtol=1e-8, atol=0)
    coarse = fd2pytorch(table, noise=None, rel_step=0.1, name="table")
    with pytest.raises(ForeignError, match=r"table: the black box, at x \+ h for columns \[0\] "
                                           r"\(central scheme\), raised ValueError: outside"):
        coarse(x.detach().requires_grad_()).sum().backward()


def test_nan_at_the_unperturbed_input():
    f = fd2pytorch(lambda x: x * np.nan, name="nan_box")
    with pytest.raises(ForeignError, match="nan_box.*at the unperturbed input"):
        f(torch.ones(2, dtype=torch.float64))


def test_complex_scheme_needs_complex_propagation():
    f = fd2pytorch(lambda x: np.abs(x) ** 2, scheme="complex", name="absbox")
    with pytest.raises(ForeignError, match="absbox.*use scheme='central'"):
        f(torch.ones(2, dtype=torch.float64, requires_grad=True)).sum().backward()


def test_a_black_box_returning_no_numbers_is_named():
    f = fd2pytorch(lambda x: np.array(["hello"]), name="words")
    with pytest.raises(ForeignError, match=r"words: the black box must return numbers, got an "
                                        r"array of dtype <U5 at the unperturbed input"):
        f(torch.ones(1, dtype=torch.float64))
    ragged = fd2pytorch(lambda x: [[1.0, 2.0], [3.0]], name="ragged")
    with pytest.raises(ForeignError, match=r"ragged: the black box must return an array of "
                                           r"numbers, got a list numpy cannot read as one"):
        ragged(torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"words: the input is empty \(shape \(0,\)\)"):
        f(torch.ones(0, dtype=torch.float64))
    nothing = fd2pytorch(lambda x: np.array([]), name="nothing")  # (an empty output passed)
    with pytest.raises(ForeignError, match=r"nothing: the black box returned no numbers at the "
                                           r"unperturbed input"):
        nothing(torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("rel_step", [None, 1e-6])  # (with and without measuring the noise)
def test_an_output_whose_length_changes_between_runs_is_named(rel_step):
    """A program that prints one line more at some inputs: named, with both lengths."""
    def flaky(x):
        return np.arange(3.0 if x[0] < 1.0 else 4.0) * x.sum()
    f = fd2pytorch(flaky, name="flaky", rel_step=rel_step)
    x = torch.tensor([1.0 - 1e-12, 2.0], dtype=torch.float64, requires_grad=True)
    with pytest.raises(ForeignError, match=r"flaky: the black box returned 4 numbers at x .*, "
                                           r"but 3 at .*must have the same length"):
        f(x).sum().backward()


def test_invalid_arguments():
    with pytest.raises(ValueError, match="unknown scheme 'spline'; valid schemes: forward, "
                                         "central, complex"):
        fd2pytorch(coupled, scheme="spline")
    with pytest.raises(TypeError, match="workers must be None, a positive int or an executor"):
        fd2pytorch(coupled, workers=0)
    with pytest.raises(TypeError, match="func must be callable"):
        fd2pytorch(3)
    with pytest.raises(ValueError, match="rel_step must be positive"):
        fd2pytorch(coupled, rel_step=-1)
    f = fd2pytorch(coupled, sparsity=np.eye(3, dtype=bool), name="sized")
    with pytest.raises(ValueError, match=r"sized: sparsity has 3 columns but the input has 4"):
        f(torch.ones(4, dtype=torch.float64))
    f = fd2pytorch(lambda x: x[:2], sparsity=np.eye(3, dtype=bool), name="rows")
    with pytest.raises(ForeignError, match=r"rows: sparsity has shape \(3, 3\).*R\^3 to R\^2"):
        f(torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="expected a tensor input"):
        f(np.ones(3))


# -- noise-aware steps ---------------------------------------------------------------------------
def test_noise_from_table_recovers_pure_noise():
    rng = np.random.default_rng(3)
    table = 1e-3 * np.linspace(0, 1, 7)[:, None] + 2e-6 * rng.standard_normal((7, 400))
    level, found = noise_from_table(table)
    assert found.mean() > 0.9
    assert 1e-6 < np.median(level) < 4e-6  # the true 2e-6, within a factor 2


@pytest.mark.parametrize("sigma", [1e-9, 1e-6])
def test_noise_estimate_recovers_the_added_noise(sigma):
    f = fd2pytorch(noisy_map(sigma))
    estimate = f.estimate_noise(np.array([0.7, 1.3]))
    assert estimate.found.all()
    assert (sigma / 3 < estimate.level).all() and (estimate.level < 3 * sigma).all()
    assert estimate.evaluations == f.noise_evaluations > 0


@pytest.mark.parametrize("scheme", ["central", "forward"])
def test_noise_aware_steps_beat_the_rounding_step_and_estimate_their_error(scheme):
    x = np.array([0.7, 1.3])
    expected = noisy_map_jacobian(x)
    fixed = fd2pytorch(noisy_map(1e-6), scheme=scheme, noise=None).jacobian_at(x)
    f = fd2pytorch(noisy_map(1e-6), scheme=scheme)
    jac = f.jacobian_at(x)
    error = np.abs(jac - expected).max()
    assert error < np.abs(fixed - expected).max() / 10
    assert error < (2e-4 if scheme == "central" else 5e-3)
    # the error estimate bounds the actual error, and not by orders of magnitude
    assert np.all(np.abs(jac - expected) <= 3 * f.jacobian_error)
    assert f.jacobian_error.max() < 30 * error


def test_gradient_error_is_attached_and_large_noise_warns_once():
    f = fd2pytorch(noisy_map(1e-2), name="very_noisy")
    x = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    with pytest.warns(NoisyGradientWarning, match=r"very_noisy: the finite-difference derivative "
                                                  r"with respect to input \d is uncertain: "
                                                  r"estimated error .* \(\d+\.\d%\)"):
        f(x).sum().backward()
    assert f.gradient_error.shape == x.shape and (f.gradient_error > 0).all()
    expected = noisy_map_jacobian(x.detach().numpy()).sum(0)
    assert np.all(np.abs(x.grad.numpy() - expected) <= 3 * f.gradient_error.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f(x.detach().requires_grad_()).sum().backward()  # same estimate: no second warning
        # an input the outputs ignore: its derivative is 0, uncertain only by rounding (it
        # warned of an "inf%" error)
        exact = fd2pytorch(lambda v: np.array([v[0] ** 2 + 1.0, np.sin(v[0])]), name="exact")
        x = torch.tensor([0.7, 3.0], dtype=torch.float64, requires_grad=True)
        exact(x).sum().backward()
        assert x.grad[1] == 0.0


def test_estimate_is_reused_renewed_when_far_and_never_reruns_an_input():
    calls = []
    f = fd2pytorch(noisy_map(1e-6, calls))
    x = np.array([0.7, 1.3])
    f.jacobian_at(x)
    first = f.noise_evaluations
    assert len(calls) == len(set(calls)) == f.evaluations + first
    f.jacobian_at(x * 1.2)  # nearby: the same estimate and steps
    assert f.noise_evaluations == first and f.evaluations == 1 + 4 + 1 + 4
    f.jacobian_at(x * 3)  # moved by more than its own size: measured again
    assert f.noise_evaluations == 2 * first
    f.estimate_noise(x * 3)
    assert f.noise_evaluations == 3 * first
    # measured at 0, where x sin(x) and x^3 vanish with their noise and curvature: the steps
    # from there (0.11 and 2e-14) were kept within distance 1, for errors of 0.5 % and 2e-4
    for func, derivative in ((lambda v: np.sin(v) * v, lambda v: np.sin(v) + v * np.cos(v)),
                             (lambda v: v ** 3, lambda v: 3 * v ** 2)):
        g = fd2pytorch(func)
        with warnings.catch_warnings():  # (at 0 the derivatives are 0, known only to rounding)
            warnings.simplefilter("ignore", NoisyGradientWarning)
            g.jacobian_at(np.zeros(2))
        v = np.array([0.4534, 0.3222])
        np.testing.assert_allclose(np.diag(g.jacobian_at(v)), derivative(v), rtol=1e-8)
    # an input shrinking toward 0 (2 -> 1e-4) kept the steps from 2: 3.6 % off, with the old
    # error estimate
    for scheme in ("central", "forward"):
        g = fd2pytorch(lambda v: np.log(v) + 1 / v, scheme=scheme)
        for v in (2.0, 1e-4):
            jac = g.jacobian_at(np.array([v]))
            exact = 1 / v - 1 / v ** 2
            assert abs(jac[0, 0] - exact) <= max(3 * g.jacobian_error[0, 0], 1e-6 * abs(exact))
            assert abs(jac[0, 0] - exact) < 1e-6 * abs(exact)


def test_output_printed_with_few_digits_is_not_taken_for_smooth_where_it_is_zero():
    """Outputs rounded to 4 decimals, linear and exactly 0 at x (a symmetric airfoil's CL at
    alpha 0): the noise table was constant at spacing 1e-6 and an exact staircase at 1e-4,
    read as smooth with no noise, and steps of 7e-7 gave dCL/dalpha = 0 for 0.12, silently."""
    def printed(v):
        return np.round([13.0 * v[0] + 0.12 * v[3], -2.8 * v[0] - 0.0015 * v[3]], 4)
    f = fd2pytorch(printed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoisyGradientWarning)  # (the zero columns' uncertainty)
        jac = f.jacobian_at(np.array([0.0, 0.4, 0.12, 0.0]))
    exact = np.array([[13.0, 0, 0, 0.12], [-2.8, 0, 0, -0.0015]])
    assert np.all(np.abs(jac - exact) <= 3 * f.jacobian_error)
    np.testing.assert_allclose(jac[0, [0, 3]], exact[0, [0, 3]], rtol=0.01)  # (CM's 0.0015
    # moves the printed value by about one digit over the step: within its error estimate)


@pytest.mark.parametrize("scheme", ["central", "forward"])
def test_a_smooth_ripple_is_not_taken_for_noise(scheme):
    """sin(w x)/w + x^2: the noise table's coarser spacings aliased the ripple into "noise"
    (steps of 0.1 |x|, gradients 20-50 % off with a small error estimate), and curvature probes
    spaced over many periods read it as nearly flat. Over random frequencies up to 1e5 and
    points: the gradient is right and its error estimate bounds the error."""
    rng = np.random.default_rng(3)
    for w, x0 in zip(10 ** rng.uniform(0, 5, 40), rng.uniform(-3, 3, 40)):
        f = fd2pytorch(lambda v, w=w: np.sin(w * v) / w + v ** 2, scheme=scheme)
        jac = f.jacobian_at(np.array([x0]))[0, 0]
        exact = np.cos(w * x0) + 2 * x0
        assert abs(jac - exact) < (1e-6 if scheme == "central" else 1e-4) * max(1.0, abs(exact))
        assert abs(jac - exact) <= 3 * f.jacobian_error[0, 0] + 1e-12, (w, x0)


def test_rel_step_wins_and_given_noise_skips_the_measurement():
    f = fd2pytorch(noisy_map(1e-6), rel_step=1e-3)
    f.jacobian_at(np.array([0.7, 1.3]))
    assert f.noise is None and f.noise_evaluations == 0 and f.jacobian_error is None
    g = fd2pytorch(noisy_map(1e-6), noise=1e-6)
    jac = g.jacobian_at(np.array([0.7, 1.3]))
    assert g.noise_evaluations == 4 * 2  # curvature probes only: x +- b, x +- 2b per column
    np.testing.assert_allclose(jac, noisy_map_jacobian(np.array([0.7, 1.3])), atol=2e-4)
    with pytest.raises(ValueError, match="noise must be 'auto', None"):
        fd2pytorch(coupled, noise="high")
    with pytest.raises(ValueError, match="noise levels must be finite and >= 0"):
        fd2pytorch(coupled, noise=-1.0)
    with pytest.raises(ValueError, match="noise has 2 levels but the black box has 3 outputs"):
        fd2pytorch(noisy_map(1e-6), noise=[1e-6, 1e-6]).jacobian_at(np.array([0.7, 1.3]))
