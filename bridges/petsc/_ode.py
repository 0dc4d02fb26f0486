"""ODE solves with PETSc TS and their discrete adjoints (TSAdjoint), as one bridged torch op.

The right-hand side is a torch function ``func(t, y)`` (an nn.Module for trained parameters).
Implicit methods integrate F(t, y, ydot) = ydot - func(t, y) = 0 with the IJacobian
shift*I - dfunc/dy as a matrix-free Mat from torch JVPs/VJPs; explicit Runge-Kutta methods use the
right-hand side directly. TSAdjoint runs backwards segment by segment between output times,
adding each output's cotangent, and yields dL/dy0 and dL/dθ.
"""
from __future__ import annotations

import numpy as np
import torch

from .._core import foreign_function
from .._errors import ForeignError
from ._jacobian import BlockJacobian, TorchJacobian, _jvp
from ._options import scoped_options
from ._runtime import PETSc, reason_name
from ._vec import as_vec, check_tensor, vec_as_tensor

# method -> (TS type, Runge-Kutta scheme or None, form)
METHODS = {
    "beuler": ("beuler", None, "implicit"),
    "cn": ("cn", None, "implicit"),
    "theta": ("theta", None, "implicit"),   # theta set with options={"ts_theta_theta": ...}
    "arkimex": ("arkimex", None, "implicit"),  # fully implicit ESDIRK: ts_arkimex_type 4 default
    "bdf": ("bdf", None, "implicit"),          # forward only: PETSc has no adjoint for BDF
    "rk4": ("rk", "4", "explicit"),
    "bosh3": ("rk", "3bs", "explicit"),
    "dopri5": ("rk", "5dp", "explicit"),
}
ADJOINT_TS_TYPES = ("beuler", "cn", "theta", "arkimex", "rk")  # TS types with TSAdjoint
JACOBIANS = ("auto", "blocks", "matrix-free")
BLOCK_LIMIT = 64  # largest per-sample system whose Jacobian blocks are assembled by default


class _ODEProblem:
    """Everything fixed across solves: the function, its parameters, the solver settings."""

    def __init__(self, func, params, method, step_size, steps_per_interval, rtol, atol, options,
                 prefix, jacobian):
        self.func, self.params = func, params
        self.ts_type, self.rk_type, self.form = METHODS[method]
        self.method, self.step_size, self.rtol, self.atol = method, step_size, rtol, atol
        self.steps_per_interval = steps_per_interval
        self.fixed = step_size is not None or steps_per_interval is not None
        self.options, self.prefix, self.jacobian = options, prefix, jacobian

    def rhs(self, t, y):
        return self.func(torch.as_tensor(t, dtype=y.dtype), y)


class _ODESolve:
    """One forward solve and its adjoint; the TS and its trajectory live as long as the pullback."""

    def __init__(self, problem, y0, times):
        self.p, self.shape, self.times = problem, y0.shape, times
        self.y0 = y0.clone(memory_format=torch.contiguous_format)
        n = y0.numel()
        self.u = as_vec(self.y0.clone())
        self.jac = TorchJacobian(self.shape)
        self.jac_mat = self.jac.mat()
        self.n_params = sum(p.numel() for p in problem.params)
        self.jacp_mat = PETSc.Mat().createPython([n, max(self.n_params, 1)], self,
                                                 comm=PETSc.COMM_SELF)
        self.jacp_mat.setUp()
        self.blocks = None
        if problem.form == "implicit" and problem.jacobian != "matrix-free":
            self.blocks = BlockJacobian(self.shape)
            self.assembled = problem.jacobian == "blocks" or self._rows_independent()
        self.ts = self._make_ts()
        self.steps = None

    # -- PETSc callbacks (they record linearisation points; torch does the algebra) -------------
    def _state(self, vec, mode="r"):
        return vec_as_tensor(vec, mode).view(self.shape)

    def _rhs_function(self, ts, t, U, F):
        with torch.no_grad():
            self._state(F, "w").copy_(self.p.rhs(t, self._state(U)))

    def _rhs_jacobian(self, ts, t, U, A, P):
        self.jac.at(lambda y: self.p.rhs(t, y), self._state(U).clone())

    def _ifunction(self, ts, t, U, Udot, F):
        with torch.no_grad():
            torch.sub(self._state(Udot), self.p.rhs(t, self._state(U)), out=self._state(F, "w"))

    def _ijacobian(self, ts, t, U, Udot, shift, A, P):
        u = self._state(U).clone()
        if self.blocks is None or not self.assembled:
            self.jac.at(lambda y: self.p.rhs(t, y), u, diag_shift=shift, factor=-1.0)
        if self.blocks is not None:
            self.blocks.assemble(lambda y: self.p.rhs(t, y), u, diag_shift=shift, factor=-1.0)

    def _rows_independent(self):
        """Whether func acts on each sample (last-dimension row) of y on its own, so that the
        block-diagonal Jacobian is exact: checked with one JVP in a random direction at y0."""
        if self.y0.ndim <= 1:
            return True
        t0 = float(self.times[0])
        fn = lambda y: self.p.rhs(t0, y)  # noqa: E731
        v = torch.randn(self.shape, dtype=self.y0.dtype, generator=torch.Generator().manual_seed(0))
        exact = _jvp(fn, self.y0, v)
        blocks = self.blocks.blocks(fn, self.y0)
        approx = torch.einsum("bij,bj->bi", blocks, v.reshape(blocks.shape[:2]))
        return bool(torch.allclose(approx.reshape(exact.shape), exact, rtol=1e-8,
                                   atol=1e-12 * float(exact.abs().max())))

    def _jacobian_p(self, ts, t, U, *rest):  # RHS form: (A); implicit form: (Udot, shift, A)
        self._jacp_point = (t, self._state(U).clone())

    def multTranspose(self, mat, x, y):
        """(d func / d params)^T x at the state PETSc passed to the JacobianP callback, recomputed
        here (a value saved from another callback is wrong for implicit methods)."""
        t, u = self._jacp_point
        out = vec_as_tensor(y, "w")
        with torch.enable_grad():
            value = self.p.rhs(t, u)
            grads = torch.autograd.grad(value, self.p.params, vec_as_tensor(x, "r").view(value.shape),
                                        allow_unused=True)
        sign = 1.0 if self.p.form == "explicit" else -1.0  # implicit: dF/dp = -dfunc/dp
        offset = 0
        for param, g in zip(self.p.params, grads):
            part = out[offset:offset + param.numel()]
            part.copy_(g.reshape(-1)).mul_(sign) if g is not None else part.zero_()
            offset += param.numel()

    # -- set-up ---------------------------------------------------------------------------------
    def _make_ts(self):
        p = self.p
        ts = PETSc.TS().create(comm=PETSc.COMM_SELF)
        if p.prefix:
            ts.setOptionsPrefix(p.prefix)
        ts.setType(p.ts_type)
        if p.rk_type:
            ts.setRKType(p.rk_type)
        if p.ts_type == "arkimex":  # the whole F is implicit: a stiffly accurate ESDIRK
            ts.setARKIMEXType("4")
            ts.setARKIMEXFullyImplicit(True)
        self.F = PETSc.Vec().createSeq(self.u.getSize(), comm=PETSc.COMM_SELF)
        if p.form == "explicit":
            ts.setRHSFunction(self._rhs_function, self.F)
            ts.setRHSJacobian(self._rhs_jacobian, self.jac_mat)
            ts.setRHSJacobianP(self._jacobian_p, self.jacp_mat)
        else:
            ts.setIFunction(self._ifunction, self.F)
            if self.blocks is not None and self.assembled:
                ts.setIJacobian(self._ijacobian, self.blocks.mat, self.blocks.mat)
            else:
                ts.setIJacobian(self._ijacobian, self.jac_mat,
                                self.jac_mat if self.blocks is None else self.blocks.mat)
            ts.setIJacobianP(self._jacobian_p, self.jacp_mat)
        ts.setExactFinalTime(PETSc.TS.ExactFinalTime.MATCHSTEP)
        ts.setErrorIfStepFails(False)
        ts.setMaxSteps(100_000)  # options["ts_max_steps"] raises it; the trajectory sizes by it
        if not p.fixed:
            ts.setTolerances(rtol=p.rtol, atol=p.atol)
        if p.form == "implicit":
            snes = ts.getSNES()
            snes.setTolerances(rtol=1e-10, atol=1e-14, max_it=50)
            ksp = snes.getKSP()
            ksp.setTolerances(rtol=1e-12, atol=1e-50)
            if self.blocks is not None and self.assembled:  # exact sparse Jacobian: direct solve
                ksp.setType("preonly")
                ksp.getPC().setType("lu")
            else:
                ksp.setType("gmres")
                ksp.getPC().setType("pbjacobi" if self.blocks is not None else "none")
        ts.setSaveTrajectory()
        # PETSc reads trajectory options without the solver's prefix; the trajectory stays in
        # memory unless chosen otherwise (PETSc's default writes files)
        options = p.options or {}
        trajectory = {k: v for k, v in options.items() if k.lstrip("-").startswith("ts_trajectory")}
        others = {k: v for k, v in options.items() if k not in trajectory}
        with scoped_options(None, trajectory, {"ts_trajectory_type": "memory"}), \
                scoped_options(p.prefix, others, {"ts_adapt_type": "none" if p.fixed else "basic"}):
            ts.setFromOptions()
        return ts

    # -- forward and adjoint --------------------------------------------------------------------
    def solve(self):
        """Integrates from times[0] through every output time; returns (len(t), *shape)."""
        ts, times = self.ts, self.times
        vec_as_tensor(self.u).copy_(self.y0.reshape(-1))
        ts.setStepNumber(0)
        ts.setTimeSpan(times.tolist())
        per_interval = self.p.steps_per_interval
        intervals = np.diff(times)
        if per_interval:
            dt = intervals[0] / per_interval
        else:
            dt = self.p.step_size or intervals[0] * 1e-3
        ts.setTimeStep(dt)
        recorded = [0]

        def record_output_steps(ts):
            k = len(recorded)
            if k < len(times) and abs(ts.getTime() - times[k]) <= 1e-10 * max(abs(times[k]), 1):
                recorded.append(ts.getStepNumber())
                if per_interval and k < len(intervals):
                    ts.setTimeStep(intervals[k] / per_interval)
        ts.setPostStep(record_output_steps)
        self._run(ts.solve, self.u)
        ts.setPostStep(None)
        self._check(ts.getConvergedReason(), "the forward solve")
        _, solutions = ts.getEvaluationSolutions()
        if len(recorded) != len(times) or len(solutions) != len(times):
            raise ForeignError(f"odeint_adjoint: PETSc TS reached {len(recorded)} of "
                               f"{len(times)} output times; check the times and step options")
        self.steps = recorded
        ys = torch.stack([vec_as_tensor(s, "r").view(self.shape).clone() for s in solutions])
        finite = torch.isfinite(ys.reshape(len(times), -1)).all(dim=1)
        if not bool(finite.all()):
            k = int(torch.nonzero(~finite)[0])
            raise ForeignError(f"odeint_adjoint: the solution became non-finite (nan/inf) by "
                               f"t = {times[k]:.6g} (PETSc TS '{ts.getType()}'); the problem may "
                               f"blow up there, or the method may be unstable at this step size")
        return ys

    def pullback(self, grad_ys, *, needs_input_grad):
        ts = self.ts
        if ts.getType() not in ADJOINT_TS_TYPES:
            raise ForeignError(f"odeint_adjoint: PETSc TS '{ts.getType()}' (chosen by options or "
                               f"the command line) has no discrete adjoint, so no gradient; use "
                               f"one of the methods {', '.join(METHODS)}")
        if self.steps is None:  # the trajectory went with an earlier adjoint: solve again
            self.solve()
        lam = as_vec(grad_ys[-1].to(torch.float64).clone())
        mu = PETSc.Vec().createSeq(max(self.n_params, 1), comm=PETSc.COMM_SELF)
        mu.zeroEntries()
        want_params = any(needs_input_grad[3:])
        ts.setCostGradients([lam], [mu] if want_params else None)
        lam_t = vec_as_tensor(lam)
        for k in range(len(self.steps) - 1, 0, -1):
            ts.adjointSetSteps(self.steps[k] - self.steps[k - 1])
            self._run(ts.adjointSolve)
            self._check(ts.getConvergedReason(), "the adjoint solve", adjoint=True)
            lam_t.add_(grad_ys[k - 1].reshape(-1))
        self.steps = None  # TSAdjoint consumed the trajectory
        grad_params = [None] * len(self.p.params)
        if want_params:
            mu_t, offset = vec_as_tensor(mu), 0
            for i, param in enumerate(self.p.params):
                grad_params[i] = mu_t[offset:offset + param.numel()].view(param.shape).clone()
                offset += param.numel()
        return (lam_t.view(self.shape).clone(), None, None, *grad_params)

    def _run(self, step, *args):
        try:
            step(*args)
        except PETSc.Error as exc:
            cause = exc.__cause__
            if cause is not None:  # a Python exception inside a callback (e.g. in func)
                raise ForeignError.wrap("odeint_adjoint: func, called by PETSc TS", cause) from exc
            raise ForeignError(f"odeint_adjoint: PETSc error {exc.ierr} in TS "
                               f"({self.ts.getType()}): {exc}", original=exc) from exc

    def _check(self, reason, what, adjoint=False):
        if reason >= 0:
            return
        ts = self.ts
        raise ForeignError(
            f"odeint_adjoint: {what} with PETSc TS '{ts.getType()}' failed: "
            f"{reason_name(PETSc.TS.ConvergedReason, reason)} at t = {ts.getTime():.6g} (output "
            f"times {self.times[0]:.6g} to {self.times[-1]:.6g}) after {ts.getStepNumber()} steps. "
            f"Try a smaller step (step_size or options['ts_dt']), tighter or looser tolerances "
            f"(rtol/atol), another method, or options such as {{'ts_max_snes_failures': -1}}")


def _forward(y0, t, problem, *params):
    solve = _ODESolve(problem, y0, t.detach().cpu().numpy().astype(np.float64))
    ys = solve.solve()
    return ys, solve.pullback


_ODEINT = foreign_function(_forward, name="petsc_odeint", pass_needs_input_grad=True)


def odeint_adjoint(func, y0, t, *, method="cn", step_size=None, steps_per_interval=None,
                   rtol=1e-6, atol=1e-8, options=None, prefix=None, adjoint_params=None,
                   jacobian="auto"):
    """Solve dy/dt = func(t, y) with PETSc TS; gradients by TSAdjoint (discrete adjoint).

    Follows torchdiffeq's convention: returns the solution at every time in ``t``, a tensor of
    shape ``(len(t), *y0.shape)``, differentiable w.r.t. ``y0`` and ``adjoint_params``.

    Args:
        func: ``func(t, y) -> dy/dt`` on torch tensors (t is a 0-d tensor); usually an nn.Module.
            A leading batch dimension of ``y0`` is handed to func as is.
        y0: initial state, any shape, PETSc's scalar dtype (float64), on the CPU.
        t: strictly increasing output times (1-D); t[0] is the initial time.
        method: one of ``beuler``, ``cn``, ``theta`` (implicit, for stiff problems), ``rk4``,
            ``bosh3``, ``dopri5`` (explicit Runge-Kutta).
        step_size: fixed step (steps are clipped to land on every output time).
        steps_per_interval: fixed steps, this many equal ones in each output interval; with
            log-spaced ``t`` the steps grow geometrically, as stiff decays want.
        rtol, atol: tolerances of adaptive stepping, used when neither of the above is given
            (rk4 has no error estimate: give a step or choose another method).
        options: PETSc options for this solve, keyed without the leading dash, e.g.
            ``{"ts_adapt_type": "none", "ts_dt": 1e-3, "ksp_type": "gmres"}``. They override the
            command line, which overrides the keyword arguments. The trajectory is kept in memory
            (``ts_trajectory_type memory``) unless options or the command line say otherwise.
        prefix: options prefix of this solver (e.g. ``"chem_"`` makes ``-chem_ts_type`` apply).
        adjoint_params: tensors func depends on that need gradients (default: func.parameters()).
        jacobian: how implicit methods get dfunc/dy. ``"blocks"``: each row along the last
            dimension of y0 is one sample whose n x n Jacobian block is assembled from n
            reverse-mode products, and Newton steps solve with LU. ``"matrix-free"``: a PETSc Mat
            whose products are torch JVPs/VJPs, solved by GMRES (preconditioned by the blocks
            when n <= 64). ``"auto"`` (default): blocks when n <= 64 and a check with one JVP at
            y0 shows func treats samples independently, else matrix-free.
    """
    who = "odeint_adjoint"
    if not callable(func):
        raise TypeError(f"{who}: func must be callable as func(t, y), got {type(func).__name__}")
    if not isinstance(y0, torch.Tensor):
        raise TypeError(f"{who}: y0 must be a torch.Tensor, got {type(y0).__name__}")
    check_tensor(y0, f"{who}: y0")
    if y0.numel() == 0:
        raise ValueError(f"{who}: y0 is empty")
    if method not in METHODS:
        raise ValueError(f"{who}: unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    t = torch.as_tensor(t, dtype=torch.float64)
    if t.ndim != 1 or t.numel() < 2:
        raise ValueError(f"{who}: t must be a 1-D sequence of at least 2 times (the initial time "
                         f"first), got shape {tuple(t.shape)}")
    if not bool((t[1:] > t[:-1]).all()):
        k = int(torch.nonzero(t[1:] <= t[:-1])[0])
        raise ValueError(f"{who}: times must strictly increase, but t[{k + 1}] = "
                         f"{t[k + 1].item():g} follows t[{k}] = {t[k].item():g}")
    if step_size is not None and steps_per_interval is not None:
        raise ValueError(f"{who}: give step_size or steps_per_interval, not both")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"{who}: step_size must be positive, got {step_size!r}")
    if steps_per_interval is not None and not (isinstance(steps_per_interval, int)
                                               and steps_per_interval >= 1):
        raise ValueError(f"{who}: steps_per_interval must be a positive int, got "
                         f"{steps_per_interval!r}")
    fixed = step_size is not None or steps_per_interval is not None
    if method == "rk4" and not fixed and not (options or {}).get("ts_adapt_type"):
        raise ValueError(f"{who}: rk4 has no error estimate to adapt steps with; give step_size "
                         f"or steps_per_interval, or use an adaptive method such as 'dopri5'")
    if adjoint_params is None:
        adjoint_params = tuple(func.parameters()) if isinstance(func, torch.nn.Module) else ()
    params = tuple(adjoint_params)
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{who}: adjoint_params[{i}] is a {type(p).__name__}, not a tensor")
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"{who}: options must be a dict of PETSc option names (without the "
                        f"leading dash) to values, e.g. {{'ts_dt': 1e-3}}, got "
                        f"{type(options).__name__}")
    if jacobian not in JACOBIANS:
        raise ValueError(f"{who}: unknown jacobian {jacobian!r}; valid: {', '.join(JACOBIANS)}")
    if jacobian == "auto" and (y0.shape[-1] if y0.ndim else 1) > BLOCK_LIMIT:
        jacobian = "matrix-free"
    problem = _ODEProblem(func, params, method, step_size, steps_per_interval, rtol, atol, options,
                          prefix, jacobian)
    return _ODEINT.apply(y0, t, problem, *params)
