"""ODE solves with PETSc TS and their discrete adjoints (TSAdjoint), as one bridged torch op.

The right-hand side is a torch function ``func(t, y)`` (an nn.Module for trained parameters).
Implicit methods integrate F(t, y, ydot) = ydot - func(t, y) = 0 with the IJacobian
shift*I - dfunc/dy, assembled from coloured products or applied matrix-free; explicit Runge-Kutta
methods use the right-hand side directly. TSAdjoint runs backwards segment by segment between
output times, adding each output's cotangent, and yields dL/dy0 and dL/dθ.

Every PETSc object of a solve lives exactly as long as the solve's pullback: it is destroyed
after the last backward that can use it, or when the outputs die without one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import warnings
import weakref

import numpy as np
import torch

from .._core import eager_under_compile, foreign_function
from .._errors import ForeignError, SolverFailure, check_finite
from .._linearise import describe_tensors, evaluate, untracked_inputs
from .._runs import (RefuseTransformedReads, RunPool, check_choice, check_state,
                     refuse_forward_mode, warn_if_rounded)
from .._runs import forward as run_forward
from ._capi import renew_trajectory, set_pre_stage, trajectory_prefix
from ._checkpoint import MEMORYLESS, Recomputation, StepLog, budget
from ._grid import SerialLayout
from ._jacobian import JACOBIANS, PRODUCTS
from ._linear import adjoint_tolerance, check_solution
from ._ode_jacobians import ODEJacobians, compiled_parameter_names
from ._options import SolverOptions, check_options
from ._runtime import (PETSc, agreed_checks, destroy, diverged, petsc_errors, petsc_real,
                       reason_name)
from ._solve import _assembler, warn_if_shallow
from ._stepping import COLLAPSE, NewtonTest, check_progress, starting_step
from ._vec import check_tensor, vec_as_tensor

# method -> (TS type, its scheme option or None, form)
METHODS = {
    "beuler": ("beuler", None, "implicit"),
    "cn": ("cn", None, "implicit"),
    "theta": ("theta", None, "implicit"),   # theta set with options={"ts_theta_theta": ...}
    "arkimex": ("arkimex", ("ts_arkimex_type", "4"), "implicit"),  # fully implicit ESDIRK
    "bdf": ("bdf", None, "implicit"),          # forward only: PETSc has no adjoint for BDF
    "rk4": ("rk", ("ts_rk_type", "4"), "explicit"),
    "bosh3": ("rk", ("ts_rk_type", "3bs"), "explicit"),
    "dopri5": ("rk", ("ts_rk_type", "5dp"), "explicit"),
}
FORMS = {ts_type: form for ts_type, _, form in METHODS.values()}  # how func is handed over
ADJOINT_TS_TYPES = ("beuler", "cn", "theta", "arkimex", "rk")  # TS types with TSAdjoint
WHO = "odeint_adjoint"
REJECTIONS = 50  # one step retried smaller this often in a row: no step size will do
CRAWL_STEPS = 1000  # steps in a row each below 1e-12 of the output interval: no end in sight


@dataclasses.dataclass
class ODEStats:
    """What the last call of an `ODESolver` did: its forward solve, and after backward its
    adjoint. Callback counts are PETSc's calls into torch."""
    steps: int = 0               # accepted steps
    rejections: int = 0          # rejected step attempts
    newton_iterations: int = 0
    linear_iterations: int = 0
    func_calls: int = 0          # residual (or right-hand side) evaluations
    jacobians: int = 0           # Jacobians formed (assembled blocks, or a new linearisation)
    newton_tests: int = 0        # Newton convergence tests after an update
    adjoint_steps: int = 0
    adjoint_jacobians: int = 0
    parameter_products: int = 0  # (dfunc/dparams)^T products of the adjoint


class _ODEProblem:
    """Everything fixed across solves: the function, its parameters, the solver settings."""

    def __init__(self, func, params, *, method, step_size, steps_per_interval, rtol, atol,
                 options, prefix, jacobian, products, compile_jacobian, assembler, grid,
                 checkpoints, solver=None):
        self.func, self.params = func, params
        # the solver object whose pool keeps idle runs and which receives each call's stats
        self.solver = weakref.ref(solver) if solver is not None else None
        self.checkpoints = checkpoints  # states the adjoint may store (None: every step)
        self.ts_type, self.scheme, self.form = METHODS[method]
        self.method, self.step_size, self.rtol, self.atol = method, step_size, rtol, atol
        self.steps_per_interval = steps_per_interval
        self.fixed = step_size is not None or steps_per_interval is not None
        self.options, self.prefix = options, prefix
        self.jacobian, self.products = jacobian, products
        self.compile_jacobian = compile_jacobian
        self.assembler, self.grid = assembler, grid
        # grad mode at the call: with it on, tensors requiring grad that func captures must be
        # differentiated even when no input requires grad
        self.grad_mode = torch.is_grad_enabled()
        self.transformed = torch._C._are_functorch_transforms_active()  # (torch.func at the call)
        self._t = self._t_tensor = None
        self.checked_params = set()  # params func alone must reach (see the adjoint's warning)

    def rhs(self, t, y):
        if t != self._t:  # one 0-d tensor per time: a step's stages and iterations share it
            self._t, self._t_tensor = t, torch.scalar_tensor(t, dtype=y.dtype)
        return self.func(self._t_tensor, y)

    def first_step(self, times):
        """The step a solve starts from, before options and the starting-step estimate."""
        first = float(times[1] - times[0])
        return first / self.steps_per_interval if self.steps_per_interval else \
            self.step_size or first * 1e-3

    def defaults(self, times, record):
        """PETSc options this solve starts from; the user's options and command line win."""
        dt = self.first_step(times)
        # (the output hook lands the steps on the output times; PETSc's own clamp to its end
        # time would not see the last output's closeness window)
        values = {"ts_type": self.ts_type, "ts_exact_final_time": "stepover",
                  "ts_max_steps": 100_000, "ts_time_step": dt, "ts_error_if_step_fails": False,
                  "ts_adapt_type": "none" if self.fixed else "basic"}
        if self.scheme:
            values[self.scheme[0]] = self.scheme[1]
        if self.ts_type == "arkimex":  # the whole F is implicit: a stiffly accurate ESDIRK
            values["ts_arkimex_fully_implicit"] = True
            if "ts_arkimex_type" not in (self.options or {}) and not self.fixed:  # (fewer
                # Newton iterations; some tableaus, e.g. prssp2, bpr3, ars443, have no formula
                # to extrapolate by; a fixed step after one cut short by an output time would
                # extrapolate far beyond it, and cannot be retried smaller)
                values["ts_arkimex_initial_guess_extrapolate"] = True
        if not self.fixed:  # a step whose Newton solve fails is retried smaller
            values.update(ts_rtol=self.rtol, ts_atol=self.atol, ts_max_snes_failures=-1,
                          ts_max_step_rejections=REJECTIONS)
        if record:  # PETSc's default trajectory writes files
            values["ts_trajectory_type"] = "memory"
        if self.form == "implicit":  # full Newton steps: PETSc's backtracking measures
            # progress by |F|, which badly scaled states (ROBER) stall at rounding, and the
            # step size already controls Newton
            values.update(snes_rtol=1e-10, snes_atol=1e-14, snes_max_it=50, ksp_rtol=1e-12,
                          ksp_atol=1e-50, snes_linesearch_type="basic",
                          snes_stol=0.0)  # PETSc would take a line search that met a nan,
            # with its stale step norm, as converged: the step kept its initial guess
        return values


class _ODESolve:
    """One forward solve and its adjoint: the TS, its matrices, vectors, trajectory and options.

    PETSc holds its callbacks (bound methods of this object), so the two form a cycle that only
    `release` breaks (see bridges._runs). A run serves one call after another (`start`) with
    the same function, parameters, shape and dtype, its `key`. On a grid, func sees each rank's
    ghosted block and returns its owned block; the state vectors are the grid's."""

    def __init__(self, problem, y0, times, record, key=None):
        self.p, self.times, self.record, self._key = problem, times, record, key
        self.layout = problem.grid or SerialLayout(y0.shape)
        self.shape = self.layout.owned_shape
        self.y0 = y0.clone(memory_format=torch.contiguous_format)
        self.steps = self.log = self.ys = None
        self.keep_outputs = False  # kept for the gradient w.r.t. t (set per call by _forward)
        self.store_all = record and problem.checkpoints is None  # PETSc's trajectory
        self.ts = self.u = self.F = self.jacobians = self.dm = self.newton = None
        self.stats, self.n_func, self._solves = ODEStats(), 0, 0
        self.options = SolverOptions(WHO, problem.prefix, problem.options,
                                     problem.defaults(times, self.store_all))
        lagged = (self.options.given.keys() | self.options.inherited.keys()) & \
            {"snes_lag_jacobian", "snes_lag_jacobian_persists"}
        if record and lagged:
            self.options.close()  # TSAdjoint would reuse the lagged Jacobian: wrong gradients
            raise ValueError(f"{WHO}: option {sorted(lagged)[0]} lags the Jacobian, which "
                             f"TSAdjoint then uses at the wrong states (wrong gradients); drop "
                             f"it (adaptive implicit steps already reuse one Jacobian per step)")
        try:
            self._set_up()
            self.start(y0, times, checked=True)
        except BaseException:
            self.release()
            raise

    @property
    def key(self):
        """What a later call must match to reuse this run; None while it cannot be reused (a
        stored trajectory no adjoint has consumed, or released)."""
        busy = self.ts is None or (self.store_all and self.steps is not None)
        return None if busy else self._key

    def start(self, y0, times, checked=False):
        """Prepare a call from y0 (same shape and dtype) over `times`."""
        self.y0 = y0.clone(memory_format=torch.contiguous_format)
        self.times, self.steps, self.stats = times, None, ODEStats()
        if not checked:
            self._check_func(float(times[0]))
        p = self.p
        if self.user_dt is not None:
            self.dt0 = self.user_dt  # the first step in force (options win over defaults)
        elif p.fixed:
            self.dt0 = p.first_step(times)
        else:
            comm = self.layout.comm.tompi4py() if self.layout.size > 1 else None
            self.dt0 = starting_step(self._value, self.y0, float(times[0]),
                                     float(times[1] - times[0]), p.rtol, p.atol, comm, WHO)
        if self.newton is not None:
            self.newton.times = times

    def _value(self, t, y):
        """func at (t, y) (y this rank's owned block), a new tensor."""
        self._owned(self.u, "w").copy_(y)
        with torch.no_grad():
            return self.p.rhs(t, self._ghosted(self.u)).reshape(y.shape).clone()

    def _set_up(self):
        p, layout = self.p, self.layout
        self.u, self.F = layout.global_vec(), layout.global_vec()
        self._check_func(float(self.times[0]))
        self.jacobians = ODEJacobians(self, WHO)
        ts = self.ts = PETSc.TS().create(comm=layout.comm)
        ts.setOptionsPrefix(self.options.prefix)
        if layout.dm is not None:
            # a clone of the grid's DMDA (same layout): PETSc keeps a TS's callbacks on its DM,
            # so two live solves on one grid must not share it (the adjoint of one would call
            # the other's callbacks, or freed ones)
            self.dm = layout.dm.clone()
            ts.setDM(self.dm)
        self.outputs = _Outputs(self.layout.owned_view)
        if self.record and not self.store_all:  # checkpointed: keep the steps, not the states
            self.log = StepLog(self.outputs, p.fixed,
                               restart=None if p.ts_type in MEMORYLESS else self.restart_step)
        if p.form == "explicit":
            ts.setRHSFunction(self._rhs_function, self.F)
        else:
            ts.setIFunction(self._ifunction, self.F)
            # Newton converges in the tolerances' norm, fixed steps too: a test on |F| alone
            # stops with state errors of |F| * h, which at steps of 1e10 are no errors of F
            self.newton = NewtonTest(ts, layout.owned_view, p.rtol, p.atol, p.fixed, WHO)
            ts.getSNES().setConvergenceTest(self.newton)
        self.jacobians.attach(ts, self)
        ts.setPostStep(self.log or self.outputs)
        if self.store_all:
            ts.setSaveTrajectory()
            trajectory_prefix(ts, self.options.prefix)
        with petsc_errors(WHO, "setting up PETSc TS from the options"):
            ts.setFromOptions()
        if p.form != "explicit":
            warn_if_shallow(ts.getSNES().getKSP().getPC(), layout, WHO)
        chosen = ts.getType()
        if FORMS.get(chosen, p.form) != p.form:
            raise ValueError(f"{WHO}: the options set ts_type '{chosen}', an {FORMS[chosen]} "
                             f"method, but method='{p.method}' set func up for an {p.form} one; "
                             f"choose it with method= instead (e.g. method='"
                             f"{next(m for m, v in METHODS.items() if v[0] == chosen)}')")
        self._pre_stage = None
        if ts.getType() == "arkimex" and p.form == "implicit":
            self._pre_stage = set_pre_stage(ts, self._stage_begins)
        user_step = self.options.given.keys() & {"ts_time_step", "ts_dt"} or \
            self.options.inherited.keys() & {"ts_time_step", "ts_dt"}
        self.user_dt = ts.getTimeStep() if user_step else None

    def _check_func(self, t0):
        """func at (t0, y0), once: its output must have the state's (owned) shape and be finite."""
        self._owned(self.u, "w").copy_(self.y0)
        tracking = self.record or self.p.grad_mode  # (see _check_tracked)
        refuse = RefuseTransformedReads(WHO, "func(t, y)", "y0 and t") if self.p.transformed \
            else contextlib.nullcontext()
        u = self._ghosted(self.u)  # (collective: before any rank's check can fail)
        with agreed_checks(self.layout.comm):
            self._check_value(t0, u, tracking, refuse)

    def _check_value(self, t0, u, tracking, refuse):
        with torch.enable_grad() if tracking else torch.no_grad(), refuse:
            value = self.p.rhs(t0, u)
        where = "this rank's owned block" if self.layout.dm is not None else "y0"
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{WHO}: func(t, y) must return a torch.Tensor (dy/dt), got "
                            f"{type(value).__name__}")
        if tuple(value.shape) != tuple(self.shape):
            raise ValueError(f"{WHO}: func(t, y) returned shape {tuple(value.shape)} at "
                             f"t = {t0:g}, but dy/dt must have the shape of {where}, "
                             f"{tuple(self.shape)}")
        if value.is_complex() or not value.is_floating_point():
            raise TypeError(f"{WHO}: func(t, y) returned {value.dtype} at t = {t0:g}; dy/dt must "
                            f"be real floating point, as y is ({self.y0.dtype})")
        warn_if_rounded(WHO, "func(t, y)", value, self.y0.dtype)
        check_finite(value, f"{WHO}: func(t, y) at t = {t0:g} (y = y0)",
                     "check func for a division by zero, a log or sqrt of a negative number, "
                     "or an overflow", error=ForeignError)
        if tracking:
            self._check_tracked(value)

    def _check_tracked(self, value):
        """Refuse (or, with adjoint_params given, warn about) tensors requiring grad that func
        uses but the adjoint does not differentiate: their gradients would be silently missing."""
        missed = untracked_inputs(value, self.p.params)
        if not missed:
            return
        if not self.record:  # nothing the op differentiates requires grad
            raise ValueError(f"{WHO}: func uses {describe_tensors(missed)}, but neither y0, t "
                             f"nor adjoint_params require grad, so the solve would give them "
                             f"no gradient; pass them, odeint_adjoint(func, y0, t, "
                             f"adjoint_params=(w, ...)), or call under torch.no_grad() if no "
                             f"gradient is wanted")
        what = (f"{WHO}: func uses {describe_tensors(missed)} but are not among "
                f"adjoint_params, so they get no gradient")
        if not self.p.params and not isinstance(self.p.func, torch.nn.Module):
            raise ValueError(f"{what}. A plain function's tensors cannot be found: pass them, "
                             f"odeint_adjoint(func, y0, t, adjoint_params=(w, ...)), make func "
                             f"an nn.Module with them as parameters, or detach them if no "
                             f"gradient is wanted")
        warnings.warn(f"{what}; add them to adjoint_params, or detach them if no gradient is "
                      f"wanted")

    # -- PETSc callbacks (they record linearisation points; torch does the algebra) -------------
    def _owned(self, vec, mode="r"):
        return self.layout.owned_view(vec, mode)

    def _ghosted(self, vec):
        return self.layout.exchange(vec)

    def _rhs_function(self, ts, t, U, F):
        self.n_func += 1
        with torch.no_grad():
            self._owned(F, "w").copy_(self.p.rhs(t, self._ghosted(U)))

    def _ifunction(self, ts, t, U, Udot, F):
        self.n_func += 1
        if self.jacobians.restarting:  # see restart_step
            t = ts.getTime()
        value = evaluate(self.p.rhs, t, self._ghosted(U))
        torch.sub(self._owned(Udot), value, out=self._owned(F, "w"))

    def restart_step(self):
        """Start the next step afresh (no data from the step before). ARKIMEX then solves
        F(t, y, slope) = 0 for the first stage's slope, but at the time of the last stage it
        computed, forward or adjoint, not at the step's start: until the step's first stage
        begins, func (residual and Jacobian) gets the step's start time."""
        self.ts.restartStep()
        self.jacobians.restarting = self._pre_stage is not None

    def _stage_begins(self):
        self.jacobians.restarting = False

    # -- forward and adjoint --------------------------------------------------------------------
    def solve(self):
        """Integrates from times[0] through every output time; returns (len(t), *shape)."""
        ts, times = self.ts, self.times
        self.jacobians.reset()
        self.n_func = 0
        if self.store_all and self._solves:  # (see renew_trajectory)
            renew_trajectory(ts, self.options.prefix)
        self._solves += 1
        if self.newton is not None:
            self.newton.size, self.newton.calls = 0.0, 0
        self._owned(self.u, "w").copy_(self.y0)
        ts.setTime(float(times[0]))
        ts.setStepNumber(0)
        # PETSc tests its end time before the output hook rounds a step that landed a rounding
        # short, and a step it does not end on is stored and followed by a sliver
        ts.setMaxTime(petsc_real(times[-1] - _landing_window(times, len(times) - 1)))
        self.outputs.start(ts, times, self.y0, self.p.steps_per_interval, self.dt0,
                           self.p.step_size)
        self.restart_step()  # as TSSolve does at step 0
        if self.log:
            self.log.start(float(times[0]))
        try:
            with petsc_errors(WHO, f"the forward solve (PETSc TS '{ts.getType()}')",
                              "PETSc's message says what the method or solver chosen lacks; "
                              "choose another through options, or fixed steps (step_size= or "
                              "steps_per_interval=) for a tableau without an error estimate"):
                ts.solve(self.u)
        except ForeignError as exc:
            if not isinstance(exc, SolverFailure):  # (those say where already)
                exc.add_note(f"{WHO}: the forward solve had reached t = {ts.getTime():.6g} "
                             f"(output times {times[0]:.6g} to {times[-1]:.6g})")
            raise
        self._check(ts.getConvergedReason(), "the forward solve")
        recorded, values = self.outputs.steps, self.outputs.values
        self.outputs.values = []
        if len(recorded) != len(times):
            steps, limit = ts.getStepNumber(), ts.getMaxSteps()
            stiff = ("; if the problem is stiff, an explicit method's steps stay tiny: use an "
                     "implicit one (method='arkimex', the default, or 'cn')"
                     if self.p.form == "explicit" else "")
            why = (f"after its maximum of {limit} steps; raise it with options "
                   f"{{'ts_max_steps': ...}}, or loosen rtol/atol{stiff}" if steps >= limit else
                   f"after {steps} steps; check the step options")
            raise ForeignError(f"{WHO}: PETSc TS reached {len(recorded)} of {len(times)} output "
                               f"times: it stopped at t = {ts.getTime():.6g} {why}")
        self.steps = recorded
        self.stats = ODEStats(
            steps=ts.getStepNumber(), rejections=ts.getStepRejections(),
            newton_iterations=ts.getSNESIterations(), linear_iterations=ts.getKSPIterations(),
            func_calls=self.n_func, jacobians=self.jacobians.count,
            newton_tests=self.newton.calls if self.newton is not None else 0)
        ys = torch.stack(values)
        self.ys = ys.clone() if self.keep_outputs else None  # (not ys: the output's graph
        # holds the pullback, which holds this run, which PETSc's callbacks keep from the gc)
        finite = torch.isfinite(ys.reshape(len(times), -1)).all(dim=1)
        if not bool(finite.all()):
            k = int(torch.nonzero(~finite)[0])
            raise ForeignError(f"{WHO}: the solution became non-finite (nan/inf) by "
                               f"t = {times[k]:.6g} (PETSc TS '{ts.getType()}'); the problem may "
                               f"blow up there, or the method may be unstable at this step size")
        self.options.report_unused()
        return ys

    def pullback(self, grad_ys, *, needs_input_grad, batched=False):
        """TSAdjoint from the last output time to the first, adding each output's cotangent
        on the way. `batched`: grad_ys has a leading batch dimension, and one sweep carries a
        cost gradient for each (PETSc's several cost functions)."""
        ts = self.ts
        if ts.getType() not in ADJOINT_TS_TYPES:
            chosen = "method='bdf'" if self.p.method == "bdf" else \
                f"PETSc TS '{ts.getType()}' (chosen by options or the command line)"
            raise ForeignError(f"{WHO}: {chosen} has no discrete adjoint, so no gradient; use one "
                               f"of the methods {', '.join(m for m in METHODS if m != 'bdf')}, "
                               f"or call under torch.no_grad() for the solution alone")
        if self.steps is None:  # the trajectory went with an earlier adjoint: solve again
            self.solve()
        cotangents = grad_ys if batched else grad_ys.unsqueeze(0)
        jacobians = self.jacobians
        chord, jacobians.chord = jacobians.chord, False  # the adjoint: exact Jacobians
        jacobians.watching = False  # (at the forward's states, checked there)
        ksp = ts.getSNES().getKSP()
        if jacobians.block_lu is None and self.log is None:  # (BlockLU checks and refines its
            ksp.setPostSolve(self._check_adjoint_solve)  # own transposed solves)
        if self.p.assembler is not None:  # (the pattern, at the end state too)
            self.p.assembler.verify_next()
        jacobians.check_samples_at(float(self.times[-1]), self._ghosted(ts.getSolution()))
        want_params = jacobians.paired = any(needs_input_grad[3:])
        if jacobians.count == 0 and ts.getType() == "arkimex":  # Newton never needed one (func
            # constant in y): ARKIMEX's adjoint copies the unassembled matrix, so assemble it
            J, P, _ = ts.getIJacobian()
            with petsc_errors(WHO, "the Jacobian for the adjoint"):
                ts.computeIJacobian(ts.getTime(), ts.getSolution(), self.F, 1.0, J, P)
        lams = [self.layout.global_vec() for _ in cotangents]
        mus = [PETSc.Vec().createMPI((jacobians.params.n, None), comm=self.layout.comm)
               for _ in cotangents] if want_params else []
        count, jacobians.params.products, jacobians.params.reached = jacobians.count, 0, set()
        try:
            for lam, mu, g in zip(lams, mus or lams, cotangents):
                self._owned(lam, "w").copy_(g[-1])
                if want_params:
                    mu.zeroEntries()
            ts.setCostGradients(lams, mus or None)
            if self.log is None:  # PETSc's trajectory of every step
                for k in range(len(self.steps) - 1, 0, -1):
                    ts.adjointSetSteps(self.steps[k] - self.steps[k - 1])
                    with petsc_errors(WHO, f"the adjoint solve (PETSc TS '{ts.getType()}')"), \
                            adjoint_tolerance(ksp, ts.getSNES()):
                        ts.adjointSolve()
                    self._check(ts.getConvergedReason(), "the adjoint solve")
                    for lam, g in zip(lams, cotangents):
                        self._owned(lam, "rw").add_(g[k - 1])
                self.steps = None  # TSAdjoint consumed the trajectory
            else:  # recomputed from checkpoints (recomputed steps keep the forward's linear
                # tolerance, to match its states); each output's cotangent added at its step
                outputs = {step: k for k, step in enumerate(self.steps[:-1])}

                def cotangent_at(step):
                    if step in outputs:
                        for lam, g in zip(lams, cotangents):
                            self._owned(lam, "rw").add_(g[outputs[step]])
                Recomputation(self, WHO, self.p.checkpoints).adjoint(cotangent_at, chord)
            grad_params = [None] * len(self.p.params)
            if want_params:  # this rank's share (see odeint_adjoint)
                mu_t, offset = torch.stack([vec_as_tensor(mu, "r") for mu in mus]), 0
                for i, param in enumerate(self.p.params):
                    part = mu_t[:, offset:offset + param.numel()]
                    grad_params[i] = part.reshape(-1, *param.shape).clone()
                    offset += param.numel()
            grad_y0 = torch.stack([self._owned(lam) for lam in lams])
            grad_t = self._time_gradient(cotangents, grad_y0) if needs_input_grad[1] else None
        finally:
            ts.adjointReset()  # the TS keeps no pointer to the cost gradients, which it does
            destroy(*lams, *mus)  # not own (a later solve with this TS would use them)
            ksp.setPostSolve(None)
        for i in self.p.checked_params:
            if want_params and needs_input_grad[3 + i] and i not in jacobians.params.reached \
                    and jacobians.params.products:
                warnings.warn(f"{WHO}: adjoint_params[{i}] requires grad, but func does not "
                              f"depend on it through torch ops (unused, or read with .item(), "
                              f"float() or numpy?), so its gradient is zero. Compute with it as "
                              f"a tensor", stacklevel=2)
        self.stats.adjoint_steps += self.stats.steps
        self.stats.adjoint_jacobians += jacobians.count - count
        self.stats.parameter_products += jacobians.params.products
        jacobians.chord, jacobians.watching = chord, True
        self.options.report_unused(final=True)
        if not batched:
            grad_y0, grad_params = grad_y0[0], [g if g is None else g[0] for g in grad_params]
            grad_t = None if grad_t is None else grad_t[0]
        return (grad_y0, grad_t, None, *grad_params)

    def _time_gradient(self, cotangents, lam0):
        """dL/dt (one row per cotangent): moving output time t_k by dt moves y_k by
        func(t_k, y_k) dt; moving t_0 moves every later output by -Phi func(t_0, y_0) dt, whose
        product with their cotangents is the adjoint at t_0 less output 0's own cotangent. (On
        a grid, this rank's share, like the parameters'.)"""
        ys = self.ys
        if not torch._C._autograd._get_current_graph_task_keep_graph():
            self.ys = None  # (kept for a second backward after retain_graph=True)
        slopes = torch.stack([self._value(float(t), y).reshape(-1)
                              for t, y in zip(self.times, ys)])
        cotangents = cotangents.reshape(*cotangents.shape[:2], -1)  # (cotangent, time, state)
        grad = (cotangents * slopes).sum(-1)
        grad[:, 0] = -((lam0.reshape(len(lam0), -1) - cotangents[:, 0]) * slopes[0]).sum(-1)
        return grad

    def _check_adjoint_solve(self, ksp, b, x):
        check_solution(ksp, b, x, WHO, f"a transposed (adjoint) solve at t = "
                       f"{self.ts.getTime():.6g}", transpose=True)

    def _check(self, reason, what):
        if reason >= 0:
            return
        ts, newton = self.ts, ""
        failed = ts.getSNES().getConvergedReason() if self.p.form != "explicit" else 0
        if reason == PETSc.TS.ConvergedReason.DIVERGED_STEP_REJECTED:
            newton = (f" (one step rejected {REJECTIONS + 1} times in a row, shrinking to "
                      f"{ts.getTimeStep():.3g}: no step size will do. Is func finite just after "
                      f"t? Newton's last try: {reason_name(PETSc.SNES.ConvergedReason, failed)})")
        elif reason == PETSc.TS.ConvergedReason.DIVERGED_NONLINEAR_SOLVE:
            newton = f" (Newton: {reason_name(PETSc.SNES.ConvergedReason, failed)}" + (
                ", func gave nan or inf at an iterate: is it defined there?"
                if failed == PETSc.SNES.ConvergedReason.DIVERGED_FUNCTION_NANORINF else "") + ")"
        raise diverged(
            WHO, f"{what} with PETSc TS '{ts.getType()}'", PETSc.TS.ConvergedReason, reason,
            f"at t = {ts.getTime():.6g} (output times {self.times[0]:.6g} to "
            f"{self.times[-1]:.6g}) after {ts.getStepNumber()} steps{newton}",
            "smaller steps (a smaller step_size or more steps_per_interval), or another method"
            if self.p.fixed else
            "a smaller first step (options {'ts_time_step': ...}), tighter or looser tolerances "
            "(rtol/atol), another method, or options such as {'ts_max_snes_failures': -1}")

    def release(self):
        """Free every PETSc object of this solve (idempotent)."""
        destroy(self.ts, self.dm, self.u, self.F)
        if self.jacobians is not None:
            self.jacobians.release()
        self.ts = self.dm = self.u = self.F = self.jacobians = self.newton = None
        self.layout.release_views()  # (cached views hold references to the Vecs)
        self.options.close()


def _check_times(t):
    """Raise unless the output times t (a 1-D float64 tensor) are finite, strictly increasing
    and far enough apart for a step between each two."""
    if not bool(torch.isfinite(t).all()):
        k = int(torch.nonzero(~torch.isfinite(t))[0])
        raise ValueError(f"{WHO}: t[{k}] is {t[k].item()}; every time must be finite")
    if not bool((t[1:] > t[:-1]).all()):
        k = int(torch.nonzero(t[1:] <= t[:-1])[0])
        raise ValueError(f"{WHO}: times must strictly increase, but t[{k + 1}] = "
                         f"{t[k + 1].item():g} follows t[{k}] = {t[k].item():g}")
    gaps = (t[1:] - t[:-1]) / torch.maximum(t[1:].abs(), t[:-1].abs())
    if bool((gaps <= COLLAPSE).any()):
        k = int(torch.nonzero(gaps <= COLLAPSE)[0])
        raise ValueError(f"{WHO}: t[{k}] = {t[k].item():.17g} and t[{k + 1}] = "
                         f"{t[k + 1].item():.17g} are a few rounding units apart, too close "
                         f"for a time step between them; merge or space them")


def _landing_window(times, k):
    """How close to output time k a step that lands on it ends (rounding of the step sums):
    a few roundings of t, at least four times the smallest step that makes progress, and
    never more than 1e-12 of the interval beyond that (a bound relative to |t| alone took
    17 % of an interval at t ~ 1.7e9, snapping steps that ended well short of the output)."""
    return max(4 * COLLAPSE * abs(times[k]), 1e-12 * (times[k] - times[k - 1]))


class _Outputs:
    """The TS post-step hook that lands steps on the output times and keeps the solution at
    each. (PETSc's evaluation times are not used: PETSc 3.26 passes its closeness tolerance,
    1e-6 of the step, as a relative one, so with steps beyond about 1e4 it stores a solution
    far from the time asked for.) It holds no reference to the TS or the solve."""

    def __init__(self, owned):
        self.owned = owned  # Vec -> torch view of this rank's part
        self.values = []

    def start(self, ts, times, y0, per_interval, dt, step_size=None):
        self.times, self.per_interval, self.step_size = times, per_interval, step_size
        self.steps, self.values, self.crawling = [0], [y0.clone()], 0
        ts.setTimeStep(self._toward(1, float(times[0]), dt))

    def _toward(self, k, t, dt):
        """The next step from t: never past output k, nor leaving a sliver before it."""
        gap = float(self.times[k]) - t
        if dt >= gap * (1 - 1e-8):
            return gap
        return gap / 2 if dt > gap / 2 else dt

    def __call__(self, ts):
        k, times = len(self.steps), self.times
        if k >= len(times):
            return
        t, dt = ts.getTime(), ts.getTimeStep()
        check_progress(ts, times, WHO, self.owned(ts.getSolution(), "r"))
        self._check_pace(ts, t, float(times[k] - times[k - 1]))
        if abs(t - times[k]) <= _landing_window(times, k):
            ts.setTime(float(times[k]))  # rounding off the last step
            self.steps.append(ts.getStepNumber())
            self.values.append(self.owned(ts.getSolution(), "r").clone())
            if k + 1 == len(times):
                return
            k, t = k + 1, float(times[k])
            if self.per_interval:
                dt = (times[k] - times[k - 1]) / self.per_interval
            elif self.step_size:  # (the step that landed was cut short)
                dt = self.step_size
        ts.setTimeStep(self._toward(k, t, dt))

    def _check_pace(self, ts, t, span):
        """Raise after CRAWL_STEPS steps in a row each below 1e-12 of the output interval they
        are in (`span`): such a solve would never end (steps held just above the collapse of
        check_progress, say where func turns nan just beyond the state)."""
        self.crawling = self.crawling + 1 if t - ts.getPrevTime() < 1e-12 * span else 0
        if self.crawling >= CRAWL_STEPS:
            raise SolverFailure(
                f"{WHO}: the last {CRAWL_STEPS} steps were each below 1e-12 of the output "
                f"interval (the last {t - ts.getPrevTime():.3g} at t = {t:.10g}): at this pace "
                f"the solve cannot finish. Is func defined just beyond this state (a nan, a "
                f"singularity)? What to try: check func there, or end the integration earlier")


def _forward(y0, t, problem, *params, needs_input_grad):
    refuse_forward_mode(WHO)  # (here, so that a probe sees a bridged op)
    record = any(needs_input_grad)
    times = t.detach().cpu().numpy().astype(np.float64)
    if problem.transformed:  # (vmap over t left them unchecked: each sample's, here)
        _check_times(torch.from_numpy(times))
    solver = problem.solver() if problem.solver is not None else None
    pool = solver._pool if solver is not None else None
    key = (*problem.key, record, problem.grad_mode, problem.transformed)
    run = pool.take(key) if pool is not None else None
    if run is None:
        run = _ODESolve(problem, y0, times, record, key)
    else:
        try:
            run.start(y0, times)
        except BaseException:
            pool.give(run)
            raise
    run.keep_outputs = needs_input_grad[1]
    out = run_forward(run, record, pool.ref if pool is not None else None, batched=True,
                      who=WHO)
    if solver is not None:
        solver.stats = run.stats  # (the pullback adds the adjoint's counts to it)
    return out


_ODEINT = foreign_function(_forward, name="petsc_odeint", pass_needs_input_grad=True,
                           protect_outputs=False)


class ODESolver:
    """A PETSc TS solver that lives across calls: ``ys = solver(func, y0, t)``.

    Takes every keyword of `odeint_adjoint` except func, y0, t and adjoint_params, which a call
    gives. Its TS, matrices, vectors, options and checks are made on the first call and reused
    by later calls with the same func, parameters, shape and dtype (a changed one makes a new
    set); a call whose outputs are still waiting for backward cannot share them, so it makes
    its own. Everything is freed when the solver and the last pullback using it are gone.
    ``stats`` (an `ODEStats`) describes the last call, its adjoint included after backward.
    """

    def __init__(self, method="arkimex", *, step_size=None, steps_per_interval=None, rtol=1e-6,
                 atol=1e-8, options=None, prefix=None, jacobian="auto", products="auto",
                 compile_jacobian=False, sparsity=None, grid=None, checkpoints=None):
        check_choice(WHO, "method", method, METHODS)
        if step_size is not None and steps_per_interval is not None:
            raise ValueError(f"{WHO}: give step_size or steps_per_interval, not both")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"{WHO}: step_size must be positive, got {step_size!r}")
        if steps_per_interval is not None and not (isinstance(steps_per_interval, int)
                                                   and steps_per_interval >= 1):
            raise ValueError(f"{WHO}: steps_per_interval must be a positive int, got "
                             f"{steps_per_interval!r}")
        check_options(WHO, options)
        fixed = step_size is not None or steps_per_interval is not None
        for name, tol in (("rtol", rtol), ("atol", atol)):
            if not (isinstance(tol, numbers.Real) and math.isfinite(tol) and tol >= 0):
                raise ValueError(f"{WHO}: {name} must be a finite number >= 0, got {tol!r}")
        if rtol == 0 and atol == 0:
            raise ValueError(f"{WHO}: rtol and atol are both 0, but step control and Newton's "
                             f"test weigh errors by atol + rtol |y|; give a positive one (e.g. "
                             f"rtol=1e-6, atol=1e-8)")
        if method == "rk4" and not fixed and not (options or {}).get("ts_adapt_type"):
            raise ValueError(f"{WHO}: rk4 has no error estimate to adapt steps with; give "
                             f"step_size or steps_per_interval, or use an adaptive method such "
                             f"as 'dopri5'")
        check_choice(WHO, "jacobian", jacobian, JACOBIANS)
        check_choice(WHO, "products", products, PRODUCTS)
        if not isinstance(compile_jacobian, bool):
            raise TypeError(f"{WHO}: compile_jacobian must be True or False, got "
                            f"{compile_jacobian!r}")
        if compile_jacobian and METHODS[method][2] == "explicit":
            raise ValueError(f"{WHO}: compile_jacobian=True is for implicit methods (arkimex, "
                             f"beuler, cn, theta); method {method!r} forms no Jacobian matrix")
        if any(k.startswith("ts_trajectory") for k in options or {}) and \
                checkpoints is not None:
            raise ValueError(f"{WHO}: checkpoints= replaces PETSc's trajectory; drop the "
                             f"ts_trajectory_* options, or checkpoints")
        self.settings = dict(method=method, step_size=step_size,
                             steps_per_interval=steps_per_interval, rtol=rtol, atol=atol,
                             options=options, prefix=prefix, jacobian=jacobian,
                             products=products, compile_jacobian=compile_jacobian)
        self.sparsity, self.grid, self.checkpoints = sparsity, grid, checkpoints
        self.stats = None
        self._pool = RunPool(self)

    @eager_under_compile(WHO)
    def __call__(self, func, y0, t, adjoint_params=None):
        """Solution at every time in t, shaped (len(t), *y0.shape) (see `odeint_adjoint`)."""
        if not callable(func):
            raise TypeError(f"{WHO}: func must be callable as func(t, y), got "
                            f"{type(func).__name__}")
        with agreed_checks(None if self.grid is None else self.grid.comm):
            check_state(WHO, "y0", y0, "the initial state", check_tensor)
        if isinstance(t, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in t):
            t = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in t])  # (with dL/dt)
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.ndim != 1 or t.numel() < 2:
            raise ValueError(f"{WHO}: t must be a 1-D sequence of at least 2 times (the initial "
                             f"time first), got shape {tuple(t.shape)}")
        if not torch._C._are_functorch_transforms_active():  # (else per sample, in _forward:
            _check_times(t)  # a t batched by vmap has no values here)
        named = adjoint_params is not None  # (a Module's parameters need not all enter func)
        if adjoint_params is None:
            adjoint_params = tuple(func.parameters()) if isinstance(func, torch.nn.Module) \
                else ()
        params = tuple(adjoint_params)
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{WHO}: adjoint_params[{i}] is a {type(p).__name__}, not a "
                                f"tensor")
        # each tensor once (a repeat would receive its gradient twice), and only those that
        # can have one (a frozen parameter is a constant of func)
        params = tuple({id(p): p for p in params if p.requires_grad}.values())
        if self.settings["compile_jacobian"]:
            compiled_parameter_names(func, params, WHO)
        jacobian, grid = self.settings["jacobian"], self.grid
        assembler = _assembler(WHO, self.sparsity, grid, y0.numel())
        if assembler is not None and grid is None:
            grid = getattr(assembler, "grid", None)  # a stencil_sparsity's one-rank grid
        if grid is not None:
            grid._check_owned(y0, f"{WHO}: y0")
        if jacobian == "assembled" and assembler is None:
            raise ValueError(f"{WHO}: jacobian='assembled' needs sparsity= (the pattern of "
                             f"dfunc/dy, e.g. stencil_sparsity(y0.shape)) or grid=")
        if jacobian == "blocks" and grid is not None:
            raise ValueError(f"{WHO}: jacobian='blocks' is for independent samples; on a grid "
                             f"use 'assembled' or 'matrix-free'")
        unknowns = int(np.prod(grid.shape)) * grid.dof if grid is not None else y0.numel()
        states = budget(WHO, self.checkpoints, unknowns)
        problem = _ODEProblem(func, params, assembler=assembler, grid=grid, checkpoints=states,
                              solver=self, **self.settings)
        problem.key = (id(func), tuple(map(id, params)), tuple(y0.shape), y0.dtype,
                       id(assembler), states)
        # params whose gradient func alone must give (y0's or t's comes through them too)
        problem.checked_params = {i for i, p in enumerate(params)
                                  if named and p is not y0 and p is not t}
        return _ODEINT(y0, t, problem, *params)


@eager_under_compile(WHO)
def odeint_adjoint(func, y0, t, *, method="arkimex", step_size=None, steps_per_interval=None,
                   rtol=1e-6, atol=1e-8, options=None, prefix=None, adjoint_params=None,
                   jacobian="auto", products="auto", compile_jacobian=False, sparsity=None,
                   grid=None, checkpoints=None):
    """Solve dy/dt = func(t, y) with PETSc TS; gradients by TSAdjoint (discrete adjoint).

    Follows torchdiffeq's convention: returns the solution at every time in ``t``, a tensor of
    shape ``(len(t), *y0.shape)``, differentiable w.r.t. ``y0``, ``t`` and ``adjoint_params``.

    Args:
        func: ``func(t, y) -> dy/dt`` on torch tensors (t is a 0-d tensor); usually an nn.Module.
            A leading batch dimension of ``y0`` is handed to func as is. Bridged ops (Julia,
            finite differences, programs) may appear in it. On a grid, func receives this
            rank's ghosted block and returns dy/dt on its owned block. y views PETSc's work
            vector, valid for the call only (PETSc overwrites it after): clone it to keep it.
        y0: initial state, any shape, PETSc's scalar dtype (float64), on the CPU; on a grid this
            rank's owned block (``grid.owned_shape``).
        t: strictly increasing output times (1-D); t[0] is the initial time.
        method: one of ``arkimex`` (the default: PETSc's ARK4(3)6L[2]SA, an L-stable,
            stiffly accurate ESDIRK of order 4 with an embedded error estimate; the fastest of
            PETSc's ARKIMEX tableaus at equal accuracy on the IVP test set, see
            bridges.problems), ``beuler``, ``cn``, ``theta`` (implicit), ``rk4``, ``bosh3``,
            ``dopri5`` (explicit Runge-Kutta), ``bdf`` (forward only). Adaptive implicit
            steps reuse one Jacobian per step (chord Newton, converged in the tolerances'
            norm); a step whose Newton solve fails is retried smaller.
        step_size: fixed step (steps are clipped to land on every output time).
        steps_per_interval: fixed steps, this many equal ones in each output interval; with
            log-spaced ``t`` the steps grow geometrically, as stiff decays want.
        rtol, atol: tolerances of adaptive stepping, used when neither of the above is given
            (rk4 has no error estimate: give a step or choose another method). Implicit
            methods also converge Newton in their weighted norm |dy| / (atol + rtol |y|), fixed
            steps included: give an atol below the smallest state component that matters.
            Gradients w.r.t. y0 and the parameters are the exact derivatives of the discrete
            solution with the forward's steps held fixed; those w.r.t. t use the continuous
            formula (func at the outputs), which the discrete solution approaches as steps
            shrink (with 3 backward-Euler steps per interval, about 12 % apart). Step
            control bounds the error of y, not of dy/dθ, which through fast transitions
            converges more slowly: on VDPOL (μ = 1e3, relaxation jumps) dy(2)/dμ is 9e-2 off
            at rtol 1e-8 and 2e-3 at 1e-10, while y is within 2e-8
            (benchmarks/bench_frozen_steps.py); at μ = 1e5, 1e9 times too large at rtol 1e-6
            and 1e-8. Check a gradient through layers this thin against central differences
            of the forward solve before trusting it.
        options: PETSc options for this solve, keyed without the leading dash, e.g.
            ``{"ts_adapt_type": "none", "ts_time_step": 1e-3, "ksp_type": "gmres"}``; ``True``
            switches a flag or viewer on (``{"ts_monitor": True}``). They override the command
            line, which overrides the keyword arguments, and stay in force for this solve's
            whole life (its adjoint included). Options PETSc never reads are reported (see
            ``bridges.petsc.set_unused_options``). The trajectory is kept in memory
            (``ts_trajectory_type memory``) unless options or the command line say otherwise.
        prefix: options prefix of this solver (e.g. ``"chem_"`` makes ``-chem_ts_type`` apply).
        adjoint_params: tensors func depends on that need gradients (default: func.parameters()).
            A tensor requiring grad that func uses but that is not among them is refused for a
            plain function (whose tensors cannot be found otherwise) and warned about otherwise.
        jacobian: how implicit methods get dfunc/dy. ``"assembled"`` (with sparsity or grid): the
            exact sparse Jacobian from one product per colour, solved by GMRES with PETSc's
            default PC (ILU on one rank, block Jacobi on many; any PC through options: gamg,
            mg on a grid, lu, ...). ``"blocks"``: each row along the last dimension of y0 is one
            sample whose n x n Jacobian block is assembled, and Newton steps solve with LU
            (func coupling the samples is refused, checked at y0 and again before the adjoint).
            ``"matrix-free"``: a PETSc Mat of Jacobian products, solved by GMRES
            (preconditioned by the blocks when n <= 64). ``"auto"`` (default): assembled with
            sparsity or a grid, else blocks when n <= 64 and a check with one product at y0
            shows func treats samples independently, else the whole state as one dense block
            when it has at most 1024 entries and func no bridged ops (a stiff system's Krylov
            solve without a preconditioner can take 100x longer), else matrix-free.
        products: how Jacobian products are formed. ``"forward"``: forward-mode AD (needs every
            op in func to have one); ``"reverse"``: reverse-mode AD, which every bridged op has
            (assembled blocks only); ``"fd"``: the finite-difference action J v ~ (f(u + h v) -
            f(u)) / h with PETSc MFFD's default step, for matrix-free Newton when some op has no
            forward mode (the adjoint still uses reverse mode); ``"auto"`` (default): forward
            mode where every op has one, else reverse mode (blocks) or fd (matrix-free).
        compile_jacobian: form dfunc/dy and dfunc/dparams of a small system (y0 of at most 64
            entries, or a batch of independent rows of at most 64; plain torch; func an
            nn.Module whose parameters include adjoint_params) with
            ``torch.compile(torch.func.jacrev(...))``, both in one call (per sample under vmap
            for a batch), instead of eager reverse passes. Implicit methods only; func must
            compile to one graph. The first call compiles (seconds, once per func, shape and
            dtype; torch.compile's recompile limit applies across funcs); in a loop of many
            solves, loss + gradient on ROBER then takes about 0.7x the time
            (`bench_callbacks`). Anything else is refused with the reason.
        sparsity: the pattern of dfunc/dy for the full state: an N x N scipy sparse matrix or
            boolean array (N = y0.numel()) or a ColouredJacobian such as
            ``stencil_sparsity(y0.shape)`` (reuse it across solves).
        grid: a `Grid` to integrate on, over all of its ranks (see func and y0); the Jacobian is
            assembled from the grid's stencil. Newton's linear solves (forward and adjoint) use
            GMRES with ILU (block Jacobi + ILU on many ranks) below ``MULTIGRID_FROM`` (2^18)
            unknowns, and from there geometric multigrid on the grid's DMDA hierarchy where it
            has at least 3 levels (`mg_levels`): Galerkin coarse operators from the assembled
            Jacobian, one Richardson step of block Jacobi + ILU per level. Options override
            any of it; ``{"pc_type": "mg"}`` alone brings the rest of that configuration.
            Each rank's parameter gradient is its share: the shares of all ranks sum to the
            gradient of the total loss (see `sum_gradients`).
        checkpoints: memory for the adjoint. ``None`` (default): PETSc's trajectory stores every
            step (its stages too). An int ``k >= 1``: at most ``k`` states are stored (y0 among
            them) and the rest recomputed during the adjoint, on the optimal binomial (Revolve)
            schedule of ``checkpoint_schedules``: n steps cost Griewank and Walther's optimum
            of recomputed steps (about 2n when k is near sqrt(n), n(n+1)/2 when k = 1). A
            string such as ``"2GB"`` or ``"512MiB"``: as many states as fit in that memory over
            all ranks (8 bytes an unknown). Recomputation replays the forward's own step sizes
            (adaptive steps are reproduced, not re-chosen). Methods that carry data between
            steps (arkimex, bosh3, dopri5) restart every step when checkpointed, so the gradient
            is exact for the forward returned; arkimex then differs from its
            stored-trajectory run by its Newton tolerance. PETSc's own
            ``ts_trajectory_max_cps_ram`` needs revolve, which this PETSc build lacks.
    """
    solver = ODESolver(method, step_size=step_size, steps_per_interval=steps_per_interval,
                       rtol=rtol, atol=atol, options=options, prefix=prefix, jacobian=jacobian,
                       products=products, compile_jacobian=compile_jacobian, sparsity=sparsity,
                       grid=grid, checkpoints=checkpoints)
    return solver(func, y0, t, adjoint_params)
