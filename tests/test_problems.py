"""bridges.problems: the registry is self-consistent and its references are right, independently
of bridges' solvers (torch against numpy, analytic against automatic derivatives, scipy Radau
against the IVP test set's published values, sensitivities against central differences)."""
import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from bridges.problems import ProblemRHS, names, problem, rober_training

ODES = ["rober", "rober_1e5", "hires", "vdpol", "orego", "pollu"]
SMALL = {"bruss2d": {"n": 5}}  # small grids keep the dense comparisons cheap


def _problem(name):
    return problem(name, **SMALL.get(name, {}))


def _states(p, count=4, seed=0):
    """Random states around the solution's magnitude (per component), positive like it."""
    rng = np.random.default_rng(seed)
    scale = np.maximum(np.abs(p.y0), np.abs(p.reference(p.t[:3])).max(axis=0)).ravel()
    scale = np.where(scale > 0, scale, 1e-3)
    return [scale * rng.uniform(0.5, 1.5, scale.size) for _ in range(count)]


def _torch_f(func, y_flat, shape, t=0.5):
    return func(torch.tensor(t, dtype=torch.float64), y_flat.reshape(shape)).reshape(-1)


def test_registry_has_the_test_set_problems_and_names_the_valid_ones():
    assert set(ODES + ["bruss2d"]) <= set(names())
    with pytest.raises(ValueError, match="unknown problem 'nope'.*rober.*hires.*bruss2d"):
        problem("nope")
    with pytest.raises(TypeError, match="problem\\('hires'\\).*builder takes"):
        problem("hires", n=4)
    p = problem("bruss2d", n=6)
    assert p.y0.shape == (2, 6, 6) and p.t[0] == 0
    with pytest.raises(ValueError, match="at least 3"):
        problem("bruss2d", n=2)


def test_func_holds_the_constants_as_float64_parameters_and_accepts_overrides():
    p = problem("rober")
    func, y0, t = p.tensors()
    assert isinstance(func, ProblemRHS) and y0.dtype == t.dtype == torch.float64
    (name, k), = func.named_parameters()
    assert name == "k" and k.requires_grad and k.dtype == torch.float64
    assert k.tolist() == [0.04, 3e7, 1e4]
    assert p.func({"k": [1.0, 2.0, 3.0]}).k.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(KeyError, match="no parameter 'q'.*k"):
        p.func({"q": 1.0})
    with pytest.raises(ValueError, match="shape"):
        p.func({"k": [1.0, 2.0]})


@pytest.mark.parametrize("name", ODES + ["bruss2d"])
def test_torch_rhs_equals_numpy_rhs(name):
    p = _problem(name)
    func = p.func()
    for y in _states(p):
        got = _torch_f(func, torch.tensor(y), p.shape).detach().numpy()
        want = p.rhs(0.5, y, p.params)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("name", ODES + ["bruss2d"])
def test_analytic_jacobians_equal_automatic_ones(name):
    p = _problem(name)
    func = p.func()
    params = {k: v.detach() for k, v in func.named_parameters()}
    t = torch.tensor(0.5, dtype=torch.float64)
    for y in _states(p, count=2):
        yt = torch.tensor(y)
        auto = torch.func.jacrev(lambda w: _torch_f(func, w, p.shape))(yt).detach().numpy()
        jac = p.jac(0.5, y, p.params)
        jac = jac.toarray() if sp.issparse(jac) else jac
        np.testing.assert_allclose(jac, auto, rtol=1e-12, atol=1e-12 * np.abs(auto).max())
        if p.jac_mul is not None:
            V = np.random.default_rng(3).standard_normal((y.size, 3))
            np.testing.assert_allclose(p.jac_mul(0.5, y, p.params, V), auto @ V, rtol=1e-12,
                                       atol=1e-12 * np.abs(auto @ V).max())

        def f_of_params(q):
            return torch.func.functional_call(func, q, (t, yt.reshape(p.shape))).reshape(-1)
        by_param = torch.func.jacrev(f_of_params)(params)
        auto_p = np.concatenate([by_param[k].reshape(y.size, -1).detach().numpy()
                                 for k in params], 1)
        np.testing.assert_allclose(p.jac_p(0.5, y, p.params), auto_p, rtol=1e-12,
                                   atol=1e-12 * np.abs(auto_p).max())


# Radau at rtol 1e-10 (analytic Jacobian) against the test set's quadruple-precision RADAU5
# values: its global error measured 4e-10 (ROBER y1, y2 at t = 1e11) and below 1e-11 elsewhere;
# 1e-8 leaves room for other BLAS/scipy versions while catching any wrong constant or sign.
@pytest.mark.parametrize("name", [n for n in ODES if problem(n).published is not None])
def test_reference_at_the_final_time_matches_the_published_value(name):
    p = problem(name)
    y_end = p.reference()[-1]
    np.testing.assert_allclose(y_end, p.published, rtol=1e-8, atol=0)
    assert p.source.startswith("IVP test set")


def test_reference_is_cached_and_read_only():
    p = problem("hires")
    a, b = p.reference(), problem("hires").reference()
    assert a is b and not a.flags.writeable
    assert a.shape == (len(p.t), 8) and np.array_equal(a[0], p.y0)
    assert p.error(a) == 0.0
    with pytest.raises(ValueError, match="shape"):
        p.error(a[1:])


# Forward sensitivities against central differences (relative step 1e-5) of the cached Radau
# reference on a short stretch of each problem's output times. Radau's error (rtol 1e-10) divided
# by the step bounds the differences' accuracy to about 1e-5 of the solution's scale; a wrong
# sign, constant or column order gives errors of order 1.
@pytest.mark.parametrize("name,count", [("rober_1e5", 12), ("hires", 10), ("vdpol", 5),
                                        ("orego", 3), ("pollu", 3), ("bruss2d", 2)])
def test_sensitivities_and_gradient_match_central_differences(name, count):
    p = _problem(name)
    t = p.t[:count]
    ys, dy = p.sensitivities(t)
    np.testing.assert_allclose(ys, p.reference(t), rtol=1e-7, atol=1e-7 * np.abs(ys).max())
    w = np.random.default_rng(1).standard_normal(ys.shape) / np.abs(ys).max(axis=0).clip(1e-300)
    grad = p.gradient(lambda y: w, t)  # of L(y) = sum(w * y)
    rng = np.random.default_rng(2)
    for pname, value in p.params.items():
        for i in rng.choice(value.size, min(value.size, 2), replace=False):
            h = 1e-5 * abs(value.flat[i])
            up, down = value.copy(), value.copy()
            up.flat[i] += h
            down.flat[i] -= h
            y_up, y_down = p.reference(t, {pname: up}), p.reference(t, {pname: down})
            fd = (y_up - y_down) / (2 * h)
            scale = np.abs(ys).max(axis=0) / abs(value.flat[i])
            error = np.abs(dy[pname][..., *np.unravel_index(i, value.shape)] - fd) / scale
            assert error.max() < 1e-4, f"{pname}[{i}]: scaled error {error.max():.1e}"
            fd_loss = (np.sum(w * y_up) - np.sum(w * y_down)) / (2 * h)
            loss_scale = np.abs(w * ys).sum() / abs(value.flat[i])
            assert abs(grad[pname].flat[i] - fd_loss) < 1e-4 * loss_scale


def test_gradient_checks_the_shape_of_dloss_dy():
    p = problem("rober_1e5")
    with pytest.raises(ValueError, match="shape"):
        p.gradient(lambda y: y[1:], p.t[:4])


# -- the 2-D Brusselator ----------------------------------------------------------------------------
def test_brusselator_diffusion_conserves_and_vanishes_on_uniform_states():
    p = problem("bruss2d", n=7)
    func = p.func()
    a, b = p.params["a"], p.params["b"]
    y = torch.tensor(_states(p, 1)[0]).reshape(p.shape)
    f = func(torch.tensor(0.0, dtype=torch.float64), y).detach()
    # the periodic Laplacian sums to zero: d/dt sum(u + v) = n^2 a - sum(u) exactly
    assert f.sum().item() == pytest.approx(49 * a - y[0].sum().item(), rel=1e-12)
    uniform = torch.stack([torch.full((7, 7), 1.3, dtype=torch.float64),
                           torch.full((7, 7), 2.1, dtype=torch.float64)])
    g = func(torch.tensor(0.0, dtype=torch.float64), uniform).detach()
    u, v = 1.3, 2.1
    assert torch.allclose(g[0], torch.tensor(a + u * u * v - (b + 1) * u), rtol=1e-13)
    assert torch.allclose(g[1], torch.tensor(b * u - u * u * v), rtol=1e-13)


def test_brusselator_is_vectorised_batched_and_runs_at_n_1024():
    p = problem("bruss2d", n=6)
    func = p.func()
    t = torch.tensor(0.0, dtype=torch.float64)
    batch = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    assert torch.equal(func(t, batch), torch.stack([func(t, y) for y in batch]))
    big = problem("bruss2d", n=1024)
    with torch.no_grad():
        f = big.func()(t, torch.from_numpy(big.y0))
    assert f.shape == (2, 1024, 1024) and torch.isfinite(f).all()


def test_brusselator_reference_matches_an_explicit_solve_of_the_torch_rhs():
    torchdiffeq = pytest.importorskip("torchdiffeq", reason="torchdiffeq (extra 'test') is "
                                                            "not installed")
    p = problem("bruss2d", n=4)  # diffusion 8 alpha n^2 = 0.26: not stiff, dopri5 is fine
    func, y0, t = p.tensors()
    with torch.no_grad():
        ys = torchdiffeq.odeint(func, y0, t, method="dopri5", rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(ys.numpy(), p.reference(), rtol=1e-8, atol=1e-9)


# -- ROBER's neural ODE (seed 000) -----------------------------------------------------------------
def test_rober_training_data_are_scaled_to_order_one_from_the_reference():
    data = rober_training(t_max=10.0, n_times=12)
    np.testing.assert_array_equal(data.y, problem("rober", t_end=10.0, n_times=12).reference())
    assert data.t[0] == 0 and data.t[-1] == 10.0 and data.y.shape == (13, 3)
    np.testing.assert_allclose(np.abs(data.target).max(axis=0), 1.0)
    dz = np.abs(np.diff(data.target, axis=0)) / np.diff(data.t)[:, None]
    np.testing.assert_allclose(dz.max(axis=0), data.rate)
    assert data.options["snes_max_it"] > 50


def test_rober_neural_starts_dissipative_and_leaves_the_global_generator_alone():
    before = torch.random.get_rng_state()
    model = rober_training(t_max=10.0, n_times=12).model(seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    w1, w2 = (layer.weight for layer in model.net[::2])
    assert w1.shape == (5, 3) and torch.equal(w2, -w1.T) and w1.dtype == torch.float64
    z = torch.randn(100, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert ((z * model(0.0, z) / model.rate).sum(-1) <= 1e-15).all()
    same = rober_training(t_max=10.0, n_times=12).model(seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))


def test_reference_depends_on_the_initial_state():
    p = problem("rober_1e5")
    other = dataclasses.replace(p, y0=np.array([0.5, 0.0, 0.5]))
    t = p.t[:5]
    assert not np.allclose(p.reference(t), other.reference(t))
    np.testing.assert_allclose(other.reference(t)[0], [0.5, 0.0, 0.5])
