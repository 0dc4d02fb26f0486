"""Loss + gradient of the 2-D reaction-diffusion demo (BRUSS-2D, periodic, dof 2) w.r.t. its
three rates, from 10^3 to 10^6 unknowns: bridges (odeint_adjoint on a Grid: Crank-Nicolson with
fixed steps, the sparse Jacobian assembled from coloured products, TSAdjoint) with its grid
defaults (GMRES + ILU on small grids, GMRES + geometric multigrid on the DMDA hierarchy on large
ones), against the other preconditioner at the sizes near the switch, and against diffrax
(Kvaerno5, adaptive, discretise-then-optimise reverse mode, its default dense LU) in the quick run.
(diffrax with lineax's matrix-free GMRES in its Newton solves fails under reverse-mode
differentiation with jax 0.10.2 / diffrax 0.7.2 / lineax 0.1.1: "TypeError: ... Jaxpr ... is not
a valid JAX type", so it is not offered.)

Problem: `bridges.problems.brusselator.bruss2d_grid(n, t_end=0.1, frames=2)`, loss the mean
of y^2 at the two outputs, gradient w.r.t. (log a, log b, log alpha). bridges steps dt = 0.01
(10 CN steps); diffrax runs at rtol = atol = 1e-6. 'gradient difference' is the relative 2-norm
difference of the two gradients: both approximate the same exact gradient (CN's error is
O(dt^2)), so it bounds how far apart the two accuracies are.

Each bridges run is one loss + gradient in a fresh process (after a small warm-up solve there),
so that its peak resident memory is its own; Newton and linear iterations are counted from
PETSc's converged-reason reports of that run.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import torch

from ._timing import fmt_time, markdown_table

TITLE = "2-D reaction-diffusion (BRUSS-2D) loss + gradient from 10^3 to 10^6 unknowns: bridges (sparse CN) vs diffrax"
T_END, FRAMES, DT, TOL = 0.1, 2, 0.01, 1e-6
DENSE_LIMIT = 10_000  # unknowns beyond which diffrax's dense Jacobian (N^2 doubles) is not tried


def _bridges(n, options=None):
    """(seconds, loss, gradient) of one loss + gradient."""
    from bridges.problems.brusselator import bruss2d_grid
    problem = bruss2d_grid(n, t_end=T_END, frames=FRAMES, step_size=DT)
    start = time.perf_counter()
    ys = problem.solve(options)
    loss = (ys[1:] ** 2).mean()
    loss.backward()
    seconds = time.perf_counter() - start
    return seconds, float(loss.detach()), problem.func.log_rates.grad.numpy().copy()


def _rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker(n, options):
    """In a fresh process: one loss + gradient after a warm-up, with PETSc reporting every
    Newton and linear solve on stdout; the result on the last line."""
    torch.set_num_threads(1)  # as the demo: stencil-sized ops run best on one thread
    _bridges(12)
    report = {"ksp_converged_reason": True, "snes_converged_reason": True}
    print("START", flush=True)
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current RSS
        f.write("5")
    seconds, loss, grad = _bridges(n, {**options, **report})
    print("RESULT " + json.dumps({"seconds": seconds, "loss": loss, "grad": grad.tolist(),
                                  "peak_mib": _rss_kib("VmHWM") / 1024,
                                  "growth_mib": (_rss_kib("VmHWM") - before) / 1024}),
          flush=True)


def _measure(n, options=None):
    """One bridges loss + gradient in a subprocess: seconds, loss, gradient, memory, and the
    Newton and linear iterations of the forward solve and the adjoint's linear iterations."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_reaction_diffusion",
                           "--worker", str(n), json.dumps(options or {})], capture_output=True,
                          text=True, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"bridges at n = {n} failed:\n{proc.stdout[-2000:]}"
                           f"\n{proc.stderr[-2000:]}")
    text = proc.stdout[proc.stdout.index("START"):]
    out = json.loads(text[text.index("RESULT ") + 7:].splitlines()[0])
    newton = [int(k) for k in re.findall(r"Nonlinear \S* ?solve converged.* iterations (\d+)",
                                         text)]
    linear = [int(k) for k in re.findall(r"Linear \S* ?solve converged.* iterations (\d+)", text)]
    if len(linear) != sum(newton) + len(newton) or "did not converge" in text:
        raise RuntimeError(f"bridges at n = {n}: unexpected solver reports:\n{text[:2000]}")
    forward = linear[:sum(newton)]
    out.update(steps=len(newton), newton=sum(newton), linear=sum(forward),
               adjoint_linear=sum(linear[sum(newton):]))
    return out


def _diffrax_setup():
    import jax
    jax.config.update("jax_enable_x64", True)  # before any array exists
    import diffrax
    import jax.numpy as jnp
    return jax, jnp, diffrax


def _diffrax(n):
    """(seconds, compile seconds, loss, gradient, steps) of one loss + gradient, compiled first
    (the one-off compilation timed apart)."""
    jax, jnp, diffrax = _diffrax_setup()
    from bridges.problems.brusselator import RATES, initial_state

    def rhs(t, y, log_rates):
        a, b, alpha = jnp.exp(log_rates)
        lap = (jnp.roll(y, 1, 0) + jnp.roll(y, -1, 0) + jnp.roll(y, 1, 1) + jnp.roll(y, -1, 1)
               - 4 * y) * n ** 2
        u, v = y[..., 0], y[..., 1]
        uuv = u * u * v
        return jnp.stack([a + uuv - (b + 1) * u, b * u - uuv], -1) + alpha * lap

    y0 = jnp.asarray(initial_state(n).numpy())
    times = jnp.linspace(0.0, T_END, FRAMES + 1)

    def loss(log_rates):
        sol = diffrax.diffeqsolve(diffrax.ODETerm(rhs), diffrax.Kvaerno5(), 0.0, T_END, None, y0,
                                  args=log_rates, saveat=diffrax.SaveAt(ts=times[1:]),
                                  stepsize_controller=diffrax.PIDController(rtol=TOL, atol=TOL),
                                  max_steps=4096)
        return jnp.mean(sol.ys ** 2), sol.stats["num_steps"]

    x = jnp.log(jnp.asarray(RATES))
    start = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(x).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    (value, steps), grad = compiled(x)
    grad = np.asarray(grad)  # waits for the result
    return time.perf_counter() - start, compile_s, float(value), grad, int(steps)


def run(quick=False, plot_dir=None):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo: stencil-sized ops run best on one thread
    try:
        return _run(quick, plot_dir)
    finally:
        torch.set_num_threads(threads)


def _run(quick, plot_dir):
    from bridges.petsc._ode_jacobians import MULTIGRID_FROM
    sizes = [12, 16, 24] if quick else [30, 60, 120, 240, 480, 720]
    other_from = 24 if quick else 240  # sizes that are also timed with the other preconditioner
    limit = 60.0
    try:
        _diffrax_setup()
        diffrax_on, why_not = quick, None if quick else "not run in the full benchmark"
    except ImportError as exc:
        diffrax_on, why_not = False, f"diffrax not installed ({exc}); pip install jax diffrax"
    rows, table = [], []
    for n in sizes:
        unknowns = 2 * n * n
        mg = unknowns >= MULTIGRID_FROM
        r = _measure(n)
        row = {"n": n, "unknowns": unknowns, "bridges_s": r["seconds"], "pc": "mg" if mg else
               "ilu", **r}
        cells = [f"{n}² ({unknowns:,})", fmt_time(r["seconds"]),
                 "multigrid" if mg else "ILU", f"{r['newton'] / r['steps']:.1f}",
                 f"{r['linear'] / r['newton']:.1f}", f"{r['adjoint_linear'] / r['steps']:.1f}",
                 f"{r['peak_mib']:,.0f} MiB (+{r['growth_mib']:,.0f})"]
        if n >= other_from:
            other = _measure(n, {"pc_type": "ilu" if mg else "mg"})
            row["other"] = other
            cells.append(f"{'ILU' if mg else 'multigrid'}: {fmt_time(other['seconds'])}, "
                         f"{other['linear'] / other['newton']:.1f} + "
                         f"{other['adjoint_linear'] / other['steps']:.1f} its")
        else:
            cells.append("")
        if diffrax_on and unknowns <= DENSE_LIMIT:
            d_s, compile_s, d_loss, d_grad, steps = _diffrax(n)
            grad = np.array(r["grad"])
            difference = float(np.linalg.norm(d_grad - grad) / np.linalg.norm(d_grad))
            row["diffrax"] = {"seconds": d_s, "compile_s": compile_s, "steps": steps,
                              "difference": difference}
            cells += [f"{fmt_time(d_s)} (+ {fmt_time(compile_s)} compile, {steps} steps)",
                      f"{d_s / r['seconds']:.3g}", f"{difference:.1e}"]
            diffrax_on = d_s <= limit
        else:
            cells += ["not run" if why_not or unknowns > DENSE_LIMIT else
                      "stopped (time limit)", "", ""]
        rows.append(row)
        table.append(cells)
    header = ["grid (unknowns)", "bridges loss + gradient", "preconditioner (default)",
              "Newton its / step", "linear its / Newton it", "adjoint linear its / step",
              "peak RSS (growth)", "other preconditioner: time, its", "diffrax Kvaerno5 (dense LU)",
              "diffrax / bridges", "gradient difference"]
    x = np.log([r["unknowns"] for r in rows])
    y = np.log([r["bridges_s"] for r in rows])
    notes = [f"- Fitted exponent (least squares on log time vs log unknowns): N^"
             f"{np.polyfit(x, y, 1)[0]:.2f} over all sizes"]
    big = [i for i, r in enumerate(rows) if r["unknowns"] >= 10_000]
    if len(big) >= 2:
        notes[-1] += (f", N^{np.polyfit(x[big], y[big], 1)[0]:.2f} from "
                      f"{rows[big[0]]['unknowns']:,} unknowns on")
    a, b = rows[big[0] if big else 0], rows[-1]
    notes[-1] += (f" ({fmt_time(a['bridges_s'] / a['unknowns'] / 10)} to "
                  f"{fmt_time(b['bridges_s'] / b['unknowns'] / 10)} per unknown and step, "
                  f"forward + adjoint).")
    notes += [
        f"- Defaults on a grid: GMRES + ILU below {MULTIGRID_FROM:,} unknowns, GMRES + geometric "
        f"multigrid on the DMDA hierarchy (Galerkin coarse operators, one Richardson step of "
        f"block Jacobi + ILU per level) from there; 'other preconditioner' is the same run with "
        f"options {{'pc_type': 'ilu'}} or {{'pc_type': 'mg'}}, its linear iterations per Newton "
        f"iteration + the adjoint's per step.",
        f"- Horizon t in [0, {T_END}] with {FRAMES} outputs: {round(T_END / DT)} CN steps of {DT}, "
        f"full Newton to snes_rtol 1e-10 with ksp_rtol 1e-12 (the demo's options), the exact "
        f"sparse Jacobian assembled from 6 coloured products per Newton iteration (the declared "
        f"coupling, forward mode, with bridges' lattice colouring of the stencil, valid on every "
        f"grid size); the adjoint reuses the Jacobian at the state both its CN steps share.",
        "- Peak RSS is the process's (torch, PETSc and Python included); the growth is above "
        "its resident size after a warm-up solve.",
        "- One process per run, torch with 1 thread; 2 cores shared with other jobs: times vary "
        "by up to ~2x between runs.",
    ]
    if why_not:
        notes.append(f"- diffrax: {why_not} (measured 2026-12-01 at 24² = 1,152 unknowns: 412 s "
                     f"+ 20 s compile, 1,740x bridges' time then)." if not quick else
                     f"- diffrax: {why_not}")
    plots = []
    if plot_dir is not None:
        from bridges.plotting import pyplot, save_figure
        plt = pyplot()
        if plt is not None:
            fig, ax = plt.subplots(figsize=(6, 4.2))
            ax.loglog([r["unknowns"] for r in rows], [r["bridges_s"] for r in rows], "o-",
                      label="bridges, grid defaults")
            other = [r for r in rows if "other" in r]
            for pc, marker in (("ilu", "s--"), ("mg", "^--")):
                pts = [(r["unknowns"], r["other"]["seconds"]) for r in other if r["pc"] != pc]
                if pts:
                    ax.loglog(*zip(*pts), marker, label=f"bridges, pc_type {pc}")
            ax.loglog([rows[0]["unknowns"], rows[-1]["unknowns"]],
                      [rows[0]["bridges_s"], rows[0]["bridges_s"] * rows[-1]["unknowns"] /
                       rows[0]["unknowns"]], ":", color="gray", label="linear in N")
            ax.set_xlabel("unknowns")
            ax.set_ylabel("seconds, loss + gradient")
            ax.set_title("BRUSS-2D loss + gradient (10 CN steps)")
            ax.legend(fontsize=8)
            plots.append(str(save_figure(fig, plot_dir, "bench_reaction_diffusion.png", dpi=110)))
    return {"title": TITLE, "table": markdown_table(header, table), "notes": "\n".join(notes),
            "plots": plots}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), json.loads(sys.argv[3]))
