"""Incompressible Navier-Stokes in a periodic box, by operator splitting on a MAC grid.

    du/dt + (u . grad) u = -grad p + nu laplacian(u),   div u = 0,   on [0, L)^2, periodic.

One step is Heun's method (SSP-RK2), each stage the seed's splitting:
    1. advection-diffusion:  u* = u + dt (nu laplacian(u) - (u . grad) u)   (explicit);
    2. pressure Poisson:     laplacian(phi) = div u*                       (the linear solve);
    3. projection:           u <- u* - grad phi                            (div u = 0).
Stage 1 from u gives u1; stage 2 projects (u + u1 + dt f(u1)) / 2, f the explicit terms. The
pressure is p = phi / dt; the incremental form (u* including -dt grad p_old) gives the same
result here, because projection removes any discrete gradient exactly. Second order in space
(central differences, energy-conserving advection) and in time; stable for CFL |u| dt / h up to
about 0.5 with the viscous damping of grid-scale modes.
"""
from __future__ import annotations

import math

import torch

from ._mac import advection, divergence, gradient, laplacian
from ._pressure import FFTPoisson, PetscPoisson

PRESSURE = {"petsc": PetscPoisson, "fft": FFTPoisson}


class Flow:
    """The flow solver on an n x n periodic MAC grid of a box of side `length`.

    Args:
        n: cells per side.
        viscosity: kinematic viscosity nu.
        dt: time step.
        pressure: ``"petsc"`` (bridges.petsc.solve, CG + multigrid) or ``"fft"`` (pure torch),
            or a callable solving laplacian(phi) = b for b of shape (..., n, n).
        options: PETSc options of the pressure solve (``pressure="petsc"`` only).

    Velocities are tensors (..., 2, n, n) (see `bridges.flow._mac`); `step` and `rollout` are
    differentiable torch code around the pressure solves.
    """

    def __init__(self, n, *, viscosity, dt, length=2 * math.pi, pressure="petsc", options=None):
        if not (isinstance(n, int) and n >= 4):
            raise ValueError(f"Flow: n must be an int >= 4 (cells per side), got {n!r}")
        if not viscosity >= 0 or not dt > 0:
            raise ValueError(f"Flow: need viscosity >= 0 and dt > 0, got viscosity={viscosity}, "
                             f"dt={dt}")
        self.n, self.length = n, float(length)
        self.h = self.length / n
        self.viscosity, self.dt = float(viscosity), float(dt)
        if callable(pressure):
            self.poisson = pressure
        elif pressure in PRESSURE:
            kwargs = {"options": options} if pressure == "petsc" else {}
            if options is not None and pressure != "petsc":
                raise ValueError("Flow: options are PETSc options; they need pressure='petsc'")
            self.poisson = PRESSURE[pressure](n, self.h, **kwargs)
        else:
            raise ValueError(f"Flow: unknown pressure solver {pressure!r}; valid: "
                             f"{', '.join(PRESSURE)}, or a callable")

    def _check(self, vel):
        if not isinstance(vel, torch.Tensor) or vel.dim() < 3 or \
                tuple(vel.shape[-3:]) != (2, self.n, self.n):
            got = tuple(vel.shape) if isinstance(vel, torch.Tensor) else type(vel).__name__
            raise ValueError(f"Flow: expected a velocity of shape (..., 2, {self.n}, {self.n}) "
                             f"(u and v on the faces), got {got}")

    def tendency(self, vel):
        """The explicit terms nu laplacian(u) - (u . grad) u."""
        return self.viscosity * laplacian(vel, self.h) - advection(vel, self.h)

    def project(self, vel):
        """The divergence-free part: vel - grad phi with laplacian(phi) = div vel."""
        return vel - gradient(self.poisson(divergence(vel, self.h)), self.h)

    def step(self, vel):
        """One Heun step (two pressure solves)."""
        self._check(vel)
        stage = self.project(vel + self.dt * self.tendency(vel))
        return self.project(0.5 * (vel + stage + self.dt * self.tendency(stage)))

    def rollout(self, vel, steps, correction=None):
        """States after 1..steps steps, stacked on a new axis after the batch axes
        (..., steps, 2, n, n); ``correction(state)`` (e.g. a network) is added after every
        step."""
        states = []
        for _ in range(int(steps)):
            vel = self.step(vel)
            if correction is not None:
                vel = vel + correction(vel)
            states.append(vel)
        return torch.stack(states, dim=-4)

    def divergence(self, vel):
        return divergence(vel, self.h)
