"""Solver in the loop (Um et al., NeurIPS 2020) on decaying 2-D turbulence: the coarse flow solver
(`bridges.flow`, 32^2, periodic MAC grid), its reference (the same solver at 4x the resolution and
steps, face-averaged back), the correcting network and option 2's unrolled objective. Shared by
the solver-in-the-loop demo, its benchmark and tests.
"""
from __future__ import annotations

import hashlib
import json

import torch

from ..flow import Flow, curl, random_flow, restrict
from ..plotting import output_dir, progress

# the physics: decaying turbulence, RMS velocity 1, energy peak at wavenumber 3, in a 2 pi box
PHYSICS = {"n": 32, "factor": 4, "viscosity": 2e-3, "dt": 0.03, "peak": 3.0}
SETTINGS = {
    "full": {"unroll": 8, "horizon": 80, "train_flows": 16, "test_flows": 4, "iterations": 400,
             "batch": 4, "lr": 1e-3, "width": 16},
    "quick": {"unroll": 4, "horizon": 20, "train_flows": 4, "test_flows": 2, "iterations": 40,
              "batch": 2, "lr": 3e-3, "width": 8},
}


class Correction(torch.nn.Module):
    """A small CNN with periodic (circular) padding from the face velocity (u, v) to a corner
    stream function psi; the correction is the discrete curl of psi, so it keeps the velocity
    divergence-free. The last layer starts at zero: the hybrid solver starts as the coarse one.
    It computes in `dtype` (float32: 5x faster than float64 here) and returns the input's."""

    def __init__(self, h, width=16, scale=0.01, dtype=torch.float32):
        super().__init__()

        def conv(i, o, k):
            return torch.nn.Conv2d(i, o, k, padding=k // 2, padding_mode="circular", dtype=dtype)
        self.body = torch.nn.Sequential(conv(2, width, 5), torch.nn.GELU(),
                                        conv(width, width, 3), torch.nn.GELU(),
                                        conv(width, width, 3), torch.nn.GELU(),
                                        conv(width, 1, 3))
        torch.nn.init.zeros_(self.body[-1].weight)
        torch.nn.init.zeros_(self.body[-1].bias)
        self.h, self.scale = h, scale

    def forward(self, vel):
        n = vel.shape[-1]
        x = vel.reshape(-1, 2, n, n).to(self.body[0].weight.dtype)
        psi = self.body(x).reshape(*vel.shape[:-3], n, n).to(vel.dtype)
        return curl(self.scale * self.h * psi, self.h)


def coarse_flow(pressure="petsc", options=None):
    """The coarse solver (PHYSICS' grid), its pressure by "petsc" (CG + multigrid) or "fft"."""
    return Flow(PHYSICS["n"], viscosity=PHYSICS["viscosity"], dt=PHYSICS["dt"],
                pressure=pressure, options=options)


def reference(count, steps, seed, show_progress=False):
    """Restricted reference trajectories (count, steps + 1, 2, n, n) from seeded random flows:
    the flow solver at factor x the resolution and factor x the steps (FFT pressure solves: the
    same discrete equations, solved exactly), face-averaged to the coarse grid."""
    f = PHYSICS["factor"]
    fine = Flow(PHYSICS["n"] * f, viscosity=PHYSICS["viscosity"], dt=PHYSICS["dt"] / f,
                pressure="fft")
    vel = random_flow(PHYSICS["n"] * f, count, seed=seed, peak=PHYSICS["peak"])
    states = [restrict(vel, f)]
    with torch.no_grad():
        for _ in progress(range(steps), desc=f"reference {fine.n}^2", leave=False,
                          disable=not show_progress):
            for _ in range(f):
                vel = fine.step(vel)
            states.append(restrict(vel, f))
    return torch.stack(states, dim=1)


def load_data(cfg, cache_dir=None, show_progress=False):
    """Training and test trajectories, cached under cache_dir (when given) by their settings."""
    spec = {**PHYSICS, "horizon": cfg["horizon"], "train": cfg["train_flows"],
            "test": cfg["test_flows"], "version": 1}
    path = None
    if cache_dir is not None:
        key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        path = output_dir(cache_dir) / f"solver_in_the_loop_data_{key}.pt"
        if path.exists():
            return torch.load(path)
    data = {"train": reference(cfg["train_flows"], cfg["horizon"], seed=0,
                               show_progress=show_progress),
            "test": reference(cfg["test_flows"], cfg["horizon"], seed=1,
                              show_progress=show_progress)}
    if path is not None:
        torch.save(data, path)
    return data


def relative_squared_error(pred, target):
    """|pred - target|^2 / |target|^2 per state (the last three dimensions: component, y, x)."""
    dims = (-3, -2, -1)
    return (pred - target).pow(2).sum(dims) / target.pow(2).sum(dims)


def relative_mse(pred, target):
    """Mean over samples (and steps) of `relative_squared_error`."""
    return relative_squared_error(pred, target).mean()


def unrolled_loss(net, flow, ref, starts, unroll):
    """Option 2's objective: the hybrid solver unrolled `unroll` steps from ref[i, t] for each
    (i, t) in starts, against ref[i, t + 1 : t + 1 + unroll]."""
    which = torch.tensor([i for i, _ in starts])
    t0 = torch.tensor([t for _, t in starts])
    window = torch.stack([ref[i, t + 1:t + 1 + unroll] for i, t in starts])
    return relative_mse(flow.rollout(ref[which, t0], unroll, correction=net), window)
