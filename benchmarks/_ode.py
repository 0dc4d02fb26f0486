"""What the ODE benchmarks (bench_ode_*.py) share: bridges' solver as a reusable object, ROBER's
loss + gradient cases with independent reference gradients, and runs with a budget."""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch

from bridges.problems import ROBER_K_START, problem

from ._timing import one_torch_thread

F64 = torch.float64
SPANS = {"[0, 1e5]": (1e5, 1e-10), "[0, 1e11]": (1e11, 1e-20)}  # label -> (t_max, atol)
MAX_RSS_MIB = 6144  # a bounded run stops before its memory (backprop's graph) grows past this


def solver(**kwargs):
    """bridges' solve(func, y0, t) with these odeint_adjoint keyword arguments: one
    bridges.petsc.ODESolver made once and reused across calls (as a diffrax user keeps one
    jitted function) where bridges has it, else odeint_adjoint called anew each time."""
    from bridges import petsc
    if hasattr(petsc, "ODESolver"):
        return petsc.ODESolver(**kwargs)

    def solve(func, y0, t):
        return petsc.odeint_adjoint(func, y0, t, **kwargs)
    return solve


def reusable():
    """Whether solver() returns one object reused across calls (bridges.petsc.ODESolver)."""
    from bridges import petsc
    return hasattr(petsc, "ODESolver")


# -- ROBER's loss + gradient --------------------------------------------------------------------
def robertson_case(t_max, y0s=None, checks=False):
    """ROBER over [0, t_max] at 0 and 40 log-spaced times from 1e-5, loss mean |y - y_data|
    against scipy Radau data from k = (0.04, 3e7, 1e4), gradient w.r.t. k at ROBER_K_START.

    y0s: initial states, shape (B, 3), for a batch (default: the one state (1, 0, 0)). Returns
    t, y0 and data (shape (len(t), B, 3) for a batch), the reference gradient (scipy Radau on
    the forward-sensitivity system, bridges.problems), and with `checks` (one state) two checks
    of it: the same at rtol 1e-8, and central differences of Radau losses."""
    rober = problem("rober", t_end=t_max, n_times=40)
    batch = [rober] if y0s is None else [dataclasses.replace(rober, y0=y0) for y0 in y0s]
    data = np.stack([p.reference() for p in batch], axis=1)  # (T, B, 3)
    k = {"k": ROBER_K_START}

    def gradient(looser=False):
        return sum(dataclasses.replace(p, ref_rtol=1e-8 if looser else p.ref_rtol).gradient(
            lambda y: np.sign(y - data[:, b]) / data.size, params=k)["k"]
            for b, p in enumerate(batch))

    case = {"t": rober.t, "grad": gradient(), "y0": rober.y0 if y0s is None else np.asarray(y0s),
            "data": data[:, 0] if y0s is None else data}
    if checks:
        k0, fd = np.array(ROBER_K_START), np.zeros(3)
        for i in range(3):
            h = 1e-4 * k0[i] * np.eye(3)[i]
            losses = [np.mean(np.abs(rober.reference(params={"k": k0 + s * h}) - case["data"]))
                      for s in (1, -1)]
            fd[i] = (losses[0] - losses[1]) / (2 * h[i])
        case.update(check_looser=grad_error(gradient(looser=True), case["grad"]),
                    check_fd=grad_error(fd, case["grad"]))
    return case


def grad_error(grad, ref):
    """Largest relative error over the components (each parameter counts alike)."""
    return float(np.max(np.abs(np.asarray(grad) - ref) / np.abs(ref)))


def bridges_call(case, func, **kwargs):
    """A zero-argument callable: one loss + gradient of ROBER through bridges' solver made once
    with kwargs, returning (loss, dL/dk); its ``solver`` attribute is that solver."""
    solve = solver(**kwargs)
    y0, t = torch.from_numpy(case["y0"]), torch.from_numpy(case["t"])
    data = torch.from_numpy(case["data"])

    def call():
        func.zero_grad()
        loss = torch.mean(torch.abs(solve(func, y0, t) - data))
        loss.backward()
        return loss.item(), func.k.grad.numpy().copy()
    call.solver = solve
    return call


def rober_func():
    """ROBER's torch right-hand side at ROBER_K_START (parameter k)."""
    return problem("rober").func({"k": ROBER_K_START})


def first_line(exc):
    text = str(exc).strip().splitlines()
    return text[0].split(": tensor(")[0][:200] if text else type(exc).__name__


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

    @property
    def k(self):
        return self.func.k

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
                and rss_kib("VmRSS") > MAX_RSS_MIB * 1024:
            self._stop(f"memory limit of {MAX_RSS_MIB} MiB RSS")
        return self.func(t, y)

    def _stop(self, why):
        self.why = (f"stopped at the {why}: the {self.phase} had reached t = {self.last_t:.3g}, "
                    f"{self.total:,} evaluations")
        raise BudgetExceeded(self.why)


def rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def diffrax_error(exc):
    """The line of a JAX runtime error that says what went wrong (equinox wraps it)."""
    lines = [line.strip() for line in str(exc).splitlines()]
    return next((line.split("Error: ", 1)[-1] for line in lines if "EquinoxRuntimeError" in line),
                lines[0] if lines else "")[:200]


TORCH_THREADS_NOTE = (
    "torch runs with one intra-op thread throughout (torch.set_num_threads(1)): with its default "
    "of two, bridges' many tiny ops were 2-3x slower on this shared 2-core machine; diffrax's "
    "times did not change with XLA held to one thread.")


def one_thread(run):
    """run(quick, plot_dir) with torch on one intra-op thread, and diffrax required."""
    def wrapped(quick=False, plot_dir=None):
        from . import _diffrax
        missing = _diffrax.missing()
        if missing:
            raise RuntimeError(f"the ODE benchmarks compare with diffrax: {missing}")
        with one_torch_thread():
            return run(quick, plot_dir)
    return wrapped
