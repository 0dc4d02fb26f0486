"""The discrete operator: TPFA transmissibilities, the residual in torch, the matrix in scipy.

Cells are indexed k[i, j]: row i (y, 0 at the bottom), column j (x, flow from j=0 to j=nx-1).
With square cells the geometric factor face-length/centre-distance is 1, so an interior face's
transmissibility is sqrt(k1 k2) and a left/right boundary face's (half a cell away) is 2 k.
Residual r(p, k) = A(k) p - b(k) = net outflow of each cell; A is symmetric positive definite.
"""
from __future__ import annotations

import numbers

import numpy as np
import scipy.sparse as sp
import torch

from .._errors import check_finite


def check_permeability(k, who: str) -> None:
    """Raise a clear error unless k is a 2-D floating tensor of finite positive values."""
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"{who}: k must be a torch.Tensor of cell permeabilities, got "
                        f"{type(k).__name__}")
    if k.ndim != 2 or min(k.shape) < 1:
        raise ValueError(f"{who}: k must have shape (ny, nx) with ny, nx >= 1, got "
                         f"{tuple(k.shape)}")
    if not k.is_floating_point():
        raise TypeError(f"{who}: k must be floating point, got {k.dtype}; use k.double()")
    if not torch._C._are_functorch_transforms_active():  # (else per sample, in the forward)
        check_values(k, who)


def check_values(k, who: str) -> None:
    """Raise a clear error unless every entry of k is finite and > 0."""
    kd = k.detach()
    advice = "k must be finite and > 0 everywhere; keep learned weights positive, e.g. exp(theta)"
    check_finite(kd, f"{who}: k", advice)
    if not bool((kd > 0).all()):
        index = tuple(int(i) for i in torch.nonzero(kd <= 0)[0])
        raise ValueError(f"{who}: k holds {kd[index].item():.3g} at index {index}; {advice}")


def check_boundary_values(p_left, p_right, who: str) -> None:
    """Raise a clear error unless both boundary pressures are finite numbers."""
    for name, v in (("p_left", p_left), ("p_right", p_right)):
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not np.isfinite(v):
            raise TypeError(f"{who}: {name} must be a finite real number (a Python or numpy "
                            f"scalar), got {v!r}")


def residual(p, k, p_left=2.0, p_right=1.0):
    """A(k) p - b(k) in torch (differentiable in p and k): each cell's net outflow."""
    r = torch.zeros_like(p + k)
    tx = torch.sqrt(k[:, :-1]) * torch.sqrt(k[:, 1:])  # (a product could underflow)
    fx = tx * (p[:, :-1] - p[:, 1:])
    r[:, :-1] += fx
    r[:, 1:] -= fx
    ty = torch.sqrt(k[:-1, :]) * torch.sqrt(k[1:, :])
    fy = ty * (p[:-1, :] - p[1:, :])
    r[:-1, :] += fy
    r[1:, :] -= fy
    r[:, 0] += 2 * k[:, 0] * (p[:, 0] - p_left)
    r[:, -1] += 2 * k[:, -1] * (p[:, -1] - p_right)
    return r


def boundary_flux(p, k, p_right=1.0):
    """Total flow out through the right boundary (per unit fracture depth)."""
    return (2 * k[:, -1] * (p[:, -1] - p_right)).sum()


def linear_profile(ny, nx, p_left=2.0, p_right=1.0, dtype=torch.float64):
    """The exact solution for uniform k: linear in x between the boundary faces."""
    x = (torch.arange(nx, dtype=dtype) + 0.5) / nx
    return (p_left + (p_right - p_left) * x).expand(ny, nx).clone()


def assemble(k: np.ndarray, p_left: float, p_right: float):
    """A(k) as scipy CSR (row-major cell numbering i*nx + j) and b(k)."""
    ny, nx = k.shape
    idx = np.arange(ny * nx).reshape(ny, nx)
    tx = np.sqrt(k[:, :-1]) * np.sqrt(k[:, 1:])
    ty = np.sqrt(k[:-1, :]) * np.sqrt(k[1:, :])
    diag = np.zeros((ny, nx))
    diag[:, :-1] += tx
    diag[:, 1:] += tx
    diag[:-1, :] += ty
    diag[1:, :] += ty
    diag[:, 0] += 2 * k[:, 0]
    diag[:, -1] += 2 * k[:, -1]
    rows = np.concatenate([idx.ravel(), idx[:, :-1].ravel(), idx[:, 1:].ravel(),
                           idx[:-1, :].ravel(), idx[1:, :].ravel()])
    cols = np.concatenate([idx.ravel(), idx[:, 1:].ravel(), idx[:, :-1].ravel(),
                           idx[1:, :].ravel(), idx[:-1, :].ravel()])
    vals = np.concatenate([diag.ravel(), -tx.ravel(), -tx.ravel(), -ty.ravel(), -ty.ravel()])
    A = sp.csr_matrix((vals, (rows, cols)), shape=(ny * nx, ny * nx))
    A.sort_indices()
    b = np.zeros((ny, nx))
    b[:, 0] += 2 * k[:, 0] * p_left
    b[:, -1] += 2 * k[:, -1] * p_right
    return A, b.ravel()


def grad_k(p, lam, k, p_left, p_right):
    """dL/dk = -(dr/dk)^T lam, given the adjoint lam = A^-T dL/dp (torch autograd of residual)."""
    with torch.enable_grad():
        kk = k.detach().requires_grad_()
        r = residual(p.detach(), kk, p_left, p_right)
        (g,) = torch.autograd.grad(r, kk, lam)
    return -g
