"""ODE gradients: bridges/PETSc (odeint_adjoint, TSAdjoint) side by side with diffrax (JAX, CPU,
float64) and torchdiffeq, in one run.

1. Robertson loss + gradient against diffrax. Robertson's kinetics with k = (0.05, 4e7, 2e4) over
   [0, 1e5] (atol 1e-10) and [0, 1e11] (atol 1e-20: y2 falls to ~1e-13), 40 log-spaced outputs
   from 1e-5; loss mean |y - y_data| against scipy Radau data from k = (0.04, 3e7, 1e4) (the
   demo's sensitivity problem). Gradient w.r.t. k for several tolerances: bridges' default method
   (a row labelled "default", whatever the default is), arkimex with the tableaus 3, 4 and 5,
   fixed-step CN as in the demo; diffrax Kvaerno3 and Kvaerno5 with its default reverse-mode
   gradient and with forward mode, each jit-compiled once (tolerances are traced arguments),
   the compile time listed apart. The reference gradient is independent: scipy Radau on the
   forward-sensitivity system (y and dy/dk, analytic Jacobian), cross-checked against central
   differences of the loss from tight scipy solutions.
2. The Robertson neural-ODE training iteration of seed 000 (bridges/demos/robertson.py: 3->5->3
   GELU, its initialisation, data and AdamW): time per iteration of bridges and diffrax over the
   same iterations, trained in interleaved chunks, and the loss ratio each reaches; torchdiffeq
   (dopri5) trains under a time budget and fails on this stiff problem.
3. Forward/backward split, memory and torchdiffeq (the issue-3 table): Robertson over [0, 1e5]
   and a damped, driven oscillator x'' = -k x - c x' + a sin t, (k, c, a) = (2.2, 0.25, 0.6), 21
   outputs in [0, 10], loss mean (y - y_data)^2 against data from (2, 0.3, 0.5); torchdiffeq on
   Robertson runs in a subprocess with a time limit (it cannot finish).
4. Where a bridges loss + gradient spends its time: cProfile and PETSc event counts.

The 2-D reaction-diffusion rows (issue 10) are benchmarks/bench_reaction_diffusion.py.
"""
from __future__ import annotations

import cProfile
import ctypes
import gc
import json
import math
import os
import pstats
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from scipy.integrate import solve_ivp

from bridges.demos import robertson as demo
from bridges.demos._util import pyplot

from . import _diffrax
from ._timing import compare, fmt_time, markdown_table

TITLE = "ODE gradients: bridges/PETSc TSAdjoint vs diffrax and torchdiffeq"
F64 = torch.float64
Y0 = (1.0, 0.0, 0.0)
MAX_RSS_MIB = 6144  # a bounded run stops before its memory (backprop's graph) grows past this


# -- a function with a budget ----------------------------------------------------------------------
class BudgetExceeded(RuntimeError):
    """A bounded run used up its time, its evaluations per call, or its memory."""


class Bounded(torch.nn.Module):
    """func with evaluation counters and the last time it was called at; past its deadline, its
    evaluations per call (reset with `new_call`) or MAX_RSS_MIB of resident memory it raises
    BudgetExceeded, which stops the solve that called it."""

    def __init__(self, func, seconds=math.inf, max_evaluations=math.inf):
        super().__init__()
        self.func, self.seconds, self.max_evaluations = func, seconds, max_evaluations
        self.deadline = math.inf
        self.total = self.in_call = 0
        self.last_t, self.phase, self.why = float("nan"), "forward solve", None

    def start(self):
        self.deadline = time.perf_counter() + self.seconds
        return self

    def new_call(self, phase="forward solve"):
        self.in_call, self.phase = 0, phase

    def forward(self, t, y):
        self.total += 1
        self.in_call += 1
        self.last_t = float(t.detach())
        if self.in_call > self.max_evaluations:
            self._stop(f"more than {self.max_evaluations:,} function evaluations in one call")
        if time.perf_counter() > self.deadline:
            self._stop(f"time limit of {self.seconds:g} s")
        if self.deadline < math.inf and self.total % 1000 == 0 \
                and _rss_kib("VmRSS") > MAX_RSS_MIB * 1024:
            self._stop(f"memory limit of {MAX_RSS_MIB} MiB RSS")
        return self.func(t, y)

    def _stop(self, why):
        self.why = (f"stopped at the {why}: the {self.phase} had reached t = {self.last_t:.3g}, "
                    f"{self.total:,} evaluations")
        raise BudgetExceeded(self.why)


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return text[0].split(": tensor(")[0][:200] if text else type(exc).__name__


# -- 1. Robertson loss + gradient against diffrax --------------------------------------------------
SPANS = {"[0, 1e5]": (1e5, 1e-10), "[0, 1e11]": (1e11, 1e-20)}  # label -> (t_max, atol)
RTOLS = (1e-4, 1e-6, 1e-8)
DIFFRAX_MAX_STEPS = 100_000  # Kvaerno3 at rtol 1e-8 over [0, 1e11] needs more than 16,384
TABLEAUS = ("3", "4", "5")


def robertson_sensitivities(t, k, rtol, atol=1e-20):
    """y(t) and dy/dk(t) from scipy Radau on the forward-sensitivity system
    S' = (df/dy) S + df/dk, S(0) = 0, with its exact Jacobian: (len(t), 3) and (len(t), 3, 3)."""
    k1, k2, k3 = (float(v) for v in k)

    def jacobians(y):
        dfdy = np.array([[-k1, k3 * y[2], k3 * y[1]], [k1, -k3 * y[2] - 2 * k2 * y[1], -k3 * y[1]],
                         [0.0, 2 * k2 * y[1], 0.0]])
        dfdk = np.array([[-y[0], 0.0, y[1] * y[2]], [y[0], -y[1] ** 2, -y[1] * y[2]],
                         [0.0, y[1] ** 2, 0.0]])
        return dfdy, dfdk

    # second derivatives: d(dfdy)_il / dy_m and d(dfdk)_ij / dy_m (constant and linear in y)
    d2f = np.zeros((3, 3, 3))
    d2f[0, 1, 2] = d2f[0, 2, 1] = k3
    d2f[1, 1, 2] = d2f[1, 2, 1] = -k3
    d2f[1, 1, 1], d2f[2, 1, 1] = -2 * k2, 2 * k2

    def dfdk_dy(y):
        out = np.zeros((3, 3, 3))
        out[0, 0, 0], out[1, 0, 0] = -1.0, 1.0
        out[0, 2, 1], out[0, 2, 2] = y[2], y[1]
        out[1, 1, 1], out[1, 2, 1], out[1, 2, 2] = -2 * y[1], -y[2], -y[1]
        out[2, 1, 1] = 2 * y[1]
        return out

    def rhs(_, z):
        y, s = z[:3], z[3:].reshape(3, 3)
        dfdy, dfdk = jacobians(y)
        f = [-k1 * y[0] + k3 * y[1] * y[2], k1 * y[0] - k3 * y[1] * y[2] - k2 * y[1] ** 2,
             k2 * y[1] ** 2]
        return np.concatenate([f, (dfdy @ s + dfdk).ravel()])

    def jac(_, z):
        y, s = z[:3], z[3:].reshape(3, 3)
        dfdy, _ = jacobians(y)
        out = np.zeros((12, 12))
        out[:3, :3] = dfdy
        out[3:, :3] = (np.einsum("ilm,lj->ijm", d2f, s) + dfdk_dy(y)).reshape(9, 3)
        out[3:, 3:] = np.kron(dfdy, np.eye(3))
        return out

    z0 = np.zeros(12)
    z0[:3] = Y0
    sol = solve_ivp(rhs, (t[0], t[-1]), z0, method="Radau", t_eval=t, rtol=rtol, atol=atol,
                    jac=jac)
    if not sol.success:
        raise RuntimeError(f"scipy Radau failed on the Robertson sensitivities: {sol.message}")
    return sol.y[:3].T, sol.y[3:].T.reshape(len(t), 3, 3)


def robertson_case(t_max):
    """Times, data, and the reference gradient of the span [0, t_max], with two checks of it: the
    same at a 10x looser tolerance, and central differences of tight scipy losses."""
    t = demo.log_times(t_max, 40)
    data = demo.reference_solution(t, demo.K_TRUE)

    def gradient(rtol):
        y, s = robertson_sensitivities(t, demo.K_START, rtol)
        return np.einsum("ti,tij->j", np.sign(y - data), s) / y.size

    ref = gradient(1e-9)
    k0, fd = np.array(demo.K_START), np.zeros(3)
    for i in range(3):
        h = 1e-4 * k0[i]
        up, down = k0.copy(), k0.copy()
        up[i] += h
        down[i] -= h
        fd[i] = (np.mean(np.abs(demo.reference_solution(t, up) - data))
                 - np.mean(np.abs(demo.reference_solution(t, down) - data))) / (2 * h)
    return {"t": t, "data": data, "grad": ref, "check_looser": grad_error(gradient(1e-8), ref),
            "check_fd": grad_error(fd, ref)}


def grad_error(grad, ref):
    """Largest relative error over the components (each parameter counts alike)."""
    return float(np.max(np.abs(np.asarray(grad) - ref) / np.abs(ref)))


def bridges_variants(quick):
    """label -> odeint_adjoint keyword arguments (rtol/atol added per span), and the rtol."""
    rtols = (1e-6,) if quick else RTOLS
    out = {}
    for rtol in rtols:
        out[f"bridges default, rtol {rtol:.0e}"] = (dict(), rtol)
    for tableau in ("4",) if quick else TABLEAUS:
        for rtol in rtols:
            out[f"bridges arkimex {tableau}, rtol {rtol:.0e}"] = (
                dict(method="arkimex", options={"ts_arkimex_type": tableau}), rtol)
    for m in (2,) if quick else (2, 5):
        out[f"bridges cn, {m} steps/interval"] = (dict(method="cn", steps_per_interval=m), None)
    return out


def diffrax_variants(quick):
    """label -> (solver, gradient mode, rtol)."""
    rtols, modes = ((1e-6,), ("reverse",)) if quick else (RTOLS, ("reverse", "forward"))
    return {f"diffrax {solver} ({mode}), rtol {rtol:.0e}": (solver, mode, rtol)
            for solver in ("Kvaerno3", "Kvaerno5") for mode in modes for rtol in rtols}


def _bridges_call(case, kwargs, rtol, atol, func):
    from bridges.petsc import odeint_adjoint
    y0, t = torch.tensor(Y0, dtype=F64), torch.from_numpy(case["t"])
    data = torch.from_numpy(case["data"])
    params = [p for p in func.parameters()]
    tolerances = {} if rtol is None else dict(rtol=rtol, atol=atol)

    def call():
        for p in params:
            p.grad = None
        loss = torch.mean(torch.abs(odeint_adjoint(func, y0, t, **kwargs, **tolerances) - data))
        loss.backward()
        return loss.item(), params[0].grad.numpy().copy()
    return call


def robertson_vs_diffrax(quick, limit):
    """Rows of table 1, the diffrax compile times, and the data for the plot."""
    jax, jnp, _ = _diffrax.load()
    rows, compiles, plot, checks = [], [], {}, {}
    for span, (t_max, atol) in SPANS.items():
        print(f"[bench_ode] Robertson {span}: reference", flush=True)
        case = robertson_case(t_max)
        checks[span] = case
        calls, results = {}, {}
        for label, (kwargs, rtol) in bridges_variants(quick).items():  # a bounded first call
            print(f"[bench_ode] {span} {label}", flush=True)
            bounded = Bounded(demo.Robertson(demo.K_START), seconds=limit).start()
            start = time.perf_counter()
            try:
                loss, grad = _bridges_call(case, kwargs, rtol, atol, bounded)()
            except Exception as exc:  # reported in the table
                results[label] = {"failure": bounded.why or f"{type(exc).__name__}: "
                                                            f"{_first_line(exc)}"}
                continue
            results[label] = {"first": time.perf_counter() - start, "grad": grad,
                              "evaluations": bounded.total, "rtol": rtol}
            calls[label] = _bridges_call(case, kwargs, rtol, atol,
                                         demo.Robertson(demo.K_START))
        d_data, d_k = jnp.asarray(case["data"]), jnp.asarray(demo.K_START)
        compiled = {}
        for label, (solver, mode, rtol) in diffrax_variants(quick).items():
            if (solver, mode) not in compiled:
                print(f"[bench_ode] {span} compiling diffrax {solver} ({mode})", flush=True)
                fn = _diffrax.loss_and_grad(_diffrax.rober, solver, case["t"], Y0,
                                            lambda ys: jnp.mean(jnp.abs(ys - d_data)),
                                            adjoint=mode, max_steps=DIFFRAX_MAX_STEPS)
                compiled[solver, mode] = _diffrax.compile_timed(fn, d_k, 1e-6, atol)
                compiles.append([span, f"{solver} ({mode})",
                                 fmt_time(compiled[solver, mode][1])])
            fn = compiled[solver, mode][0]

            def call(fn=fn, rtol=rtol):
                return jax.block_until_ready(fn(d_k, rtol, atol))
            start = time.perf_counter()
            try:
                loss, grad, steps = call()
            except Exception as exc:  # e.g. max_steps reached: reported in the table
                results[label] = {"failure": f"{type(exc).__name__}: {_diffrax_error(exc)}"}
                continue
            results[label] = {"first": time.perf_counter() - start, "grad": np.asarray(grad),
                              "steps": int(steps), "rtol": rtol}
            calls[label] = call
        print(f"[bench_ode] {span}: timing {len(calls)} variants side by side", flush=True)
        times = _interleaved(calls, {v: results[v]["first"] for v in calls},
                             rounds=1 if quick else 3)
        diffrax_points = [(times[v], grad_error(r["grad"], case["grad"]))
                          for v, r in results.items() if v.startswith("diffrax") and v in times]
        for label, r in results.items():
            tool = label.split(" ", 1)[0]
            if "failure" in r:
                rows.append([span, label, f"failed: {r['failure']}", "", "", ""])
                continue
            err = grad_error(r["grad"], case["grad"])
            seconds = times[label]
            plot.setdefault(span, []).append((label, seconds, err))
            work = (f"{r['evaluations']:,} func calls" if tool == "bridges"
                    else f"{r['steps']:,} steps")
            rows.append([span, label, fmt_time(seconds), f"{err:.1e}", work,
                         _versus(seconds, err, diffrax_points) if tool == "bridges" else ""])
    return rows, compiles, plot, checks


def _diffrax_error(exc):
    """The line of a JAX runtime error that says what went wrong (equinox wraps it)."""
    lines = [line.strip() for line in str(exc).splitlines()]
    return next((line.split("Error: ", 1)[-1] for line in lines if "EquinoxRuntimeError" in line),
                lines[0] if lines else "")[:200]


def _versus(seconds, err, diffrax_points):
    """bridges' time over the fastest diffrax run at least as accurate (or, if none is, over the
    most accurate one, marked)."""
    good = [s for s, e in diffrax_points if e <= err]
    if good:
        return f"{seconds / min(good):.2f}x"
    s, e = min(diffrax_points, key=lambda p: p[1])
    return f"{seconds / s:.2f}x (diffrax's best is {e:.0e})"


def _interleaved(calls, first, rounds, min_time=0.05):
    """Median seconds per call: every round times each variant once, in turn (a fast one in a
    batch lasting at least min_time, sized from its first call)."""
    batch = {v: max(1, math.ceil(min_time / max(first[v], 1e-9))) for v in calls}
    samples = {v: [] for v in calls}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for v, fn in calls.items():
                start = time.perf_counter()
                for _ in range(batch[v]):
                    fn()
                samples[v].append((time.perf_counter() - start) / batch[v])
                gc.collect()
    finally:
        if gc_was_enabled:
            gc.enable()
    return {v: statistics.median(s) for v, s in samples.items()}


# -- 2. the neural-ODE training iteration ----------------------------------------------------------
LR, TRAIN_RTOL, TRAIN_ATOL = 5e-3, 1e-6, 1e-8


class TorchTrainer:
    """AdamW steps of the demo's neural ODE through a torch solve(func, z0, times)."""

    def __init__(self, solve, bounded=None):
        t, y, scale, rate = demo.training_data()
        self.times, self.target = torch.from_numpy(t), torch.from_numpy(y / scale)
        self.model = demo.NeuralRHS(rate, seed=0)
        self.func = self.model if bounded is None else Bounded(self.model, **bounded)
        self.solve, self.bounded = solve, bounded is not None
        self.optimiser = torch.optim.AdamW(self.model.parameters(), lr=LR)
        self.history = []

    def loss(self):
        return torch.mean(torch.abs(self.solve(self.func, self.target[0], self.times)
                                    - self.target))

    def step(self):
        self.optimiser.zero_grad()
        if self.bounded:
            self.func.new_call("forward solve")
        loss = self.loss()
        if self.bounded:
            self.func.phase = "backward pass"
        loss.backward()
        self.optimiser.step()
        self.history.append(loss.item())

    def final_loss(self):
        if self.bounded:
            self.func.new_call("final forward solve")
        with torch.no_grad():
            return self.loss().item()


class DiffraxTrainer:
    """The same AdamW steps with diffrax: one jit-compiled function per step (loss, reverse-mode
    gradient, update)."""

    def __init__(self, solver):
        jax, jnp, _ = _diffrax.load()
        t, y, scale, rate = demo.training_data()
        target = jnp.asarray(y / scale)
        model = demo.NeuralRHS(rate, seed=0)  # the very same initial weights
        self.params = (jnp.asarray(model.net[0].weight.detach().numpy()),
                       jnp.asarray(model.net[2].weight.detach().numpy()))
        rate = jnp.asarray(rate)
        init, update = _diffrax.adamw(LR)
        self.state = init(self.params)

        def loss(params):
            ys, _ = _diffrax.solve(_diffrax.neural, solver, jnp.asarray(t), target[0],
                                   (params, rate), TRAIN_RTOL, TRAIN_ATOL)
            return jnp.mean(jnp.abs(ys - target))

        def step(params, state):
            value, grads = jax.value_and_grad(loss)(params)
            params, state = update(params, grads, state)
            return value, params, state
        self.jax = jax
        self._step, self.compile_s = _diffrax.compile_timed(step, self.params, self.state)
        self._loss, seconds = _diffrax.compile_timed(loss, self.params)
        self.compile_s += seconds
        self.history = []

    def step(self):
        value, self.params, self.state = self._step(self.params, self.state)
        self.history.append(float(self.jax.block_until_ready(value)))

    def final_loss(self):
        return float(self._loss(self.params))


def _bridges_training_solve(options=None, **kwargs):
    from bridges.petsc import odeint_adjoint
    options = {**demo.TRAINING_OPTIONS, **(options or {})}
    return lambda func, z0, times: odeint_adjoint(func, z0, times, options=options, **kwargs)


def _torchdiffeq_training_solve(adjoint):
    import torchdiffeq

    def solve(func, z0, times):
        kwargs = dict(method="dopri5", rtol=TRAIN_RTOL, atol=TRAIN_ATOL)
        if adjoint:
            return torchdiffeq.odeint_adjoint(func, z0, times,
                                              adjoint_params=tuple(func.parameters()), **kwargs)
        return torchdiffeq.odeint(func, z0, times, **kwargs)
    return solve


def training(quick, budget, torchdiffeq_budget):
    """Rows of table 2. A variant stops once it has used `budget` seconds (its time per iteration
    still counts); torchdiffeq runs after the others, bounded by torchdiffeq_budget."""
    iterations, chunk = (6, 2) if quick else (40, 5)
    trainers = {
        "bridges cn, 2 steps/interval (the demo)": TorchTrainer(
            _bridges_training_solve(method="cn", steps_per_interval=2)),
    }
    if not quick:
        trainers[f"bridges default, rtol {TRAIN_RTOL:g}"] = TorchTrainer(
            _bridges_training_solve(rtol=TRAIN_RTOL, atol=TRAIN_ATOL))
        trainers[f"bridges arkimex 4, rtol {TRAIN_RTOL:g}"] = TorchTrainer(
            _bridges_training_solve(method="arkimex", rtol=TRAIN_RTOL, atol=TRAIN_ATOL,
                                    options={"ts_arkimex_type": "4"}))
    for solver in ("Kvaerno3",) if quick else ("Kvaerno3", "Kvaerno5"):
        print(f"[bench_ode] training: compiling diffrax {solver}", flush=True)
        trainers[f"diffrax {solver}, rtol {TRAIN_RTOL:g}"] = DiffraxTrainer(solver)
    seconds = {v: 0.0 for v in trainers}
    failures, stopped = {}, set()
    for done in range(0, iterations, chunk):  # interleaved chunks: noise hits every variant
        print(f"[bench_ode] training: iterations {done + 1}-{done + chunk}", flush=True)
        for v, trainer in trainers.items():
            if v in failures or v in stopped:
                continue
            if seconds[v] > budget:
                stopped.add(v)
                continue
            start = time.perf_counter()
            try:
                for _ in range(chunk):
                    trainer.step()
            except Exception as exc:  # reported in the table
                failures[v] = f"{type(exc).__name__}: {_first_line(exc)}"
            seconds[v] += time.perf_counter() - start
    for adjoint in (True, False):  # bounded: they cannot finish one iteration
        label = f"torchdiffeq dopri5 {'odeint_adjoint' if adjoint else 'odeint (backprop)'}"
        try:
            trainer = TorchTrainer(_torchdiffeq_training_solve(adjoint),
                                   bounded=dict(seconds=torchdiffeq_budget,
                                                max_evaluations=200_000))
        except ImportError:
            failures[label] = "torchdiffeq is not installed (pip install torchdiffeq)"
            trainers[label], seconds[label] = None, 0.0
            continue
        trainers[label] = trainer
        trainer.func.start()
        start = time.perf_counter()
        try:
            for _ in range(iterations):
                trainer.step()
        except Exception as exc:  # reported in the table
            failures[label] = trainer.func.why or f"{type(exc).__name__}: {_first_line(exc)}"
        seconds[label] = time.perf_counter() - start

    results = {}
    for v, trainer in trainers.items():
        done = len(trainer.history) if trainer is not None else 0
        r = results[v] = {"done": done, "seconds": seconds[v], "failure": failures.get(v),
                          "compile": getattr(trainer, "compile_s", None)}
        if done and v not in failures:
            r.update(initial=trainer.history[0], final=trainer.final_loss())
            r["ratio"] = r["initial"] / r["final"]
    diffrax_best = min((r["seconds"] / r["done"] for v, r in results.items()
                        if v.startswith("diffrax") and r["done"] and not r["failure"]),
                       default=math.nan)
    rows = []
    for v, r in results.items():
        per = r["seconds"] / r["done"] if r["done"] else None
        if r["failure"]:
            rows.append([v, f"{r['done']} of {iterations}", f"failed: {r['failure']}", "", "", "",
                         ""])
            continue
        done = f"{r['done']}" if v not in stopped else \
            f"{r['done']} of {iterations} (stopped after {budget:g} s)"
        rows.append([v, done, fmt_time(per), f"{r['initial']:.4g} -> {r['final']:.4g}",
                     f"{r['ratio']:.2f}", fmt_time(r["compile"]) if r["compile"] else "",
                     f"{per / diffrax_best:.2f}x" if v.startswith("bridges") else ""])
    return rows, iterations, chunk, results, stopped


# -- 3. forward/backward, memory, torchdiffeq (issue 3's table) -----------------------------------
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
        t = demo.log_times(1e5, 40)
        data = demo.reference_solution(t, demo.K_TRUE)
        return dict(cls=demo.Robertson, theta=demo.K_START, y0=Y0, t=t, data=data,
                    loss=lambda y, d: torch.mean(torch.abs(y - d)),
                    scipy_loss=lambda th: float(np.mean(np.abs(demo.reference_solution(t, th)
                                                               - data))))
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
        "PETSc arkimex 4, rtol 1e-6": ("petsc", dict(method="arkimex", rtol=1e-6, atol=1e-10)),
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
SLOW = {"PETSc arkimex 4, rtol 1e-6"}  # left out of --quick


def make_call(name, variant, seconds=math.inf):
    """Callables for one loss + gradient and for the forward solve alone, and the bounded func."""
    p = problem(name)
    library, kwargs = VARIANTS[name][variant]
    func = p["cls"](p["theta"])
    y0, t, data = (torch.tensor(p["y0"], dtype=F64), torch.from_numpy(p["t"]),
                   torch.from_numpy(p["data"]))
    bounded = Bounded(func, seconds)
    if library == "petsc":
        from bridges.petsc import odeint_adjoint

        def solve():
            return odeint_adjoint(func, y0, t, **kwargs)
    else:
        import torchdiffeq

        def solve():
            if library == "adjoint":
                return torchdiffeq.odeint_adjoint(bounded, y0, t,
                                                  adjoint_params=tuple(func.parameters()), **kwargs)
            return torchdiffeq.odeint(bounded, y0, t, **kwargs)

    def call():
        func.zero_grad()
        loss = p["loss"](solve(), data)
        loss.backward()
        return loss.item(), torch.cat([q.grad.reshape(-1) for q in func.parameters()]).numpy()

    def forward_only():
        return p["loss"](solve(), data)  # records what the backward pass needs, as in training
    return call, forward_only, bounded


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
    torch.set_num_threads(1)
    out = {"status": "ok"}
    call, _, bounded = make_call(name, variant, limit_s)
    bounded.start()
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
    except BudgetExceeded as exc:
        out.update(status="failed", reason=str(exc))
    except Exception as exc:  # reported, not raised: the parent writes it into the table
        out.update(status="failed", reason=f"{type(exc).__name__}: {_first_line(exc)} (last t = "
                                           f"{bounded.last_t:.3g}, {bounded.total:,} evaluations)")
    if before is not None:  # for a failed run: the growth until it stopped
        out["peak_mib"] = (_rss_kib("VmHWM") - before) / 1024
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


def forward_backward(quick, limit):
    rows, summary = [], {}
    for name in ("robertson", "oscillator"):
        print(f"[bench_ode] forward/backward: {name}", flush=True)
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
            peak = r.get("peak_mib")
            if r["status"] != "ok":
                rows.append([name, variant, f"failed: {r['reason']}", "", "", "",
                             "" if peak is None else f"{peak:.1f} (until stopped)", ""])
                continue
            ratio = r.get("ratio")
            rows.append([name, variant, "ok", fmt_time(r["seconds"]),
                         fmt_time(r["forward"]) if "forward" in r else "",
                         f"{ratio:.2f}" if ratio is not None else "",
                         f"{peak:.1f}" if peak is not None else "-",
                         f"{grad_error(r['grad'], ref):.1e}"])
        summary[name] = results
    return rows, summary


# -- 4. where the time goes ------------------------------------------------------------------------
PETSC_COUNTS = ("TSStep", "TSAdjointStep", "SNESSolve", "TSFunctionEval", "TSJacobianEval")
PROFILED = {  # name -> (odeint_adjoint keyword arguments, rtol)
    "arkimex 4, rtol 1e-6": (dict(method="arkimex", options={"ts_arkimex_type": "4"}), 1e-6),
    "cn, 2 steps/interval": (dict(method="cn", steps_per_interval=2), None),
}
CALLBACKS = {  # (file suffix, function) -> what it is
    ("petsc/_ode.py", "_ifunction"): "IFunction callbacks (residual: one func call each)",
    ("petsc/_ode.py", "_ijacobian"): "IJacobian callbacks",
    ("petsc/_ode.py", "_linearisation"): "linearisation look-ups (IJacobian, IJacobianP)",
    ("petsc/_ode.py", "_all"): "uses of a linearisation's dense Jacobians (built on the first)",
    ("petsc/_ode.py", "_jacobian_p"): "IJacobianP callbacks",
    ("petsc/_ode.py", "multTranspose"): "parameter-Jacobian transposed products",
    ("petsc/_ode.py", "_newton_converged"): "Newton convergence tests",
    ("petsc/_ode.py", "solve"): "the forward solve (TSSolve)",
    ("petsc/_ode.py", "pullback"): "the adjoint solve (TSAdjointSolve)",
    ("demos/robertson.py", "forward"): "func (Robertson.forward) evaluations",
}


def profile(label, atol=1e-10):
    """One Robertson [0, 1e5] loss + gradient under cProfile: total, callback counts, PETSc
    counts, and the top functions by own time. Runs in a fresh process (see profile_worker)."""
    from bridges.petsc import PETSc
    torch.set_num_threads(1)
    PETSc.Log.begin()
    events = {n: PETSc.Log.Event(n) for n in PETSC_COUNTS}  # looked up once each
    kwargs, rtol = PROFILED[label]
    case = {"t": demo.log_times(1e5, 40)}
    case["data"] = demo.reference_solution(case["t"], demo.K_TRUE)
    call = _bridges_call(case, kwargs, rtol, atol, demo.Robertson(demo.K_START))
    call()  # warm-up
    start = time.perf_counter()
    call()
    plain = time.perf_counter() - start
    before = {n: e.getPerfInfo()["count"] for n, e in events.items()}
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    call()
    prof.disable()
    profiled = time.perf_counter() - start
    counts = {n: e.getPerfInfo()["count"] - before[n] for n, e in events.items()}
    stats = pstats.Stats(prof).stats
    callbacks = {what: [0, 0.0] for what in CALLBACKS.values()}
    for (path, _, name), (_, calls, _, cumulative, _) in stats.items():
        for (suffix, fn), what in CALLBACKS.items():
            if path.endswith(suffix) and name == fn:
                callbacks[what][0] += calls
                callbacks[what][1] += cumulative
    top = sorted(stats.items(), key=lambda item: -item[1][2])[:12]
    top_rows = [[f"`{os.path.basename(path)}:{line}({name})`", f"{calls:,}", fmt_time(own),
                 fmt_time(cumulative)] for (path, line, name), (_, calls, own, cumulative, _) in top]
    return {"label": label, "plain": plain, "profiled": profiled, "counts": counts,
            "callbacks": callbacks, "top": top_rows}


def profile_in_subprocess(label):
    """profile(label) in a fresh process: PETSc's event counts go wrong in a process where a
    solve was stopped inside a callback (its events are left open)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_ode", "--profile", label],
                          capture_output=True, text=True, timeout=600, cwd=root)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"the profile worker exited with code {proc.returncode}: {tail[:200]}")


# -- the benchmark ---------------------------------------------------------------------------------
def run(quick=False, plot_dir=None):
    missing = _diffrax.missing()
    if missing:
        raise RuntimeError(f"bench_ode compares with diffrax: {missing}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (see the notes)
    try:
        return _run(quick, plot_dir)
    finally:
        torch.set_num_threads(threads)


def _run(quick, plot_dir):
    limit = 10.0 if quick else 30.0
    start = time.perf_counter()
    rober_rows, compiles, plot_data, checks = robertson_vs_diffrax(quick, limit)
    train_rows, iterations, chunk, train_results, stopped = training(
        quick, 30.0 if quick else 100.0, 5.0 if quick else 25.0)
    fb_rows, summary = forward_backward(quick, limit)
    print("[bench_ode] profiles", flush=True)
    profiles = [profile_in_subprocess(label) for label in PROFILED]
    seconds = time.perf_counter() - start

    tables = [
        "**1. Robertson loss + gradient (w.r.t. k) against diffrax.**", "",
        markdown_table(["span", "method", "loss + gradient", "gradient error", "work",
                        "bridges / diffrax"], rober_rows), "",
        _robertson_notes(checks, limit, quick), "",
        "diffrax compile times (once per solver, gradient mode and span; not in the times "
        "above): " + "; ".join(f"{span} {what} {t}" for span, what, t in compiles) + ".", "",
        f"**2. Neural-ODE training iteration** (seed 000, {iterations} iterations, interleaved "
        f"in chunks of {chunk}).", "",
        markdown_table(["method", "iterations", "time / iteration", "loss (first -> final)",
                        "loss ratio", "compile (once)", "bridges / fastest diffrax"], train_rows),
        "", _training_notes(train_results, iterations, stopped), "",
        "**3. Forward/backward split, memory, torchdiffeq.**", "",
        markdown_table(["problem", "method", "status", "loss + gradient", "forward",
                        "backward / forward", "peak RSS growth [MiB]", "gradient error"],
                       fb_rows), "",
        _fb_notes(summary, quick, limit), "",
        "**4. Where a bridges loss + gradient goes** (Robertson [0, 1e5], one call, cProfile).", "",
        _profile_text(profiles), "",
        "The 2-D reaction-diffusion loss + gradient against diffrax (issue 10) is "
        "benchmarks/bench_reaction_diffusion.py.",
    ]
    notes = "\n".join(tables)
    plots = []
    if plot_dir is not None:
        path = _plot(plot_data, plot_dir / "ode.png")
        if path:
            plots.append(path)
    print(f"[bench_ode] done in {seconds:.0f} s", flush=True)
    return {"title": TITLE, "table": "", "notes": notes, "plots": plots}


def _robertson_notes(checks, limit, quick):
    spans = "; ".join(f"{span}: looser reference (rtol 1e-8) within {c['check_looser']:.0e}, "
                      f"central differences (relative step 1e-4) of scipy Radau losses (rtol "
                      f"1e-10) within {c['check_fd']:.0e}" for span, c in checks.items())
    return (
        "Absolute times depend on the load other jobs put on this shared 2-core machine, and "
        "differ between tables run minutes apart; compare the ratios, measured side by side "
        "within a table. "
        "Gradient error: the largest relative error over dL/dk1, dL/dk2, dL/dk3 against the "
        "reference (scipy Radau, rtol 1e-9, on the forward-sensitivity system; so it includes "
        f"each method's discretisation error). Checks of the reference: {spans}. Times: median "
        f"of {1 if quick else 3} interleaved rounds after a first call; bridges' first call runs "
        f"with a limit of {limit:g} s ('failed' rows) and counts its func calls (residuals and "
        "Jacobian passes, forward and adjoint); diffrax's 'steps' are its accepted and "
        "rejected steps. "
        "'bridges / diffrax': bridges' time over that of the fastest diffrax run (any solver, "
        "gradient mode and tolerance) whose gradient error is at most as large; below 1 means "
        "bridges is faster at equal accuracy. diffrax: PID step control, reverse mode is its "
        "default RecursiveCheckpointAdjoint, forward mode is ForwardMode with jax.jacfwd (3 "
        "parameters). 'default' is odeint_adjoint with only rtol and atol given. torch runs "
        "with one intra-op thread throughout (torch.set_num_threads(1)): with its default of "
        "two, bridges' many tiny ops were 2-3x slower on this shared 2-core machine (CN, 2 "
        "steps per interval: 2.1 s against 0.6-0.9 s per loss + gradient, measured side by "
        "side); diffrax's times did not change with XLA held to one thread.")


def _training_notes(results, iterations, stopped):
    ratios = {v: r["ratio"] for v, r in results.items() if r.get("ratio") and v not in stopped}
    text = ", ".join(f"{v} {r:.2f}" for v, r in ratios.items())
    return (
        f"Every variant starts from the demo's initial weights and runs the same {iterations} "
        f"AdamW steps (lr {LR:g}) on the demo's data (40 log-spaced times in [1e-5, 100], scaled "
        f"variables); adaptive methods use rtol {TRAIN_RTOL:g}, atol {TRAIN_ATOL:g}. bridges "
        f"runs with the demo's options (snes_max_it 200, unlimited Newton failures per step). "
        f"diffrax runs one jit-compiled step (loss, reverse-mode gradient, AdamW update); its "
        f"compile time is listed apart and not in the time per iteration. Loss ratios (first / "
        f"final) after {iterations} iterations: {text}. torchdiffeq runs after the others under "
        f"its own time budget. 'bridges / fastest diffrax': time per iteration over the fastest "
        f"diffrax variant's.")


def _fb_notes(summary, quick, limit):
    rob, osc = summary["robertson"], summary["oscillator"]
    rob_ratios = [r["ratio"] for r in rob.values() if r.get("ratio") is not None]
    osc_ratios = {v: r["ratio"] for v, r in osc.items() if r.get("ratio") is not None}
    return (
        f"Robertson [0, 1e5] and the oscillator. 'forward' is odeint_adjoint with the trajectory "
        f"recorded (as in training); backward/forward = (loss + gradient - forward) / forward, "
        f"timed side by side (issue 3's goal: at most 2). Over the PETSc Robertson variants it is "
        f"{min(rob_ratios):.2f}-{max(rob_ratios):.2f}; on the non-stiff oscillator "
        + ", ".join(f"{r:.2f} ({v})" for v, r in osc_ratios.items())
        + ": for explicit Runge-Kutta the forward pass only evaluates the right-hand side, while "
        f"TSAdjoint also applies its Jacobian and parameter Jacobian at every stage. Gradient "
        f"error: largest relative error over the parameters against central differences (relative "
        f"step 1e-4) of the loss computed by scipy at tight tolerances (Radau rtol 1e-10, DOP853 "
        f"rtol 1e-12). Peak RSS growth: the largest growth of the resident set during one loss + "
        f"gradient (after a warm-up call) in a fresh process, from Linux's VmHWM reset just "
        f"before the call"
        f"{' (--quick: first variant of each problem only; arkimex left out)' if quick else ''}. "
        f"torchdiffeq on Robertson runs without warm-up in a subprocess stopped after {limit:g} s: "
        f"stability limits dopri5's steps to the stiff time scale (~1e-4) of the y2 equation.")


def _profile_text(profiles):
    lines = []
    for p in profiles:
        c = p["counts"]
        lines += [
            f"*{p['label']}*: {fmt_time(p['plain'])} without the profiler, "
            f"{fmt_time(p['profiled'])} under it. PETSc: {c['TSStep']:,} steps, "
            f"{c['TSAdjointStep']:,} adjoint steps, {c['SNESSolve']:,} Newton solves, "
            f"{c['TSFunctionEval']:,} residual and {c['TSJacobianEval']:,} Jacobian evaluations "
            f"requested (forward and adjoint).", "",
            markdown_table(["callback", "calls", "cumulative"],
                           [[what, f"{n:,}", fmt_time(t)] for what, (n, t) in
                            p["callbacks"].items() if n]), "",
            markdown_table(["top functions by own time", "calls", "own", "cumulative"], p["top"]),
            ""]
    return "\n".join(lines)


def _plot(plot_data, path):
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
            ax.loglog(s, e, ("o-" if group.startswith("bridges") else "s--"), color=f"C{i % 10}",
                      label=group, ms=4)
        ax.set(xlabel="loss + gradient time [s]", ylabel="gradient error (max relative)",
               title=f"Robertson {span}: time vs gradient error")
        ax.legend(fontsize=6.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5] == "1")
    elif len(sys.argv) == 3 and sys.argv[1] == "--profile":
        print("RESULT " + json.dumps(profile(sys.argv[2])), flush=True)
    else:
        sys.exit("run through the harness: python -m benchmarks.run --only bench_ode")
