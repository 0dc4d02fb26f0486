"""A stiff 2-D reaction-diffusion system, the Brusselator with diffusion (BRUSS-2D, Hairer and
Wanner, Solving ODEs II, IV.10), integrated by PETSc TS with its discrete adjoint on a
`bridges.petsc.Grid`, and its reaction rates and diffusion coefficient recovered from noisy
snapshots through ``odeint_adjoint``.

    du/dt = a + u^2 v - (b + 1) u + alpha Lap(u)
    dv/dt = b u - u^2 v           + alpha Lap(v),      a = 1, b = 3.4, alpha = 0.002

on the periodic unit square (n x n points, spacing 1/n, 5-point Laplacian), from
u(0) = 22 y (1 - y)^1.5, v(0) = 27 x (1 - x)^1.5. Periodic, as in the original problem: every
point is alike, and halo exchange wraps around. Diffusion makes it stiff (eigenvalues down to
-8 alpha n^2: -2e3 at n = 256), so it is integrated by Crank-Nicolson with fixed steps and
Newton, with the exact sparse Jacobian assembled from coloured products on the grid's stencil
(dof 2: u and v at each point) and GMRES + ILU (block Jacobi + ILU on many ranks).

The same command runs on one process or distributed, each rank integrating its block:

    [mpiexec -n 2] python -m bridges.demos.reaction_diffusion [--n 64] [--t-end 1.0] [--dt 0.025]
        [--frames 4] [--fit-iterations 6] [--noise 0.01] [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from bridges.demos._util import figure_path, progress, pyplot
from bridges.petsc import Grid, PETSc, odeint_adjoint, sum_gradients

RATES = (1.0, 3.4, 0.002)  # a, b, alpha
NAMES = ("a", "b", "alpha")
# Newton to a tight tolerance, so that the adjoint gradient is that of the computed solution
OPTIONS = {"snes_rtol": 1e-10, "snes_atol": 1e-12, "ksp_rtol": 1e-12}


class Brusselator(torch.nn.Module):
    """dy/dt of BRUSS-2D on a periodic `grid` (dof 2): maps this rank's ghosted block
    (rows + 2, cols + 2, 2) to dy/dt on its owned block. Its parameters are the logarithms of
    (a, b, alpha), so that the three share one scale and stay positive."""

    def __init__(self, grid: Grid, rates=RATES):
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
class Problem:
    """Everything a solve needs: ``odeint_adjoint(func, y0, t, grid=grid, method="cn",
    step_size=step_size)``. y0 is this rank's owned block."""
    func: Brusselator
    y0: torch.Tensor
    t: torch.Tensor
    grid: Grid
    step_size: float

    def solve(self, options=None, t=None, y0=None):
        """y at the times t (default self.t) from y0 (default self.y0), differentiable."""
        return odeint_adjoint(self.func, self.y0 if y0 is None else y0,
                              self.t if t is None else t, method="cn",
                              step_size=self.step_size, grid=self.grid,
                              options={**OPTIONS, **(options or {})})


def build_problem(n=64, *, t_end=1.0, frames=4, step_size=0.025, rates=RATES, comm=None):
    """BRUSS-2D on an n x n periodic Grid over `comm` (default: every rank of mpiexec), with
    frames + 1 output times evenly spaced in [0, t_end] and fixed steps of step_size (clipped
    to land on each output)."""
    if n < 4:
        raise ValueError(f"build_problem: n must be at least 4 (a periodic 5-point stencil), "
                         f"got {n}")
    grid = Grid((n, n), dof=2, boundary="periodic", comm=comm)
    t = torch.linspace(0.0, t_end, frames + 1, dtype=torch.float64)
    return Problem(Brusselator(grid, rates), grid.scatter(initial_state(n)), t, grid,
                   float(step_size))


def integrate(problem, show_progress=False):
    """The solution at every output time, (len(t), *owned block), one odeint_adjoint call per
    output interval (the same steps as one call, so the same gradient; a progress bar ticks
    per interval)."""
    ys, y = [problem.y0], problem.y0
    bar = progress(range(len(problem.t) - 1), desc=f"BRUSS-2D {problem.grid.shape[0]}^2",
                   disable=not show_progress, leave=False)
    for k in bar:
        y = problem.solve(t=problem.t[k:k + 2], y0=y)[-1]
        ys.append(y)
    return torch.stack(ys)


def _total(grid, value):
    """A number summed over the grid's ranks."""
    if grid.size == 1:
        return value
    return grid.comm.tompi4py().allreduce(value)


def misfit(ys, data, grid):
    """This rank's part of the mean squared misfit of u at the output times after the first
    (the parts of all ranks sum to the misfit)."""
    count = data.shape[0] * grid.shape[0] * grid.shape[1]
    return torch.sum((ys[1:, ..., 0] - data) ** 2) / count


def observations(problem, noise=0.01, seed=0):
    """u at the output times after the first from the problem's rates, with Gaussian noise of
    `noise` times the largest |u| (drawn on the full grid, so the same on any number of ranks).
    Returns (this rank's data, the noise variance: the misfit floor)."""
    with torch.no_grad():
        u = problem.solve()[1:, ..., 0]
    grid = problem.grid
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn((u.shape[0], *grid.shape), dtype=torch.float64, generator=gen)
    scale = float(u.abs().max())
    if grid.size > 1:
        from mpi4py import MPI
        scale = grid.comm.tompi4py().allreduce(scale, op=MPI.MAX)
    return u + noise * scale * full[(slice(None), *grid.owned)], (noise * scale) ** 2


def gradient_check(problem, data, rel=1e-5):
    """dL/d(log rates) by TSAdjoint against central differences of the same discrete solve
    (steps +- rel in each log rate). Returns (adjoint, central differences), both totals."""
    func, grid = problem.func, problem.grid
    func.zero_grad()
    misfit(problem.solve(), data, grid).backward()
    sum_gradients(func.parameters(), grid.comm)
    adjoint = func.log_rates.grad.clone()
    centre = func.log_rates.detach().clone()
    central = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for i in range(3):
            values = []
            for sign in (1, -1):
                func.log_rates.copy_(centre)
                func.log_rates[i] += sign * rel
                values.append(_total(grid, float(misfit(problem.solve(), data, grid))))
            central[i] = (values[0] - values[1]) / (2 * rel)
        func.log_rates.copy_(centre)
    return adjoint, central


def fit(problem, data, iterations=8, show_progress=False):
    """Recover (a, b, alpha) from the snapshots by L-BFGS (strong Wolfe line search) on the log
    rates, each loss + gradient one forward solve and one TSAdjoint; the ranks' gradient shares
    are summed, so every rank takes the same steps. Returns (misfit, rates) of every
    evaluation."""
    func, grid = problem.func, problem.grid
    evaluations = 2 * iterations
    optimiser = torch.optim.LBFGS(func.parameters(), lr=1.0, max_iter=iterations,
                                  max_eval=evaluations, line_search_fn="strong_wolfe")
    ticks = iter(progress(range(evaluations), desc="fitting (a, b, alpha)",
                          disable=not show_progress))
    history = []

    def closure():
        optimiser.zero_grad()
        share = misfit(integrate(problem), data, grid)
        share.backward()
        sum_gradients(func.parameters(), grid.comm)
        history.append((_total(grid, float(share.detach())), func.rates.tolist()))
        next(ticks, None)
        return torch.tensor(history[-1][0], dtype=torch.float64)

    if iterations > 0:
        optimiser.step(closure)
    for _ in ticks:  # close the bar
        pass
    return history


def plot(frames, times, history, truth, floor, path):
    """u at three output times, and the fit's misfit against the noise level."""
    plt = pyplot()
    if plt is None:
        return None
    picks = sorted({0, len(frames) // 2, len(frames) - 1})
    fig, axes = plt.subplots(1, len(picks) + 1, figsize=(4.2 * (len(picks) + 1), 3.8))
    for ax, k in zip(axes, picks):
        im = ax.imshow(frames[k][..., 0].numpy(), origin="lower", extent=(0, 1, 0, 1),
                       cmap="magma")
        ax.set_title(f"u at t = {float(times[k]):.2f} ({frames[k].shape[0]}²)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    ax = axes[-1]
    if history:
        ax.semilogy([h[0] for h in history], "o-", label="misfit")
        ax.axhline(floor, color="gray", ls=":", label="noise level")
        ax.legend(fontsize=8)
        final = min(history, key=lambda h: h[0])[1]
        ax.set_title("best: " + ", ".join(f"{name} {v:.4g} ({t:g})" for name, v, t in
                                            zip(NAMES, final, truth)), fontsize=8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("mean squared misfit of u")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="grid points per axis (64 ... 512)")
    parser.add_argument("--t-end", type=float, default=1.0, help="final time")
    parser.add_argument("--dt", type=float, default=0.025, help="Crank-Nicolson step")
    parser.add_argument("--frames", type=int, default=4,
                        help="observed snapshots, evenly spaced in (0, t-end]")
    parser.add_argument("--noise", type=float, default=0.01,
                        help="observation noise, relative to max |u|")
    parser.add_argument("--start", type=float, nargs=3, default=(0.8, 3.0, 0.003),
                        metavar=("A", "B", "ALPHA"), help="initial guess of the rates")
    parser.add_argument("--fit-iterations", type=int, default=6,
                        help="L-BFGS iterations (at most twice as many solves)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the central-difference check of the gradient")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 24^2 points, t-end 0.4, 2 frames, 2 iterations")
    parser.add_argument("--out", default=None, help="directory for the PNG (default bridges-out)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.t_end, args.frames, args.fit_iterations = 24, 0.4, 2, 2
    torch.set_num_threads(1)  # stencil-sized ops run best on one thread; ranks take the cores
    root = PETSc.COMM_WORLD.getRank() == 0
    show = print if root else (lambda *a, **k: None)

    problem = build_problem(args.n, t_end=args.t_end, frames=args.frames, step_size=args.dt)
    grid = problem.grid
    show(f"BRUSS-2D on {args.n}x{args.n} points ({2 * args.n ** 2:,} unknowns), "
         f"{grid.size} MPI rank{'s' if grid.size > 1 else ''}; CN, dt = {args.dt:g}, "
         f"t in [0, {args.t_end:g}]")
    start = time.perf_counter()
    with torch.no_grad():
        ys = integrate(problem, show_progress=root)
    show(f"forward solve: {time.perf_counter() - start:.2f} s")
    frames = [grid.gather(y) for y in ys]
    data, floor = observations(problem, args.noise)

    with torch.no_grad():
        problem.func.log_rates.copy_(torch.tensor(args.start, dtype=torch.float64).log())
    if not args.no_check:
        start = time.perf_counter()
        adjoint, central = gradient_check(problem, data)
        show(f"gradient at the initial guess, dL/d(log a, log b, log alpha) "
             f"({time.perf_counter() - start:.1f} s for it and 6 more solves):")
        for name, g, c in zip(NAMES, adjoint.tolist(), central.tolist()):
            show(f"  {name:>5}: TSAdjoint {g: .8e}   central differences {c: .8e}   "
                 f"rel. difference {abs(g - c) / max(abs(c), 1e-300):.1e}")
    start = time.perf_counter()
    history = fit(problem, data, args.fit_iterations, show_progress=root)
    if history:
        best = min(history, key=lambda h: h[0])
        show(f"fit ({len(history)} solves with gradients, {time.perf_counter() - start:.1f} "
             f"s): misfit {history[0][0]:.3g} -> {best[0]:.3g} (noise level {floor:.3g}); "
             + ", ".join(f"{name} = {v:.5g} (true {t:g})"
                         for name, v, t in zip(NAMES, best[1], RATES)))
    if root:
        path = plot(frames, problem.t, history, RATES, floor,
                    figure_path(args.out, "reaction_diffusion.png"))
        if path is not None:
            show(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
