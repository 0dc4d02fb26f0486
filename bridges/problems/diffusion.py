"""Steady diffusion -div(kappa grad T) = s on the unit square (seed 002's problem and harder
ones), its residual in torch, and its two solvers: PETSc through ``bridges.petsc.solve`` and the
seed's LBFGS on the residual. Shared by the steady-diffusion demo, its benchmarks and tests.

The residual is the seed's conv-stencil finite-difference operator: flux form with face-averaged
kappa (so the Jacobian is symmetric), Dirichlet values on the boundary ring of an n x n node grid
(h = 1/(n-1)), unknowns the (n-2)^2 interior nodes, scaled by h^2 and signed so that the Jacobian
is positive definite: F = h^2 (-div(kappa grad T) - s). On a `bridges.petsc.Grid` of the interior
nodes (`interior_grid`) the boundary ring is the ghost layer outside the domain, where
`grid_residual` puts the Dirichlet values. Grid sizes n = 2^k + 3 (2^k + 1 unknowns per axis) let
multigrid coarsen all the way down.
"""
from __future__ import annotations

import math
import time

import torch

from ..plotting import progress

# F is linear in T: one Newton step (ksponly) with CG solved until |F| <= 1e-11 (or relative
# 1e-12), preconditioned by geometric multigrid (SOR smoothing, Galerkin coarse operators) on the
# grid's DMDA hierarchy; PRECONDITIONERS["gamg"] uses algebraic multigrid instead
SOLVER = {"snes_type": "ksponly", "ksp_type": "cg", "ksp_rtol": 1e-12, "ksp_atol": 1e-11,
          "ksp_norm_type": "unpreconditioned"}
PRECONDITIONERS = {
    "mg": {"pc_type": "mg", "mg_levels_ksp_type": "richardson", "mg_levels_pc_type": "sor"},
    "gamg": {"pc_type": "gamg"},
}


def residual(T, kappa, source, boundary=None):
    """F(T) = h^2 (-div(kappa grad T) - s) at the interior nodes of an n x n grid.

    T: (n-2, n-2) interior values; kappa: (n, n) nodal conductivity (face values are averages of
    the two nodes); source: (n-2, n-2); boundary: (n, n) whose outer ring holds the Dirichlet
    values (interior entries ignored), or None for T = 0 on the boundary.
    """
    n = T.shape[-1] + 2
    full = torch.nn.functional.pad(T, (1, 1, 1, 1))
    if boundary is not None:
        ring = torch.ones_like(boundary)
        ring[1:-1, 1:-1] = 0
        full = full + boundary * ring
    return _flux_residual(full, kappa, source / (n - 1) ** 2)


def _flux_residual(full, kappa, h2_source):
    """-div(kappa grad T) - h^2 s at the inner points of a block of nodal values `full` (the
    block and kappa one node wider than the result on every side)."""
    kx = 0.5 * (kappa[:, 1:] + kappa[:, :-1])   # faces between columns
    ky = 0.5 * (kappa[1:, :] + kappa[:-1, :])   # faces between rows
    flux_x = kx * (full[:, 1:] - full[:, :-1])
    flux_y = ky * (full[1:, :] - full[:-1, :])
    div = (flux_x[1:-1, 1:] - flux_x[1:-1, :-1]) + (flux_y[1:, 1:-1] - flux_y[:-1, 1:-1])
    return -div - h2_source


def interior_grid(n, comm=None):
    """The Grid of the (n-2)^2 interior nodes of an n x n node grid, split over the ranks of
    `comm` (default: every rank of mpiexec); its ghost layer outside the domain is the boundary
    ring."""
    from ..petsc import Grid
    return Grid((n - 2, n - 2), comm=comm)


def grid_residual(grid):
    """`residual` on `grid`'s blocks: F(u, kappa, source, boundary) maps this rank's ghosted
    block u of interior values to F on its owned block. kappa, source and boundary are the full
    arrays (replicated on every rank, as in `residual`); each rank reads its window of them."""
    nodes = tuple(slice(s.start, s.stop + 2) for s in grid.owned)  # the ghosted block's nodes
    ring = grid.exterior()  # the ghosted block's points outside the domain: boundary nodes

    def F(u, kappa, source, boundary=None):
        full = u if boundary is None else torch.where(ring, boundary[nodes], u)
        h2 = 1.0 / (kappa.shape[-1] - 1) ** 2
        return _flux_residual(full, kappa[nodes], h2 * source[grid.owned])
    return F


def seed_problem(n, dtype=torch.float64):
    """The seed's test case on an n x n node grid: kappa = 1, s = 1, T = 0 on the boundary."""
    return torch.ones(n, n, dtype=dtype), torch.ones(n - 2, n - 2, dtype=dtype)


def varied_problem(n, dtype=torch.float64):
    """A harder case for the figures: smooth kappa varying 20x, a hot blob, warm left wall."""
    x = torch.linspace(0, 1, n, dtype=dtype)
    X, Y = torch.meshgrid(x, x, indexing="xy")
    kappa = true_kappa(X, Y)
    source = 40.0 * torch.exp(-((X - 0.65) ** 2 + (Y - 0.35) ** 2) / 0.01)[1:-1, 1:-1]
    boundary = torch.zeros(n, n, dtype=dtype)
    boundary[:, 0] = torch.sin(math.pi * x)
    return kappa, source, boundary


def true_kappa(X, Y):
    """The varied problem's conductivity: 0.2 below a wavy interface, 4 above it."""
    return 0.2 + 3.8 * torch.sigmoid(12 * (Y - 0.5 - 0.15 * torch.sin(2 * math.pi * X)))


def residual_norm(T, kappa, source, boundary=None):
    """The 2-norm of `residual` in float64, without a graph."""
    with torch.no_grad():
        return float(torch.linalg.norm(residual(T.double(), kappa.double(), source.double(),
                                                None if boundary is None else boundary.double())))


def solve_petsc(kappa, source, boundary=None, options=None, grid=None, pc=None):
    """T with residual 2-norm <= 1e-10 by PETSc: CG + multigrid (pc "mg" geometric, on the grid's
    DMDA hierarchy, or "gamg" algebraic) on the Jacobian assembled from coloured products.
    pc None: "mg" where the grid coarsens to at least 3 levels (n = 2^k m + 3), else "gamg".
    grid: an `interior_grid(n)` to reuse (default: a new one). Returns (T, solve statistics),
    T this rank's owned block of the interior values (all of them on one rank)."""
    from ..petsc import mg_levels, solve
    grid = grid or interior_grid(kappa.shape[0])
    pc = pc or ("mg" if mg_levels(grid) >= 3 else "gamg")
    stats = {}
    args = (kappa, source) if boundary is None else (kappa, source, boundary)
    T = solve(grid_residual(grid), grid.zeros(), *args, grid=grid, linear=True,
              symmetric=True, stats=stats,
              options={**SOLVER, **PRECONDITIONERS[pc], **(options or {})})
    return T, stats


def solve_lbfgs(kappa, source, *, max_steps=500, time_limit=60.0, dtype=torch.float32,
                show_progress=False):
    """Seed 002's method: minimise the mean squared residual (unscaled, as the seed's loss) over
    T with torch.optim.LBFGS (its defaults: lr 1, 20 inner iterations), in float32 like the seed.
    Stops at the seed's loss target 1e-10, after max_steps, or after time_limit seconds."""
    n = kappa.shape[0]
    h2 = 1.0 / (n - 1) ** 2
    kappa, source = kappa.to(dtype), source.to(dtype)
    T = torch.zeros(n - 2, n - 2, dtype=dtype, requires_grad=True)
    optimiser = torch.optim.LBFGS([T])

    def closure():
        optimiser.zero_grad()
        loss = torch.mean((residual(T, kappa, source) / h2) ** 2)
        loss.backward()
        return loss

    start, losses = time.perf_counter(), []
    for _ in progress(range(max_steps), desc=f"LBFGS {n}x{n}", disable=not show_progress,
                      leave=False):
        losses.append(float(optimiser.step(closure).detach()))
        if losses[-1] < 1e-10 or time.perf_counter() - start > time_limit:
            break
    return T.detach(), {"seconds": time.perf_counter() - start, "steps": len(losses),
                        "loss": losses[-1]}
