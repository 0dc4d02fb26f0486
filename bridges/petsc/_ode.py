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

import weakref

import numpy as np
import torch

from .._core import eager_under_compile, foreign_function
from .._errors import ForeignError
from .._linearise import Linearisation, probe
from ._capi import trajectory_prefix
from ._jacobian import TorchJacobian, block_jacobian
from ._options import SolverOptions, check_options
from ._runtime import PETSc, destroy, diverged, petsc_errors
from ._vec import as_vec, check_tensor, vec_as_tensor

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
ADJOINT_TS_TYPES = ("beuler", "cn", "theta", "arkimex", "rk")  # TS types with TSAdjoint
JACOBIANS = ("auto", "blocks", "matrix-free")
PRODUCTS = ("auto", "forward", "reverse", "fd")
BLOCK_LIMIT = 64  # largest per-sample system whose Jacobian blocks are assembled by default
WHO = "odeint_adjoint"


class _ODEProblem:
    """Everything fixed across solves: the function, its parameters, the solver settings."""

    def __init__(self, func, params, method, step_size, steps_per_interval, rtol, atol, options,
                 prefix, jacobian, products):
        self.func, self.params = func, params
        self.ts_type, self.scheme, self.form = METHODS[method]
        self.method, self.step_size, self.rtol, self.atol = method, step_size, rtol, atol
        self.steps_per_interval = steps_per_interval
        self.fixed = step_size is not None or steps_per_interval is not None
        self.options, self.prefix = options, prefix
        self.jacobian, self.products = jacobian, products

    def rhs(self, t, y):
        return self.func(torch.as_tensor(t, dtype=y.dtype), y)

    def defaults(self, times, record):
        """PETSc options this solve starts from; the user's options and command line win."""
        first = float(times[1] - times[0])
        dt = first / self.steps_per_interval if self.steps_per_interval else \
            self.step_size or first * 1e-3
        values = {"ts_type": self.ts_type, "ts_exact_final_time": "matchstep",
                  "ts_max_steps": 100_000, "ts_time_step": dt, "ts_error_if_step_fails": False,
                  "ts_adapt_type": "none" if self.fixed else "basic"}
        if self.scheme:
            values[self.scheme[0]] = self.scheme[1]
        if self.ts_type == "arkimex":  # the whole F is implicit: a stiffly accurate ESDIRK
            values["ts_arkimex_fully_implicit"] = True
        if not self.fixed:
            values.update(ts_rtol=self.rtol, ts_atol=self.atol)
        if record:  # PETSc's default trajectory writes files
            values["ts_trajectory_type"] = "memory"
        if self.form == "implicit":
            values.update(snes_rtol=1e-10, snes_atol=1e-14, snes_max_it=50, ksp_rtol=1e-12,
                          ksp_atol=1e-50)
        return values


class _ODESolve:
    """One forward solve and its adjoint: the TS, its matrices, vectors, trajectory and options.

    PETSc holds its callbacks (bound methods of this object), so the two form a cycle that only
    `release` breaks; `_Pullback` calls it when it dies."""

    def __init__(self, problem, y0, times, record):
        self.p, self.shape, self.times, self.record = problem, y0.shape, times, record
        self.y0 = y0.clone(memory_format=torch.contiguous_format)
        self.steps = None
        self.ts = self.u = self.F = self.jac_mat = self.jacp_mat = self.blocks = self.jac = None
        self.options = SolverOptions(WHO, problem.prefix, problem.options,
                                     problem.defaults(times, record))
        try:
            self._set_up()
        except BaseException:
            self.release()
            raise

    def _set_up(self):
        p, n = self.p, self.y0.numel()
        self.u = as_vec(self.y0.clone())
        self.F = PETSc.Vec().createSeq(n, comm=PETSc.COMM_SELF)
        self.jac = TorchJacobian(self.shape)
        self.jac_mat = self.jac.mat()
        self.n_params = sum(q.numel() for q in p.params)
        self.jacp_mat = PETSc.Mat().createPython([n, max(self.n_params, 1)], self,
                                                 comm=PETSc.COMM_SELF)
        self.jacp_mat.setUp()
        ts = self.ts = PETSc.TS().create(comm=PETSc.COMM_SELF)
        ts.setOptionsPrefix(self.options.prefix)
        if p.form == "explicit":
            ts.setRHSFunction(self._rhs_function, self.F)
            ts.setRHSJacobian(self._rhs_jacobian, self.jac_mat)  # the adjoint's transposes
            ts.setRHSJacobianP(self._jacobian_p, self.jacp_mat)
        else:
            ts.setIFunction(self._ifunction, self.F)
            self._set_ijacobian(ts)
            ts.setIJacobianP(self._jacobian_p, self.jacp_mat)
        if self.record:
            ts.setSaveTrajectory()
            trajectory_prefix(ts, self.options.prefix)
        with petsc_errors(WHO, "setting up PETSc TS from the options"):
            ts.setFromOptions()
        self.dt0 = ts.getTimeStep()  # the first step in force (options win over defaults)

    def _set_ijacobian(self, ts):
        """Jacobian structure and product mode of an implicit method (see odeint_adjoint)."""
        p = self.p
        block = self.shape[-1] if self.y0.ndim else 1
        jacobian = p.jacobian
        if jacobian == "auto" and block > BLOCK_LIMIT:
            jacobian = "matrix-free"
        fn = self._rhs_at(float(self.times[0]))
        caps = probe(fn, self.y0, WHO)
        products = p.products
        if jacobian != "matrix-free":
            if products == "fd":
                raise ValueError(f"{WHO}: products='fd' is a matrix-free action; use it with "
                                 f"jacobian='matrix-free', or products 'forward'/'reverse'")
            self.blocks = block_jacobian(self.shape, mode=products)
            if jacobian == "auto" and not self._rows_independent(fn):
                jacobian = "matrix-free"
        self.assembled = jacobian == "blocks" or (jacobian == "auto" and self.blocks is not None)
        defaults = {}
        if self.assembled:  # exact sparse Jacobian: a direct solve
            ts.setIJacobian(self._ijacobian, self.blocks.mat, self.blocks.mat)
            defaults = {"ksp_type": "preonly", "pc_type": "lu"}
        else:
            if products == "reverse":
                raise ValueError(f"{WHO}: a matrix-free Jacobian needs J v, which reverse mode "
                                 f"cannot give; use products 'forward', 'fd' or 'auto', or "
                                 f"jacobian='blocks'")
            if products == "forward" and not caps.forward:
                raise ValueError(f"{WHO}: products='forward' needs a forward-mode rule for "
                                 f"every op in func; one has none. Use 'fd' or 'auto'")
            fd = products == "fd" or (products == "auto" and not caps.forward)
            self.jac.products = "fd" if fd else "forward"
            self.pmat = self.jac_mat if self.blocks is None else self.blocks.mat
            ts.setIJacobian(self._ijacobian, self.jac_mat, self.pmat)
            defaults = {"ksp_type": "gmres",
                        "pc_type": "none" if self.blocks is None else "pbjacobi"}
        for key, value in defaults.items():  # below the user's options and the command line
            if self.options[key] is None:
                PETSc.Options()[self.options.prefix + key] = value
                self.options.keys.append(key)

    def _rhs_at(self, t):
        return lambda y: self.p.rhs(t, y)

    def _rows_independent(self, fn):
        """Whether func acts on each sample (last-dimension row) of y on its own, so that the
        block-diagonal Jacobian is exact: checked with one reverse-mode product in a random
        direction at y0 against the assembled blocks."""
        if self.y0.ndim <= 1:
            return True
        w = torch.randn(self.shape, dtype=self.y0.dtype, generator=torch.Generator().manual_seed(0))
        exact = Linearisation(fn, self.y0).vjp(w).reshape(-1)
        mat = self.blocks.assemble(fn, self.y0)
        approx = torch.zeros_like(exact)
        mat.multTranspose(as_vec(w.reshape(-1).clone()), as_vec(approx))
        return bool(torch.allclose(approx, exact, rtol=1e-8,
                                   atol=1e-12 * float(exact.abs().max())))

    # -- PETSc callbacks (they record linearisation points; torch does the algebra) -------------
    def _state(self, vec, mode="r"):
        return vec_as_tensor(vec, mode).view(self.shape)

    def _rhs_function(self, ts, t, U, F):
        with torch.no_grad():
            self._state(F, "w").copy_(self.p.rhs(t, self._state(U)))

    def _rhs_jacobian(self, ts, t, U, A, P):
        self.jac.at(self._rhs_at(t), self._state(U).clone())

    def _ifunction(self, ts, t, U, Udot, F):
        with torch.no_grad():
            torch.sub(self._state(Udot), self.p.rhs(t, self._state(U)), out=self._state(F, "w"))

    def _ijacobian(self, ts, t, U, Udot, shift, A, P):
        u = self._state(U).clone()
        if not self.assembled:
            self.jac.at(self._rhs_at(t), u, diag_shift=shift, factor=-1.0)
        if self.blocks is not None:
            self.blocks.assemble(self._rhs_at(t), u, diag_shift=shift, factor=-1.0)

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

    # -- forward and adjoint --------------------------------------------------------------------
    def solve(self):
        """Integrates from times[0] through every output time; returns (len(t), *shape)."""
        ts, times = self.ts, self.times
        vec_as_tensor(self.u).copy_(self.y0.reshape(-1))
        ts.setTime(float(times[0]))
        ts.setStepNumber(0)
        ts.setTimeSpan(times.tolist())
        ts.setTimeStep(self.dt0)
        per_interval = self.p.steps_per_interval
        intervals = np.diff(times)
        recorded = [0]

        def record_output_steps(ts):
            k = len(recorded)
            if k < len(times) and abs(ts.getTime() - times[k]) <= 1e-10 * max(abs(times[k]), 1):
                recorded.append(ts.getStepNumber())
                if per_interval and k < len(intervals):
                    ts.setTimeStep(intervals[k] / per_interval)
        ts.setPostStep(record_output_steps)
        try:
            with petsc_errors(WHO, f"the forward solve (PETSc TS '{ts.getType()}')"):
                ts.solve(self.u)
        finally:
            ts.setPostStep(None)
        self._check(ts.getConvergedReason(), "the forward solve")
        _, solutions = ts.getEvaluationSolutions()
        if len(recorded) != len(times) or len(solutions) != len(times):
            raise ForeignError(f"{WHO}: PETSc TS reached {len(recorded)} of {len(times)} output "
                               f"times; check the times and step options")
        self.steps = recorded
        ys = torch.stack([vec_as_tensor(s, "r").view(self.shape).clone() for s in solutions])
        finite = torch.isfinite(ys.reshape(len(times), -1)).all(dim=1)
        if not bool(finite.all()):
            k = int(torch.nonzero(~finite)[0])
            raise ForeignError(f"{WHO}: the solution became non-finite (nan/inf) by "
                               f"t = {times[k]:.6g} (PETSc TS '{ts.getType()}'); the problem may "
                               f"blow up there, or the method may be unstable at this step size")
        self.options.report_unused()
        return ys

    def pullback(self, grad_ys, *, needs_input_grad):
        ts = self.ts
        if ts.getType() not in ADJOINT_TS_TYPES:
            raise ForeignError(f"{WHO}: PETSc TS '{ts.getType()}' (chosen by options or the "
                               f"command line) has no discrete adjoint, so no gradient; use one "
                               f"of the methods {', '.join(m for m in METHODS if m != 'bdf')}")
        if self.steps is None:  # the trajectory went with an earlier adjoint: solve again
            self.solve()
        lam = as_vec(grad_ys[-1].to(torch.float64).clone())
        mu = PETSc.Vec().createSeq(max(self.n_params, 1), comm=PETSc.COMM_SELF)
        try:
            mu.zeroEntries()
            want_params = any(needs_input_grad[3:])
            ts.setCostGradients([lam], [mu] if want_params else None)
            lam_t = vec_as_tensor(lam)
            for k in range(len(self.steps) - 1, 0, -1):
                ts.adjointSetSteps(self.steps[k] - self.steps[k - 1])
                with petsc_errors(WHO, f"the adjoint solve (PETSc TS '{ts.getType()}')"):
                    ts.adjointSolve()
                self._check(ts.getConvergedReason(), "the adjoint solve")
                lam_t.add_(grad_ys[k - 1].reshape(-1))
            self.steps = None  # TSAdjoint consumed the trajectory
            grad_params = [None] * len(self.p.params)
            if want_params:
                mu_t, offset = vec_as_tensor(mu), 0
                for i, param in enumerate(self.p.params):
                    grad_params[i] = mu_t[offset:offset + param.numel()].view(param.shape).clone()
                    offset += param.numel()
            grad_y0 = lam_t.view(self.shape).clone()
        finally:
            destroy(lam, mu)  # TS does not own its cost gradients
        self.options.report_unused(final=True)
        return (grad_y0, None, None, *grad_params)

    def _check(self, reason, what):
        if reason >= 0:
            return
        ts = self.ts
        raise diverged(
            WHO, f"{what} with PETSc TS '{ts.getType()}'", PETSc.TS.ConvergedReason, reason,
            f"at t = {ts.getTime():.6g} (output times {self.times[0]:.6g} to "
            f"{self.times[-1]:.6g}) after {ts.getStepNumber()} steps",
            "a smaller first step (options {'ts_time_step': ...}), tighter or looser tolerances "
            "(rtol/atol), another method, or options such as {'ts_max_snes_failures': -1}")

    def release(self):
        """Free every PETSc object of this solve (idempotent)."""
        destroy(self.ts, self.u, self.F, self.jac_mat, self.jacp_mat,
                None if self.blocks is None else self.blocks.mat)
        self.ts = self.u = self.F = self.jac_mat = self.jacp_mat = self.blocks = None
        self.jac = None  # its linearisation point holds a closure over this object
        self.options.close()


class _Pullback:
    """The op's pullback; when it is released (after backward, or with the outputs), the
    solve's PETSc objects are destroyed."""

    def __init__(self, run):
        self.run = run
        weakref.finalize(self, run.release)

    def __call__(self, *grad_ys, needs_input_grad):
        return self.run.pullback(*grad_ys, needs_input_grad=needs_input_grad)


def _forward(y0, t, problem, *params, needs_input_grad):
    record = any(needs_input_grad)
    run = _ODESolve(problem, y0, t.detach().cpu().numpy().astype(np.float64), record)
    try:
        ys = run.solve()
    except BaseException:
        run.release()
        raise
    if not record:
        run.release()
        return ys, None
    return ys, _Pullback(run)


_ODEINT = foreign_function(_forward, name="petsc_odeint", pass_needs_input_grad=True,
                           protect_outputs=False)


@eager_under_compile(WHO)
def odeint_adjoint(func, y0, t, *, method="cn", step_size=None, steps_per_interval=None,
                   rtol=1e-6, atol=1e-8, options=None, prefix=None, adjoint_params=None,
                   jacobian="auto", products="auto"):
    """Solve dy/dt = func(t, y) with PETSc TS; gradients by TSAdjoint (discrete adjoint).

    Follows torchdiffeq's convention: returns the solution at every time in ``t``, a tensor of
    shape ``(len(t), *y0.shape)``, differentiable w.r.t. ``y0`` and ``adjoint_params``.

    Args:
        func: ``func(t, y) -> dy/dt`` on torch tensors (t is a 0-d tensor); usually an nn.Module.
            A leading batch dimension of ``y0`` is handed to func as is. Bridged ops (Julia,
            finite differences, programs) may appear in it.
        y0: initial state, any shape, PETSc's scalar dtype (float64), on the CPU.
        t: strictly increasing output times (1-D); t[0] is the initial time.
        method: one of ``beuler``, ``cn``, ``theta``, ``arkimex`` (implicit, for stiff
            problems), ``rk4``, ``bosh3``, ``dopri5`` (explicit Runge-Kutta), ``bdf`` (forward
            only).
        step_size: fixed step (steps are clipped to land on every output time).
        steps_per_interval: fixed steps, this many equal ones in each output interval; with
            log-spaced ``t`` the steps grow geometrically, as stiff decays want.
        rtol, atol: tolerances of adaptive stepping, used when neither of the above is given
            (rk4 has no error estimate: give a step or choose another method).
        options: PETSc options for this solve, keyed without the leading dash, e.g.
            ``{"ts_adapt_type": "none", "ts_time_step": 1e-3, "ksp_type": "gmres"}``; ``True``
            switches a flag or viewer on (``{"ts_monitor": True}``). They override the command
            line, which overrides the keyword arguments, and stay in force for this solve's
            whole life (its adjoint included). Options PETSc never reads are reported (see
            ``bridges.petsc.set_unused_options``). The trajectory is kept in memory
            (``ts_trajectory_type memory``) unless options or the command line say otherwise.
        prefix: options prefix of this solver (e.g. ``"chem_"`` makes ``-chem_ts_type`` apply).
        adjoint_params: tensors func depends on that need gradients (default: func.parameters()).
        jacobian: how implicit methods get dfunc/dy. ``"blocks"``: each row along the last
            dimension of y0 is one sample whose n x n Jacobian block is assembled, and Newton
            steps solve with LU. ``"matrix-free"``: a PETSc Mat of Jacobian products, solved by
            GMRES (preconditioned by the blocks when n <= 64). ``"auto"`` (default): blocks when
            n <= 64 and a check with one product at y0 shows func treats samples independently,
            else matrix-free.
        products: how Jacobian products are formed. ``"forward"``: forward-mode AD (needs every
            op in func to have one); ``"reverse"``: reverse-mode AD, which every bridged op has
            (assembled blocks only); ``"fd"``: the finite-difference action J v ~ (f(u + h v) -
            f(u)) / h with PETSc MFFD's default step, for matrix-free Newton when some op has no
            forward mode (the adjoint still uses reverse mode); ``"auto"`` (default): forward
            mode where every op has one, else reverse mode (blocks) or fd (matrix-free).
    """
    if not callable(func):
        raise TypeError(f"{WHO}: func must be callable as func(t, y), got {type(func).__name__}")
    if not isinstance(y0, torch.Tensor):
        raise TypeError(f"{WHO}: y0 must be a torch.Tensor, got {type(y0).__name__}")
    check_tensor(y0, f"{WHO}: y0")
    if y0.numel() == 0:
        raise ValueError(f"{WHO}: y0 is empty")
    if method not in METHODS:
        raise ValueError(f"{WHO}: unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    t = torch.as_tensor(t, dtype=torch.float64)
    if t.ndim != 1 or t.numel() < 2:
        raise ValueError(f"{WHO}: t must be a 1-D sequence of at least 2 times (the initial time "
                         f"first), got shape {tuple(t.shape)}")
    if not bool((t[1:] > t[:-1]).all()):
        k = int(torch.nonzero(t[1:] <= t[:-1])[0])
        raise ValueError(f"{WHO}: times must strictly increase, but t[{k + 1}] = "
                         f"{t[k + 1].item():g} follows t[{k}] = {t[k].item():g}")
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
    if method == "rk4" and not fixed and not (options or {}).get("ts_adapt_type"):
        raise ValueError(f"{WHO}: rk4 has no error estimate to adapt steps with; give step_size "
                         f"or steps_per_interval, or use an adaptive method such as 'dopri5'")
    if adjoint_params is None:
        adjoint_params = tuple(func.parameters()) if isinstance(func, torch.nn.Module) else ()
    params = tuple(adjoint_params)
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{WHO}: adjoint_params[{i}] is a {type(p).__name__}, not a tensor")
    if jacobian not in JACOBIANS:
        raise ValueError(f"{WHO}: unknown jacobian {jacobian!r}; valid: {', '.join(JACOBIANS)}")
    if products not in PRODUCTS:
        raise ValueError(f"{WHO}: unknown products {products!r}; valid: {', '.join(PRODUCTS)}")
    problem = _ODEProblem(func, params, method, step_size, steps_per_interval, rtol, atol, options,
                          prefix, jacobian, products)
    return _ODEINT(y0, t, problem, *params)
