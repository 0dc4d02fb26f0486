"""Stiff loss + gradient: ROBER (Robertson's kinetics) through bridges/PETSc against diffrax
(JAX, CPU, float64), side by side in one run.

1. At equal gradient error. k = (0.05, 4e7, 2e4) over [0, 1e5] (atol 1e-10) and [0, 1e11] (atol
   1e-20: y2 falls to ~1e-13), 40 log-spaced outputs from 1e-5, loss mean |y - y_data| against
   scipy Radau data from k = (0.04, 3e7, 1e4). Gradient w.r.t. k for several tolerances:
   bridges' default method, arkimex with the tableaus 3, 4 and 5, fixed-step CN; diffrax
   Kvaerno3 and Kvaerno5 with reverse-mode (its default) and forward-mode gradients, each
   jit-compiled once (tolerances are traced arguments), compile times listed apart. The
   reference gradient is independent of both: scipy Radau on the forward-sensitivity system
   (bridges.problems), checked against a looser solve and central differences.
2. Batched: B = 1, 16, 128 trajectories in one call ([0, 1e5], rtol 1e-6), bridges with y0 of
   shape (B, 3) in one solve, diffrax under jax.vmap; one loss and gradient over the batch.
"""
from __future__ import annotations

import numpy as np

from bridges.plotting import pyplot, save_figure
from bridges.problems import ROBER_K_START

from . import _diffrax
from ._ode import (SPANS, TORCH_THREADS_NOTE, Bounded, bridges_call, diffrax_error, first_line,
                   grad_error, one_thread, reusable, robertson_case, rober_func)
from ._timing import compare, fmt_time, markdown_table

TITLE = "Stiff ODE loss + gradient: bridges/PETSc vs diffrax on ROBER"
RTOLS = (1e-4, 1e-6, 1e-8)
DIFFRAX_MAX_STEPS = 100_000  # Kvaerno3 at rtol 1e-8 over [0, 1e11] needs more than 16,384
BATCHES = (1, 16, 128)
DISTINCT = 16  # distinct initial states in a batch (each one's reference costs a Radau solve)


def bridges_variants(quick):
    """label -> (bridges solver keyword arguments without atol, rtol or None)."""
    rtols = (1e-6,) if quick else RTOLS
    out = {f"bridges default, rtol {r:.0e}": ({"rtol": r}, r) for r in rtols}
    for tableau in ("4",) if quick else ("3", "4", "5"):
        for r in rtols:
            out[f"bridges arkimex {tableau}, rtol {r:.0e}"] = (
                dict(method="arkimex", rtol=r, options={"ts_arkimex_type": tableau}), r)
    for m in (2,) if quick else (2, 5):
        out[f"bridges cn, {m} steps/interval"] = (dict(method="cn", steps_per_interval=m), None)
    if not quick:
        out.update(_compiled({"bridges default, rtol 1e-06": ({"rtol": 1e-6}, 1e-6),
                              "bridges cn, 2 steps/interval": (
                                  dict(method="cn", steps_per_interval=2), None)}))
    return out


def _compiled(variants):
    """The same variants with compile_jacobian=True (their first call compiles)."""
    return {f"{label}, compile_jacobian": ({**settings, "compile_jacobian": True}, rtol)
            for label, (settings, rtol) in variants.items()}


def diffrax_variants(quick):
    """label -> (solver, gradient mode, rtol)."""
    rtols, modes = ((1e-6,), ("reverse",)) if quick else (RTOLS, ("reverse", "forward"))
    return {f"diffrax {s} ({mode}), rtol {r:.0e}": (s, mode, r)
            for s in ("Kvaerno3", "Kvaerno5") for mode in modes for r in rtols}


class DiffraxCalls:
    """diffrax loss + gradient callables for one case, each (solver, mode) compiled once."""

    def __init__(self, case, atol):
        self.jax, self.jnp, _ = _diffrax.load()
        self.case, self.atol, self.compiled, self.compiles = case, atol, {}, {}
        self.k = self.jnp.asarray(ROBER_K_START)

    def __call__(self, solver, mode, rtol):
        jnp, case = self.jnp, self.case
        if (solver, mode) not in self.compiled:
            print(f"[bench_ode_stiff] compiling diffrax {solver} ({mode})", flush=True)
            data = jnp.asarray(case["data"])
            fn = _diffrax.loss_and_grad(_diffrax.rober, solver, case["t"], case["y0"],
                                        lambda ys: jnp.mean(jnp.abs(ys - data)), adjoint=mode,
                                        batched=case["y0"].ndim == 2, max_steps=DIFFRAX_MAX_STEPS)
            self.compiled[solver, mode], self.compiles[solver, mode] = \
                _diffrax.compile_timed(fn, self.k, 1e-6, self.atol)
        fn = self.compiled[solver, mode]
        return lambda: self.jax.block_until_ready(fn(self.k, rtol, self.atol))


def first_calls(case, atol, bridges, diffrax, limit):
    """One call of every variant (bridges' with a time limit): label -> result, and label ->
    callable for the variants that succeeded."""
    results, calls = {}, {}
    for label, (kwargs, rtol) in bridges.items():
        print(f"[bench_ode_stiff] first call of {label}", flush=True)
        # (a compiled Jacobian needs a func torch.compile can trace: not the counting wrapper)
        compiled = kwargs.get("compile_jacobian", False)
        bounded = rober_func() if compiled else Bounded(rober_func(), seconds=limit).start()
        tolerances = {} if rtol is None else {"atol": atol}
        try:
            _, grad = bridges_call(case, bounded, **kwargs, **tolerances)()
        except Exception as exc:  # reported in the table
            why = None if compiled else bounded.why
            results[label] = {"failure": why or f"{type(exc).__name__}: {first_line(exc)}"}
            continue
        results[label] = {"grad": grad, "work": "as without it" if compiled else
                          f"{bounded.total:,} func calls"}
        calls[label] = bridges_call(case, rober_func(), **kwargs, **tolerances)
    for label, call in diffrax.items():
        try:
            _, grad, steps = call()
        except Exception as exc:  # e.g. max_steps reached
            results[label] = {"failure": f"{type(exc).__name__}: {diffrax_error(exc)}"}
            continue
        results[label] = {"grad": np.asarray(grad), "work": f"{int(np.max(steps)):,} steps"}
        calls[label] = call
    return results, calls


def at_equal_error(quick, limit, rounds):
    rows, compiles, plot, checks = [], [], {}, {}
    for span, (t_max, atol) in SPANS.items():
        print(f"[bench_ode_stiff] {span}: reference gradient", flush=True)
        case = checks[span] = robertson_case(t_max, checks=True)
        jax_calls = DiffraxCalls(case, atol)
        diffrax = {label: jax_calls(*spec) for label, spec in diffrax_variants(quick).items()}
        results, calls = first_calls(case, atol, bridges_variants(quick), diffrax, limit)
        compiles += [f"{span} {s} ({m}) {fmt_time(t)}" for (s, m), t in jax_calls.compiles.items()]
        print(f"[bench_ode_stiff] {span}: timing {len(calls)} variants side by side", flush=True)
        times = compare(calls, rounds=rounds, min_time=0.05)
        diffrax_points = [(times[v], grad_error(results[v]["grad"], case["grad"]))
                          for v in calls if v.startswith("diffrax")]
        for label, r in results.items():
            if "failure" in r:
                rows.append([span, label, f"failed: {r['failure']}", "", "", ""])
                continue
            err, seconds = grad_error(r["grad"], case["grad"]), times[label]
            plot.setdefault(span, []).append((label, seconds, err))
            rows.append([span, label, fmt_time(seconds), f"{err:.1e}", r["work"],
                         versus(seconds, err, diffrax_points) if label.startswith("bridges")
                         else ""])
    return rows, compiles, plot, checks


def versus(seconds, err, diffrax_points):
    """bridges' time over the fastest diffrax run at least as accurate (or, if none is, over the
    most accurate one, marked)."""
    good = [s for s, e in diffrax_points if e <= err]
    if good:
        return f"{seconds / min(good):.2f}x"
    s, e = min(diffrax_points, key=lambda p: p[1])
    return f"{seconds / s:.2f}x (diffrax's best is {e:.0e})"


def batched(quick, rounds):
    """Rows of table 2: loss + gradient of B trajectories in one call, rtol 1e-6."""
    rows = []
    t_max, atol = SPANS["[0, 1e5]"]
    share = np.linspace(0.0, 0.3, DISTINCT)  # y0 = (1 - s, 0, s)
    for size in BATCHES[:2] if quick else BATCHES:
        print(f"[bench_ode_stiff] batch of {size}: reference gradient", flush=True)
        s = share[np.arange(size) % DISTINCT] if size > 1 else share[:1]
        case = robertson_case(t_max, np.stack([1 - s, 0 * s, s], axis=1))
        jax_calls = DiffraxCalls(case, atol)
        bridges = {"bridges default": ({"rtol": 1e-6}, 1e-6),
                   "bridges cn, 2 steps/interval": (dict(method="cn", steps_per_interval=2), None)}
        bridges.update(_compiled(bridges))
        diffrax = {f"diffrax {s} (vmap)": jax_calls(s, "reverse", 1e-6)
                   for s in ("Kvaerno3", "Kvaerno5")}
        results, calls = first_calls(case, atol, bridges, diffrax, limit=120.0)
        times = compare(calls, rounds=rounds, min_time=0.05)
        best = min(times[v] for v in calls if v.startswith("diffrax"))
        for label, r in results.items():
            if "failure" in r:
                rows.append([size, label, f"failed: {r['failure']}", "", "", "", ""])
                continue
            rows.append([size, label, fmt_time(times[label]), fmt_time(times[label] / size),
                         f"{grad_error(r['grad'], case['grad']):.1e}", r["work"],
                         f"{times[label] / best:.2f}x" if label.startswith("bridges") else ""])
    return rows


@one_thread
def run(quick=False, plot_dir=None):
    limit, rounds = (10.0, 1) if quick else (30.0, 3)
    rows, compiles, plot_data, checks = at_equal_error(quick, limit, rounds)
    batch_rows = batched(quick, rounds)
    spans = "; ".join(f"{span}: looser reference (rtol 1e-8) within {c['check_looser']:.0e}, "
                      f"central differences (relative step 1e-4) of Radau losses within "
                      f"{c['check_fd']:.0e}" for span, c in checks.items())
    solver = ("one bridges.petsc.ODESolver per variant, made once and reused across calls" if
              reusable() else "odeint_adjoint (it makes its PETSc objects anew in every call)")
    notes = "\n".join([
        "**1. ROBER loss + gradient (w.r.t. k) at equal gradient error.**", "",
        markdown_table(["span", "method", "loss + gradient", "gradient error", "work",
                        "bridges / diffrax"], rows), "",
        f"bridges: {solver}. Gradient error: the largest relative error over dL/dk1, dL/dk2, "
        f"dL/dk3 against the reference (scipy Radau, rtol 1e-10, on the forward-sensitivity "
        f"system; so it includes each method's discretisation error). Checks of the reference: "
        f"{spans}. Times: median of {rounds} interleaved rounds (benchmarks/_timing.compare) "
        f"after a first call; bridges' first call runs with a limit of {limit:g} s ('failed' "
        f"rows) and counts its func calls (residuals and Jacobian passes, forward and adjoint); "
        f"diffrax's 'steps' are its accepted and rejected steps. 'bridges / diffrax': bridges' "
        f"time over that of the fastest diffrax run (any solver, gradient mode and tolerance) "
        f"whose gradient error is at most as large; below 1 means bridges is faster at equal "
        f"accuracy. diffrax: PID step control; reverse mode is its default "
        f"RecursiveCheckpointAdjoint, forward mode ForwardMode with jax.jacfwd (3 parameters). "
        f"'default' is bridges with only rtol and atol given. CN with 2 steps per interval "
        f"fails over [0, 1e11] because its step equation at t = 3.6e7 (h = 1.6e7) has no "
        f"solution, which scipy's root finders confirm independently of PETSc "
        f"(benchmarks/cn_step_without_root.py). {TORCH_THREADS_NOTE}", "",
        "diffrax compile times (once per solver, gradient mode and span; not in the times "
        "above): " + "; ".join(compiles) + ".", "",
        "**2. Batched loss + gradient** ([0, 1e5], rtol 1e-6, atol 1e-10; B trajectories from "
        f"y0 = (1 - s, 0, s), {DISTINCT} values of s in [0, 0.3] repeated; one loss, the mean "
        "over the batch, and its gradient w.r.t. the shared k).", "",
        markdown_table(["B", "method", "loss + gradient", "per trajectory", "gradient error",
                        "work", "bridges / fastest diffrax"], batch_rows), "",
        "bridges solves the batch as one system of 3B unknowns (y0 of shape (B, 3)) with one step "
        "size for all; diffrax runs its solve under jax.vmap, compiled once per B. Gradient error "
        "against the sum of the trajectories' scipy Radau sensitivities.",
    ])
    path = _plot(plot_data, plot_dir) if plot_dir is not None else None
    plots = [path] if path else []
    return {"title": TITLE, "table": "", "notes": notes, "plots": plots}


def _plot(plot_data, plot_dir):
    plt = pyplot()
    if plt is None or not plot_data:
        return None
    fig, axes = plt.subplots(1, len(plot_data), figsize=(7 * len(plot_data), 4.6))
    for ax, (span, entries) in zip(np.atleast_1d(axes), plot_data.items()):
        groups = {}
        for label, seconds, err in entries:
            groups.setdefault(label.rsplit(", rtol", 1)[0], []).append((seconds, err))
        for i, (group, points) in enumerate(groups.items()):
            s, e = zip(*sorted(points))
            ax.loglog(s, e, "o-" if group.startswith("bridges") else "s--", color=f"C{i % 10}",
                      label=group, ms=4)
        ax.set(xlabel="loss + gradient time [s]", ylabel="gradient error (max relative)",
               title=f"ROBER {span}: time vs gradient error")
        ax.legend(fontsize=6.5)
    return save_figure(fig, plot_dir, "ode_stiff.png", dpi=110)
