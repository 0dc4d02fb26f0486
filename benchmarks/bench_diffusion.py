"""Steady diffusion (seed 002's problem: kappa = 1, s = 1, T = 0 on the boundary of an n x n node
grid) solved by `bridges.petsc.solve` to a residual 2-norm <= 1e-10 (F scaled by h^2), next to the
seed's method (LBFGS on the mean squared residual, float32, torch defaults) at equal grid sizes,
and the cost of the implicit gradient (one adjoint solve) relative to the forward solve.

Timings are medians of a few repeats; the PETSc time includes assembling the Jacobian from
coloured JVPs and setting up multigrid (the sparsity pattern, reusable, is timed apart).
"""
from __future__ import annotations

import statistics
import time

import torch

from bridges.plotting import pyplot, save_figure
from bridges.problems import diffusion

from ._timing import fmt_time, markdown_table, one_torch_thread

TITLE = "Steady diffusion: PETSc solve (CG + multigrid) vs seed 002's LBFGS"


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _petsc(n, repeats):
    kappa, source = diffusion.seed_problem(n)
    pattern_s, sparsity = _median_time(lambda: diffusion.interior_grid(n), 1)
    solve_s, (T, stats) = _median_time(lambda: diffusion.solve_petsc(kappa, source,
                                                                grid=sparsity), repeats)
    return {"n": n, "pattern_s": pattern_s, "solve_s": solve_s, "T": T,
            "residual": diffusion.residual_norm(T, kappa, source), "cg": stats["ksp_iterations"],
            "kappa": kappa, "source": source, "sparsity": sparsity}


def _gradient_ratio(row, repeats):
    """Median over repeats of (forward seconds, backward seconds) for dL/d(kappa, s) with
    L = sum(w * T), each backward timed right after its own forward."""
    kappa = row["kappa"].clone().requires_grad_()
    source = row["source"].clone().requires_grad_()
    weights = torch.randn(source.shape, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(0))
    forward, backward = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        T = diffusion.solve_petsc(kappa, source, grid=row["sparsity"])[0]
        loss = torch.sum(weights * T)
        forward.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch.autograd.grad(loss, (kappa, source))
        backward.append(time.perf_counter() - start)
    ratios = [b / f for f, b in zip(forward, backward)]
    return statistics.median(forward), statistics.median(backward), statistics.median(ratios)

def _plot(rows, plot_dir):
    """Seconds against unknowns: the PETSc solve, its one-off pattern, the seed's LBFGS."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2))
    unknowns = [(r["n"] - 2) ** 2 for r in rows]
    ax.loglog(unknowns, [r["solve_s"] for r in rows], "o-", label="PETSc solve (CG + MG)")
    ax.loglog(unknowns, [r["pattern_s"] for r in rows], "^:", label="+ sparsity pattern (once)")
    seed = [r for r in rows if "lbfgs_s" in r]
    ax.loglog([(r["n"] - 2) ** 2 for r in seed], [r["lbfgs_s"] for r in seed], "s--",
              label="seed 002: LBFGS, stopped by its time limit")
    ax.set(xlabel="unknowns", ylabel="seconds", title="steady diffusion: time to solve")
    ax.legend(fontsize=8)
    return save_figure(fig, plot_dir, "bench_diffusion.png", dpi=110)


def run(quick=False, plot_dir=None):
    # one torch thread for both methods (up to 8x faster at 256x256 in our runs)
    with one_torch_thread():
        return _run(quick, plot_dir)


def _run(quick, plot_dir):
    grids = [131, 1027] if quick else [131, 259, 515, 1027]  # 2^k + 1 unknowns per axis
    lbfgs = {131: 10.0} if quick else {131: 60.0, 259: 60.0}
    repeats = 1 if quick else 3
    rows, table = [], []
    diffusion.solve_petsc(*diffusion.seed_problem(35))  # warm up PETSc and torch once
    for n in grids:
        row = _petsc(n, repeats)
        if n in lbfgs:
            T_l, info = diffusion.solve_lbfgs(row["kappa"], row["source"], time_limit=lbfgs[n])
            row.update(lbfgs_s=info["seconds"], lbfgs_steps=info["steps"],
                       lbfgs_residual=diffusion.residual_norm(T_l, row["kappa"], row["source"]))
        rows.append(row)
        table.append([f"{n}x{n} ({(n - 2) ** 2:,} unknowns)", fmt_time(row["solve_s"]),
                      fmt_time(row["pattern_s"]), f"{row['residual']:.1e}", row["cg"],
                      fmt_time(row["lbfgs_s"]) if "lbfgs_s" in row else "not run",
                      f"{row['lbfgs_residual']:.1e}" if "lbfgs_s" in row else "",
                      f"≥ {row['lbfgs_s'] / row['solve_s']:.0f}x" if "lbfgs_s" in row else ""])
    largest = rows[-1]
    grad_row = largest
    fwd, bwd, ratio = _gradient_ratio(grad_row, 2 if quick else 3)
    header = ["grid", "PETSc solve", "+ pattern (once)", "PETSc residual", "CG its",
              "LBFGS (seed) time", "LBFGS residual", "speed-up"]
    notes = [
        f"- Largest grid {largest['n']}x{largest['n']}: solved to residual "
        f"{largest['residual']:.1e} in {fmt_time(largest['solve_s'])} "
        f"(+ {fmt_time(largest['pattern_s'])} for the sparsity pattern, built once and reused)."
        + ("" if quick else " Goal: under 5 s on CPU at about 1024x1024."),
        "- LBFGS is the seed's method (torch.optim.LBFGS defaults, float32, loss = mean squared "
        "unscaled residual), stopped by its time limit "
        f"({', '.join(f'{lbfgs[n]:.0f} s at {n}x{n}' for n in lbfgs)}) or the seed's loss "
        "target 1e-10. It never reaches residual 1e-10 (float32 and its stalling loss), so "
        "'speed-up' compares its time to the PETSc time to a far smaller residual: a lower bound.",
        f"- Gradient at {grad_row['n']}x{grad_row['n']}: forward solve {fmt_time(fwd)}, backward "
        f"(dL/dkappa and dL/ds: one adjoint CG+MG solve reusing the forward's preconditioner, "
        f"then one autograd pass through the residual) {fmt_time(bwd)}; backward/forward cost "
        f"ratio {ratio:.2f} (median of per-pair ratios).",
        "- torch runs with 1 intra-op thread for both methods; 2 CPU cores shared with other "
        "jobs, so times vary by up to ~2x between runs.",
    ]
    return {"title": TITLE, "table": markdown_table(header, table), "notes": "\n".join(notes),
            "plots": [] if plot_dir is None else [_plot(rows, plot_dir)]}
