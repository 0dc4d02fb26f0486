"""Steady diffusion -div(kappa grad T) = s on the unit square (`bridges.problems.diffusion`)
solved by PETSc through ``bridges.petsc.solve``, next to seed 002's approach (the same residual
minimised by LBFGS), plus a small inverse problem: recover a spatially varying kappa (log-kappa on
a coarse grid, bicubic) from noisy temperatures of two heating experiments by Adam through the
differentiable solve. "Residual" means the 2-norm of F = h^2 (-div(kappa grad T) - s). F is linear
in T: its Jacobian is assembled once from coloured products of the 5-point stencil and solved by
CG preconditioned by geometric multigrid (or GAMG).

The same command runs on one process or distributed, each rank solving for its block (figures and
tables from rank 0):

    [mpiexec -n 2] python -m bridges.demos.steady_diffusion [--grids 131 259 515 1027]
        [--lbfgs-grids 131] [--lbfgs-time 60] [--pc mg|gamg] [--inverse-iterations 200] [--out DIR]
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from bridges.petsc import PETSc, sum_gradients
from bridges.plotting import demo_parser, progress, pyplot, report_figures, save_figure
from bridges.problems.diffusion import (PRECONDITIONERS, interior_grid, residual_norm,
                                        seed_problem, solve_lbfgs, solve_petsc, true_kappa,
                                        varied_problem)

def _total(grid, value, op="sum"):
    """A number summed (or maximised) over the grid's ranks."""
    if grid.size == 1:
        return value
    from mpi4py import MPI
    return grid.comm.tompi4py().allreduce(value, op=MPI.SUM if op == "sum" else MPI.MAX)


def compare(grids, lbfgs_grids, lbfgs_time=60.0, show_progress=True, pc="mg"):
    """Time both approaches on the seed's problem; one row per grid (complete on rank 0; LBFGS,
    a one-process method, runs on rank 0 only)."""
    rows = []
    for n in progress(grids, desc="grids", disable=not show_progress):
        kappa, source = seed_problem(n)
        start = time.perf_counter()
        grid = interior_grid(n)
        pattern_s = time.perf_counter() - start
        T_owned, stats = solve_petsc(kappa, source, grid=grid, pc=pc)
        total = time.perf_counter() - start
        T = grid.gather(T_owned)
        if grid.rank != 0:
            continue
        row = {"n": n, "petsc_s": total, "pattern_s": pattern_s, "ranks": grid.size,
               "petsc_residual": residual_norm(T, kappa, source),
               "ksp_iterations": stats["ksp_iterations"], "T": T}
        if n in lbfgs_grids:
            T_l, info = solve_lbfgs(kappa, source, time_limit=lbfgs_time,
                                    show_progress=show_progress)
            row.update(lbfgs_s=info["seconds"], lbfgs_steps=info["steps"],
                       lbfgs_residual=residual_norm(T_l, kappa, source),
                       lbfgs_error=float((T_l.double() - T).abs().max()))
        rows.append(row)
    return rows


# -- inverse problem -------------------------------------------------------------------------------
def coarse_to_fine(coeffs, n):
    """kappa on the n x n grid from log-kappa on a coarse grid, bicubically interpolated."""
    fine = torch.nn.functional.interpolate(coeffs[None, None], size=(n, n), mode="bicubic",
                                           align_corners=True)[0, 0]
    return torch.exp(fine)


def _experiments(n):
    """Two heating experiments (warm left wall, warm bottom wall, each with a heat source): two
    views of the same kappa make it far better determined than one."""
    x = torch.linspace(0, 1, n, dtype=torch.float64)
    X, Y = torch.meshgrid(x, x, indexing="xy")
    runs = []
    for wall, (cx, cy) in ((0, (0.65, 0.35)), (1, (0.35, 0.7))):
        boundary = torch.zeros(n, n, dtype=torch.float64)
        if wall == 0:
            boundary[:, 0] = torch.sin(math.pi * x)
        else:
            boundary[0, :] = torch.sin(math.pi * x)
        source = 5.0 + 40.0 * torch.exp(-((X - cx) ** 2 + (Y - cy) ** 2) / 0.01)[1:-1, 1:-1]
        runs.append((source, boundary))
    return runs


def recover_kappa(n=51, coarse=6, iterations=200, lr=0.05, noise=0.01, seed=0,
                  show_progress=True):
    """Fit log-kappa on a coarse x coarse grid to noisy temperatures of two experiments by Adam
    through the differentiable solve (one adjoint solve per experiment and step). On many ranks
    each rank's loss is its block's part of the misfit, and `sum_gradients` adds the ranks'
    gradient shares, so every rank takes the same Adam step as one rank would."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.linspace(0, 1, n, dtype=torch.float64)
    X, Y = torch.meshgrid(x, x, indexing="xy")
    kappa_true = true_kappa(X, Y)
    grid = interior_grid(n)
    runs = _experiments(n)
    clean = [solve_petsc(kappa_true, s, b, grid=grid)[0] for s, b in runs]
    scale = max(_total(grid, float(T.abs().max()), "max") for T in clean)
    data = [T + noise * scale * torch.randn((n - 2, n - 2), dtype=T.dtype,
                                             generator=gen)[grid.owned] for T in clean]
    coeffs = torch.zeros(coarse, coarse, dtype=torch.float64, requires_grad=True)  # kappa = 1
    optimiser = torch.optim.Adam([coeffs], lr=lr)
    history = []
    bar = progress(range(iterations), desc="recovering kappa",
                   disable=not show_progress or grid.rank != 0)
    for _ in bar:
        optimiser.zero_grad()
        kappa = coarse_to_fine(coeffs, n)
        loss = sum(torch.sum((solve_petsc(kappa, s, b, grid=grid)[0] - d) ** 2)
                   for (s, b), d in zip(runs, data)) / (len(runs) * (n - 2) ** 2 * scale ** 2)
        loss.backward()  # this rank's share of the gradient of the total misfit ...
        sum_gradients([coeffs])  # ... and the total on every rank
        optimiser.step()
        history.append(_total(grid, float(loss.detach())))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(misfit=f"{history[-1]:.3g}")
    kappa_fit = coarse_to_fine(coeffs.detach(), n)
    return {"kappa_true": kappa_true, "kappa_fit": kappa_fit, "history": np.array(history),
            "noise_floor": noise ** 2,
            "kappa_error": float(((kappa_fit - kappa_true).norm() / kappa_true.norm()))}


# -- figures and CLI -------------------------------------------------------------------------------
def plot_solution(n, out=None):
    plt = pyplot()
    kappa, source, boundary = varied_problem(n)
    grid = interior_grid(n)
    T = grid.gather(solve_petsc(kappa, source, boundary, grid=grid)[0])  # every rank solves
    if plt is None or grid.rank != 0:
        return None
    full = boundary.clone()
    full[1:-1, 1:-1] = T
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, field, title in ((axes[0], kappa, "conductivity κ"),
                             (axes[1], full, f"temperature T ({n}x{n}, PETSc CG + MG)")):
        im = ax.imshow(field.numpy(), origin="lower", extent=(0, 1, 0, 1), cmap="inferno")
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    return save_figure(fig, out, "steady_diffusion_T.png", dpi=110)


def plot_timing(rows, out=None):
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.loglog([r["n"] ** 2 for r in rows], [r["petsc_s"] for r in rows], "o-",
              label="bridges.petsc.solve (CG + multigrid), residual ≤ 1e-10")
    lb = [r for r in rows if "lbfgs_s" in r]
    if lb:
        ax.loglog([r["n"] ** 2 for r in lb], [r["lbfgs_s"] for r in lb], "s--",
                  label="seed 002: LBFGS on the residual (bounded)")
        for r in lb:
            ax.annotate(f"residual {r['lbfgs_residual']:.1e}", (r["n"] ** 2, r["lbfgs_s"]),
                        fontsize=8)
    ax.set(xlabel="grid nodes", ylabel="seconds", title="steady diffusion: time to solve")
    ax.legend(fontsize=8)
    return save_figure(fig, out, "steady_diffusion_timing.png", dpi=110)


def plot_inverse(result, out=None):
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    vmin, vmax = float(result["kappa_true"].min()), float(result["kappa_true"].max())
    for ax, key, title in ((axes[0], "kappa_true", "true κ"),
                           (axes[1], "kappa_fit", f"recovered κ (rel. error "
                                                  f"{result['kappa_error']:.2f})")):
        im = ax.imshow(result[key].numpy(), origin="lower", extent=(0, 1, 0, 1), vmin=vmin,
                       vmax=vmax, cmap="viridis")
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    axes[2].semilogy(result["history"], label="misfit")
    axes[2].axhline(result["noise_floor"], color="gray", ls=":", label="noise level")
    axes[2].set(xlabel="Adam iteration", title="relative mean squared misfit")
    axes[2].legend()
    return save_figure(fig, out, "steady_diffusion_inverse.png", dpi=110)


QUICK = {"grids": [35, 67], "lbfgs_grids": [35], "lbfgs_time": 2.0, "solution_grid": 35,
         "inverse_grid": 18, "inverse_coarse": 4, "inverse_iterations": 20}


def main(argv=None):
    parser = demo_parser(__doc__, quick="tiny grids and short runs (smoke test): " + ", ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    parser.add_argument("--grids", type=int, nargs="+", default=[131, 259, 515, 1027],
                        help="grid sizes n (n x n nodes) solved by PETSc")
    parser.add_argument("--lbfgs-grids", type=int, nargs="*", default=[131],
                        help="grid sizes also run with the seed's LBFGS approach (on rank 0)")
    parser.add_argument("--lbfgs-time", type=float, default=60.0,
                        help="time limit of each LBFGS run [s]")
    parser.add_argument("--pc", default="mg", choices=sorted(PRECONDITIONERS),
                        help="multigrid preconditioner of CG: geometric (mg) or algebraic (gamg)")
    parser.add_argument("--solution-grid", type=int, default=259,
                        help="grid of the solution-field figure")
    parser.add_argument("--inverse-grid", type=int, default=51)
    parser.add_argument("--inverse-coarse", type=int, default=6,
                        help="kappa is parametrised on a coarse x coarse grid")
    parser.add_argument("--inverse-iterations", type=int, default=200)
    parser.add_argument("--noise", type=float, default=0.01,
                        help="observation noise, relative to max |T|")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    root = PETSc.COMM_WORLD.getRank() == 0  # rank 0 of mpiexec (or the only process) reports
    show = print if root else (lambda *a, **k: None)

    rows = compare(args.grids, set(args.lbfgs_grids), args.lbfgs_time, pc=args.pc,
                   show_progress=root)
    show(f"{'grid':>10} {'PETSc [s]':>10} {'residual':>10} {'CG its':>7} "
         f"{'LBFGS [s]':>10} {'LBFGS residual':>15} {'speed-up':>9}")
    for r in rows:
        extra = (f"{r['lbfgs_s']:10.2f} {r['lbfgs_residual']:15.2e} "
                 f"{r['lbfgs_s'] / r['petsc_s']:8.0f}x") if "lbfgs_s" in r else ""
        show(f"{r['n']:>5}x{r['n']:<4} {r['petsc_s']:10.2f} {r['petsc_residual']:10.2e} "
             f"{r['ksp_iterations']:7d} {extra}")
    if rows:
        show(f"({rows[0]['ranks']} MPI rank{'s' if rows[0]['ranks'] > 1 else ''})")
    solution = plot_solution(args.solution_grid, args.out)  # on every rank: all ranks solve
    result = recover_kappa(args.inverse_grid, args.inverse_coarse, args.inverse_iterations,
                           noise=args.noise, show_progress=root)
    show(f"inverse problem: misfit {result['history'][0]:.3g} -> {result['history'][-1]:.3g} "
         f"(noise level {result['noise_floor']:.3g}); relative kappa error "
         f"{result['kappa_error']:.3f}")
    if root:
        report_figures(solution, plot_timing(rows, args.out), plot_inverse(result, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
