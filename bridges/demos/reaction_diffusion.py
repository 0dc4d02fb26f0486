"""A stiff 2-D reaction-diffusion system, BRUSS-2D (`bridges.problems.brusselator`), integrated by
PETSc TS with its discrete adjoint on a periodic `bridges.petsc.Grid`, and its reaction rates and
diffusion coefficient recovered from noisy snapshots through ``odeint_adjoint``.

Diffusion makes it stiff (eigenvalues down to -8 alpha n^2: -2e3 at n = 256), so it is integrated
by Crank-Nicolson with fixed steps and Newton, with the exact sparse Jacobian assembled from
coloured products on the grid's stencil (dof 2: u and v at each point) and GMRES + ILU (block
Jacobi + ILU on many ranks). Halo exchange wraps around the periodic square.

The same command runs on one process or distributed, each rank integrating its block:

    [mpiexec -n 2] python -m bridges.demos.reaction_diffusion [--n 64] [--t-end 1.0] [--dt 0.025]
        [--frames 4] [--fit-iterations 6] [--noise 0.01] [--quick] [--out DIR]
"""
from __future__ import annotations

import time

import torch

from bridges.petsc import PETSc, sum_gradients
from bridges.plotting import demo_parser, progress, pyplot, report_figures, save_figure
from bridges.problems.brusselator import NAMES, RATES, bruss2d_grid


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


def plot(frames, times, history, truth, floor, out=None):
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
    return save_figure(fig, out, "reaction_diffusion.png", dpi=110)


def main(argv=None):
    parser = demo_parser(__doc__, quick="a smoke run: 24^2 points, t-end 0.4, 2 frames, 2 "
                                        "iterations")
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
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.t_end, args.frames, args.fit_iterations = 24, 0.4, 2, 2
    torch.set_num_threads(1)  # stencil-sized ops run best on one thread; ranks take the cores
    root = PETSc.COMM_WORLD.getRank() == 0
    show = print if root else (lambda *a, **k: None)

    problem = bruss2d_grid(args.n, t_end=args.t_end, frames=args.frames, step_size=args.dt)
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
        report_figures(plot(frames, problem.t, history, RATES, floor, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
