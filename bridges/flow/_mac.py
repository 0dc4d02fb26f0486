"""Finite differences on a periodic, uniform staggered (MAC) grid of n x n square cells.

Arrays are C-ordered ``(ny, nx)`` like the rest of the toolkit, index ``[j, i]``, spacing h. The
velocity is one tensor of shape ``(..., 2, n, n)``: channel 0 is u (x-velocity) at the x-faces
(i h, (j + 1/2) h), channel 1 is v at the y-faces ((i + 1/2) h, j h). Scalars (pressure,
divergence) live at cell centres ((i + 1/2) h, (j + 1/2) h); the stream function and the
vorticity at the corners (i h, j h).

On this grid ``divergence(gradient(p)) == laplacian(p)`` (the 5-point stencil), which makes the
projection exact: after it the discrete divergence is the Poisson solve's residual.
"""
from __future__ import annotations

import torch


def east(a):   # a[j, i + 1]
    return torch.roll(a, -1, -1)


def west(a):   # a[j, i - 1]
    return torch.roll(a, 1, -1)


def north(a):  # a[j + 1, i]
    return torch.roll(a, -1, -2)


def south(a):  # a[j - 1, i]
    return torch.roll(a, 1, -2)


def divergence(vel, h):
    """Cell-centre divergence of a face velocity (..., 2, n, n) -> (..., n, n)."""
    u, v = vel[..., 0, :, :], vel[..., 1, :, :]
    return (east(u) - u + north(v) - v) / h


def gradient(p, h):
    """Face gradient of a cell-centre scalar (..., n, n) -> (..., 2, n, n)."""
    return torch.stack(((p - west(p)) / h, (p - south(p)) / h), dim=-3)


def laplacian(a, h):
    """5-point Laplacian of each component (periodic)."""
    return (east(a) + west(a) + north(a) + south(a) - 4 * a) / h ** 2


def curl(psi, h):
    """Face velocity (dpsi/dy, -dpsi/dx) of a corner stream function (..., n, n): its discrete
    divergence is zero to round-off."""
    return torch.stack(((north(psi) - psi) / h, -(east(psi) - psi) / h), dim=-3)


def vorticity(vel, h):
    """Corner vorticity dv/dx - du/dy of a face velocity (..., 2, n, n) -> (..., n, n)."""
    u, v = vel[..., 0, :, :], vel[..., 1, :, :]
    return (v - west(v) - u + south(u)) / h


def advection(vel, h):
    """(u . grad) u in divergence form, d(u u_k)/dx + d(v u_k)/dy with second-order averages
    (Harlow and Welch): conserves momentum, and kinetic energy while the velocity is
    divergence-free (up to the time stepping)."""
    u, v = vel[..., 0, :, :], vel[..., 1, :, :]
    uu = (0.5 * (u + east(u))) ** 2                    # cell centres
    vv = (0.5 * (v + north(v))) ** 2                   # cell centres
    uv = 0.25 * (u + south(u)) * (v + west(v))         # corners
    adv_u = (uu - west(uu)) / h + (north(uv) - uv) / h
    adv_v = (east(uv) - uv) / h + (vv - south(vv)) / h
    return torch.stack((adv_u, adv_v), dim=-3)


def restrict(vel, factor):
    """Face averages of a fine face velocity on the grid `factor` times coarser: each coarse face
    gets the mean of the fine faces it covers, so the coarse field carries the same fluxes and
    stays divergence-free."""
    n = vel.shape[-1]
    if n % factor or vel.shape[-2] != n:
        raise ValueError(f"restrict: the grid ({tuple(vel.shape[-2:])}) must be square with a "
                         f"size divisible by the factor {factor}")
    m = n // factor
    u = vel[..., 0, :, ::factor].reshape(*vel.shape[:-3], m, factor, m).mean(-2)
    v = vel[..., 1, ::factor, :].reshape(*vel.shape[:-3], m, m, factor).mean(-1)
    return torch.stack((u, v), dim=-3)
