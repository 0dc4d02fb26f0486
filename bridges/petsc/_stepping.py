"""Step control of implicit ODE solves: the first step, Newton's convergence test in the
integrator's own norm, and the checks that stop a solve which cannot succeed."""
from __future__ import annotations

import math

import numpy as np
import torch

from .._errors import ForeignError, SolverFailure
from ._runtime import PETSc
from ._vec import vec_as_tensor

NEWTON_TOLERANCE = 1e-3  # adaptive steps: Newton's first update, in units of the tolerances,
NEWTON_REMAINDER = 3e-2  # and its estimated remaining error after later ones
COLLAPSE = 64 * np.finfo(np.float64).eps  # a step below this times |t| makes no progress


def on_every_rank(comm, flag: bool) -> bool:
    """Whether `flag` holds on every rank of `comm` (so that all ranks decide alike)."""
    if comm.getSize() == 1:
        return flag
    return comm.tompi4py().allreduce(int(not flag)) == 0


def _rms(x, comm):
    total, count = float(x.square().sum()), x.numel()
    if comm is not None:
        total, count = comm.allreduce(total), comm.allreduce(count)
    return (total / count) ** 0.5


def starting_step(f, y0, t0, interval, rtol, atol, comm, who, order=2):
    """A first step for adaptive integration (Hairer, Norsett and Wanner's estimate from two
    evaluations of f(t, y)): small where the solution changes fast in the tolerances' norm.
    `comm` is the mpi4py communicator of a state split over ranks, or None."""
    scale = atol + rtol * y0.abs()
    f0 = f(t0, y0)
    d0, d1 = _rms(y0 / scale, comm), _rms(f0 / scale, comm)
    h0 = min(1e-6 * interval if min(d0, d1) < 1e-5 else 0.01 * d0 / d1, interval)
    d2 = _rms((f(t0 + h0, y0 + h0 * f0) - f0) / scale, comm) / h0
    largest = max(d1, d2)
    h1 = max(1e-6 * h0, 1e-3 * h0) if largest <= 1e-15 else \
        (0.01 / largest) ** (1.0 / (order + 1))
    step = min(100 * h0, h1, interval)
    if not np.isfinite(step) or step <= 0:
        raise ForeignError(f"{who}: func gave non-finite values at t = {t0:g} or just after; "
                           f"cannot choose a first step (give options "
                           f"{{'ts_time_step': ...}} or check func)")
    return step


HUGE = 1e150  # beyond it PETSc's 2-norms of the state overflow ("inf or nan in norma")


def _bounded(x) -> bool:
    """Whether every entry of x is finite and below HUGE in size (one reduction; nan fails)."""
    return float(torch.linalg.vector_norm(x, float("inf"))) < HUGE


def check_progress(ts, times, who, state=None):
    """Stop a solve that cannot succeed, at once: a step size collapsed to a few rounding
    units of t (a blow-up, a singularity, or Newton failing at every step size), or a
    non-finite state."""
    t, dt = ts.getTime(), ts.getTimeStep()
    if state is not None and not on_every_rank(ts.getComm(), _bounded(state)):
        raise SolverFailure(f"{who}: the solution became non-finite (nan/inf) or beyond {HUGE:g} "
                            f"at t = {t:.10g} (PETSc TS '{ts.getType()}', step size {dt:.3g}); "
                            f"the problem may blow up there, the method may be unstable at this "
                            f"step size, or atol may be above the solution's components (a "
                            f"loose atol lets small ones drift, and grow)")
    if dt > COLLAPSE * abs(t):
        return
    size = vec_as_tensor(ts.getSolution(), "r").abs().max()
    if abs(times[0]) > 1e6 * abs(times[-1] - times[0]):  # steps below double's resolution
        raise SolverFailure(
            f"{who}: the step size collapsed to {dt:.3g} at t = {t:.17g}, too small for double "
            f"precision to add to a time this far from 0 (output times {times[0]:.17g} to "
            f"{times[-1]:.17g}). What to try: shift the times to start near 0 (and add the "
            f"shift back inside func if it reads t), or loosen rtol/atol")
    raise SolverFailure(
        f"{who}: the step size collapsed to {dt:.3g} at t = {t:.17g} (output times "
        f"{times[0]:g} to {times[-1]:g}), after {ts.getStepNumber()} steps and "
        f"{ts.getStepRejections()} rejections; the largest |y| there is {float(size):.3g}. The "
        f"solution probably blows up (or func is singular) near t = {t:.6g}. What to try: "
        f"end the integration before that time, or check func there")


class NewtonTest:
    """Newton's convergence in the integrator's own norm: s_k = RMS(dx_k / (atol + rtol |x|))
    of the k-th update (a norm of the whole vector would leave small components, y ~ 1e-8
    beside y ~ 1, unconverged). Converged when s_1 <= NEWTON_TOLERANCE, or, with the observed
    rate q = s_k / s_(k-1) < 1, when the remaining error q / (1 - q) s_k is below
    NEWTON_REMAINDER, or when every component's update is down to rounding (|dx_i| <= 1e-13
    |x_i|). Diverged when q >= 1, unless the updates have stalled at the rounding floor (|dx| <=
    1e-12 |x|, or within the tolerances for a fixed step); an adaptive step is then retried
    smaller, with a fresh Jacobian, while a fixed step, which cannot be, iterates on (up to
    snes_max_it). The first call of each solve also checks the step has not collapsed."""

    def __init__(self, ts, owned, rtol, atol, fixed, who):
        self.ts, self.owned, self.who = ts, owned, who
        self.rtol, self.atol, self.fixed = rtol, atol, fixed
        self.times, self.size = None, 0.0
        self.calls = 0

    def __call__(self, snes, it, norms):
        xnorm, step, fnorm = norms
        reason = PETSc.SNES.ConvergedReason
        if not math.isfinite(fnorm):  # (numpy's costs a microsecond on a float)
            return reason.DIVERGED_FNORM_NAN
        if fnorm == 0.0:
            return reason.CONVERGED_FNORM_ABS
        if it == 0:
            check_progress(self.ts, self.times, self.who)
            return 0
        self.calls += 1
        comm = snes.getComm()
        # numpy views: on small states each torch op costs more than its arithmetic
        x = self.owned(snes.getSolution(), "r").numpy()
        dx = self.owned(snes.getSolutionUpdate(), "r").numpy()
        if step <= 1e-14 * xnorm and on_every_rank(comm, bool((abs(dx) <= 1e-13 * abs(x)).all())):
            return reason.CONVERGED_SNORM_RELATIVE  # every component down to rounding
        weighted = dx / (self.atol + self.rtol * abs(x))
        scaled, count = float(np.vdot(weighted, weighted)), dx.size
        if comm.getSize() > 1:
            scaled, count = (comm.tompi4py().allreduce(v) for v in (scaled, count))
        size, previous = (scaled / count) ** 0.5, self.size
        self.size = size
        if it == 1:
            return reason.CONVERGED_SNORM_RELATIVE if size <= NEWTON_TOLERANCE else 0
        rate = size / previous
        if rate >= 1.0:  # no progress: converged at the rounding floor (of the whole state,
            # or within the tolerances for a fixed step); a fixed step cannot be retried
            # smaller, so its Newton iterations go on (up to snes_max_it)
            if step <= 1e-12 * xnorm or (self.fixed and size <= 1.0):
                return reason.CONVERGED_SNORM_RELATIVE
            return 0 if self.fixed else reason.DIVERGED_DTOL
        if rate / (1.0 - rate) * size <= NEWTON_REMAINDER:
            return reason.CONVERGED_SNORM_RELATIVE
        return 0
