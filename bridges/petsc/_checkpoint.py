"""Bounded-memory adjoints for odeint_adjoint: a budget of stored states, the rest recomputed.

With ``checkpoints=`` the forward solve keeps no trajectory, only the time reached and the size
of every step it took (two floats a step). The adjoint then runs the binomial (Revolve) schedule
of checkpoint_schedules' `MultistageCheckpointSchedule`, all checkpoints in memory: it integrates
again from y0 with exactly the recorded steps (adaptivity off, so the same steps whatever the
tolerances), stores at most the budget's states, and for each step from the last to the first
restores the nearest stored state, recomputes up to that step and runs TSAdjoint over it.
The output cotangents are added to lambda as the adjoint reaches their steps.

A recomputed step is the forward's step only when it starts from the same state *and* the same
method memory. Methods that carry data from one step to the next (the ESDIRK's first-stage
slope, an explicit Runge-Kutta pair's first-same-as-last stage, extrapolated Newton guesses)
restart after a restored checkpoint, as PETSc's own checkpointing does; the forward is run with
the same restarts, at every step, so forward and recomputation agree to rounding. Methods
without such memory (beuler, cn, theta, rk4) do not need that.
"""
from __future__ import annotations

import math
import re

import numpy as np

from ._capi import swap_adapt, trajectory_memory
from ._runtime import petsc_errors

# TS types whose steps depend only on the state, time and step size they start from
MEMORYLESS = ("beuler", "cn", "theta")
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def budget(who, checkpoints, unknowns, itemsize=8):
    """The number of states a `checkpoints=` argument allows (None: store every step).

    An int is a number of stored states; a string such as ``"2GB"`` or ``"512MiB"`` is the memory
    for them, over all ranks (one state is ``unknowns * itemsize`` bytes)."""
    if checkpoints is None:
        return None
    state = unknowns * itemsize
    if isinstance(checkpoints, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]i?b|b)\s*",
                             checkpoints, re.IGNORECASE)
        if match is None:
            raise ValueError(f"{who}: checkpoints={checkpoints!r} is not a memory size; give "
                             f"a number of states (an int) or a size such as '2GB' or '512MiB'")
        size = float(match[1]) * _UNITS[match[2].lower()]
        count = int(size // state)
        if count < 1:
            raise ValueError(f"{who}: checkpoints={checkpoints!r} holds no state: one state of "
                             f"{unknowns} unknowns takes {state} bytes; give at least "
                             f"'{math.ceil(state / 1e3)}kB' or checkpoints=1 (more memory "
                             f"means less recomputation)")
        return count
    if isinstance(checkpoints, bool) or not isinstance(checkpoints, (int, np.integer)):
        raise TypeError(f"{who}: checkpoints must be None (store every step), an int (number of "
                        f"stored states) or a memory size such as '2GB', got "
                        f"{type(checkpoints).__name__}")
    if checkpoints < 1:
        raise ValueError(f"{who}: checkpoints={checkpoints} stores no state, so the adjoint "
                         f"cannot restart anywhere; give checkpoints >= 1 (1 keeps y0 only and "
                         f"recomputes the most), or None to store every step")
    return int(checkpoints)


def _schedules():
    try:
        import checkpoint_schedules
    except ImportError as exc:
        raise ImportError("odeint_adjoint(..., checkpoints=) needs the package "
                          "checkpoint-schedules: pip install 'bridges[petsc]' or "
                          "pip install checkpoint-schedules") from exc
    return checkpoint_schedules


def schedule(steps, states):
    """checkpoint_schedules' binomial schedule for `steps` steps and `states` stored states."""
    return _schedules().MultistageCheckpointSchedule(steps, min(states, steps - 1), 0)


def predicted_steps(steps, states):
    """Forward steps the adjoint recomputes: the sum of the schedule's forward advances."""
    cs, total = _schedules(), 0
    for action in schedule(steps, states):
        if isinstance(action, cs.Forward):
            total += len(action)
        elif isinstance(action, cs.EndReverse):
            return total


class StepLog:
    """The forward's post-step hook in checkpointed solves: runs the output hook, then keeps
    the size of the step just taken and the time it reached (after the output hook landed it
    on an output time). With `restart`, every step starts afresh (see the module notes)."""

    def __init__(self, outputs, fixed, restart):
        self.outputs, self.fixed, self.restart = outputs, fixed, restart
        self.times, self.sizes = [], []

    def start(self, t0):
        self.times, self.sizes = [t0], []

    def __call__(self, ts):
        # fixed steps: the size PETSc used is still in force; adaptive: the one it accepted
        self.sizes.append(ts.getTimeStep() if self.fixed else ts.getTime() - ts.getPrevTime())
        self.outputs(ts)
        self.times.append(ts.getTime())
        if self.restart:
            self.restart()


class Recomputation:
    """The adjoint of one checkpointed solve (`run`, an _ODESolve after its forward)."""

    def __init__(self, run, who, states):
        self.run, self.who, self.log, self.states = run, who, run.log, states

    def _advance(self, n0, n1, trajectory):
        """Steps the TS from step n0 to n1 with the recorded step sizes."""
        run, ts, log = self.run, self.run.ts, self.log
        if trajectory:
            ts.setSaveTrajectory()
            trajectory_memory(ts)
        ts.setTime(log.times[n0])
        ts.setTimeStep(log.sizes[n0])
        ts.setStepNumber(n0)
        ts.setMaxSteps(n1)
        with petsc_errors(self.who, f"recomputing steps {n0} to {n1} for the adjoint"):
            ts.solve(run.u)
        run._check(ts.getConvergedReason(), "recomputing the forward for the adjoint")
        if ts.getStepNumber() != n1:
            raise RuntimeError(f"recomputation stopped at step {ts.getStepNumber()}, not {n1}")

    def _replay_step(self, ts):
        """Post-step hook of a recomputation: the recorded time and the next step's size (after
        the last step, the size of that step stays: TSAdjoint steps back by it)."""
        n = ts.getStepNumber()
        ts.setTime(self.log.times[n])
        if n < ts.getMaxSteps():
            ts.setTimeStep(self.log.sizes[n])
        if self.log.restart:
            self.log.restart()

    def adjoint(self, cotangent_at, chord):
        """Runs the whole adjoint; cotangent_at(step) adds the cotangents of an output there.
        chord: the forward's Newton mode (recomputed steps use it; adjoint steps do not)."""
        cs = _schedules()
        run, ts, log = self.run, self.run.ts, self.log
        ksp, steps = ts.getSNES().getKSP(), len(log.sizes)
        stored, at = {}, None  # step -> state; the step the TS's state is at (None: unknown)
        saved = (swap_adapt(ts, "none"), ts.getMaxSteps(), ts.getMaxTime(), run.jacobians.chord)
        ts.setMaxTime(2 * abs(log.times[-1]) + 1.0)  # step counts end recomputations
        ts.setPostStep(self._replay_step)
        try:
            for action in schedule(steps, self.states):
                if isinstance(action, cs.Forward):
                    if at != action.n0:
                        if action.n0 != 0:
                            raise RuntimeError(f"schedule left the TS at step {at}, not "
                                               f"{action.n0}")
                        run._owned(run.u, "w").copy_(run.y0)
                        run.restart_step()
                    if action.write_ics:
                        stored[action.n0] = run._owned(run.u).clone()
                    run.jacobians.chord = chord
                    self._advance(action.n0, action.n1, action.write_adj_deps)
                    at = action.n1
                elif isinstance(action, cs.Reverse):
                    run.jacobians.chord = False  # the adjoint: exact Jacobians
                    # (a recomputation's last step left the restart flag on: the adjoint's
                    # stages have their own times, which no pre-stage hook would restore)
                    run.jacobians.restarting = False
                    ts.adjointSetSteps(action.n1 - action.n0)
                    if run.jacobians.block_lu is None:  # (BlockLU checks its own transposed solves)
                        ksp.setPostSolve(run._check_adjoint_solve)
                    with petsc_errors(self.who, f"the adjoint solve (PETSc TS '{ts.getType()}')"):
                        ts.adjointSolve()
                    ksp.setPostSolve(None)
                    run._check(ts.getConvergedReason(), "the adjoint solve")
                    ts.removeTrajectory()
                    cotangent_at(action.n0)
                    at = None
                elif isinstance(action, (cs.Copy, cs.Move)):
                    if action.to_storage != cs.StorageType.WORK:
                        raise RuntimeError(f"unexpected checkpoint action {action}")
                    state = stored.pop(action.n) if isinstance(action, cs.Move) else \
                        stored[action.n]
                    run._owned(run.u, "w").copy_(state)
                    run.restart_step()
                    at = action.n
                elif isinstance(action, cs.EndReverse):
                    break
                elif not isinstance(action, cs.EndForward):
                    raise RuntimeError(f"unexpected checkpoint action {action}")
        finally:
            swap_adapt(ts, saved[0])
            ts.setMaxSteps(saved[1])
            ts.setMaxTime(saved[2])
            run.jacobians.chord = saved[3]
            ts.setPostStep(log)
