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
from .._errors import ForeignError, SolverFailure, check_finite
from .._linearise import DenseLinearisation, Linearisation, acts_on_rows, evaluate, probe
from ._capi import set_pre_stage, trajectory_prefix
from ._checkpoint import MEMORYLESS, Recomputation, StepLog, budget
from ._grid import SerialLayout
from ._jacobian import TorchJacobian, block_jacobian
from ._linear import check_solution, use_block_lu
from ._options import SolverOptions, check_options
from ._runtime import PETSc, destroy, diverged, petsc_errors
from ._solve import _assembler, multigrid_defaults
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
JACOBIANS = ("auto", "assembled", "blocks", "matrix-free")
PRODUCTS = ("auto", "forward", "reverse", "fd")
BLOCK_LIMIT = 64  # largest per-sample system whose Jacobian blocks are assembled by default
NEWTON_TOLERANCE = 1e-3  # adaptive steps: Newton's first update, in units of the tolerances,
NEWTON_REMAINDER = 3e-2  # and its estimated remaining error after later ones
# grids of at least this many unknowns precondition implicit steps with geometric multigrid:
# in benchmarks/bench_reaction_diffusion.py its iterations stay flat (5 per solve up to 10^6
# unknowns, ILU's grow to 23), ILU is faster below, the two take about the same time above
MULTIGRID_FROM = 1 << 18
WHO = "odeint_adjoint"
COLLAPSE = 64 * np.finfo(np.float64).eps  # a step below this times |t| makes no progress


class _ODEProblem:
    """Everything fixed across solves: the function, its parameters, the solver settings."""

    def __init__(self, func, params, method, step_size, steps_per_interval, rtol, atol, options,
                 prefix, jacobian, products, assembler, grid, checkpoints):
        self.func, self.params = func, params
        self.checkpoints = checkpoints  # states the adjoint may store (None: every step)
        self.ts_type, self.scheme, self.form = METHODS[method]
        self.method, self.step_size, self.rtol, self.atol = method, step_size, rtol, atol
        self.steps_per_interval = steps_per_interval
        self.fixed = step_size is not None or steps_per_interval is not None
        self.options, self.prefix = options, prefix
        self.jacobian, self.products = jacobian, products
        self.assembler, self.grid = assembler, grid
        self._t = self._t_tensor = None

    def rhs(self, t, y):
        if t != self._t:  # one 0-d tensor per time: a step's stages and iterations share it
            self._t, self._t_tensor = t, torch.scalar_tensor(t, dtype=y.dtype)
        return self.func(self._t_tensor, y)

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
            values.update(ts_arkimex_fully_implicit=True,
                          ts_arkimex_initial_guess_extrapolate=True)  # fewer Newton iterations
        if not self.fixed:  # a step whose Newton solve fails is retried smaller
            values.update(ts_rtol=self.rtol, ts_atol=self.atol, ts_max_snes_failures=-1,
                          ts_max_step_rejections=-1)
        if record:  # PETSc's default trajectory writes files
            values["ts_trajectory_type"] = "memory"
        if self.form == "implicit":  # full Newton steps: PETSc's backtracking measures
            # progress by |F|, which badly scaled states (ROBER) stall at rounding, and the
            # step size already controls Newton
            values.update(snes_rtol=1e-10, snes_atol=1e-14, snes_max_it=50, ksp_rtol=1e-12,
                          ksp_atol=1e-50, snes_linesearch_type="basic")
        return values


class _ODESolve:
    """One forward solve and its adjoint: the TS, its matrices, vectors, trajectory and options.

    PETSc holds its callbacks (bound methods of this object), so the two form a cycle that only
    `release` breaks; `_Pullback` calls it when it dies. On a grid, func sees each rank's
    ghosted block and returns its owned block; the state vectors are the grid's."""

    def __init__(self, problem, y0, times, record):
        self.p, self.times, self.record = problem, times, record
        self.layout = problem.grid or SerialLayout(y0.shape)
        self.shape = self.layout.owned_shape
        self.y0 = y0.clone(memory_format=torch.contiguous_format)
        self.steps = self.log = None
        self.store_all = record and problem.checkpoints is None  # PETSc's trajectory
        self.ts = self.u = self.F = self.jac_mat = self.jacp_mat = self.blocks = self.jac = None
        self.dm = None
        self._last_linearisation, self._jacp_point = [], None
        self.dense = self.stacked = self.chord = False
        self.block_lu = None
        self._states, self._newton_size = None, 0.0
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
        except BaseException:
            self.release()
            raise

    def _set_up(self):
        p, layout = self.p, self.layout
        self.u, self.F = layout.global_vec(), layout.global_vec()
        self._check_func(float(self.times[0]))
        self.jac = TorchJacobian(layout.ghosted_shape, layout=layout)
        self.jac_mat = self.jac.mat()
        # parameter Jacobian: state rows by columns that give every rank its own copy of the
        # parameters, so TSAdjoint accumulates each rank's share without communication
        self.n_params = max(sum(q.numel() for q in p.params), 1)
        n = int(np.prod(self.shape))
        self.jacp_mat = PETSc.Mat().createPython([(n, None), (self.n_params, None)], self,
                                                 comm=layout.comm)
        self.jacp_mat.setUp()
        ts = self.ts = PETSc.TS().create(comm=layout.comm)
        ts.setOptionsPrefix(self.options.prefix)
        if layout.dm is not None:
            # a clone of the grid's DMDA (same layout): PETSc keeps a TS's callbacks on its DM,
            # so two live solves on one grid must not share it (the adjoint of one would call
            # the other's callbacks, or freed ones)
            self.dm = layout.dm.clone()
            ts.setDM(self.dm)
        if p.form == "explicit":
            ts.setRHSFunction(self._rhs_function, self.F)
            ts.setRHSJacobian(self._rhs_jacobian, self.jac_mat)  # the adjoint's transposes
            ts.setRHSJacobianP(self._jacobian_p, self.jacp_mat)
        else:
            ts.setIFunction(self._ifunction, self.F)
            self._set_ijacobian(ts)
            ts.setIJacobianP(self._jacobian_p, self.jacp_mat)
            # adaptive steps: one Jacobian per step (chord Newton; a step whose Newton solve
            # fails is retried smaller, with a fresh Jacobian), converged in the tolerances'
            # norm; fixed steps: full Newton to snes_rtol
            self.chord, self._new_step, self._shift = not p.fixed, True, None
            ts.setPreStep(self._pre_step)
            # Newton converges in the tolerances' norm, fixed steps too: a test on |F| alone
            # stops with state errors of |F| * h, which at steps of 1e10 are no errors of F
            ts.getSNES().setConvergenceTest(self._newton_converged)
        self.outputs = _Outputs(self.layout.owned_view)
        if self.record and not self.store_all:  # checkpointed: keep the steps, not the states
            self.log = StepLog(self.outputs, p.fixed,
                               restart=None if p.ts_type in MEMORYLESS else self.restart_step)
        ts.setPostStep(self.log or self.outputs)
        if self.store_all:
            ts.setSaveTrajectory()
            trajectory_prefix(ts, self.options.prefix)
        with petsc_errors(WHO, "setting up PETSc TS from the options"):
            ts.setFromOptions()
        self._restarting, self._pre_stage = False, None
        if ts.getType() == "arkimex" and p.form == "implicit":
            self._pre_stage = set_pre_stage(ts, self._stage_begins)
        user_step = self.options.given.keys() & {"ts_time_step", "ts_dt"} or \
            self.options.inherited.keys() & {"ts_time_step", "ts_dt"}
        if p.fixed or user_step:
            self.dt0 = ts.getTimeStep()  # the first step in force (options win over defaults)
        else:
            self.dt0 = self._starting_step()

    def _check_func(self, t0):
        """func at (t0, y0), once: its output must have the state's (owned) shape and be finite."""
        self._owned(self.u, "w").copy_(self.y0)
        with torch.no_grad():
            value = self.p.rhs(t0, self._ghosted(self.u))
        where = "this rank's owned block" if self.layout.dm is not None else "y0"
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{WHO}: func(t, y) must return a torch.Tensor (dy/dt), got "
                            f"{type(value).__name__}")
        if tuple(value.shape) != tuple(self.shape):
            raise ValueError(f"{WHO}: func(t, y) returned shape {tuple(value.shape)} at "
                             f"t = {t0:g}, but dy/dt must have the shape of {where}, "
                             f"{tuple(self.shape)}")
        check_finite(value, f"{WHO}: func(t, y) at t = {t0:g} (y = y0)",
                     "check func for a division by zero, a log or sqrt of a negative number, "
                     "or an overflow", error=ForeignError)

    def _starting_step(self, order=2):
        """A first step for adaptive integration (Hairer, Norsett and Wanner's estimate from two
        evaluations of func): small where the solution changes fast in the tolerance's norm."""
        t0, interval = float(self.times[0]), float(self.times[1] - self.times[0])
        scale = self.p.atol + self.p.rtol * self.y0.abs()
        comm = self.layout.comm.tompi4py() if self.layout.size > 1 else None

        def rms(x):
            total, count = float(x.square().sum()), x.numel()
            if comm is not None:
                total, count = comm.allreduce(total), comm.allreduce(count)
            return (total / count) ** 0.5

        def f(t, y):
            self._owned(self.u, "w").copy_(y)
            with torch.no_grad():
                return self.p.rhs(t, self._ghosted(self.u)).reshape(y.shape).clone()
        f0 = f(t0, self.y0)
        d0, d1 = rms(self.y0 / scale), rms(f0 / scale)
        h0 = 1e-6 * interval if min(d0, d1) < 1e-5 else 0.01 * d0 / d1
        h0 = min(h0, interval)
        d2 = rms((f(t0 + h0, self.y0 + h0 * f0) - f0) / scale) / h0
        largest = max(d1, d2)
        h1 = max(1e-6 * h0, 1e-3 * h0) if largest <= 1e-15 else \
            (0.01 / largest) ** (1.0 / (order + 1))
        step = min(100 * h0, h1, interval)
        if not np.isfinite(step) or step <= 0:
            raise ForeignError(f"{WHO}: func gave non-finite values at t = {t0:g} or just after; "
                               f"cannot choose a first step (give options "
                               f"{{'ts_time_step': ...}} or check func)")
        return step

    def _set_ijacobian(self, ts):
        """Jacobian structure and product mode of an implicit method (see odeint_adjoint)."""
        p = self.p
        jacobian, products = p.jacobian, p.products
        if jacobian == "auto":
            block = self.shape[-1] if self.y0.ndim else 1
            jacobian = "assembled" if p.assembler is not None else \
                "blocks" if block <= BLOCK_LIMIT else "matrix-free"
        fn = self._rhs_at(float(self.times[0]))
        self.layout.owned_view(self.u, "w").copy_(self.y0)
        u0 = self.layout.exchange(self.u).clone()
        if products == "fd" and jacobian != "matrix-free":
            raise ValueError(f"{WHO}: products='fd' is a matrix-free action; use it with "
                             f"jacobian='matrix-free', or products 'forward'/'reverse'")
        if jacobian == "assembled":
            self.blocks = p.assembler
        elif jacobian == "blocks":
            self.blocks = block_jacobian(self.shape, mode=products)
            if p.jacobian == "auto" and not self._rows_independent(fn):
                jacobian = "matrix-free"  # samples are coupled: blocks would be inexact
        self.assembled = jacobian in ("assembled", "blocks")
        # one small system of plain torch: its whole Jacobian comes from one reverse pass per
        # point (see DenseLinearisation)
        n = self.y0.numel()
        self.dense = (jacobian == "blocks" and n == self.blocks.n_in and products != "forward"
                      and n <= BLOCK_LIMIT and not probe(fn, u0, WHO).bridged)
        self.stacked = self.dense and acts_on_rows(fn, u0)
        block_lu = False  # blocks: solved by their pivoted LU factors (see _linear.BlockLU)
        if self.assembled:
            ts.setIJacobian(self._ijacobian, self.blocks.mat, self.blocks.mat)
            # a sparse Jacobian: GMRES with PETSc's default PC
            block_lu = jacobian == "blocks"
            defaults = {"ksp_type": "preonly" if block_lu else "gmres"}
            if jacobian == "assembled" and self.layout.dm is not None:  # multigrid where it
                unknowns = int(np.prod(self.layout.shape)) * self.layout.dof  # measured faster
                defaults.update(multigrid_defaults(self.layout, unknowns >= MULTIGRID_FROM))
        else:
            if products == "reverse":
                raise ValueError(f"{WHO}: a matrix-free Jacobian needs J v, which reverse mode "
                                 f"cannot give; use products 'forward', 'fd' or 'auto', or "
                                 f"jacobian='blocks' or 'assembled'")
            caps = probe(fn, u0, WHO)
            if products == "forward" and not caps.forward:
                raise ValueError(f"{WHO}: products='forward' needs a forward-mode rule for "
                                 f"every op in func; one has none. Use 'fd' or 'auto'")
            fd = products == "fd" or (products == "auto" and not caps.forward)
            self.jac.products = "fd" if fd else "forward"
            # a small per-sample system still preconditions with its blocks
            if self.blocks is None and self.layout.dm is None and self.y0.ndim and \
                    self.shape[-1] <= BLOCK_LIMIT and p.jacobian != "matrix-free":
                self.blocks = block_jacobian(self.shape, mode=products)
            self.pmat = self.jac_mat if self.blocks is None else self.blocks.mat
            ts.setIJacobian(self._ijacobian, self.jac_mat, self.pmat)
            block_lu = self.blocks is not None
            defaults = {"ksp_type": "gmres"} if block_lu else \
                {"ksp_type": "gmres", "pc_type": "none"}
        for key, value in defaults.items():  # below the user's options and the command line
            if self.options[key] is None:
                PETSc.Options()[self.options.prefix + key] = value
                self.options.keys.append(key)
        if block_lu and self.options["pc_type"] is None:  # options may still choose another PC
            self.block_lu = use_block_lu(ts.getSNES().getKSP(), WHO)

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
    def _owned(self, vec, mode="r"):
        return self.layout.owned_view(vec, mode)

    def _ghosted(self, vec):
        return self.layout.exchange(vec)

    def _rhs_function(self, ts, t, U, F):
        with torch.no_grad():
            self._owned(F, "w").copy_(self.p.rhs(t, self._ghosted(U)))

    def _rhs_jacobian(self, ts, t, U, A, P):
        self.jac.at(self._rhs_at(t), self._ghosted(U).clone())

    def _ifunction(self, ts, t, U, Udot, F):
        if self._restarting:  # see restart_step
            t = ts.getTime()
        value = evaluate(self.p.rhs, t, self._ghosted(U))
        torch.sub(self._owned(Udot), value, out=self._owned(F, "w"))

    def _ijacobian(self, ts, t, U, Udot, shift, A, P):
        # the chord method: this step's Jacobian for every stage and iteration, unless PETSc
        # changed the matrices since (ARKIMEX rescales them when it solves for the first
        # stage's derivative)
        if self.chord and not self._new_step and shift == self._shift and \
                self._states == (A.stateGet(), P.stateGet()):
            return
        self._new_step, self._shift = False, shift
        lin = self._linearisation(t, self._ghosted(U))
        if self.dense:
            self.blocks.set_dense(lin.jacobian, diag_shift=shift, factor=-1.0)
        else:
            if not self.assembled:
                self.jac.at(lin.fn, lin.u, diag_shift=shift, factor=-1.0)
            if self.blocks is not None:
                self.blocks.assemble(lin.fn, lin.u, diag_shift=shift, factor=-1.0,
                                     out_shape=self.shape, linearisation=lin)
        self._states = (A.stateGet(), P.stateGet())

    def _linearisation(self, t, u):
        """func linearised at (t, u), shared by the Jacobian and parameter-Jacobian products
        PETSc asks for at the same point (one evaluation of func for both). The last two points
        are kept: a Crank-Nicolson adjoint step asks for both ends of its step, in turn."""
        for last_t, point in self._last_linearisation:
            if last_t == t and torch.equal(point.u, u):
                return point
        point = DenseLinearisation(self._rhs_at(t), u.clone(), self.stacked) if self.dense \
            else Linearisation(self._rhs_at(t), u.clone())
        self._last_linearisation = [(t, point)] + self._last_linearisation[:1]
        return point

    def restart_step(self):
        """Start the next step afresh (no data from the step before). ARKIMEX then solves
        F(t, y, slope) = 0 for the first stage's slope, but at the time of the last stage it
        computed, forward or adjoint, not at the step's start: until the step's first stage
        begins, func gets the step's start time."""
        self.ts.restartStep()
        self._restarting = self._pre_stage is not None

    def _stage_begins(self):
        self._restarting = False

    def _pre_step(self, ts):
        self._new_step = True

    def _newton_converged(self, snes, it, norms):
        """Newton's convergence in the integrator's own norm: s_k = RMS(dx_k / (atol + rtol
        |x|)) of the k-th update (a norm of the whole vector would leave small components,
        y ~ 1e-8 beside y ~ 1, unconverged). Converged when s_1 <= NEWTON_TOLERANCE, or, with
        the observed rate q = s_k / s_(k-1) < 1, when the remaining error q / (1 - q) s_k is
        below NEWTON_REMAINDER, or when every component's update is down to rounding
        (|dx_i| <= 1e-13 |x_i|). Diverged when q >= 1, unless the updates have stalled at the
        rounding floor (|dx| <= 1e-12 |x|, or within the tolerances for a fixed step); an
        adaptive step is then retried smaller, with a fresh Jacobian, while a fixed step, which
        cannot be, iterates on (up to snes_max_it)."""
        xnorm, step, fnorm = norms
        reason = PETSc.SNES.ConvergedReason
        if not np.isfinite(fnorm):
            return reason.DIVERGED_FNORM_NAN
        if fnorm == 0.0:
            return reason.CONVERGED_FNORM_ABS
        if it == 0:
            check_progress(self.ts, self.outputs.times)
            return 0
        x, dx = self._owned(snes.getSolution()), self._owned(snes.getSolutionUpdate())
        if step <= 1e-14 * xnorm and _on_every_rank(snes.getComm(),
                                                   bool((dx.abs() <= 1e-13 * x.abs()).all())):
            return reason.CONVERGED_SNORM_RELATIVE  # every component down to rounding
        scaled = float((dx / (self.p.atol + self.p.rtol * x.abs())).square().sum())
        count = dx.numel()
        if self.layout.size > 1:
            scaled, count = (self.layout.comm.tompi4py().allreduce(v) for v in (scaled, count))
        size, previous = (scaled / count) ** 0.5, self._newton_size
        self._newton_size = size
        if it == 1:
            return reason.CONVERGED_SNORM_RELATIVE if size <= NEWTON_TOLERANCE else 0
        rate = size / previous
        if rate >= 1.0:  # no progress: converged if already at the rounding floor (of the
            # whole state, or within the tolerances for a fixed step); a fixed step cannot be
            # retried smaller, so its Newton iterations go on (up to snes_max_it)
            if step <= 1e-12 * xnorm or (self.p.fixed and size <= 1.0):
                return reason.CONVERGED_SNORM_RELATIVE
            return 0 if self.p.fixed else reason.DIVERGED_DTOL
        if rate / (1.0 - rate) * size <= NEWTON_REMAINDER:
            return reason.CONVERGED_SNORM_RELATIVE
        return 0

    def _jacobian_p(self, ts, t, U, *rest):  # RHS form: (A); implicit form: (Udot, shift, A)
        self._jacp_point = self._linearisation(t, self._ghosted(U))

    def multTranspose(self, mat, x, y):
        """This rank's share of (d func / d params)^T x at the state PETSc passed to the
        JacobianP callback (not a value saved from another callback: wrong for implicit
        methods)."""
        out = vec_as_tensor(y, "w")
        if not self.p.params:
            out.zero_()
            return
        sign = 1.0 if self.p.form == "explicit" else -1.0  # implicit: dF/dp = -dfunc/dp
        grads = self._jacp_point.param_vjp(self.p.params, self._owned(x))
        offset = 0
        for param, g in zip(self.p.params, grads):
            part = out[offset:offset + param.numel()]
            torch.mul(g.view(-1), sign, out=part) if g is not None else part.zero_()
            offset += param.numel()

    # -- forward and adjoint --------------------------------------------------------------------
    def solve(self):
        """Integrates from times[0] through every output time; returns (len(t), *shape)."""
        ts, times = self.ts, self.times
        self._owned(self.u, "w").copy_(self.y0)
        ts.setTime(float(times[0]))
        ts.setStepNumber(0)
        ts.setMaxTime(float(times[-1]))
        self.outputs.start(ts, times, self.y0, self.p.steps_per_interval, self.dt0)
        self.restart_step()  # as TSSolve does at step 0
        if self.log:
            self.log.start(float(times[0]))
        with petsc_errors(WHO, f"the forward solve (PETSc TS '{ts.getType()}')"):
            ts.solve(self.u)
        self._check(ts.getConvergedReason(), "the forward solve")
        recorded, values = self.outputs.steps, self.outputs.values
        self.outputs.values = []
        if len(recorded) != len(times):
            steps, limit = ts.getStepNumber(), ts.getMaxSteps()
            why = (f"after its maximum of {limit} steps; raise it with options "
                   f"{{'ts_max_steps': ...}}, or loosen rtol/atol" if steps >= limit else
                   f"after {steps} steps; check the step options")
            raise ForeignError(f"{WHO}: PETSc TS reached {len(recorded)} of {len(times)} output "
                               f"times: it stopped at t = {ts.getTime():.6g} {why}")
        self.steps = recorded
        ys = torch.stack(values)
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
            raise ForeignError(f"{WHO}: PETSc TS '{ts.getType()}' (chosen by options or the "
                               f"command line) has no discrete adjoint, so no gradient; use one "
                               f"of the methods {', '.join(m for m in METHODS if m != 'bdf')}")
        if self.steps is None:  # the trajectory went with an earlier adjoint: solve again
            self.solve()
        cotangents = grad_ys if batched else grad_ys.unsqueeze(0)
        chord, self.chord = self.chord, False  # the adjoint: exact Jacobians
        ksp = ts.getSNES().getKSP()
        if self.block_lu is None and self.log is None:  # (BlockLU checks and refines its
            ksp.setPostSolve(self._check_adjoint_solve)  # own transposed solves)
        want_params = any(needs_input_grad[3:])
        lams = [self.layout.global_vec() for _ in cotangents]
        mus = [PETSc.Vec().createMPI((self.n_params, None), comm=self.layout.comm)
               for _ in cotangents] if want_params else []
        try:
            for lam, mu, g in zip(lams, mus or lams, cotangents):
                self._owned(lam, "w").copy_(g[-1])
                if want_params:
                    mu.zeroEntries()
            ts.setCostGradients(lams, mus or None)
            if self.log is None:  # PETSc's trajectory of every step
                for k in range(len(self.steps) - 1, 0, -1):
                    ts.adjointSetSteps(self.steps[k] - self.steps[k - 1])
                    with petsc_errors(WHO, f"the adjoint solve (PETSc TS '{ts.getType()}')"):
                        ts.adjointSolve()
                    self._check(ts.getConvergedReason(), "the adjoint solve")
                    for lam, g in zip(lams, cotangents):
                        self._owned(lam, "rw").add_(g[k - 1])
                self.steps = None  # TSAdjoint consumed the trajectory
            else:  # recomputed from checkpoints; each output's cotangent added at its step
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
        finally:
            destroy(*lams, *mus)  # TS does not own its cost gradients
            ksp.setPostSolve(None)
        self.chord = chord
        self.options.report_unused(final=True)
        if not batched:
            grad_y0, grad_params = grad_y0[0], [g if g is None else g[0] for g in grad_params]
        return (grad_y0, None, None, *grad_params)

    def _check_adjoint_solve(self, ksp, b, x):
        check_solution(ksp, b, x, WHO, f"a transposed (adjoint) solve at t = "
                       f"{self.ts.getTime():.6g}", transpose=True)

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
        destroy(self.ts, self.dm, self.u, self.F, self.jac_mat, self.jacp_mat,
                None if self.blocks is None or self.blocks is self.p.assembler else
                self.blocks.mat)
        self.ts = self.dm = self.u = self.F = self.jac_mat = self.jacp_mat = self.blocks = None
        self.jac = self._jacp_point = self.block_lu = None  # closures over self; cached views
        self._last_linearisation = []
        self.layout.release_views()
        self.options.close()


class _Outputs:
    """The TS post-step hook that lands steps on the output times and keeps the solution at
    each. (PETSc's evaluation times are not used: PETSc 3.26 passes its closeness tolerance,
    1e-6 of the step, as a relative one, so with steps beyond about 1e4 it stores a solution
    far from the time asked for.) It holds no reference to the TS or the solve."""

    def __init__(self, owned):
        self.owned = owned  # Vec -> torch view of this rank's part
        self.values = []

    def start(self, ts, times, y0, per_interval, dt):
        self.times, self.per_interval = times, per_interval
        self.steps, self.values = [0], [y0.clone()]
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
        check_progress(ts, times, self.owned(ts.getSolution(), "r"))
        t, dt = ts.getTime(), ts.getTimeStep()
        if abs(t - times[k]) <= 1e-12 * max(abs(times[k]), times[k] - times[k - 1]):
            ts.setTime(float(times[k]))  # rounding off the last step; ends the solve exactly
            self.steps.append(ts.getStepNumber())
            self.values.append(self.owned(ts.getSolution(), "r").clone())
            if k + 1 == len(times):
                return
            k, t = k + 1, float(times[k])
            if self.per_interval:
                dt = (times[k] - times[k - 1]) / self.per_interval
        ts.setTimeStep(self._toward(k, t, dt))


def _on_every_rank(comm, flag: bool) -> bool:
    """Whether `flag` holds on every rank of `comm` (so that all ranks decide alike)."""
    if comm.getSize() == 1:
        return flag
    return comm.tompi4py().allreduce(int(not flag)) == 0


def check_progress(ts, times, state=None):
    """Stop a solve that cannot succeed, at once: a step size collapsed to a few rounding
    units of t (a blow-up, a singularity, or Newton failing at every step size), or a
    non-finite state."""
    t, dt = ts.getTime(), ts.getTimeStep()
    if state is not None and not _on_every_rank(ts.getComm(),
                                                bool(torch.isfinite(state).all())):
        raise SolverFailure(f"{WHO}: the solution became non-finite (nan/inf) at t = {t:.10g} "
                            f"(PETSc TS '{ts.getType()}', step size {dt:.3g}); the problem may "
                            f"blow up there, or the method may be unstable at this step size")
    if dt > COLLAPSE * abs(t):
        return
    size = vec_as_tensor(ts.getSolution(), "r").abs().max()
    raise SolverFailure(
        f"{WHO}: the step size collapsed to {dt:.3g} at t = {t:.17g} (output times "
        f"{times[0]:g} to {times[-1]:g}), after {ts.getStepNumber()} steps and "
        f"{ts.getStepRejections()} rejections; the largest |y| there is {float(size):.3g}. The "
        f"solution probably blows up (or func is singular) near t = {t:.6g}. What to try: "
        f"end the integration before that time, or check func there")


class _Pullback:
    """The op's pullback; when it is released (after backward, or with the outputs), the
    solve's PETSc objects are destroyed."""

    def __init__(self, run):
        self.run = run
        weakref.finalize(self, run.release)

    batched = True  # under vmap, one adjoint sweep for every cotangent

    def __call__(self, *grad_ys, needs_input_grad, batched=False):
        return self.run.pullback(*grad_ys, needs_input_grad=needs_input_grad, batched=batched)


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
def odeint_adjoint(func, y0, t, *, method="arkimex", step_size=None, steps_per_interval=None,
                   rtol=1e-6, atol=1e-8, options=None, prefix=None, adjoint_params=None,
                   jacobian="auto", products="auto", sparsity=None, grid=None, checkpoints=None):
    """Solve dy/dt = func(t, y) with PETSc TS; gradients by TSAdjoint (discrete adjoint).

    Follows torchdiffeq's convention: returns the solution at every time in ``t``, a tensor of
    shape ``(len(t), *y0.shape)``, differentiable w.r.t. ``y0`` and ``adjoint_params``.

    Args:
        func: ``func(t, y) -> dy/dt`` on torch tensors (t is a 0-d tensor); usually an nn.Module.
            A leading batch dimension of ``y0`` is handed to func as is. Bridged ops (Julia,
            finite differences, programs) may appear in it. On a grid, func receives this
            rank's ghosted block and returns dy/dt on its owned block.
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
        options: PETSc options for this solve, keyed without the leading dash, e.g.
            ``{"ts_adapt_type": "none", "ts_time_step": 1e-3, "ksp_type": "gmres"}``; ``True``
            switches a flag or viewer on (``{"ts_monitor": True}``). They override the command
            line, which overrides the keyword arguments, and stay in force for this solve's
            whole life (its adjoint included). Options PETSc never reads are reported (see
            ``bridges.petsc.set_unused_options``). The trajectory is kept in memory
            (``ts_trajectory_type memory``) unless options or the command line say otherwise.
        prefix: options prefix of this solver (e.g. ``"chem_"`` makes ``-chem_ts_type`` apply).
        adjoint_params: tensors func depends on that need gradients (default: func.parameters()).
        jacobian: how implicit methods get dfunc/dy. ``"assembled"`` (with sparsity or grid): the
            exact sparse Jacobian from one product per colour, solved by GMRES with PETSc's
            default PC (ILU on one rank, block Jacobi on many; any PC through options: gamg,
            mg on a grid, lu, ...). ``"blocks"``: each row along the last dimension of y0 is one
            sample whose n x n Jacobian block is assembled, and Newton steps solve with LU.
            ``"matrix-free"``: a PETSc Mat of Jacobian products, solved by GMRES
            (preconditioned by the blocks when n <= 64). ``"auto"`` (default): assembled with
            sparsity or a grid, else blocks when n <= 64 and a check with one product at y0
            shows func treats samples independently, else matrix-free.
        products: how Jacobian products are formed. ``"forward"``: forward-mode AD (needs every
            op in func to have one); ``"reverse"``: reverse-mode AD, which every bridged op has
            (assembled blocks only); ``"fd"``: the finite-difference action J v ~ (f(u + h v) -
            f(u)) / h with PETSc MFFD's default step, for matrix-free Newton when some op has no
            forward mode (the adjoint still uses reverse mode); ``"auto"`` (default): forward
            mode where every op has one, else reverse mode (blocks) or fd (matrix-free).
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
    if not callable(func):
        raise TypeError(f"{WHO}: func must be callable as func(t, y), got {type(func).__name__}")
    if not isinstance(y0, torch.Tensor):
        raise TypeError(f"{WHO}: y0 must be a torch.Tensor, got {type(y0).__name__}")
    check_tensor(y0, f"{WHO}: y0")
    if y0.numel() == 0:
        raise ValueError(f"{WHO}: y0 is empty")
    check_finite(y0, f"{WHO}: y0", "the initial state must be finite")
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
    assembler = _assembler(WHO, sparsity, grid, y0.numel())
    if assembler is not None and grid is None:
        grid = getattr(assembler, "grid", None)  # a stencil_sparsity's one-rank grid
    if grid is not None:
        grid._check_owned(y0, f"{WHO}: y0")
    if jacobian == "assembled" and assembler is None:
        raise ValueError(f"{WHO}: jacobian='assembled' needs sparsity= (the pattern of "
                         f"dfunc/dy, e.g. stencil_sparsity(y0.shape)) or grid=")
    if jacobian == "blocks" and grid is not None:
        raise ValueError(f"{WHO}: jacobian='blocks' is for independent samples; on a grid use "
                         f"'assembled' or 'matrix-free'")
    unknowns = int(np.prod(grid.shape)) * grid.dof if grid is not None else y0.numel()
    states = budget(WHO, checkpoints, unknowns)
    if states is not None and any(k.startswith("ts_trajectory") for k in options or {}):
        raise ValueError(f"{WHO}: checkpoints= replaces PETSc's trajectory; drop the "
                         f"ts_trajectory_* options, or checkpoints")
    problem = _ODEProblem(func, params, method, step_size, steps_per_interval, rtol, atol, options,
                          prefix, jacobian, products, assembler, grid, states)
    return _ODEINT(y0, t, problem, *params)
