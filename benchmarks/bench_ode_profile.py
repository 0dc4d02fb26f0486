"""Where a bridges ODE loss + gradient spends its time, and how many callbacks it makes per step
against diffrax's function evaluations per step on the same problem (ROBER over [0, 1e5] from
k = (0.05, 4e7, 2e4), loss mean |y - y_data|, atol 1e-10).

1. Callbacks per step: bridges' counts (PETSc's event counts, func calls) for the forward solve
   and for the backward pass, against diffrax's right-hand-side evaluations and Jacobians (or
   vector-Jacobian products) per step, counted with jax.debug.callback in a separate, untimed
   run.
2. cProfile of one bridges loss + gradient: callbacks, PETSc counts, top functions by own time.
Each bridges run is in a fresh process: PETSc's event counts go wrong in a process where a solve
was stopped inside a callback (its events are left open).
"""
from __future__ import annotations

import collections
import cProfile
import json
import os
import pstats
import subprocess
import sys
import time

from . import _diffrax
from ._ode import SPANS, Bounded, bridges_call, one_thread, robertson_case, rober_func
from ._timing import fmt_time, markdown_table

TITLE = "ODE callbacks per step and where the time goes: bridges/PETSc vs diffrax on ROBER"
EVENTS = ("TSStep", "TSAdjointStep", "SNESSolve", "KSPSolve", "TSFunctionEval", "TSJacobianEval")
PROFILED = {  # label -> bridges solver keyword arguments
    "default, rtol 1e-6": dict(rtol=1e-6, atol=SPANS["[0, 1e5]"][1]),
    "arkimex 4, rtol 1e-6": dict(method="arkimex", rtol=1e-6, atol=SPANS["[0, 1e5]"][1],
                                 options={"ts_arkimex_type": "4"}),
    "cn, 2 steps/interval": dict(method="cn", steps_per_interval=2),
}
CALLBACKS = {  # (file suffix, function) -> what it is; names missing from a profile are left out
    ("petsc/_ode.py", "_ifunction"): "IFunction callbacks (residual: one func call each)",
    ("petsc/_ode_jacobians.py", "ijacobian"): "IJacobian callbacks",
    ("petsc/_ode_jacobians.py", "linearisation"): "linearisation look-ups (IJacobian, "
                                                  "IJacobianP)",
    ("bridges/_linearise.py", "jacobian"): "dense Jacobians built from a linearisation",
    ("petsc/_ode_jacobians.py", "jacobian_p"): "IJacobianP callbacks",
    ("petsc/_ode_jacobians.py", "multTranspose"): "parameter-Jacobian transposed products",
    ("petsc/_linear.py", "applyTranspose"): "adjoint block solves (pivoted LU, refined)",
    ("petsc/_stepping.py", "__call__"): "Newton convergence tests",
    ("petsc/_ode.py", "solve"): "the forward solve (TSSolve)",
    ("petsc/_ode.py", "pullback"): "the adjoint solve (TSAdjointSolve)",
    ("bridges/problems/__init__.py", "_rober_torch"): "func (ROBER's right-hand side) "
                                                      "evaluations",
}


# -- bridges, in a fresh process -------------------------------------------------------------------
def worker(label):
    """One warmed-up loss + gradient counted (PETSc events, func calls; forward and backward
    apart), then one under cProfile."""
    import torch

    from bridges.petsc import PETSc
    torch.set_num_threads(1)
    PETSc.Log.begin()
    events = {n: PETSc.Log.Event(n) for n in EVENTS}  # looked up once each

    def snapshot():
        return {n: e.getPerfInfo()["count"] for n, e in events.items()}
    case = robertson_case(1e5)
    counting = Bounded(rober_func())
    call = bridges_call(case, counting, **PROFILED[label])
    call()  # warm-up
    y0, t = torch.from_numpy(case["y0"]), torch.from_numpy(case["t"])
    data = torch.from_numpy(case["data"])
    counting.zero_grad()
    before, calls = snapshot(), counting.total
    loss = torch.mean(torch.abs(call.solver(counting, y0, t) - data))
    middle, forward_calls = snapshot(), counting.total - calls
    loss.backward()
    after = snapshot()
    counts = {"forward": {**{n: middle[n] - before[n] for n in EVENTS}, "func": forward_calls},
              "backward": {**{n: after[n] - middle[n] for n in EVENTS},
                           "func": counting.total - calls - forward_calls}}
    stats = getattr(call.solver, "stats", None)
    if stats is not None:  # bridges.petsc.ODESolver's own counts of the last call
        counts["stats"] = {k: v for k, v in vars(stats).items() if isinstance(v, (int, float))}

    call = bridges_call(case, rober_func(), **PROFILED[label])
    call()
    start = time.perf_counter()
    call()
    plain = time.perf_counter() - start
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    call()
    prof.disable()
    profiled = time.perf_counter() - start
    stats = pstats.Stats(prof).stats
    callbacks = {what: [0, 0.0] for what in CALLBACKS.values()}
    for (path, _, name), (_, n, _, cumulative, _) in stats.items():
        for (suffix, fn), what in CALLBACKS.items():
            if path.endswith(suffix) and name == fn:
                callbacks[what][0] += n
                callbacks[what][1] += cumulative
    top = sorted(stats.items(), key=lambda item: -item[1][2])[:12]
    top_rows = [[f"`{os.path.basename(path)}:{line}({name})`", f"{n:,}", fmt_time(own),
                 fmt_time(cumulative)] for (path, line, name), (_, n, own, cumulative, _) in top]
    return {"label": label, "plain": plain, "profiled": profiled, "counts": counts,
            "callbacks": callbacks, "top": top_rows}


def in_subprocess(label):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_ode_profile", "--worker", label],
                          capture_output=True, text=True, timeout=900, cwd=root)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"the profile worker exited with code {proc.returncode}: {tail[:200]}")


# -- diffrax, counted with jax.debug.callback ------------------------------------------------------
def diffrax_counts(method, rtol=1e-6):
    """Steps, right-hand-side evaluations and derivative passes (a Jacobian by jax.jacfwd, or a
    vector-Jacobian product, each one batched pass) of diffrax `method` on the same case: for
    the forward solve and for loss + gradient (reverse mode)."""
    jax, jnp, _ = _diffrax.load()
    counts = collections.Counter()

    @jax.custom_jvp
    def rhs(t, y, k):
        jax.debug.callback(lambda: counts.update(["f"]))
        return _diffrax.rober(t, y, k)

    @rhs.defjvp
    def rhs_jvp(primals, tangents):
        jax.debug.callback(lambda: counts.update(["derivative"]))
        return jax.jvp(_diffrax.rober, primals, tangents)

    t_max, atol = SPANS["[0, 1e5]"]
    case = robertson_case(t_max)
    t, y0, k = jnp.asarray(case["t"]), jnp.asarray(case["y0"]), jnp.asarray(rober_func().k.detach())
    data = jnp.asarray(case["data"])
    forward = jax.jit(lambda k: _diffrax.solve(rhs, method, t, y0, k, rtol, atol)[1])
    gradient = jax.jit(_diffrax.loss_and_grad(rhs, method, t, y0,
                                              lambda ys: jnp.mean(jnp.abs(ys - data))))
    out = {}
    for phase, fn in (("forward", forward), ("loss + gradient", lambda k: gradient(k, rtol,
                                                                                   atol)[2])):
        jax.block_until_ready(fn(k))  # compiles
        counts.clear()
        steps = int(jax.block_until_ready(fn(k)))
        jax.effects_barrier()
        out[phase] = {"steps": steps, **counts}
    return out


def count_rows(profiles, diffrax):
    rows = []
    for p in profiles:
        fwd, bwd = p["counts"]["forward"], p["counts"]["backward"]
        for phase, c, steps in (("forward", fwd, fwd["TSStep"]),
                                ("backward", bwd, bwd["TSAdjointStep"])):
            per = {n: c[n] / max(steps, 1) for n in c}
            rows.append([f"bridges {p['label']}", phase, f"{steps:,}", f"{per['func']:.2f}",
                         f"{per['TSFunctionEval']:.2f}", f"{per['TSJacobianEval']:.2f}",
                         f"{per['SNESSolve']:.2f}", f"{per['KSPSolve']:.2f}"])
    for method, phases in diffrax.items():
        for phase, c in phases.items():
            per = {n: c.get(n, 0) / max(c["steps"], 1) for n in ("f", "derivative")}
            rows.append([f"diffrax {method}, rtol 1e-6", phase, f"{c['steps']:,}",
                         f"{per['f']:.2f}", "", f"{per['derivative']:.2f}", "", ""])
    return rows


@one_thread
def run(quick=False, plot_dir=None):
    labels = list(PROFILED)[:2] if quick else list(PROFILED)
    profiles = []
    for label in labels:
        print(f"[bench_ode_profile] bridges {label}", flush=True)
        profiles.append(in_subprocess(label))
    diffrax = {}
    for method in ("Kvaerno3", "Kvaerno5"):
        print(f"[bench_ode_profile] counting diffrax {method}", flush=True)
        diffrax[method] = diffrax_counts(method)
    lines = [
        "**1. Callbacks per step** (ROBER [0, 1e5], one loss + gradient).", "",
        markdown_table(["method", "phase", "steps", "func calls / step",
                        "residuals / step", "Jacobians (diffrax: + VJPs) / step",
                        "Newton solves / step", "linear solves / step"],
                       count_rows(profiles, diffrax)), "",
        "bridges: PETSc's event counts (TSFunctionEval, TSJacobianEval, SNESSolve, KSPSolve) per "
        "TSStep forward and per TSAdjointStep backward, after a warm-up call; 'func calls' counts "
        "every evaluation of the torch right-hand side (a residual, or one batched pass of a "
        "Jacobian or a vector-Jacobian product). diffrax: a separate, untimed counting run "
        "with jax.debug.callback in the right-hand side and in its JVP rule; 'func calls' are "
        "right-hand-side evaluations, the Jacobian column counts derivative passes (a jax.jacfwd "
        "Jacobian in the forward solve, counted once per batched pass; in loss + gradient also "
        "the reverse pass's VJPs and the forward recomputed by its checkpointing), per accepted "
        "or rejected step.", ""]
    for p in profiles:
        stats = p["counts"].get("stats")
        lines += [
            f"**2. Where a bridges loss + gradient goes: {p['label']}** (cProfile). "
            f"{fmt_time(p['plain'])} without the profiler, {fmt_time(p['profiled'])} under it."
            + (f" ODESolver.stats: {stats}." if stats else ""), "",
            markdown_table(["callback", "calls", "cumulative"],
                           [[what, f"{n:,}", fmt_time(t)] for what, (n, t) in
                            p["callbacks"].items() if n]), "",
            markdown_table(["top functions by own time", "calls", "own", "cumulative"], p["top"]),
            ""]
    return {"title": TITLE, "table": "", "notes": "\n".join(lines), "plots": []}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print("RESULT " + json.dumps(worker(sys.argv[2])), flush=True)
    else:
        sys.exit("run through the harness: python -m benchmarks.run --only bench_ode_profile")
