"""Poisson solves  laplacian(phi) = b  on the periodic cell-centre grid (5-point stencil), for the
pressure projection. b must have zero mean (a divergence does); phi is the zero-mean solution.

    PetscPoisson(n, h)   # bridges.petsc.solve on a periodic Grid: CG + geometric multigrid,
                         # constant null space; its gradient is one adjoint CG solve
    FFTPoisson(n, h)     # pure torch: the stencil's exact eigen-decomposition by FFT (the
                         # in-framework reference; torch autograd differentiates it)

Both take b of shape (..., n, n). The PETSc one solves one field per call (a loop over the
leading axes): the fields are independent, not coupled degrees of freedom.
"""
from __future__ import annotations

import math

import torch

# one CG solve preconditioned by the grid's geometric multigrid; the tolerance is on the true
# (unpreconditioned) residual, so after the projection |div u| <= ksp_rtol * |div u*|
OPTIONS = {"snes_type": "ksponly", "ksp_type": "cg", "pc_type": "mg",
           "ksp_norm_type": "unpreconditioned", "ksp_rtol": 1e-10}


def _check(who, b, n):
    if not isinstance(b, torch.Tensor) or b.dim() < 2 or tuple(b.shape[-2:]) != (n, n):
        got = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
        raise ValueError(f"{who}: expected a right-hand side of shape (..., {n}, {n}), got {got}")


class FFTPoisson:
    """laplacian(phi) = b by FFT: the 5-point Laplacian's eigenvalues on an n x n periodic grid
    are -(4 / h^2)(sin^2(pi k / n) + sin^2(pi l / n)); the zero mode (constants) is dropped."""

    def __init__(self, n, h):
        self.n, self.h = int(n), float(h)
        s = torch.sin(math.pi * torch.arange(self.n, dtype=torch.float64) / self.n) ** 2
        eig = -(4.0 / self.h ** 2) * (s[:, None] + s[None, :self.n // 2 + 1])  # rfft2 layout
        eig[0, 0] = 1.0
        inverse = 1.0 / eig
        inverse[0, 0] = 0.0
        self.inverse = inverse

    def __call__(self, b):
        _check("FFTPoisson", b, self.n)
        inverse = self.inverse.to(b.dtype)
        return torch.fft.irfft2(torch.fft.rfft2(b) * inverse, s=(self.n, self.n))


class PetscPoisson:
    """laplacian(phi) = b through `bridges.petsc.solve` on a periodic `Grid` of n x n points.

    The residual is h^2 (b - laplacian(phi)) on the ghosted block (a symmetric positive
    semi-definite Jacobian, the constants its null space), linear: PETSc assembles it from the
    grid's colouring and solves once with CG and multigrid. Options update `OPTIONS` (PETSc's
    options, keyed without the dash, e.g. ``{"pc_type": "gamg"}``). ``stats`` (a dict) receives
    the last solve's statistics.
    """

    def __init__(self, n, h, options=None):
        from bridges.petsc import PETSc, Grid
        self.n, self.h = int(n), float(h)
        # the whole field on each process: the flow solver around it is serial torch
        self.grid = Grid((self.n, self.n), boundary="periodic", comm=PETSc.COMM_SELF)
        self.options = {**OPTIONS, **(options or {})}
        self.stats = {}

    def residual(self, phi, b):
        i = self.grid.interior
        lap = phi[:-2, 1:-1] + phi[2:, 1:-1] + phi[1:-1, :-2] + phi[1:-1, 2:] - 4 * phi[i]
        return self.h ** 2 * b - lap

    def __call__(self, b):
        _check("PetscPoisson", b, self.n)
        from bridges.petsc import solve
        flat = b.reshape(-1, self.n, self.n)
        out = []
        for field in flat:
            field = field.to(torch.float64)
            out.append(solve(self.residual, self.grid.zeros(), field - field.mean(),
                             grid=self.grid, linear=True, symmetric=True, nullspace="constant",
                             options=self.options, stats=self.stats))
        return torch.stack(out).reshape(b.shape).to(b.dtype)
