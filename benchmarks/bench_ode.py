"""ODE loss + gradient: bridges/PETSc (odeint_adjoint, TSAdjoint) against torchdiffeq
(odeint_adjoint and plain backprop through odeint) on a stiff and a non-stiff problem.

- Robertson's kinetics, k = (0.05, 4e7, 2e4), 40 log-spaced outputs in [1e-5, 1e5], loss
  mean |y - y_data| against scipy Radau data from k = (0.04, 3e7, 1e4) (the demo's sensitivity);
- a damped, driven oscillator x'' = -k x - c x' + a sin t, (k, c, a) = (2.2, 0.25, 0.6), 21 outputs
  in [0, 10], loss mean (y - y_data)^2 against data from (2, 0.3, 0.5).

Gradients are w.r.t. the parameters. Reference gradient: central differences (relative step 1e-4)
of the same loss computed by scipy at tight tolerances (Radau rtol 1e-10 for Robertson, DOP853
rtol 1e-12 for the oscillator), i.e. of the exact, continuous loss; a method's error includes its
discretisation error. torchdiffeq on Robertson runs in a subprocess with a time limit (it cannot
finish); its failure and how far it got are reported.
"""
from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch
from scipy.integrate import solve_ivp

from bridges.demos._util import pyplot

from ._timing import compare, fmt_time, markdown_table

TITLE = "ODE gradients: PETSc TSAdjoint vs torchdiffeq"
F64 = torch.float64
GOAL_SECONDS, GOAL_RATIO = 1.0, 2.0


# -- problems -------------------------------------------------------------------------------------
class Oscillator(torch.nn.Module):
    def __init__(self, theta):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(theta, dtype=F64))

    def forward(self, t, y):
        k, c, a = self.theta
        x, v = y.unbind(-1)
        return torch.stack([v, -k * x - c * v + a * torch.sin(t)], -1)


def _oscillator_scipy(theta, t):
    k, c, a = theta
    sol = solve_ivp(lambda s, y: [y[1], -k * y[0] - c * y[1] + a * math.sin(s)], (t[0], t[-1]),
                    [1.0, 0.0], method="DOP853", t_eval=t, rtol=1e-12, atol=1e-14)
    return sol.y.T


def problem(name):
    """(module class, theta, y0, t, data, loss(y, data), scipy loss(theta)) of a named problem."""
    if name == "robertson":
        from bridges.demos.robertson import (K_START, K_TRUE, Robertson, log_times,
                                             reference_solution)
        t = log_times(1e5, 40)
        data = reference_solution(t, K_TRUE)
        return dict(cls=Robertson, theta=K_START, y0=(1.0, 0.0, 0.0), t=t, data=data,
                    loss=lambda y, d: torch.mean(torch.abs(y - d)),
                    scipy_loss=lambda th: float(np.mean(np.abs(reference_solution(t, th) - data))))
    t = np.linspace(0.0, 10.0, 21)
    data = _oscillator_scipy((2.0, 0.3, 0.5), t)
    return dict(cls=Oscillator, theta=(2.2, 0.25, 0.6), y0=(1.0, 0.0), t=t, data=data,
                loss=lambda y, d: torch.mean((y - d) ** 2),
                scipy_loss=lambda th: float(np.mean((_oscillator_scipy(th, t) - data) ** 2)))


def reference_gradient(p, rel=1e-4):
    theta = np.array(p["theta"], dtype=np.float64)
    grad = np.zeros_like(theta)
    for i in range(len(theta)):
        h = rel * abs(theta[i])
        up, down = theta.copy(), theta.copy()
        up[i] += h
        down[i] -= h
        grad[i] = (p["scipy_loss"](up) - p["scipy_loss"](down)) / (2 * h)
    return grad


# variant name -> (library, keyword arguments); torchdiffeq tolerances match PETSc's adaptive ones
VARIANTS = {
    "robertson": {
        "PETSc cn, 2 steps/interval": ("petsc", dict(method="cn", steps_per_interval=2)),
        "PETSc cn, 5 steps/interval": ("petsc", dict(method="cn", steps_per_interval=5)),
        "PETSc arkimex (ESDIRK4), rtol 1e-6": ("petsc", dict(method="arkimex", rtol=1e-6,
                                                             atol=1e-10)),
        "torchdiffeq dopri5 odeint_adjoint": ("adjoint", dict(method="dopri5", rtol=1e-6,
                                                              atol=1e-10)),
        "torchdiffeq dopri5 odeint (backprop)": ("backprop", dict(method="dopri5", rtol=1e-6,
                                                                  atol=1e-10)),
    },
    "oscillator": {
        "PETSc dopri5, rtol 1e-6": ("petsc", dict(method="dopri5", rtol=1e-6, atol=1e-8)),
        "PETSc rk4, dt 0.05": ("petsc", dict(method="rk4", step_size=0.05)),
        "PETSc cn, dt 0.05": ("petsc", dict(method="cn", step_size=0.05)),
        "torchdiffeq dopri5 odeint_adjoint": ("adjoint", dict(method="dopri5", rtol=1e-6,
                                                              atol=1e-8)),
        "torchdiffeq dopri5 odeint (backprop)": ("backprop", dict(method="dopri5", rtol=1e-6,
                                                                  atol=1e-8)),
    },
}
BOUNDED = {("robertson", "adjoint"), ("robertson", "backprop")}  # run in a time-limited subprocess
SLOW = {"PETSc arkimex (ESDIRK4), rtol 1e-6"}  # left out of --quick


MAX_RSS_MIB = 6144  # a bounded run stops before its memory (backprop's graph) grows past this


class _Deadline(RuntimeError):
    pass


class _Counted(torch.nn.Module):
    """func with an evaluation counter, the last time it was called at, and an optional deadline
    (which also stops the run when its resident memory exceeds MAX_RSS_MIB)."""

    def __init__(self, func, deadline=math.inf):
        super().__init__()
        self.func, self.deadline, self.evaluations, self.last_t = func, deadline, 0, float("nan")
        self.why = ""

    def forward(self, t, y):
        self.evaluations += 1
        self.last_t = float(t.detach())
        if time.perf_counter() > self.deadline:
            self.why = "time"
            raise _Deadline()
        if self.deadline < math.inf and self.evaluations % 1000 == 0 \
                and _rss_kib("VmRSS") > MAX_RSS_MIB * 1024:
            self.why = "memory"
            raise _Deadline()
        return self.func(t, y)


def make_call(name, variant, deadline=math.inf):
    """Callables for one loss + gradient and for the forward solve alone, and the counted func."""
    p = problem(name)
    library, kwargs = VARIANTS[name][variant]
    func = p["cls"](p["theta"])
    y0, t, data = (torch.tensor(p["y0"], dtype=F64), torch.from_numpy(p["t"]),
                   torch.from_numpy(p["data"]))
    counted = _Counted(func, deadline)
    if library == "petsc":
        from bridges.petsc import odeint_adjoint

        def solve():
            return odeint_adjoint(func, y0, t, **kwargs)
    else:
        import torchdiffeq

        def solve():
            if library == "adjoint":
                return torchdiffeq.odeint_adjoint(counted, y0, t,
                                                  adjoint_params=tuple(func.parameters()), **kwargs)
            return torchdiffeq.odeint(counted, y0, t, **kwargs)

    def call():
        func.zero_grad()
        loss = p["loss"](solve(), data)
        loss.backward()
        return loss.item(), torch.cat([q.grad.reshape(-1) for q in func.parameters()]).numpy()

    def forward_only():
        return p["loss"](solve(), data)  # records what the backward pass needs, as in training
    return call, forward_only, counted


# -- memory: one fresh process per measurement ----------------------------------------------------
def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_memory():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def worker(name, variant, limit_s, warm_up):
    """Runs in a fresh subprocess: one (optionally warmed-up) loss + gradient, measured."""
    out = {"status": "ok"}
    deadline = time.perf_counter() + limit_s
    call, _, counted = make_call(name, variant, deadline)
    before = None
    try:
        if warm_up:
            call()
        _release_memory()
        before = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current RSS
            f.write("5")
        start = time.perf_counter()
        loss, grad = call()
        out.update(seconds=time.perf_counter() - start, loss=loss, grad=grad.tolist())
    except _Deadline:
        limit = f"{limit_s:g} s" if counted.why == "time" else f"{MAX_RSS_MIB} MiB RSS"
        out.update(status="failed", reason=f"stopped at the limit of {limit}: last evaluation at "
                                           f"t = {counted.last_t:.3g} of {problem(name)['t'][-1]:g}"
                                           f", {counted.evaluations:,} evaluations")
    except Exception as exc:  # reported, not raised: the parent writes it into the table
        text = str(exc).strip().splitlines()
        out.update(status="failed", reason=f"{type(exc).__name__}: {text[0][:160] if text else ''}"
                                           f" (last t = {counted.last_t:.3g}, "
                                           f"{counted.evaluations:,} evaluations)")
    if before is not None:  # for a failed run: the growth until it stopped
        out["peak_mib"] = (_rss_kib("VmHWM") - before) / 1024
    out["evaluations"] = counted.evaluations
    print("RESULT " + json.dumps(out), flush=True)


def in_subprocess(name, variant, limit_s, warm_up=True):
    cmd = [sys.executable, "-m", "benchmarks.bench_ode", "--worker", name, variant, str(limit_s),
           "1" if warm_up else "0"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit_s + 60, cwd=root)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"killed after {limit_s + 60:g} s without a result"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": "failed",
            "reason": f"worker exited with code {proc.returncode}: {tail[:160]}"}


# -- the benchmark --------------------------------------------------------------------------------
def run(quick=False, plot_dir=None):
    limit = 5.0 if quick else 60.0
    rows, summary, plot_data = [], {}, {}
    for name in ("robertson", "oscillator"):
        p = problem(name)
        ref = reference_gradient(p)
        timed, forward, results = {}, {}, {}
        variants = {v: spec for v, spec in VARIANTS[name].items() if not (quick and v in SLOW)}
        for variant, (library, _) in variants.items():
            if (name, library) in BOUNDED:
                continue
            call, forward_only, _ = make_call(name, variant)
            timed[variant] = call
            if library == "petsc":
                forward[variant + " [forward]"] = forward_only
            results[variant] = {"status": "ok", "grad": call()[1]}
        times = compare({**timed, **forward}, rounds=3 if quick else 7, min_time=0.05)
        for variant, (library, _) in variants.items():
            if (name, library) in BOUNDED:
                results[variant] = in_subprocess(name, variant, limit, warm_up=False)
                continue
            results[variant]["seconds"] = times[variant]
            if library == "petsc":
                fwd = times[variant + " [forward]"]
                results[variant]["forward"] = fwd
                results[variant]["ratio"] = (times[variant] - fwd) / fwd
            if not quick or variant == next(iter(VARIANTS[name])):
                memory = in_subprocess(name, variant, limit)
                results[variant]["peak_mib"] = memory.get("peak_mib")
        for variant, r in results.items():
            if r["status"] != "ok":
                peak = r.get("peak_mib")
                rows.append([name, variant, f"failed: {r['reason']}", "", "", "",
                             "" if peak is None else f"{peak:.1f} (until stopped)", ""])
                continue
            err = np.linalg.norm(np.array(r["grad"]) - ref) / np.linalg.norm(ref)
            ratio = r.get("ratio")
            peak = r.get("peak_mib")
            rows.append([name, variant, "ok", fmt_time(r["seconds"]),
                         fmt_time(r["forward"]) if "forward" in r else "",
                         f"{ratio:.2f}" if ratio is not None else "",
                         f"{peak:.1f}" if peak is not None else "-", f"{err:.1e}"])
            plot_data.setdefault(name, []).append((variant, r["seconds"], err))
        plot_data.setdefault(name, [])
        summary[name] = results
    table = markdown_table(["problem", "method", "status", "loss + gradient", "forward",
                            "backward / forward", "peak RSS growth [MiB]",
                            "gradient rel. error"], rows)
    notes = _notes(summary, quick, limit)
    plots = []
    if plot_dir is not None:
        failures = {name: [v for v, r in res.items() if r["status"] != "ok"]
                    for name, res in summary.items()}
        path = _plot(plot_data, failures, plot_dir / "ode.png")
        if path:
            plots.append(path)
    return {"title": TITLE, "table": table, "notes": notes, "plots": plots}


def _notes(summary, quick, limit):
    rob, osc = summary["robertson"], summary["oscillator"]
    fast = rob["PETSc cn, 2 steps/interval"]
    seconds, ratio = fast["seconds"], fast["ratio"]
    rob_ratios = [r["ratio"] for r in rob.values() if r.get("ratio") is not None]
    osc_ratios = {v: r["ratio"] for v, r in osc.items() if r.get("ratio") is not None}
    failed = [f"{v}: {r['reason']}" for v, r in rob.items() if r["status"] != "ok"]
    return (
        f"Goals (issue 3): the Robertson [0, 1e5] loss + gradient in under {GOAL_SECONDS:g} s, and "
        f"the adjoint (backward) at most {GOAL_RATIO:g}x the forward solve. PETSc CN with 2 fixed "
        f"steps per output interval (80 steps, geometric on the log grid): **{seconds:.3f} s** "
        f"({'met' if seconds < GOAL_SECONDS else 'not met'}), backward/forward **{ratio:.2f}x** "
        f"({'met' if ratio <= GOAL_RATIO else 'not met'}); over the PETSc Robertson variants "
        f"backward/forward is {min(rob_ratios):.2f}-{max(rob_ratios):.2f}x. On the non-stiff "
        f"oscillator it is " + ", ".join(f"{r:.2f}x ({v})" for v, r in osc_ratios.items())
        + ": for explicit Runge-Kutta the forward pass only evaluates the right-hand side, while "
        f"TSAdjoint also applies its Jacobian and parameter Jacobian at every stage. "
        f"torchdiffeq on Robertson: {'; '.join(failed) if failed else 'finished'}. "
        f"'forward' is odeint_adjoint with the trajectory recorded (as in training); 'backward' is "
        f"loss + gradient minus forward, timed side by side. Gradient error: relative 2-norm "
        f"distance to central differences of the loss computed by scipy at tight tolerances (the "
        f"exact loss), so it includes each method's discretisation error. Peak RSS growth: the "
        f"largest growth of the resident set during one loss + gradient (after a warm-up call) in "
        f"a fresh process, read from Linux's VmHWM after resetting it just before the call: it "
        f"sees torch, PETSc and Python allocations alike"
        f"{' (--quick: first variant of each problem only; arkimex left out)' if quick else ''}. "
        f"torchdiffeq on Robertson runs without warm-up in a subprocess stopped after {limit:g} s: "
        f"stability limits dopri5's steps to about 1e-3 to 1e-4 (the time scale of the y2 "
        f"equation), so reaching t = 1e5 would take of the order of 1e8 steps.")


def _plot(plot_data, failures, path):
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(plot_data), figsize=(6 * len(plot_data), 4))
    for ax, (name, entries) in zip(np.atleast_1d(axes), plot_data.items()):
        for i, (variant, seconds, err) in enumerate(entries):
            ax.loglog(seconds, err, "o" if variant.startswith("PETSc") else "s", color=f"C{i}",
                      label=variant)
        if name == "robertson":
            ax.axvline(GOAL_SECONDS, color="grey", ls=":", label="1 s goal")
        if failures[name]:
            ax.text(0.02, 0.5, "failed (see table):\n" + "\n".join(failures[name]),
                    transform=ax.transAxes, fontsize=7, color="C3")
        ax.set(xlabel="loss + gradient time [s]", ylabel="gradient rel. error",
               title=f"{name}: cost vs accuracy")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5] == "1")
    else:
        sys.exit("run through the harness: python -m benchmarks.run --only bench_ode")
