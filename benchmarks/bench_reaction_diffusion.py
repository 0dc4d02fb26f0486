"""Loss + gradient of the 2-D reaction-diffusion demo (BRUSS-2D, periodic, dof 2) w.r.t. its
three rates, from n = 10^3 to 10^6 unknowns: bridges (odeint_adjoint on a Grid: Crank-Nicolson
with fixed steps, the sparse Jacobian assembled from coloured products, GMRES + ILU, TSAdjoint)
against diffrax (Kvaerno5, adaptive, discretise-then-optimise reverse mode, its default dense LU),
timed side by side in one run; diffrax stops at the first size whose run passes the time limit.
(diffrax with lineax's matrix-free GMRES in its Newton solves fails under reverse-mode
differentiation with jax 0.10.2 / diffrax 0.7.2 / lineax 0.1.1: "TypeError: ... Jaxpr ... is not
a valid JAX type", so it is not offered.)

Problem: `bridges.demos.reaction_diffusion.build_problem(n, t_end=0.1, frames=2)`, loss the mean
of y^2 at the two outputs, gradient w.r.t. (log a, log b, log alpha). bridges steps dt = 0.01
(10 CN steps); diffrax runs at rtol = atol = 1e-6. 'gradient difference' is the relative 2-norm
difference of the two gradients: both approximate the same exact gradient (CN's error is
O(dt^2)), so it bounds how far apart the two accuracies are.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ._timing import fmt_time, markdown_table

TITLE = "2-D reaction-diffusion (BRUSS-2D) loss + gradient: bridges (sparse CN) vs diffrax"
T_END, FRAMES, DT, TOL = 0.1, 2, 0.01, 1e-6
DENSE_LIMIT = 10_000  # unknowns beyond which diffrax's dense Jacobian (N^2 doubles) is not tried


def _bridges(n):
    """(seconds, loss, gradient) of one loss + gradient."""
    from bridges.demos.reaction_diffusion import build_problem
    problem = build_problem(n, t_end=T_END, frames=FRAMES, step_size=DT)
    start = time.perf_counter()
    ys = problem.solve()
    loss = (ys[1:] ** 2).mean()
    loss.backward()
    seconds = time.perf_counter() - start
    return seconds, float(loss.detach()), problem.func.log_rates.grad.numpy().copy()


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
    from bridges.demos.reaction_diffusion import RATES, initial_state

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
    sizes = [12, 16, 24] if quick else [24, 48, 96, 192, 384, 724]
    limit = 60.0 if quick else 180.0
    try:
        _diffrax_setup()
        diffrax_on, why_not = True, None
    except ImportError as exc:
        diffrax_on, why_not = False, f"diffrax not installed ({exc}); pip install jax diffrax"
    _bridges(12)  # warm up PETSc and torch
    rows, table = [], []
    for n in sizes:
        unknowns = 2 * n * n
        seconds, loss, grad = _bridges(n)
        row = {"n": n, "unknowns": unknowns, "bridges_s": seconds, "loss": loss}
        cells = [f"{n}² ({unknowns:,})", fmt_time(seconds)]
        if diffrax_on and unknowns > DENSE_LIMIT:
            diffrax_on = False
            cells += [f"not run (its dense Jacobian: {unknowns ** 2 * 8 / 2 ** 30:.1f} GiB)", "",
                      ""]
        elif diffrax_on:
            d_s, compile_s, d_loss, d_grad, steps = _diffrax(n)
            difference = float(np.linalg.norm(d_grad - grad) / np.linalg.norm(d_grad))
            row["diffrax"] = {"seconds": d_s, "compile_s": compile_s, "steps": steps,
                              "difference": difference}
            cells += [f"{fmt_time(d_s)} (+ {fmt_time(compile_s)} compile, {steps} steps)",
                      f"{d_s / seconds:.3g}", f"{difference:.1e}"]
            if d_s > limit:
                diffrax_on = False
        else:
            cells += ["stopped (time limit)" if why_not is None else "not run", "", ""]
        rows.append(row)
        table.append(cells)
    header = ["grid (unknowns)", "bridges loss + gradient", "diffrax Kvaerno5 (dense LU)",
              "diffrax / bridges", "gradient difference"]
    notes = []
    big = [r for r in rows if r["n"] >= 96] or rows
    if len(big) >= 2:
        a, b = big[0], big[-1]
        slope = np.log(b["bridges_s"] / a["bridges_s"]) / np.log(b["unknowns"] / a["unknowns"])
        notes.append(f"- bridges' cost grows as N^{slope:.2f} from {a['unknowns']:,} to "
                     f"{b['unknowns']:,} unknowns ({fmt_time(a['bridges_s'] / a['unknowns'] / 10)}"
                     f" to {fmt_time(b['bridges_s'] / b['unknowns'] / 10)} per unknown and step, "
                     f"forward + adjoint).")
    timed = [r for r in rows if "diffrax" in r]
    if len(timed) >= 2:
        a, b = timed[0], timed[-1]
        slope = np.log(b["diffrax"]["seconds"] / a["diffrax"]["seconds"]) / \
            np.log(b["unknowns"] / a["unknowns"])
        notes.append(f"- diffrax grows as N^{slope:.2f} from {a['unknowns']:,} to "
                     f"{b['unknowns']:,} unknowns (dense LU of the N x N Newton matrix).")
    notes.append(f"- diffrax stops after the first run over {limit:.0f} s (compilation not "
                 f"counted), and is not tried beyond {DENSE_LIMIT:,} unknowns, where its dense "
                 f"Jacobian alone would need gigabytes.")
    if why_not:
        notes.append(f"- diffrax: {why_not}")
    notes += [
        f"- Horizon t in [0, {T_END}] with {FRAMES} outputs: bridges {round(T_END / DT)} CN steps "
        f"of {DT} (Newton to 1e-10, GMRES + ILU on the exact sparse Jacobian, assembled once per "
        f"Newton iteration from 10 coloured reverse-mode products); diffrax adaptive at rtol = "
        f"atol = {TOL:g} (its step count listed). Each time is one call after a warm-up; "
        f"diffrax's one-off compilation is listed apart.",
        "- One process, torch with 1 thread; JAX uses what it likes. 2 cores shared with "
        "other jobs (load average ~5 during this run): times vary by up to ~2x between runs.",
    ]
    plots = []
    if plot_dir is not None:
        from bridges.demos._util import pyplot
        plt = pyplot()
        if plt is not None:
            fig, ax = plt.subplots(figsize=(6, 4.2))
            ax.loglog([r["unknowns"] for r in rows], [r["bridges_s"] for r in rows], "o-",
                      label="bridges (CN, sparse Jacobian, TSAdjoint)")
            timed = [r for r in rows if "diffrax" in r]
            if timed:
                ax.loglog([r["unknowns"] for r in timed],
                          [r["diffrax"]["seconds"] for r in timed], "s--",
                          label="diffrax Kvaerno5 (dense LU)")
            ax.set_xlabel("unknowns")
            ax.set_ylabel("seconds, loss + gradient")
            ax.set_title("BRUSS-2D loss + gradient")
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = plot_dir / "bench_reaction_diffusion.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            plots.append(str(path))
    return {"title": TITLE, "table": markdown_table(header, table), "notes": "\n".join(notes),
            "plots": plots}
