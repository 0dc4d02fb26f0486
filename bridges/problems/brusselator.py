"""BRUSS-2D, the Brusselator with diffusion on the periodic unit square (Hairer and Wanner, Solving
ODEs II, section IV.10), written once for every solver that takes it:

    du/dt = a + u^2 v - (b + 1) u + alpha Lap(u)
    dv/dt = b u - u^2 v           + alpha Lap(v),      a = 1, b = 3.4, alpha = 0.002

on n x n points (spacing 1/n, 5-point Laplacian), from u(0) = 22 y (1 - y)^1.5,
v(0) = 27 x (1 - x)^1.5. Diffusion makes it stiff (eigenvalues down to -8 alpha n^2).

- `Brusselator` and `bruss2d_grid`: on a `bridges.petsc.Grid` (dof 2, periodic halo exchange), one
  rank's block at a time, with log-rates as parameters: the reaction-diffusion demo and benchmark.
- the whole-array torch right-hand side and its scipy twin with analytic Jacobians: the IVP
  problem ``bridges.problems.problem("bruss2d")``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

RATES = (1.0, 3.4, 0.002)  # a, b, alpha
NAMES = ("a", "b", "alpha")
# which species each equation reads (Grid's coupling): both at its own point (the reaction), only
# its own at the neighbours (the diffusion)
COUPLING = (np.ones((2, 2)), np.eye(2))
# Newton to a tight tolerance, so that the adjoint gradient is that of the computed solution
OPTIONS = {"snes_rtol": 1e-10, "snes_atol": 1e-12, "ksp_rtol": 1e-12}


def _laplacian_torch(w, n):
    return (torch.roll(w, 1, -1) + torch.roll(w, -1, -1) + torch.roll(w, 1, -2)
            + torch.roll(w, -1, -2) - 4 * w) * (n * n)


def bruss_torch(t, y, a, b, alpha):
    """dy/dt of the whole (..., 2, n, n) state, for ``problem("bruss2d")``."""
    n = y.shape[-1]
    u, v = y[..., 0, :, :], y[..., 1, :, :]
    uuv = u * u * v
    return torch.stack([a + uuv - (b + 1) * u + alpha * _laplacian_torch(u, n),
                        b * u - uuv + alpha * _laplacian_torch(v, n)], -3)


class BrusselatorScipy:
    """numpy/scipy side of the 2-D Brusselator on an n x n periodic grid."""

    def __init__(self, n):
        self.n = n
        d = sp.diags([1.0, 1.0, -2.0, 1.0, 1.0], [-(n - 1), -1, 0, 1, n - 1], shape=(n, n)) * n * n
        eye = sp.identity(n)
        self.L = (sp.kron(eye, d) + sp.kron(d, eye)).tocsr()  # on the row-major flattened grid
        self.LL = sp.block_diag([self.L, self.L], format="csc")

    def rhs(self, t, y, p):
        a, b, alpha = float(p["a"]), float(p["b"]), float(p["alpha"])
        u, v = y[:self.n ** 2], y[self.n ** 2:]
        uuv = u * u * v
        return np.concatenate([a + uuv - (b + 1) * u + alpha * (self.L @ u),
                               b * u - uuv + alpha * (self.L @ v)])

    def jac(self, t, y, p):
        b, alpha = float(p["b"]), float(p["alpha"])
        m = self.n ** 2
        u, v = y[:m], y[m:]
        local = sp.diags([np.concatenate([2 * u * v - (b + 1), -u * u]), u * u, b - 2 * u * v],
                         [0, m, -m])  # the reaction's 2 x 2 blocks at every grid point
        return (alpha * self.LL + local).tocsc()

    def jac_mul(self, t, y, p, V):
        b, alpha = float(p["b"]), float(p["alpha"])
        m = self.n ** 2
        u, v, Vu, Vv = y[:m, None], y[m:, None], V[:m], V[m:]
        return np.concatenate([(2 * u * v - (b + 1)) * Vu + u * u * Vv + alpha * (self.L @ Vu),
                               (b - 2 * u * v) * Vu - u * u * Vv + alpha * (self.L @ Vv)])

    def jac_p(self, t, y, p):
        u, v = y[:self.n ** 2], y[self.n ** 2:]
        one, zero = np.ones_like(u), np.zeros_like(u)
        return np.stack([np.concatenate([one, zero]), np.concatenate([-u, u]),
                         np.concatenate([self.L @ u, self.L @ v])], 1)


class Brusselator(torch.nn.Module):
    """dy/dt of BRUSS-2D on a periodic `grid` (dof 2): maps this rank's ghosted block
    (rows + 2, cols + 2, 2) to dy/dt on its owned block. Its parameters are the logarithms of
    (a, b, alpha), so that the three share one scale and stay positive."""

    def __init__(self, grid, rates=RATES):
        super().__init__()
        if grid.dof != 2 or len(grid.shape) != 2 or grid.shape[0] != grid.shape[1]:
            raise ValueError(f"Brusselator: needs a square 2-D Grid with dof=2, got {grid!r}")
        self.grid = grid
        self.log_rates = torch.nn.Parameter(torch.tensor(rates, dtype=torch.float64).log())

    @property
    def rates(self) -> torch.Tensor:
        return self.log_rates.detach().exp()

    def forward(self, t, y):
        a, b, alpha = self.log_rates.exp()
        n = self.grid.shape[0]
        c = y[1:-1, 1:-1]  # owned points (stencil width 1)
        laplacian = (y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4 * c) * n ** 2
        u, v = c[..., 0], c[..., 1]
        uuv = u * u * v
        return torch.stack([a + uuv - (b + 1) * u, b * u - uuv], -1) + alpha * laplacian


def initial_state(n: int) -> torch.Tensor:
    """The full (n, n, 2) initial state: u = 22 y (1 - y)^1.5, v = 27 x (1 - x)^1.5."""
    x = torch.arange(n, dtype=torch.float64) / n
    Y, X = torch.meshgrid(x, x, indexing="ij")
    return torch.stack([22 * Y * (1 - Y) ** 1.5, 27 * X * (1 - X) ** 1.5], -1)


@dataclass
class GridProblem:
    """Everything a solve needs: ``odeint_adjoint(func, y0, t, grid=grid, method="cn",
    step_size=step_size)``. y0 is this rank's owned block."""
    func: Brusselator
    y0: torch.Tensor
    t: torch.Tensor
    grid: object  # a bridges.petsc.Grid
    step_size: float

    def solve(self, options=None, t=None, y0=None):
        """y at the times t (default self.t) from y0 (default self.y0), differentiable."""
        from ..petsc import odeint_adjoint
        return odeint_adjoint(self.func, self.y0 if y0 is None else y0,
                              self.t if t is None else t, method="cn",
                              step_size=self.step_size, grid=self.grid,
                              options={**OPTIONS, **(options or {})})


def bruss2d_grid(n=64, *, t_end=1.0, frames=4, step_size=0.025, rates=RATES, comm=None):
    """BRUSS-2D on an n x n periodic `bridges.petsc.Grid` over `comm` (default: every rank of
    mpiexec), for Crank-Nicolson with fixed steps of step_size (clipped to land on each output)
    through frames + 1 output times evenly spaced in [0, t_end]."""
    from ..petsc import Grid
    if n < 4:
        raise ValueError(f"bruss2d_grid: n must be at least 4 (a periodic 5-point stencil), "
                         f"got {n}")
    grid = Grid((n, n), dof=2, boundary="periodic", coupling=COUPLING, comm=comm)
    t = torch.linspace(0.0, t_end, frames + 1, dtype=torch.float64)
    return GridProblem(Brusselator(grid, rates), grid.scatter(initial_state(n)), t, grid,
                       float(step_size))
