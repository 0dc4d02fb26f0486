"""BRUSS-2D on a periodic Grid: gradients w.r.t. the rates and the initial state against central
differences, the solution against scipy with a right-hand side of its own. (Its 1-rank against 2-
and 4-rank agreement is a case of tests/mpi_cases.py.)"""
import numpy as np
import pytest
import scipy.sparse
import torch
from scipy.integrate import solve_ivp

from bridges.problems import brusselator
from bridges.petsc import Grid

F64 = torch.float64


def _problem(n=16, **kwargs):
    return brusselator.bruss2d_grid(n, **{"t_end": 0.3, "frames": 2, "step_size": 0.05, **kwargs})


def _loss(ys, weights):
    return (weights * ys[1:]).sum() + (ys[-1] ** 2).sum() / 100


def test_gradients_match_central_differences_of_the_same_solve():
    problem = _problem()
    weights = torch.randn((2, 16, 16, 2), dtype=F64, generator=torch.Generator().manual_seed(0))
    y0 = problem.y0.clone().requires_grad_()
    _loss(problem.solve(y0=y0), weights).backward()
    grad_rates, grad_y0 = problem.func.log_rates.grad.clone(), y0.grad.clone()
    assert bool((grad_rates != 0).all())

    def loss_at(log_rates=None, start=None):
        with torch.no_grad():
            if log_rates is not None:
                problem.func.log_rates.copy_(log_rates)
            return float(_loss(problem.solve(y0=start), weights))
    centre = problem.func.log_rates.detach().clone()
    h = 1e-5
    for i in range(3):
        step = torch.zeros(3, dtype=F64)
        step[i] = h
        central = (loss_at(centre + step) - loss_at(centre - step)) / (2 * h)
        assert grad_rates[i].item() == pytest.approx(central, rel=1e-6), brusselator.NAMES[i]
    problem.func.log_rates.data.copy_(centre)
    # dL/dy0 along a random direction
    direction = torch.randn(y0.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    h = 1e-4
    central = (loss_at(start=problem.y0 + h * direction)
               - loss_at(start=problem.y0 - h * direction)) / (2 * h)
    assert float((grad_y0 * direction).sum()) == pytest.approx(central, rel=1e-6)


def _scipy_solution(n, t):
    """BRUSS-2D by scipy Radau at tight tolerances, with its own numpy right-hand side and
    sparse Jacobian (nothing shared with the module but the equations)."""
    a, b, alpha = brusselator.RATES
    m = n * n
    step = scipy.sparse.diags([1.0, 1.0, -2.0, 1.0, 1.0], [-(n - 1), -1, 0, 1, n - 1],
                              shape=(n, n)) * n * n  # periodic second difference
    eye = scipy.sparse.identity(n)
    lap = (scipy.sparse.kron(eye, step) + scipy.sparse.kron(step, eye)).tocsr()

    def rhs(_, y):
        u, v = y[:m], y[m:]
        uuv = u * u * v
        return np.concatenate([a + uuv - (b + 1) * u + alpha * (lap @ u),
                               b * u - uuv + alpha * (lap @ v)])

    def jac(_, y):
        u, v = y[:m], y[m:]
        return (scipy.sparse.block_diag([alpha * lap, alpha * lap])
                + scipy.sparse.bmat([[scipy.sparse.diags(2 * u * v - (b + 1)),
                                      scipy.sparse.diags(u * u)],
                                     [scipy.sparse.diags(b - 2 * u * v),
                                      scipy.sparse.diags(-u * u)]])).tocsc()
    x = np.arange(n) / n
    y0 = np.concatenate([np.repeat(22 * x * (1 - x) ** 1.5, n),   # u(y): constant along rows
                         np.tile(27 * x * (1 - x) ** 1.5, n)])    # v(x)
    sol = solve_ivp(rhs, (t[0], t[-1]), y0, method="Radau", t_eval=t, jac=jac, rtol=1e-11,
                    atol=1e-11)
    assert sol.success
    return sol.y.T.reshape(len(t), 2, n, n).transpose(0, 2, 3, 1)  # -> (t, y, x, [u, v])


def test_crank_nicolson_converges_to_scipy_at_second_order():
    n = 12
    errors = []
    for dt in (0.04, 0.02):
        problem = _problem(n, step_size=dt, t_end=0.4)
        with torch.no_grad():
            ys = problem.solve().numpy()
        reference = _scipy_solution(n, problem.t.numpy())
        errors.append(np.abs(ys - reference).max() / np.abs(reference).max())
    assert errors[1] < 1e-3
    assert 3.0 < errors[0] / errors[1] < 5.0, errors  # halving the step: 4x smaller error


def test_the_module_asks_for_its_grid():
    with pytest.raises(ValueError, match="Brusselator: needs a square 2-D Grid with dof=2"):
        brusselator.Brusselator(Grid((8, 8)))
    with pytest.raises(ValueError, match="bruss2d_grid: n must be at least 4"):
        brusselator.bruss2d_grid(3)
