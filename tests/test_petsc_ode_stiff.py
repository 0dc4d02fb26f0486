"""odeint_adjoint on hard stiff problems with default settings: the IVP test-set problems of
bridges.problems against their independent references (scipy Radau at tight tolerances, the test
set's published values), and gradients against central differences of tight scipy solutions."""
import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from bridges import ForeignError
from bridges.petsc import odeint_adjoint
from bridges.problems import problem

F64 = torch.float64


@pytest.mark.parametrize("name", ["rober", "hires", "vdpol", "orego", "pollu"])
def test_registry_problems_solve_with_default_settings(name):
    """Only the tolerances are given. The error over every output time, in units of those
    tolerances (|y - y_ref| / (atol + rtol |y_ref|)), stays within what sound adaptive solvers
    reach: scipy's BDF at the same tolerances measured 3 to 370 on these problems (Radau 0.2 to
    0.6), bridges' default 2 to 51."""
    p = problem(name)
    func, y0, t = p.tensors()
    with torch.no_grad():
        ys = odeint_adjoint(func, y0, t, rtol=p.rtol, atol=p.atol)
    assert p.error(ys) < 100


# ROBER's y2 ~ 1e-13 at t = 1e11 needs a tiny atol
@pytest.mark.parametrize("name,rtol,atol,within", [("rober", 1e-6, 1e-20, 1e-3),
                                                   ("hires", 1e-8, 1e-12, 1e-4)])
def test_final_values_match_the_published_ones_in_every_component(name, rtol, atol, within):
    p = problem(name)
    func, y0, t = p.tensors()
    with torch.no_grad():
        ys = odeint_adjoint(func, y0, t, rtol=rtol, atol=atol)
    np.testing.assert_allclose(ys[-1].numpy(), p.published, rtol=within, atol=0)


# problem, tolerances, entries of k to difference and their relative step
GRADIENT_CASES = [("rober", 1e-6, 1e-20, [0, 1, 2], 1e-4),
                  ("hires", 1e-8, 1e-12, [0, 6, 9], 1e-5)]  # k1, k7 (nonlinear), the source


@pytest.mark.parametrize("name,rtol,atol,entries,rel_step", GRADIENT_CASES)
def test_loss_gradient_matches_central_differences_of_scipy(name, rtol, atol, entries, rel_step):
    """dL/dk of a loss over every output time (ROBER: 49 times up to 1e11), each component
    of y scaled to order one, by TSAdjoint against central differences of the tight scipy
    Radau reference."""
    p = problem(name)
    reference = p.reference()
    weights = np.random.default_rng(0).standard_normal(reference.shape) / \
        np.abs(reference).max(axis=0)
    func, y0, t = p.tensors()
    ys = odeint_adjoint(func, y0, t, rtol=rtol, atol=atol)
    (ys * torch.from_numpy(weights)).sum().backward()
    k = p.params["k"]
    for j in entries:
        up, down = k.copy(), k.copy()
        up[j] *= 1 + rel_step
        down[j] *= 1 - rel_step
        difference = p.reference(None, {"k": up}) - p.reference(None, {"k": down})
        fd = np.sum(weights * difference) / (2 * rel_step * k[j])
        assert float(func.k.grad[j]) == pytest.approx(fd, rel=1e-2 if name == "rober" else 1e-4)


class Brusselator1D(torch.nn.Module):
    """u' = a + u^2 v - (b + 1) u + alpha u_xx, v' = b u - u^2 v + alpha v_xx on (0, 1), with
    u = a, v = b / a at both ends; y has shape (2, n) (interior points)."""

    def __init__(self, n, a=1.0, b=3.0, alpha=0.02):
        super().__init__()
        self.n = n
        self.a, self.b = (torch.nn.Parameter(torch.tensor(v, dtype=F64)) for v in (a, b))
        self.alpha = alpha

    def forward(self, t, y):
        u, v = y
        h2 = (self.n + 1) ** 2
        ends = torch.stack([self.a, self.b / self.a]).unsqueeze(-1)
        padded = torch.cat([ends, y, ends], -1)
        lap = (padded[:, 2:] - 2 * y + padded[:, :-2]) * h2
        uuv = u * u * v
        return torch.stack([self.a + uuv - (self.b + 1) * u, self.b * u - uuv]) + self.alpha * lap


def _brusselator_scipy(n, a, b, t, alpha=0.02):
    x = np.arange(1, n + 1) / (n + 1)
    y0 = np.concatenate([1 + np.sin(2 * np.pi * x), np.full(n, 3.0)])

    def rhs(_, y):
        u, v = y[:n], y[n:]
        lap = lambda w, end: (np.concatenate([w[1:], [end]]) - 2 * w
                              + np.concatenate([[end], w[:-1]])) * (n + 1) ** 2
        uuv = u * u * v
        return np.concatenate([a + uuv - (b + 1) * u + alpha * lap(u, a),
                               b * u - uuv + alpha * lap(v, b / a)])
    sol = solve_ivp(rhs, (t[0], t[-1]), y0, method="Radau", t_eval=t, rtol=1e-11, atol=1e-12)
    return y0, sol.y.T


def test_brusselator_adaptive_arkimex_adjoint_with_a_matrix_free_jacobian():
    n, t = 24, np.array([0.0, 1.0, 2.0])
    y0, _ = _brusselator_scipy(n, 1.0, 3.0, t)
    func = Brusselator1D(n)
    ys = odeint_adjoint(func, torch.tensor(y0).reshape(2, n), torch.tensor(t), method="arkimex",
                        rtol=1e-8, atol=1e-10, jacobian="matrix-free")
    weights = torch.linspace(0.5, 1.5, 2 * n, dtype=F64)
    (ys[-1].reshape(-1) * weights).sum().backward()
    step = 1e-5
    for name, (da, db) in (("a", (step, 0.0)), ("b", (0.0, step))):
        loss = [_brusselator_scipy(n, 1.0 + sign * da, 3.0 + sign * db, t)[1][-1] @
                weights.numpy() for sign in (1, -1)]
        fd = (loss[0] - loss[1]) / (2 * step)
        assert float(getattr(func, name).grad) == pytest.approx(fd, rel=1e-4)


def test_the_users_first_step_and_step_options_are_honoured():
    """Adaptive by default, but options win: backward Euler with the user's fixed step 0.25 on
    y' = -y is (1 + h)^-k exactly."""
    decay = lambda t, y: -y
    y0, t = torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    ys = odeint_adjoint(decay, y0, t, method="beuler", rtol=1e-3,
                        options={"ts_adapt_type": "none", "ts_time_step": 0.25})
    assert float(ys[-1]) == pytest.approx(1.25 ** -4, rel=1e-12)
    adaptive = odeint_adjoint(decay, y0, t, method="beuler", rtol=1e-3,
                              options={"ts_time_step": 0.25})
    assert float(adaptive[-1]) != pytest.approx(1.25 ** -4, rel=1e-6)  # the controller acted


def test_a_failed_newton_solve_is_retried_with_a_smaller_step_by_default():
    """A first step of 1e4 on ROBER, with at most two Newton iterations, fails; the step is
    retried smaller until it converges, and the solution is still right."""
    p = problem("rober_1e5")
    func, y0, t = p.tensors()
    with torch.no_grad():
        ys = odeint_adjoint(func, y0, t[[0, -1]], rtol=1e-6, atol=1e-12,
                            options={"ts_time_step": 1e4, "snes_max_it": 2})
    np.testing.assert_allclose(ys[-1].numpy(), p.reference(t[[0, -1]].numpy())[-1], rtol=1e-3)


def test_step_failures_say_which_reason_and_what_to_try():
    p = problem("rober_1e5")
    func, y0, t = p.tensors()
    with pytest.raises(ForeignError, match=r"(?s)DIVERGED_NONLINEAR_SOLVE at t = 0 .*What to "
                                           r"try: a smaller first step"):
        odeint_adjoint(func, y0, t[[0, -1]], rtol=1e-6, atol=1e-12,
                       options={"ts_time_step": 1e4, "snes_max_it": 1,
                                "ts_max_snes_failures": 1})
    with pytest.raises(ForeignError, match=r"reached 1 of 2 output times: it stopped at t = "
                                           r"\S+ after its maximum of 3 steps; .*ts_max_steps"):
        odeint_adjoint(func, y0, t[[0, -1]], rtol=1e-6, atol=1e-12, options={"ts_max_steps": 3})


def test_a_lagged_jacobian_is_refused_when_a_gradient_is_recorded():
    p = problem("rober_1e5")
    func, y0, t = p.tensors()
    with pytest.raises(ForeignError, match="snes_lag_jacobian lags the Jacobian.*wrong gradients"):
        odeint_adjoint(func, y0, t[:3], options={"snes_lag_jacobian": 2})
    with torch.no_grad():  # forward only: allowed
        odeint_adjoint(func, y0, t[:3], options={"snes_lag_jacobian": 2})
