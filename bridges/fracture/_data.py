"""Synthetic rough fractures: a correlated log-normal aperture and a "fine-scale truth" permeability.

No lattice-Boltzmann data is available, so the truth departs from the local cubic law by a
documented roughness factor (the correction the learned W should recover):

    k_true = a^2/12 * c,    c = 1 / (1 + beta * (ell * |grad ln a|)^2)

with ell the aperture's correlation length (cells) and the gradient by central differences in
cell units. Steep aperture changes (tortuous, rough walls) reduce flow; c is 1 where a is smooth.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def cubic_law(aperture):
    """Local cubic law: permeability a^2 / 12 (the transmissivity a^3/12 divided by a)."""
    return aperture ** 2 / 12


def aperture_field(ny, nx, *, correlation=8.0, sigma=0.5, mean=1.0, seed=0):
    """Log-normal aperture: exp of Gaussian-filtered (in Fourier space) white noise, scaled so
    ln a has standard deviation `sigma` and a has geometric mean `mean`. Periodic correlation
    length `correlation` (cells). float64 tensor (ny, nx)."""
    if correlation <= 0 or sigma < 0 or mean <= 0:
        raise ValueError("aperture_field: need correlation > 0, sigma >= 0, mean > 0, got "
                         f"{correlation}, {sigma}, {mean}")
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((ny, nx))
    ky = np.fft.fftfreq(ny)[:, None]
    kx = np.fft.fftfreq(nx)[None, :]
    filt = np.exp(-0.5 * (2 * np.pi * correlation) ** 2 * (kx ** 2 + ky ** 2) / 4)
    g = np.fft.ifft2(np.fft.fft2(noise) * filt).real
    g = (g - g.mean()) / (g.std() or 1.0)
    return torch.from_numpy(mean * np.exp(sigma * g))


def roughness_factor(aperture, *, correlation=8.0, beta=1.0):
    """The hidden correction c = 1 / (1 + beta (ell |grad ln a|)^2), values in (0, 1]."""
    la = torch.log(aperture)
    gy, gx = torch.gradient(la)
    return 1 / (1 + beta * correlation ** 2 * (gx ** 2 + gy ** 2))


@dataclass
class SyntheticFracture:
    aperture: torch.Tensor     # (ny, nx)
    correction: torch.Tensor   # the hidden c
    k_true: torch.Tensor       # cubic law * c


def synthetic_fracture(n, *, ny=None, seed=0, correlation=None, sigma=0.8, beta=2.0):
    """One seeded fracture on an ny x n grid (ny defaults to n); correlation defaults to n/16."""
    ny = ny or n
    if min(n, ny) < 2:
        raise ValueError(f"synthetic_fracture: the grid must be at least 2 x 2 cells (its "
                         f"roughness takes differences of the aperture), got n={n!r}, ny={ny!r}")
    ell = correlation or max(n / 16, 1.0)
    a = aperture_field(ny, n, correlation=ell, sigma=sigma, seed=seed)
    c = roughness_factor(a, correlation=ell, beta=beta)
    return SyntheticFracture(a, c, cubic_law(a) * c)
