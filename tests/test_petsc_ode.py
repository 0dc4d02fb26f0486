"""odeint_adjoint: PETSc TS solves and TSAdjoint gradients, checked against independent
references (scipy at tight tolerances, central finite differences, torchdiffeq)."""
import gc
import os
import re
import warnings

import numpy as np
import pytest
import scipy.sparse
import torch
from torch.autograd import gradcheck

import bridges
from bridges import ForeignError, SolverFailure
from bridges.petsc import PETSc, UnusedOptionsWarning, odeint_adjoint, stencil_sparsity
from bridges.problems import log_times, problem

F64 = torch.float64
ROBER = problem("rober")  # its reference is scipy Radau, independent of PETSc


class Oscillator(torch.nn.Module):
    """Damped, driven oscillator: x'' = -k x - c x' + a sin(t)."""

    def __init__(self, k=2.0, c=0.3, a=0.5):
        super().__init__()
        self.k, self.c, self.a = (torch.nn.Parameter(torch.tensor(v, dtype=F64)) for v in (k, c, a))

    def forward(self, t, y):
        x, v = y.unbind(-1)
        return torch.stack([v, -self.k * x - self.c * v + self.a * torch.sin(t)], -1)


def test_robertson_matches_scipy_radau_at_40_log_spaced_times():
    t = log_times(1e5, 40)
    reference = ROBER.reference(t)
    ys = odeint_adjoint(ROBER.func(), torch.tensor([1.0, 0.0, 0.0], dtype=F64), torch.from_numpy(t),
                        method="bdf", rtol=1e-9, atol=1e-20, options={"ts_bdf_order": 5})
    got = ys.detach().numpy()
    mask = np.abs(reference) > 1e-12
    relative = np.abs(got - reference)[mask] / np.abs(reference)[mask]
    assert relative.max() < 1e-6, f"worst relative error {relative.max():.2e}"


def _fd_gradient(loss, x, rel=1e-6):
    """Central differences of loss() w.r.t. the entries of tensor x (modified in place)."""
    grad = torch.zeros_like(x)
    flat, gflat = x.data.view(-1), grad.view(-1)
    for i in range(flat.numel()):
        h = rel * max(abs(flat[i].item()), 1e-3)
        old = flat[i].item()
        flat[i] = old + h
        up = loss()
        flat[i] = old - h
        down = loss()
        flat[i] = old
        gflat[i] = (up - down) / (2 * h)
    return grad


def _assert_close_relative(got, expected, tol):
    error = (got - expected).norm() / expected.norm()
    assert error < tol, f"relative error {error:.2e}: got {got}, expected {expected}"


ROBERTSON_T = torch.cat([torch.zeros(1, dtype=F64), torch.logspace(-5, 2, 12, dtype=F64)])
ROBERTSON_W = torch.randn(13, 3, dtype=F64, generator=torch.Generator().manual_seed(3)) \
    * torch.tensor([1.0, 1e4, 1.0], dtype=F64)  # y2 is ~1e-5: weigh it up


def _check_against_central_differences(loss, *tensors):
    """loss().backward()'s gradients w.r.t. tensors against central differences, to 1e-4."""
    loss().backward()
    for x in tensors:
        with torch.no_grad():
            fd = _fd_gradient(lambda: loss().item(), x)
        _assert_close_relative(x.grad, fd, 1e-4)


@pytest.mark.parametrize("method", ["beuler", "cn"])
def test_robertson_gradients_match_central_differences(method):
    func = ROBER.func()
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64, requires_grad=True)

    def loss():
        return (ROBERTSON_W * odeint_adjoint(func, y0, ROBERTSON_T, method=method,
                                             steps_per_interval=4)).sum()
    _check_against_central_differences(loss, func.k, y0)


@pytest.mark.parametrize("method,kwargs", [("rk4", {"step_size": 2e-6}),
                                           ("dopri5", {"rtol": 1e-10, "atol": 1e-14})])
def test_explicit_gradients_match_central_differences_on_non_stiff_interval(method, kwargs):
    func = ROBER.func()
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1e-4, 5, dtype=F64)
    w = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(4)) \
        * torch.tensor([1.0, 1e5, 1e7], dtype=F64)

    def loss():
        return (w * odeint_adjoint(func, y0, t, method=method, **kwargs)).sum()
    _check_against_central_differences(loss, func.k, y0)


def test_runge_kutta_adjoint_linearises_func_once_per_stage():
    """The rk4 adjoint multiplies dfunc/dy and dfunc/dparams transposed at each stage: one graph
    of func per stage serves both (4 per step), and the gradient is central differences'."""
    k = torch.tensor(1.5, dtype=F64, requires_grad=True)
    graphs = []

    def func(t, y):
        graphs.append(torch.is_grad_enabled() and y.requires_grad)
        return torch.stack([y[..., 1], -k * torch.sin(y[..., 0])], -1)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    y0 = torch.tensor([0.4, 0.1], dtype=F64, requires_grad=True)
    w = torch.tensor([[0.0, 0.0], [1.0, -0.5], [0.3, 2.0]], dtype=F64)

    def loss():
        return (w * odeint_adjoint(func, y0, t, method="rk4", step_size=0.05,
                                   adjoint_params=(k,))).sum()
    value = loss()
    graphs.clear()
    value.backward()
    assert sum(graphs) == 4 * 20  # 20 steps of 4 stages
    with torch.no_grad():
        fd = torch.cat([_fd_gradient(lambda: loss().item(), x).view(-1) for x in (y0, k)])
    _assert_close_relative(torch.cat([y0.grad, k.grad.view(1)]), fd, 1e-7)


@pytest.mark.parametrize("method,kwargs", [("dopri5", {"rtol": 1e-12, "atol": 1e-14}),
                                           ("rk4", {"step_size": 5e-3})])
def test_oscillator_gradients_match_torchdiffeq(method, kwargs):
    torchdiffeq = pytest.importorskip("torchdiffeq", reason="torchdiffeq (extra 'test') is "
                                                            "not installed")
    t = torch.linspace(0, 5, 11, dtype=F64)
    w = torch.randn(11, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    grads = []
    for solve in (lambda f, y0: odeint_adjoint(f, y0, t, method=method, **kwargs),
                  lambda f, y0: torchdiffeq.odeint(f, y0, t, method="dopri5", rtol=1e-13,
                                                   atol=1e-14)):
        func = Oscillator()
        y0 = torch.tensor([1.0, -0.5], dtype=F64, requires_grad=True)
        (w * solve(func, y0)).sum().backward()
        grads.append(torch.cat([y0.grad, func.k.grad.view(1), func.c.grad.view(1),
                                func.a.grad.view(1)]))
    _assert_close_relative(grads[0], grads[1], 1e-5)


@pytest.mark.parametrize("method,kwargs", [("cn", {"step_size": 0.05}),
                                           ("rk4", {"step_size": 0.05}),
                                           ("beuler", {"step_size": 0.05}),
                                           ("arkimex", {"step_size": 0.1})])
def test_gradcheck(method, kwargs):
    k = torch.tensor(1.5, dtype=F64, requires_grad=True)

    def func(t, y):
        return torch.stack([y[..., 1], -k * torch.sin(y[..., 0])], -1)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    y0 = torch.tensor([0.4, 0.1], dtype=F64, requires_grad=True)
    assert gradcheck(lambda y0, k: odeint_adjoint(func, y0, t, method=method,
                                                  adjoint_params=(k,), **kwargs), (y0, k))


def _forced_decay(k=0.7):
    return lambda t, y: -k * y + torch.sin(t)


@pytest.mark.parametrize("method,kwargs", [("arkimex", {"rtol": 1e-11, "atol": 1e-13}),
                                           ("dopri5", {"rtol": 1e-11, "atol": 1e-13})])
def test_gradient_wrt_the_times_matches_central_differences(method, kwargs):
    """dL/dt_k: every output time, the initial one included, against central differences of
    the loss (relative step 1e-4) and the closed form of y' = -k y + sin t."""
    func, y0 = _forced_decay(), torch.tensor([1.0, -0.5], dtype=F64)
    weights = torch.arange(1, 5, dtype=F64)[:, None]

    def loss(t):
        return (odeint_adjoint(func, y0, t, method=method, **kwargs) ** 2 * weights).sum()
    t = torch.tensor([0.1, 0.5, 1.2, 2.0], dtype=F64, requires_grad=True)
    loss(t).backward()
    h, fd = 1e-4, []
    for i in range(4):
        step = torch.zeros(4, dtype=F64)
        step[i] = h
        with torch.no_grad():
            fd.append(float((loss(t + step) - loss(t - step)) / (2 * h)))
    np.testing.assert_allclose(t.grad.numpy(), fd, rtol=1e-6, atol=1e-8)

    def exact(t0, t1, y):  # y(t1) from y(t0) = y, for k = 0.7
        k, c = 0.7, 1 / (1 + 0.7 ** 2)
        particular = lambda s: c * (k * np.sin(s) - np.cos(s))  # noqa: E731
        return particular(t1) + (y - particular(t0)) * np.exp(-k * (t1 - t0))
    times = t.detach().numpy()
    slope = lambda s, y: -0.7 * y + np.sin(s)  # noqa: E731
    ys = [exact(times[0], s, y0.numpy()) for s in times]
    g = [2 * w * y for w, y in zip(weights[:, 0].numpy(), ys)]
    expected = [float(np.dot(gk, slope(s, yk))) for gk, s, yk in zip(g, times, ys)]
    adjoint_t0 = sum(gk * np.exp(-0.7 * (s - times[0])) for gk, s in zip(g[1:], times[1:]))
    expected[0] = -float(np.dot(adjoint_t0, slope(times[0], ys[0])))
    np.testing.assert_allclose(t.grad.numpy(), expected, rtol=1e-7)


def test_gradient_wrt_the_times_passes_gradcheck_and_batches_under_jacrev():
    func, y0 = _forced_decay(), torch.tensor([1.0, -0.5], dtype=F64)
    t = torch.tensor([0.1, 0.5, 1.2, 2.0], dtype=F64, requires_grad=True)
    tight = dict(method="dopri5", rtol=1e-12, atol=1e-14)
    assert gradcheck(lambda t: odeint_adjoint(func, y0, t, **tight), (t,), eps=1e-4, atol=1e-6)
    jac = torch.func.jacrev(lambda t: odeint_adjoint(func, y0, t, **tight)[-1])(t.detach())
    with torch.no_grad():
        end = odeint_adjoint(func, y0, t, **tight)[-1]
    torch.testing.assert_close(jac[:, -1], func(t[-1], end).detach(), rtol=1e-9, atol=1e-12)
    assert bool((jac[:, 1:3] == 0).all())  # intermediate output times do not move y(T)
    scalar = odeint_adjoint(func, torch.tensor(1.0, dtype=F64), t)  # a 0-d state
    scalar[-1].backward()
    assert t.grad.shape == (4,) and float(t.grad[-1]) != 0.0
    del scalar
    gc.collect()  # the outputs kept for dL/dt must not tie a run to its own graph
    assert _live(bridges.petsc._ode._ODESolve) == 0


def test_captured_tensors_that_require_grad_are_not_dropped_silently():
    """A plain function's captured weights cannot be differentiated unless passed: refused, also
    when no input requires grad; adjoint_params that leave some out: a warning; everything
    passed, or no grad mode: neither."""
    k = torch.tensor(0.7, dtype=F64, requires_grad=True)
    func = lambda t, y: -k * y  # noqa: E731
    y0, t = torch.ones(2, dtype=F64, requires_grad=True), torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(ForeignError, match=r"func uses 1 tensor\(s\) that require grad "
                                           r"\(shapes \(\)\) but are not among adjoint_params"
                                           r".*adjoint_params=\(w, \.\.\.\)"):
        odeint_adjoint(func, y0, t)
    # nothing the op differentiates requires grad, yet k does: its gradient would lack the ODE
    with pytest.raises(ForeignError, match=r"func uses 1 tensor\(s\) that require grad .*"
                                           r"neither y0, t nor adjoint_params require grad"
                                           r".*torch.no_grad\(\)"):
        odeint_adjoint(func, y0.detach(), t)
    model = Oscillator()
    with pytest.warns(UserWarning, match=r"func uses 2 tensor\(s\) that require grad"):
        odeint_adjoint(model, torch.ones(2, dtype=F64), t, adjoint_params=(model.k,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ys = odeint_adjoint(func, y0, t, adjoint_params=(k,))
        ys[-1].sum().backward()
        odeint_adjoint(model, torch.ones(2, dtype=F64, requires_grad=True), t)
        with torch.no_grad():  # no gradient wanted: nothing to check
            odeint_adjoint(lambda t, y: -k * y, y0, t)
    np.testing.assert_allclose(float(k.grad), -2 * np.exp(-0.7), rtol=1e-5)


def test_batch_of_initial_states_matches_separate_solves():
    func = Oscillator()
    y0 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.5, 0.3]], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 2, 5, dtype=F64)
    ys = odeint_adjoint(func, y0, t, method="cn", step_size=0.01)
    assert ys.shape == (5, 3, 2)
    ys.square().sum().backward()
    batch_grad_y0, batch_grad_k = y0.grad.clone(), func.k.grad.clone()
    func.k.grad = None
    total_k = torch.zeros((), dtype=F64)
    for b in range(3):
        single = y0.detach()[b].clone().requires_grad_()
        ys_b = odeint_adjoint(func, single, t, method="cn", step_size=0.01)
        torch.testing.assert_close(ys_b, ys[:, b].detach())
        ys_b.square().sum().backward()
        torch.testing.assert_close(single.grad, batch_grad_y0[b])
        total_k += func.k.grad
        func.k.grad = None
    torch.testing.assert_close(total_k, batch_grad_k)


def test_samples_coupled_by_func_get_the_whole_jacobian_not_their_blocks():
    """Rows of y0 that func couples: "auto" sees the per-sample blocks are not exact and takes
    the whole (small) Jacobian as one dense block; it agrees with matrix-free products."""
    class Coupled(torch.nn.Module):  # each sample feels the batch mean: blocks are not exact
        def __init__(self):
            super().__init__()
            self.k = torch.nn.Parameter(torch.tensor(0.7, dtype=F64))

        def forward(self, t, y):
            return -self.k * y + 0.5 * y.mean(dim=0, keepdim=True) ** 2
    t = torch.linspace(0, 1, 4, dtype=F64)
    y0 = torch.tensor([[1.0, 0.2], [0.3, -0.4]], dtype=F64)
    results = []
    for jacobian in ("auto", "matrix-free"):
        func = Coupled()
        ys = odeint_adjoint(func, y0, t, method="beuler", step_size=0.05, jacobian=jacobian)
        ys.sum().backward()
        results.append((ys.detach(), func.k.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    func = Coupled()

    def loss():
        return odeint_adjoint(func, y0, t, method="beuler", step_size=0.05).sum().item()
    with torch.no_grad():
        fd = _fd_gradient(loss, func.k)
    _assert_close_relative(results[0][1].view(1), fd.view(1), 1e-6)


def test_samples_coupled_only_away_from_y0_are_not_taken_for_independent():
    """Rows coupled through y - mean(y), whose derivative vanishes at equal rows: at y0 alone
    the per-sample blocks look exact, but not once the rows part. The gradient equals the
    matrix-free path's (and dopri5's, an explicit method with no Jacobian to choose)."""
    def func(t, y):
        return -y + (y - y.mean(0, keepdim=True)) ** 2 + \
            0.1 * torch.sin(3 * t) * torch.arange(3.0, dtype=F64).reshape(3, 1)
    t = torch.tensor([0.0, 1.0, 3.0], dtype=F64)
    grads = []
    for kwargs in [{}, {"jacobian": "matrix-free", "options": {"ksp_rtol": 1e-13}},
                   {"method": "dopri5"}]:
        y0 = torch.ones(3, 2, dtype=F64, requires_grad=True)
        ys = odeint_adjoint(func, y0, t, rtol=1e-10, atol=1e-12, **kwargs)
        grads.append(torch.autograd.grad(ys[-1, 0, 0], y0)[0])
    assert float(grads[1][1:].abs().max()) > 1e-4  # the other rows do matter
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-8)
    torch.testing.assert_close(grads[0], grads[2], rtol=0, atol=1e-7)


def test_matrix_free_and_block_jacobians_agree():
    t = ROBERTSON_T[:6]
    grads = []
    for jacobian in ("blocks", "matrix-free"):
        func = ROBER.func()
        (ROBERTSON_W[:6] * odeint_adjoint(func, torch.tensor([1.0, 0, 0], dtype=F64), t,
                                          method="cn", steps_per_interval=4,
                                          jacobian=jacobian)).sum().backward()
        grads.append(func.k.grad)
    _assert_close_relative(grads[1], grads[0], 1e-6)


def test_options_override_method_and_prefix_scopes_command_line_style_options():
    func, y0 = Oscillator(), torch.tensor([1.0, 0.0], dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)
    beuler = odeint_adjoint(func, y0, t, method="beuler", step_size=0.1)
    via_dict = odeint_adjoint(func, y0, t, method="cn", step_size=0.1,
                              options={"ts_type": "beuler"})
    torch.testing.assert_close(via_dict, beuler)
    db = PETSc.Options()
    db["osc_ts_type"] = "beuler"
    try:
        via_prefix = odeint_adjoint(func, y0, t, method="cn", step_size=0.1, prefix="osc_")
        unprefixed = odeint_adjoint(func, y0, t, method="cn", step_size=0.1)
    finally:
        del db["osc_ts_type"]
    torch.testing.assert_close(via_prefix, beuler)
    assert not torch.allclose(unprefixed, beuler)
    assert not db.hasName("ts_type")  # the dict's options do not leak into the database


def test_trajectory_in_memory_by_default_and_checkpointing_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = torch.linspace(0, 2, 5, dtype=F64)
    grads = []
    for options, prefix in ((None, None), (None, "traj_"),
                            ({"ts_trajectory_solution_only": True}, "traj_")):
        func = Oscillator()
        odeint_adjoint(func, torch.tensor([1.0, 0.0], dtype=F64), t, method="cn", step_size=0.05,
                       options=options, prefix=prefix).sum().backward()
        grads.append(func.k.grad)
    assert os.listdir(tmp_path) == []  # PETSc's default 'basic' trajectory writes TS-data-*
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=0)
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-9, atol=0)


def test_second_backward_resolves():
    func = Oscillator()
    ys = odeint_adjoint(func, torch.tensor([1.0, 0.0], dtype=F64), torch.linspace(0, 1, 3,
                        dtype=F64), method="rk4", step_size=0.05)
    ys.sum().backward(retain_graph=True)
    first = func.k.grad.clone()
    ys.sum().backward()
    torch.testing.assert_close(func.k.grad, 2 * first)


def test_clear_errors():
    func, y0 = Oscillator(), torch.tensor([1.0, 0.0], dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)
    with pytest.raises(TypeError, match="y0: tensor has dtype torch.float32, but PETSc's scalar "
                                        "type is torch.float64"):
        odeint_adjoint(func, y0.float(), t)
    with pytest.raises(ValueError, match="y0: tensor is on device 'meta'.*CPU-only"):
        odeint_adjoint(func, torch.empty(2, dtype=F64, device="meta"), t)
    with pytest.raises(ValueError, match=r"times must strictly increase, but t\[2\] = 0.5 "
                                         r"follows t\[1\] = 1"):
        odeint_adjoint(func, y0, torch.tensor([0.0, 1.0, 0.5], dtype=F64))
    with pytest.raises(ValueError, match="unknown method 'euler'; valid: beuler, cn"):
        odeint_adjoint(func, y0, t, method="euler")
    with pytest.raises(ValueError, match="rk4 has no error estimate"):
        odeint_adjoint(func, y0, t, method="rk4")
    with pytest.raises(TypeError, match="options must be a dict"):
        odeint_adjoint(func, y0, t, options=["ts_type", "cn"])
    with pytest.raises(ValueError, match=r"t\[1\] is nan; every time must be finite"):
        odeint_adjoint(func, y0, torch.tensor([0.0, float("nan"), 1.0], dtype=F64))
    with pytest.raises(ValueError, match=r"t\[0\] = 1 and t\[1\] = 1.0000000000000011 are a "
                                         r"few rounding units apart"):
        odeint_adjoint(func, y0, torch.tensor([1.0, 1 + 1e-15], dtype=F64))
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0, got -1"):
        odeint_adjoint(func, y0, t, rtol=-1)
    with pytest.raises(ValueError, match="rtol and atol are both 0"):
        odeint_adjoint(func, y0, t, rtol=0, atol=0, steps_per_interval=4)


def test_a_less_precise_func_is_warned_about():
    with pytest.warns(UserWarning, match="func.* returned torch.float32 for a torch.float64 "
                                         "state"):
        odeint_adjoint(lambda t, y: (-y).float(), torch.ones(2, dtype=F64),
                       torch.tensor([0.0, 1.0], dtype=F64))


# (-1 is PETSC_DETERMINE to TSSetMaxTime; the others end with a step a rounding short of the end)
@pytest.mark.parametrize("times", [[-3.0, -1.0], [-2.000001, -1e-6], [-0.501, -0.001],
                                   [-1.999, 0.001], [0.0, 1.0]])
def test_end_times_that_petsc_reads_specially_or_steps_land_short_of(times):
    """Backward Euler, 10 steps of h on y' = -k y: y_N = (1 + kh)^-N exactly, so dy_N/dk =
    -N h (1 + kh)^-(N+1); the adaptive default (also with checkpoints) against the exact
    solution. func is never evaluated past the end (nor at ARKIMEX's stale restart time, 0,
    which is past it for the negative spans)."""
    t, n, k0 = torch.tensor(times, dtype=F64), 10, 1.5
    h = (times[1] - times[0]) / n
    seen = []
    for method, kwargs in [("beuler", {"steps_per_interval": n}),
                           ("arkimex", {"rtol": 1e-10, "atol": 1e-12}),
                           ("arkimex", {"rtol": 1e-10, "atol": 1e-12, "checkpoints": 2})]:
        k = torch.tensor(k0, dtype=F64, requires_grad=True)

        def func(s, y):
            seen.append(float(s))
            return -k * y
        solver = bridges.petsc.ODESolver(method, **kwargs)
        ys = solver(func, torch.ones(1, dtype=F64), t, adjoint_params=(k,))
        (dk,) = torch.autograd.grad(ys[-1].sum(), k)
        if method == "beuler":
            assert solver.stats.steps == n
            y, grad = (1 + k0 * h) ** -n, -n * h * (1 + k0 * h) ** -(n + 1)
        else:
            span = times[1] - times[0]
            y, grad = np.exp(-k0 * span), -span * np.exp(-k0 * span)
        np.testing.assert_allclose(float(ys[-1].detach()), y, rtol=1e-8)
        np.testing.assert_allclose(float(dk), grad, rtol=1e-7)
    assert max(seen) <= times[1] + 1e-12 * abs(times[1] - times[0])


@pytest.mark.parametrize("method,kwargs", [("arkimex", {}), ("beuler", {"step_size": 0.1}),
                                           ("cn", {"step_size": 0.1}), ("dopri5", {}),
                                           ("rk4", {"step_size": 0.1})])
@pytest.mark.filterwarnings("ignore:.*does not depend on it through torch ops")  # (it does not)
def test_a_func_that_ignores_y_or_its_parameters(method, kwargs):
    """dy/dt constant in y (or zero) needs no Jacobian in the forward, and its derivatives
    w.r.t. y and unused parameters are zero, not an error."""
    t = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    k = torch.tensor(2.0, dtype=F64, requires_grad=True)
    coarse = method in ("beuler", "cn")  # (fixed steps of 0.1 on the cosine)
    cases = [(lambda s, y: torch.cos(s) * torch.ones_like(y), 1 + np.sin(2.0), 0.0,
              5e-2 if coarse else 1e-5),  # every method integrates the others exactly:
             (lambda s, y: -k * torch.ones_like(y), 1 - 2 * 2.0, -2.0, 1e-9),
             (lambda s, y: 0 * y + 0 * k, 1.0, 0.0, 1e-12)]
    for func, y_end, dk, within in cases:
        y0 = torch.ones(2, dtype=F64, requires_grad=True)
        ys = odeint_adjoint(func, y0, t, method=method, adjoint_params=(k,), **kwargs)
        np.testing.assert_allclose(ys[-1].detach().numpy(), y_end, rtol=within)
        g_y0, g_k = torch.autograd.grad(ys[-1].sum(), (y0, k))
        np.testing.assert_allclose(g_y0.numpy(), 1.0, rtol=1e-12)
        np.testing.assert_allclose(float(g_k), 2 * dk, rtol=1e-9, atol=1e-12)


def test_divergence_reports_reason_and_time():
    def blow_up(t, y):  # y' = y^2, y(0) = 1: y = 1 / (1 - t) blows up at t = 1
        return y ** 2
    y0 = torch.ones(1, dtype=F64)
    with pytest.raises(ForeignError, match=r"forward solve with PETSc TS 'beuler' failed: "
                                           r"DIVERGED_NONLINEAR_SOLVE at t = 0\.\d+"):
        odeint_adjoint(blow_up, y0, torch.tensor([0.0, 2.0], dtype=F64), method="beuler",
                       step_size=0.05)
    with pytest.raises(SolverFailure, match=r"became non-finite \(nan/inf\) or beyond 1e\+150 "
                                            r"at t = 1\.1\d* \(PETSc TS 'rk', step size 0\.05\)"):
        odeint_adjoint(blow_up, y0, torch.tensor([0.0, 0.5, 2.0], dtype=F64), method="rk4",
                       step_size=0.05)
    # finite but past 1e150, where PETSc's norms overflow ("inf or nan generated in norma",
    # with advice about the method): named as a blow-up, with the time (e^345 ~ 1e150)
    with pytest.raises(SolverFailure, match=r"or beyond 1e\+150 at t = 3[45]\d\.\d+ \(PETSc TS "
                                            r"'arkimex'.*or atol may be above"):
        odeint_adjoint(lambda t, y: y, y0, torch.tensor([0.0, 1000.0], dtype=F64))


def test_a_func_undefined_beyond_a_state_fails_fast_not_silently_or_never():
    """A Newton iterate where func is nan: PETSc took the failed line search as converged and
    kept the step's initial guess (y' = -10 sqrt(y) + 0.1 by backward Euler: y(5) = 0.107
    against 1e-4). A func finite only at t = 0, or nan once y < 0.999, ran forever
    (rejections without limit, or steps of 1e-17 held above the collapse test)."""
    t = torch.tensor([0.0, 0.05, 0.5, 5.0], dtype=F64)
    with pytest.raises(ForeignError, match=r"DIVERGED_NONLINEAR_SOLVE .*Newton: "
                                           r"DIVERGED_FUNCTION_NANORINF, func gave nan"):
        odeint_adjoint(lambda s, y: -10 * torch.sqrt(y) + 0.1, torch.ones(1, dtype=F64), t,
                       method="beuler", steps_per_interval=3)
    unit = torch.tensor([0.0, 1.0], dtype=F64)
    for func, method, message in (
            (lambda s, y: -y + torch.sqrt(-s), "arkimex", r"DIVERGED_STEP_REJECTED at t = 0 .*"
                                                          r"rejected 51 times in a row"),
            (lambda s, y: -y + torch.sqrt(-s), "beuler", r"rejected 51 times in a row"),
            (lambda s, y: torch.where(y < 0.999, torch.nan, -y), "arkimex",
             r"the last 1000 steps were each below 1e-12 of the output interval"),
            (lambda s, y: torch.where(y < 0.999, torch.nan, -y), "beuler",
             r"step size collapsed")):
        with pytest.raises(ForeignError, match=message):  # (within about a second here)
            odeint_adjoint(func, torch.ones(1, dtype=F64), unit, method=method)


def test_a_fixed_step_size_is_kept_after_a_step_cut_short_by_an_output():
    """step_size=0.3 with an output at 0.01: the step cut to land there stayed the step size,
    200 steps instead of 8."""
    solver = bridges.petsc.ODESolver("beuler", step_size=0.3)
    with torch.no_grad():
        solver(lambda s, y: -0.7 * y, torch.ones(1, dtype=F64),
               torch.tensor([0.0, 0.01, 2.0], dtype=F64))
    assert solver.stats.steps == 8


def test_fixed_arkimex_steps_after_a_sliver_of_an_interval_converge():
    """An output 1e-9 after another: ARKIMEX's extrapolated Newton guess for the next fixed
    step reached 5e7 times beyond the sliver, and Newton failed (adaptive steps are retried
    smaller; fixed ones cannot). The solution now matches scipy's."""
    from scipy.integrate import solve_ivp
    A = np.array([[-2.0, 0.5], [0.3, -1.5]])
    t = np.array([0.0, 0.5, 0.5 + 1e-9, 1.0])
    reference = solve_ivp(lambda s, y: A @ y - 0.5 * y ** 3 + np.sin(3 * s), (0, 1), [-1.0, 1.0],
                          method="DOP853", rtol=1e-12, atol=1e-12, t_eval=t).y.T
    At = torch.from_numpy(A.T)
    for settings in (dict(step_size=0.05), dict(steps_per_interval=4)):
        ys = odeint_adjoint(lambda s, y: y @ At - 0.5 * y ** 3 + torch.sin(3 * s),
                            torch.tensor([-1.0, 1.0], dtype=F64), torch.from_numpy(t), **settings)
        np.testing.assert_allclose(ys.numpy(), reference, atol=1e-5)


def test_times_as_tensors_in_a_list_and_a_second_backward_through_checkpoints():
    """y' = -k y: dL/dt for t given as a list of 0-d tensors (their gradient was lost); a
    second backward after retain_graph with checkpoints and t requiring grad (it failed); the
    ARKIMEX tableaus without an extrapolation formula (prssp2, bpr3, ars443) by options."""
    k = torch.tensor(0.7, dtype=F64, requires_grad=True)
    t1 = torch.tensor(1.0, dtype=F64, requires_grad=True)
    ys = odeint_adjoint(lambda s, y: -k * y, torch.ones(1, dtype=F64),
                        [torch.tensor(0.0, dtype=F64), t1], rtol=1e-10, atol=1e-12,
                        adjoint_params=(k,))
    ys[-1].sum().backward()
    np.testing.assert_allclose(t1.grad.item(), -0.7 * np.exp(-0.7), rtol=1e-7)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64, requires_grad=True)
    ys = odeint_adjoint(lambda s, y: -k * y, torch.ones(1, dtype=F64), t, checkpoints=2,
                        adjoint_params=(k,))
    first = torch.autograd.grad(ys.sum(), t, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(ys.sum(), t)[0], first)
    for tableau in ("prssp2", "bpr3", "ars443"):
        ys = odeint_adjoint(lambda s, y: -k * y, torch.ones(1, dtype=F64), t[[0, 2]].detach(),
                            steps_per_interval=20, adjoint_params=(k,),
                            options={"ts_arkimex_type": tableau})
        (grad,) = torch.autograd.grad(ys[-1].sum(), k)
        np.testing.assert_allclose(grad.item(), -np.exp(-0.7), rtol=1e-3)


def test_vmap_over_the_output_times():
    """One time grid per sample (torch's 'data-dependent control flow' error before): y' = -0.7 y
    against exp(-0.7 T), dL/dt against -0.7 exp(-0.7 T) (and its opposite at t0); a bad grid
    among them is named."""
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    grids = torch.stack([t, 2 * t])

    def end(times):
        return odeint_adjoint(lambda s, y: -0.7 * y, torch.ones(1, dtype=F64), times,
                              rtol=1e-10, atol=1e-12)[-1].sum()
    torch.testing.assert_close(torch.func.vmap(end)(grids), torch.exp(-0.7 * grids[:, -1]))
    slope = -0.7 * torch.exp(-0.7 * grids[:, -1])
    expected = torch.stack([-slope, torch.zeros(2, dtype=F64), slope], 1)
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(end))(grids), expected,
                               rtol=1e-7, atol=1e-12)
    with pytest.raises(ForeignError, match=r"times must strictly increase, but t\[1\] = 0.5 "
                                           r"follows t\[0\] = 1"):
        torch.func.vmap(end)(torch.stack([t, t.flip(0)]))


def test_exception_in_func_is_wrapped():
    def broken(t, y):
        raise ArithmeticError("rate law undefined")
    with pytest.raises(ForeignError, match="rate law undefined") as info:
        odeint_adjoint(broken, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                       method="rk4", step_size=0.1)
    assert isinstance(info.value.original, ArithmeticError)


def test_forward_only_method_refuses_gradients_clearly():
    """By the method given (the message blamed options or the command line), or by the TS type
    options chose."""
    y0 = torch.tensor([1.0, 0.0], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 3, dtype=F64)
    ys = odeint_adjoint(Oscillator(), y0, t, method="bdf")
    with pytest.raises(ForeignError, match=r"method='bdf' has no discrete adjoint, so no "
                                           r"gradient; use one of the methods beuler, .*, or "
                                           r"call under torch.no_grad\(\)"):
        ys.sum().backward()
    ys = odeint_adjoint(Oscillator(), y0, t, method="beuler", steps_per_interval=4,
                        options={"ts_type": "bdf"})
    with pytest.raises(ForeignError, match=r"TS 'bdf' \(chosen by options or the command line\) "
                                           r"has no discrete adjoint"):
        ys.sum().backward()


# -- first-class behaviour: bridged ops inside func, lifetime, compile, options ------------------
def _cube_forward(x):
    X = bridges.as_numpy(x).copy()
    return X ** 3, lambda g: 3 * X ** 2 * bridges.as_numpy(g)


CUBE = bridges.foreign_function(_cube_forward, name="cube")  # reverse mode only
FD_TANH = bridges.fd2pytorch(np.tanh, sparsity=scipy.sparse.identity(3), name="fd_tanh")


class Hybrid(torch.nn.Module):
    """Linear dynamics plus a foreign term of the scaled state."""

    def __init__(self, term):
        super().__init__()
        self.term = term
        self.theta = torch.nn.Parameter(torch.tensor([0.8, 1.3, 0.5], dtype=F64))
        self.register_buffer("A", torch.tensor([[-2.0, 1.0, 0.0], [0.5, -3.0, 1.0],
                                                [0.0, 1.0, -1.5]], dtype=F64))

    def forward(self, t, y):
        return self.A @ y - 0.3 * self.term(self.theta * y)


@pytest.mark.parametrize("jacobian", ["auto", "matrix-free"])
@pytest.mark.parametrize("method", ["cn", "beuler", "arkimex"])
@pytest.mark.parametrize("term", [CUBE, FD_TANH], ids=["reverse-only op", "fd op"])
def test_bridged_ops_inside_the_right_hand_side(term, method, jacobian):
    func = Hybrid(term)
    y0 = torch.tensor([1.0, -0.5, 0.2], dtype=F64, requires_grad=True)
    t = torch.linspace(0, 1, 5, dtype=F64)
    w = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(0))

    def loss():
        return (w * odeint_adjoint(func, y0, t, method=method, step_size=0.125,
                                   jacobian=jacobian)).sum()
    loss().backward()
    with torch.no_grad():
        fd = torch.cat([_fd_gradient(lambda: loss().item(), func.theta),
                        _fd_gradient(lambda: loss().item(), y0)])
    _assert_close_relative(torch.cat([func.theta.grad, y0.grad]), fd, 1e-5)


def _live(cls):
    return sum(type(o) is cls for o in gc.get_objects())


def test_petsc_objects_are_released_without_the_garbage_collector():
    from bridges.petsc._ode import _ODESolve
    func, t = Oscillator(), torch.linspace(0, 1, 3, dtype=F64)
    y0 = torch.tensor([1.0, 0.0], dtype=F64, requires_grad=True)
    gc.collect()
    gc.disable()
    try:
        ys = odeint_adjoint(func, y0, t, method="cn", step_size=0.1)
        assert _live(_ODESolve) == 1
        ys.sum().backward()  # after the last backward that can use it
        assert _live(_ODESolve) == 0
        ys = odeint_adjoint(func, y0, t, method="cn", step_size=0.1)
        del ys  # outputs gone without a backward
        assert _live(_ODESolve) == 0
        with torch.no_grad():
            odeint_adjoint(func, y0, t, method="cn", step_size=0.1)  # nothing kept at all
        assert _live(_ODESolve) == 0
    finally:
        gc.enable()


def test_memory_stays_flat_over_many_mixed_calls(memory_growth):
    func, t = Oscillator(), torch.tensor([0.0, 1.0], dtype=F64)
    y0 = torch.tensor([1.0, 0.0], dtype=F64, requires_grad=True)

    def call(i):
        if i % 2:
            with torch.no_grad():
                odeint_adjoint(func, y0, t, method="cn", step_size=0.5)
        else:
            odeint_adjoint(func, y0, t, method="beuler", step_size=0.5).sum().backward()
    calls = 2000  # 10 MB per 10,000 calls, scaled
    grown = memory_growth(call, calls)
    assert grown < 10 * 2 ** 20 * calls / 10_000, f"resident memory grew by {grown / 2**20:.2f} MB"


def test_torch_compile_of_a_model_with_odeint_and_a_foreign_op_matches_eager():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.encode = torch.nn.Linear(3, 3).double()
            self.rhs = Hybrid(CUBE)
            with torch.no_grad():
                self.encode.weight.copy_(torch.randn(3, 3, dtype=F64, generator=gen))

        def forward(self, x):
            y0 = torch.tanh(self.encode(x))
            ys = odeint_adjoint(self.rhs, y0, torch.linspace(0, 1, 4, dtype=F64), method="cn",
                                step_size=0.1)
            return (CUBE(ys[-1]) ** 2).sum() + ys.square().mean()
    model, x = Model(), torch.tensor([0.3, -0.2, 0.9], dtype=F64)
    results = []
    for run in (model, torch.compile(model)):
        model.zero_grad()
        loss = run(x)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)
    torch._dynamo.reset()


def test_solves_alive_at_the_same_time_keep_their_own_options():
    t, y0 = torch.linspace(0, 1, 3, dtype=F64), torch.tensor([1.0, 0.0], dtype=F64)
    reference = {}
    for name, options in (("beuler", {"ts_type": "beuler"}), ("cn", None)):
        func = Oscillator()
        ys = odeint_adjoint(func, y0, t, step_size=0.1, options=options)
        ys.sum().backward()
        reference[name] = (ys.detach(), func.k.grad)
    funcs = {"beuler": Oscillator(), "cn": Oscillator()}
    solutions = {"beuler": odeint_adjoint(funcs["beuler"], y0, t, step_size=0.1,
                                          options={"ts_type": "beuler"}),
                 "cn": odeint_adjoint(funcs["cn"], y0, t, step_size=0.1)}
    for name in ("cn", "beuler"):  # backward in the other order, both solvers alive
        solutions[name].sum().backward()
    for name in reference:
        torch.testing.assert_close(solutions[name].detach(), reference[name][0])
        torch.testing.assert_close(funcs[name].k.grad, reference[name][1])
    assert not torch.allclose(reference["cn"][0], reference["beuler"][0])


def test_misspelt_options_warn_and_flags_given_as_true_work(capfd):
    func, y0 = Oscillator(), torch.tensor([1.0, 0.0], dtype=F64)
    t = torch.linspace(0, 1, 3, dtype=F64)
    with pytest.warns(UnusedOptionsWarning, match="odeint_adjoint: PETSc never read the "
                                                  "option\\(s\\) ts_typo_option"):
        odeint_adjoint(func, y0, t, step_size=0.25, options={"ts_typo_option": 3})
    odeint_adjoint(func, y0, t, step_size=0.25, options={"ts_monitor": True, "ts_view": True})
    out = capfd.readouterr().out
    assert re.search(r"4 TS \(bridges\d+_\) dt 0.25 time 1\.", out) and "TS Object: (bridges" in out


def test_jacrev_through_odeint_is_one_adjoint_sweep_and_exact():
    """torch.func.jacrev of y(1) w.r.t. y0 for y' = A y equals expm(A) (every row from one
    TSAdjoint sweep that carries all cotangents)."""
    a = torch.tensor([[-1.0, 0.5], [0.2, -2.0]], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    jac = torch.func.jacrev(lambda y0: odeint_adjoint(lambda s, y: a @ y, y0, t, rtol=1e-10,
                                                      atol=1e-12)[-1])(torch.ones(2, dtype=F64))
    torch.testing.assert_close(jac, torch.linalg.matrix_exp(a), rtol=1e-7, atol=1e-9)


def test_vmap_over_y0_runs_one_solve_per_sample_with_each_samples_gradient():
    """torch.func.vmap over y0 (the front door's checks cannot read values there): each
    sample's solution and gradient, by ordinary autograd and by torch.func.grad outside vmap,
    against exp(-k t)."""
    t = torch.tensor([0.0, 1.0], dtype=F64)
    y0 = torch.tensor([[0.5, 1.0], [2.0, -1.0], [1.5, 0.25]], dtype=F64, requires_grad=True)
    single = lambda y: odeint_adjoint(lambda t, y: -0.7 * y, y, t, rtol=1e-10,  # noqa: E731
                                      atol=1e-12)[-1]
    ys = torch.func.vmap(single)(y0)
    decay = float(np.exp(-0.7))
    torch.testing.assert_close(ys, y0.detach() * decay, rtol=1e-8, atol=0)
    ys.square().sum().backward()
    torch.testing.assert_close(y0.grad, 2 * y0.detach() * decay ** 2, rtol=1e-8, atol=0)
    g = torch.func.grad(lambda y: torch.func.vmap(single)(y).square().sum())(y0.detach())
    torch.testing.assert_close(g, y0.grad, rtol=1e-12, atol=0)
    g = torch.func.vmap(torch.func.grad(lambda y: single(y).square().sum()))(y0.detach())
    torch.testing.assert_close(g, y0.grad, rtol=1e-12, atol=0)


def test_torch_func_refuses_a_func_that_captures_a_transformed_tensor():
    """Under torch.func.grad or vmap, a k that func captures (even if also passed as
    adjoint_params) reaches the callbacks as a constant: its derivative was silently 0."""
    t, y0 = torch.tensor([0.0, 1.0], dtype=F64), torch.ones(2, dtype=F64)
    k = torch.tensor([0.7, 0.9], dtype=F64)
    for call in (lambda k: odeint_adjoint(lambda t, y: -k * y, y0, t)[-1].sum(),
                 lambda k: odeint_adjoint(lambda t, y: -k * y, y0, t,
                                          adjoint_params=(k,))[-1].sum()):
        for transform in (torch.func.grad, torch.func.vmap):
            with pytest.raises(ForeignError, match=r"func\(t, y\) uses a tensor captured from "
                                                   r"an enclosing torch.func transform .*only y0 "
                                                   r"and t are differentiated"):
                transform(call)(k[0] if transform is torch.func.grad else k)


def test_a_solve_inside_func_composes_and_forward_mode_is_refused():
    """dy/dt = -k x(y), x^3 + x = y solved by PETSc SNES inside func (its products become
    reverse mode): dk against central differences; under torch.func.jvp the ODE says it
    cannot run there."""
    from bridges.petsc import solve
    k = torch.tensor(0.5, dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=F64)
    t = torch.tensor([0.0, 0.5], dtype=F64)

    def end(k):
        return odeint_adjoint(lambda t, y: -k * solve(lambda x, y: x ** 3 + x - y,
                                                        torch.zeros_like(y), y),
                              y0, t, rtol=1e-11, atol=1e-13, adjoint_params=(k,))[-1].sum()
    end(k).backward()
    with torch.no_grad():
        fd = (end(k + 1e-6) - end(k - 1e-6)) / 2e-6
    np.testing.assert_allclose(float(k.grad), float(fd), rtol=1e-6)
    with pytest.raises(bridges.MissingDerivativeError, match=r"odeint_adjoint cannot run inside "
                                                             r"forward-mode AD"):
        torch.func.jvp(end, (k.detach(),), (torch.ones_like(k),))


def test_forward_products_need_a_forward_rule_and_take_classic_form_functions():
    """products='forward' on a func with an op that has no forward-mode rule is refused by name
    for every Jacobian kind (dense blocks took torch.func's own error); a classic-form
    autograd.Function with a jvp (which torch.func refuses) gives the analytic dy/dk of
    y' = -k y^3: -t (1 + 2 k t)^(-3/2)."""
    from test_linearise import ClassicCube

    class PullbackOnly(ClassicCube):
        jvp = torch.autograd.Function.jvp
    t = torch.tensor([0.0, 1.0], dtype=F64)
    for kwargs in ({}, {"jacobian": "blocks"}, {"sparsity": stencil_sparsity(4)},
                   {"jacobian": "matrix-free"}):
        k = torch.tensor(1.3, dtype=F64, requires_grad=True)
        with pytest.raises(ForeignError, match="products='forward' needs a forward-mode rule"):
            odeint_adjoint(lambda t, y: -k * PullbackOnly.apply(y), torch.ones(4, dtype=F64),
                           t, products="forward", adjoint_params=(k,), **kwargs)
        ys = odeint_adjoint(lambda t, y: -k * ClassicCube.apply(y), torch.ones(4, dtype=F64), t,
                            products="forward", adjoint_params=(k,), rtol=1e-10, atol=1e-12,
                            **kwargs)
        ys[-1, 0].backward()
        np.testing.assert_allclose(k.grad.item(), -(1 + 2 * 1.3) ** -1.5, rtol=1e-6)


def test_a_loose_forward_linear_tolerance_does_not_reach_the_gradient():
    """ksp_rtol 1e-2 (GMRES without a preconditioner, matrix-free): Newton's later iterations
    correct the forward's linear solves, but the adjoint's were as loose and the gradient 17 %
    off. It now matches central differences of the same solve."""
    n = 40
    x = torch.arange(n, dtype=F64)
    y0, w = torch.sin(3.14159 * (x + 1) / (n + 1)), torch.cos(x)
    t = torch.tensor([0.0, 0.5], dtype=F64)

    def loss(k):
        def rhs(s, y):
            padded = torch.nn.functional.pad(y, (1, 1))
            return k * (padded[2:] - 2 * y + padded[:-2]) * (n + 1) ** 2 / 100 - y ** 3
        ys = odeint_adjoint(rhs, y0, t, method="cn", steps_per_interval=20, rtol=1e-10,
                            atol=1e-12, jacobian="matrix-free", adjoint_params=(k,),
                            options={"ksp_rtol": 1e-2, "pc_type": "none"})
        return (w * ys[-1]).sum()
    k = torch.tensor(1.3, dtype=F64, requires_grad=True)
    loss(k).backward()
    with torch.no_grad():
        central = (loss(k + 1e-6) - loss(k - 1e-6)) / 2e-6
    np.testing.assert_allclose(k.grad.item(), central.item(), rtol=1e-5)


def test_a_parameter_read_as_a_number_is_warned_about_not_given_a_silent_zero():
    k = torch.tensor(0.7, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    for method in ("arkimex", "dopri5"):
        ys = odeint_adjoint(lambda s, y: -k.item() * y, torch.ones(1, dtype=F64), t,
                            method=method, adjoint_params=(k,))
        with pytest.warns(UserWarning, match=r"adjoint_params\[0\] requires grad, but func does "
                                             r"not depend on it through torch ops .*\.item\(\)"):
            ys[-1].sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        odeint_adjoint(lambda s, y: -k * y, torch.ones(1, dtype=F64), t,
                       adjoint_params=(k,))[-1].sum().backward()


def test_repeated_or_frozen_adjoint_params_and_times_far_from_zero():
    """A tensor listed twice gets its gradient once (it got it twice); a frozen parameter
    among adjoint_params is a constant (backward failed); output times near 1.7e9 (seconds
    since 1970) are met without snapping steps that end well short of them (18 % off), and
    tolerances below what double resolves there fail naming the cause."""
    k = torch.tensor(0.7, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    odeint_adjoint(lambda t, y: -k * y, torch.ones(1, dtype=F64), t, adjoint_params=[k, k],
                   rtol=1e-10, atol=1e-12)[-1].sum().backward()
    np.testing.assert_allclose(k.grad.item(), -2 * np.exp(-1.4), rtol=1e-7)
    lin = torch.nn.Linear(2, 2).double()
    lin.bias.requires_grad_(False)
    y0 = torch.tensor([0.3, -0.2], dtype=F64)
    for method in ("arkimex", "dopri5"):
        lin.weight.grad = None
        odeint_adjoint(lambda t, y: torch.tanh(lin(y)), y0, t, method=method,
                       adjoint_params=list(lin.parameters()))[-1].sum().backward()
        assert lin.weight.grad is not None and lin.bias.grad is None
    far = 1.7e9 + torch.tensor([0.0, 0.01, 0.02, 0.05], dtype=F64)
    ys = odeint_adjoint(lambda t, y: -100 * y, torch.ones(1, dtype=F64), far, method="dopri5")
    np.testing.assert_allclose(ys[:, 0].numpy(), np.exp(-100 * (far - far[0]).numpy()),
                               rtol=1e-4)
    with pytest.raises(bridges.SolverFailure, match=r"too small for double precision to add to "
                                                    r"a time this far from 0"):
        odeint_adjoint(lambda t, y: -100 * y, torch.ones(1, dtype=F64), far, rtol=1e-10,
                       atol=1e-12)


def test_structure_promises_that_func_breaks_are_named(monkeypatch):
    """jacobian='blocks' for samples that func couples (refused at the start); samples that
    func couples only once their sum passes 3, or only for t in (0.4, 0.6), after per-sample
    blocks were chosen near y0 (13-15 % and 2 % off before): refused at the first forward
    Jacobian that sees the coupling, and at the end state before the adjoint if a Jacobian
    missed it; a ts_type in options of the other form than method's."""
    from bridges.petsc._jacobian import ColouredJacobian
    y0 = torch.tensor([[0.5, 0.6], [0.7, 0.4]], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    with pytest.raises(ForeignError, match=r"jacobian='blocks' takes the samples \(rows\) of y0 "
                                           r"as independent, but func couples them"):
        odeint_adjoint(lambda s, y: -y + 0.5 * y.flip(0), y0, t, jacobian="blocks")
    late = lambda s, y: 0.8 * y - 0.5 * torch.relu(y.sum(0, keepdim=True) - 3.0)  # noqa: E731
    middle = lambda s, y: -y ** 3 + 10 * torch.relu(0.1 - (s - 0.5).abs()) * (  # noqa: E731
        y.mean(0) - y)
    coupled = r"couples the samples \(rows\) of its input at this state.*jacobian='matrix-free'"
    for func, kwargs in ((late, {"steps_per_interval": 10}), (middle, {})):
        with pytest.raises(ForeignError, match=coupled):
            odeint_adjoint(func, y0, t, **kwargs)
        ys = odeint_adjoint(func, y0, t, jacobian="matrix-free", **kwargs)
        ys[-1].sum().backward()  # the safe path
    with monkeypatch.context() as patch:  # the end state's check, should a Jacobian miss it
        patch.setattr(ColouredJacobian, "verify_next", lambda self, always=False: None)
        ys = odeint_adjoint(late, y0, t, steps_per_interval=10)
        with pytest.raises(ForeignError, match=r"func couples the samples \(rows\) of y at "
                                               r"t = 2, though not near y0"):
            ys[-1].sum().backward()
    with pytest.raises(ForeignError, match=r"the options set ts_type 'beuler', an implicit "
                                           r"method, but method='dopri5'.*method='beuler'"):
        odeint_adjoint(lambda s, y: -y, y0, t, method="dopri5", options={"ts_type": "beuler"})
