"""Initial velocity fields: the Taylor-Green vortex and seeded random smooth flows."""
from __future__ import annotations

import math

import torch

from ._mac import curl


def face_coordinates(n, length=2 * math.pi, dtype=torch.float64):
    """(x, y) of the u faces and of the v faces, each (n, n) in [j, i] order."""
    h = length / n
    edge = torch.arange(n, dtype=dtype) * h
    mid = edge + 0.5 * h
    xu, yu = torch.meshgrid(edge, mid, indexing="xy")
    xv, yv = torch.meshgrid(mid, edge, indexing="xy")
    return (xu, yu), (xv, yv)


def taylor_green(n, t=0.0, viscosity=0.0, length=2 * math.pi, dtype=torch.float64):
    """The decaying Taylor-Green vortex u = sin x cos y F(t), v = -cos x sin y F(t),
    F = exp(-2 nu t) (on a box of side 2 pi; other sides rescale x and y), sampled on the
    faces: an exact solution of the Navier-Stokes equations."""
    k = 2 * math.pi / length
    decay = math.exp(-2 * viscosity * k ** 2 * t)
    (xu, yu), (xv, yv) = face_coordinates(n, length, dtype)
    u = torch.sin(k * xu) * torch.cos(k * yu) * decay
    v = -torch.cos(k * xv) * torch.sin(k * yv) * decay
    return torch.stack((u, v))


def random_flow(n, count, *, seed, peak=4.0, rms=1.0, length=2 * math.pi,
                dtype=torch.float64):
    """`count` random smooth divergence-free velocities (count, 2, n, n): the discrete curl of
    a random stream function whose energy spectrum peaks at wavenumber `peak`
    (E(k) ~ k^4 exp(-2 (k / peak)^2)), each scaled to RMS velocity `rms`. Seeded, and the same
    flows at every n that resolves them (the random coefficients are drawn at a fixed 64^2
    and padded with zeros above)."""
    gen = torch.Generator().manual_seed(int(seed))
    base = 64
    noise = torch.randn(count, base, base, dtype=dtype, generator=gen)
    coeffs = torch.fft.fft2(noise)
    k = torch.fft.fftfreq(base, d=1.0 / base, dtype=dtype) * (2 * math.pi / length)
    kk = torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
    # |psi_hat|^2 ~ E(k) / k^3 so that E(k) ~ k^4 exp(-2 (k/peak)^2)
    amplitude = torch.where(kk > 0, kk ** 0.5 * torch.exp(-(kk / peak) ** 2), 0.0)
    coeffs = coeffs * amplitude
    if n < base:
        raise ValueError(f"random_flow: n must be at least {base}, got {n}; restrict to "
                         f"coarser grids with bridges.flow.restrict")
    full = torch.zeros(count, n, n, dtype=torch.complex128 if dtype == torch.float64
                       else torch.complex64)
    half = base // 2
    idx = torch.cat((torch.arange(half), torch.arange(n - half, n)))
    full[:, idx[:, None], idx[None, :]] = coeffs.to(full.dtype)
    psi = torch.fft.ifft2(full).real * (n / base) ** 2
    vel = curl(psi, length / n)
    scale = rms / vel.pow(2).mean(dim=(-3, -2, -1), keepdim=True).sqrt()
    return vel * scale
