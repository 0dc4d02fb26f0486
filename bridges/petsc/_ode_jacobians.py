"""The Jacobians of an ODE solve as PETSc's TS asks for them: dfunc/dy for Newton and the adjoint
(assembled from coloured products, as per-sample dense blocks, or matrix-free), and dfunc/dparams
for TSAdjoint, sharing one linearisation of func per point.

Newton's Jacobian follows the chord method: one per step for the stages and iterations of an
adaptive step; `chord = False` (fixed steps, the adjoint) gives the exact Jacobian at every point
asked for. (Keeping a small system's dfunc/dy across steps, as CVODE does, was measured and
dropped: on ROBER and HIRES it saved 20-40 % of the Jacobians but added 3-7 % Newton iterations,
no faster in all, and a checkpointed forward could no longer be recomputed exactly.)
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .._linearise import DenseLinearisation, Linearisation, acts_on_rows, probe, probe_points
from ._jacobian import TorchJacobian, block_jacobian, plan_jacobian
from ._linear import use_block_lu
from ._runtime import PETSc
from ._solve import multigrid_defaults
from ._vec import VecViews, as_vec

BLOCK_LIMIT = 64  # largest per-sample system whose Jacobian blocks are assembled by default
# largest coupled system of plain torch (no sparsity, no grid) taken as one dense block: a
# matrix-free Krylov solve without a preconditioner crawls on stiff problems (a 1-D Brusselator
# of 400 states: 534 s against 4.6 s dense), and an n x n LU of this size takes milliseconds
DENSE_LIMIT = 1024
# grids of at least this many unknowns precondition implicit steps with geometric multigrid:
# in benchmarks/bench_reaction_diffusion.py its iterations stay flat (5 per solve up to 10^6
# unknowns, ILU's grow to 23), ILU is faster below, the two take about the same time above
MULTIGRID_FROM = 1 << 18


class ODEJacobians:
    """dfunc/dy and dfunc/dparams of one solve (`run`: its problem, layout, state vector and
    options), attached to its TS by `attach`."""

    def __init__(self, run, who):
        p, layout = run.p, run.layout
        self.p, self.layout, self.shape, self.who = p, layout, run.shape, who
        self.jac = TorchJacobian(layout.ghosted_shape, layout=layout)
        self.mat = self.jac.mat()
        self.params = ParameterJacobian(p.params, int(np.prod(self.shape)), layout.owned_view,
                                        1.0 if p.form == "explicit" else -1.0, layout.comm)
        self.blocks = self.block_lu = self.compiled = None
        self.dense = self.stacked = self.chord = self.per_sample = False
        self.watching = True  # per-sample blocks checked at every forward Jacobian
        self.paired = False  # an adjoint that wants parameter gradients (see rhs_jacobian)
        self.restarting = False  # ARKIMEX's restart: PETSc's time is stale (see restart_step)
        self.count = 0
        self.reset()

    def reset(self):
        """Before a forward solve: nothing kept from the last one."""
        self._points, self._states, self._shift, self._new_step = [], None, None, True
        self.count = 0
        self.params.views.clear()  # (the last adjoint's Vecs)

    def rhs_at(self, t):
        return lambda y: self.p.rhs(t, y)

    def attach(self, ts, run):
        """Register the callbacks with `ts` (`run` gives y0, the state vector and options)."""
        if self.p.form == "explicit":
            ts.setRHSJacobian(self.rhs_jacobian, self.mat)  # the adjoint's transposes
            ts.setRHSJacobianP(self.jacobian_p, self.params.mat)
            return
        self._plan(ts, run)
        ts.setIJacobianP(self.jacobian_p, self.params.mat)
        ts.setPreStep(self.new_step)
        # adaptive steps: chord Newton (a step whose Newton solve fails is retried smaller,
        # with a fresh Jacobian); fixed steps: a Jacobian at every Newton iteration
        self.chord = not self.p.fixed

    def _plan(self, ts, run):
        """Jacobian structure and product mode of an implicit method (see odeint_adjoint)."""
        p, layout, options = self.p, self.layout, run.options
        y0, fn = run.y0, self.rhs_at(float(run.times[0]))
        layout.owned_view(run.u, "w").copy_(y0)
        u0 = layout.exchange(run.u).clone()
        caps = probe(fn, u0, self.who)
        block = None if layout.dm is not None else self.shape[-1] if y0.ndim else 1
        independent = True
        # per-sample blocks (also kept to precondition a matrix-free Jacobian)
        if p.assembler is None and p.products != "fd" and (p.jacobian == "blocks" or (
                p.jacobian == "auto" and block <= BLOCK_LIMIT)):
            self.blocks = block_jacobian(self.shape, mode=p.products)
            independent = self._rows_independent(fn, y0)
            if p.jacobian == "blocks" and not independent:
                raise ValueError(f"{self.who}: jacobian='blocks' takes the samples (rows) of y0 "
                                 f"as independent, but func couples them (checked with one "
                                 f"Jacobian product at y0); use jacobian='auto' or "
                                 f"'matrix-free'")
        n = y0.numel()
        whole = p.jacobian == "auto" and p.assembler is None and layout.dm is None and \
            p.products != "fd" and not p.compile_jacobian and not caps.bridged and \
            n <= DENSE_LIMIT and (self.blocks is None or not independent)
        if whole:  # one coupled system of plain torch: its whole Jacobian as one dense block
            # (with bridged ops, n products per Jacobian could cost more than Krylov's few)
            if self.blocks is not None:
                self.blocks.destroy()
            self.blocks, block, independent = block_jacobian((n,), mode=p.products), n, True
        jacobian, products = plan_jacobian(self.who, p.jacobian, p.products,
                                           assembler=p.assembler, block=block,
                                           block_limit=n if whole else BLOCK_LIMIT,
                                           independent=independent, forward=caps.forward)
        if jacobian == "assembled":
            self.blocks = p.assembler
        self.assembled = jacobian in ("assembled", "blocks")
        # one small system of plain torch (not a batch, whose blocks come from one reverse
        # pass over their colours): its whole Jacobian from one reverse pass per point (see
        # DenseLinearisation)
        self.dense = (jacobian == "blocks" and block == n and products != "forward"
                      and n <= DENSE_LIMIT and not caps.bridged)
        self.per_sample = jacobian == "blocks" and block != n  # (see check_samples_at)
        self.stacked = self.dense and acts_on_rows(fn, u0)
        if p.compile_jacobian:
            if jacobian != "blocks" or caps.bridged:
                raise ValueError(
                    f"{self.who}: compile_jacobian=True is for small systems of plain torch: "
                    f"one (y0 of at most {BLOCK_LIMIT} entries) or a batch of independent "
                    f"samples (rows of at most {BLOCK_LIMIT}), without bridged ops; this "
                    f"solve's Jacobian is {'one with bridged ops' if caps.bridged else jacobian}. "
                    f"Drop compile_jacobian")
            self.compiled = CompiledJacobian.of(p.func, p.params, self.who,
                                                None if self.dense else self.shape)
        if self.assembled:
            ts.setIJacobian(self.ijacobian, self.blocks.mat, self.blocks.mat)
            block_lu = jacobian == "blocks"  # blocks: solved by their pivoted LU factors
            # a sparse Jacobian: GMRES with PETSc's default PC
            defaults = {"ksp_type": "preonly" if block_lu else "gmres"}
            if jacobian == "assembled" and layout.dm is not None:  # multigrid where it
                unknowns = int(np.prod(layout.shape)) * layout.dof  # measured faster
                defaults.update(multigrid_defaults(layout, unknowns >= MULTIGRID_FROM))
        else:
            self.jac.products = products
            ts.setIJacobian(self.ijacobian, self.mat,
                            self.mat if self.blocks is None else self.blocks.mat)
            block_lu = self.blocks is not None
            defaults = {"ksp_type": "gmres"} if block_lu else \
                {"ksp_type": "gmres", "pc_type": "none"}
            if not block_lu and n > DENSE_LIMIT and p.jacobian == "auto" and \
                    options["pc_type"] is None:
                warnings.warn(
                    f"{self.who}: func couples all {n} states (more than {DENSE_LIMIT}, the "
                    f"largest taken as one dense Jacobian) and no sparsity= or grid= says how, "
                    f"so implicit steps solve with matrix-free GMRES and no preconditioner, "
                    f"which can be many times slower on stiff problems. Pass the pattern of "
                    f"dfunc/dy (sparsity=, e.g. stencil_sparsity(shape)), or grid=, or a "
                    f"pc_type through options", stacklevel=2)
        for key, value in defaults.items():  # below the user's options and the command line
            if options[key] is None:
                PETSc.Options()[options.prefix + key] = value
                options.keys.append(key)
        if block_lu and options["pc_type"] is None:  # options may still choose another PC
            self.block_lu = use_block_lu(ts.getSNES().getKSP(), self.who)

    def check_samples_at(self, t, u):
        """Per-sample blocks were chosen by checks near y0: raise if func couples the samples
        at (t, u) (the end state, before the adjoint), where a coupling that switched on
        during the solve shows; the blocks would leave it out of every gradient."""
        if self.per_sample and not self._rows_independent(self.rhs_at(t), u):
            raise ValueError(f"{self.who}: func couples the samples (rows) of y at t = {t:g}, "
                             f"though not near y0, where the per-sample Jacobian blocks were "
                             f"chosen; the gradient would leave the coupling out. Pass "
                             f"jacobian='matrix-free' (or a sparsity=)")

    def _rows_independent(self, fn, y0):
        """Whether func acts on each sample (last-dimension row) of y on its own, so that the
        block-diagonal Jacobian is exact: checked with one reverse-mode product in a random
        direction against the assembled blocks, at y0 and at a random point near it (at y0
        alone, rows coupled by a term with zero derivative there, e.g. through y - mean(y)
        with equal rows, would pass)."""
        if y0.ndim <= 1:
            return True
        w = torch.randn(self.shape, dtype=y0.dtype, generator=torch.Generator().manual_seed(0))
        for u in probe_points(y0):
            exact = Linearisation(fn, u).vjp(w).reshape(-1)
            mat = self.blocks.assemble(fn, u)
            approx = torch.zeros_like(exact)
            mat.multTranspose(as_vec(w.reshape(-1).clone()), as_vec(approx))
            if not torch.allclose(approx, exact, rtol=1e-8,
                                  atol=1e-12 * float(exact.abs().max())):
                return False  # (a non-finite product too: the matrix-free path is safe)
        return True

    # -- PETSc callbacks (they record linearisation points; torch does the algebra) -------------
    def rhs_jacobian(self, ts, t, U, A, P):
        # TSAdjoint's Runge-Kutta step multiplies the transposes of dfunc/dy and dfunc/dparams
        # at each stage by the same vector: one backward pass forms both
        lin = self.linearisation(t, self.layout.exchange(U))
        self.jac.at(lin.fn, lin.u, linearisation=lin,
                    params=self.p.params if self.paired else ())

    def ijacobian(self, ts, t, U, Udot, shift, A, P):
        # the chord method: this step's Jacobian for every stage and iteration, unless PETSc
        # changed the matrices since (ARKIMEX rescales them when it solves for the first
        # stage's derivative)
        if self.chord and not self._new_step and shift == self._shift and \
                self._states == (A.stateGet(), P.stateGet()):
            return
        self._new_step, self._shift = False, shift
        self.count += 1
        if self.restarting:
            t = ts.getTime()
        lin = self.linearisation(t, self.layout.exchange(U))
        if self.dense:
            self.blocks.set_dense(lin.jacobian, diag_shift=shift, factor=-1.0)
        else:
            if not self.assembled:
                self.jac.at(lin.fn, lin.u, diag_shift=shift, factor=-1.0, linearisation=lin)
            if self.compiled is not None:  # (the blocks of a batch)
                self.blocks.set_blocks(lin.blocks, diag_shift=shift, factor=-1.0)
            elif self.blocks is not None:
                if self.per_sample and self.watching:  # a coupling may switch on anywhere
                    self.blocks.verify_next(always=True)
                self.blocks.assemble(lin.fn, lin.u, diag_shift=shift, factor=-1.0,
                                     out_shape=self.shape, linearisation=lin)
        self._states = (A.stateGet(), P.stateGet())

    def jacobian_p(self, ts, t, U, *rest):  # RHS form: (A); implicit form: (Udot, shift, A)
        self.params.at(self.linearisation(t, self.layout.exchange(U)))

    def new_step(self, ts):
        """TS pre-step: the chord method's next Jacobian."""
        self._new_step = True

    def linearisation(self, t, u):
        """func linearised at (t, u), shared by the Jacobian and parameter-Jacobian products
        PETSc asks for at the same point (one evaluation of func for both). The last two points
        are kept: a Crank-Nicolson adjoint step asks for both ends of its step, in turn."""
        for last_t, point in self._points:
            if last_t == t and torch.equal(point.u, u):
                return point
        if self.compiled is not None:
            point = CompiledLinearisation(self.compiled, self.rhs_at(t), u.clone(),
                                          torch.scalar_tensor(t, dtype=u.dtype))
        elif self.dense:
            point = DenseLinearisation(self.rhs_at(t), u.clone(), self.stacked)
        else:
            point = Linearisation(self.rhs_at(t), u.clone())
        self._points = [(t, point)] + self._points[:1]
        return point

    def release(self):
        """Free the matrices (the assembler's is the caller's) and the closures over func."""
        if self.blocks is not None and self.blocks is not self.p.assembler:
            self.blocks.mat.destroy()
        if self.mat is not None:
            self.mat.destroy()
        self.params.release()
        self.mat = self.blocks = self.jac = self.block_lu = None
        self._points = []


class ParameterJacobian:
    """Context of a python-type PETSc Mat for TSAdjoint: sign * dfunc/dparams at a
    linearisation point (`at`), of which PETSc only ever asks the transposed product. Its
    columns give every rank its own copy of the parameters, so TSAdjoint accumulates each
    rank's share without communication. `owned` maps a Vec to this rank's block."""

    def __init__(self, params, n_rows, owned, sign, comm):
        self.params, self.owned, self.sign = params, owned, sign
        self.n = max(sum(q.numel() for q in params), 1)
        self.point, self.products = None, 0
        self.reached = set()  # indices of the params some product depended on
        self.views = VecViews((self.n,))  # TSAdjoint writes into the same few Vecs each time
        self.mat = PETSc.Mat().createPython([(n_rows, None), (self.n, None)], self, comm=comm)
        self.mat.setUp()

    def at(self, point):
        """Products from now on are at `point` (a Linearisation, whose graph they share)."""
        self.point = point

    def multTranspose(self, mat, x, y):
        out = self.views.write(y).numpy()  # (numpy: a few small writes, each a torch op's cost)
        if not self.params:
            out[:] = 0.0
            return
        self.products += 1
        grads = self.point.param_vjp(self.params, self.owned(x, "r"))
        offset = 0
        for i, (param, g) in enumerate(zip(self.params, grads)):
            part = out[offset:offset + param.numel()]
            if g is None:
                part[:] = 0.0
            else:
                self.reached.add(i)
                np.multiply(g.numpy().reshape(-1), self.sign, out=part)
            offset += param.numel()

    def release(self):  # (not `destroy`: petsc4py calls a context's destroy(mat))
        if self.mat is not None:
            self.mat.destroy()
        self.views.clear()
        self.mat = self.point = None


def compiled_parameter_names(func, params, who):
    """func's names for `params`, after checking that compile_jacobian=True can serve: func is
    an nn.Module and params are among its parameters (they are passed to the compiled call)."""
    if not isinstance(func, torch.nn.Module):
        raise ValueError(f"{who}: compile_jacobian=True needs func to be a torch.nn.Module (its "
                         f"parameters are passed to the compiled function); got "
                         f"{type(func).__name__}. Drop compile_jacobian, or wrap func in a "
                         f"Module")
    named = {id(q): name for name, q in func.named_parameters()}
    missing = [i for i, q in enumerate(params) if id(q) not in named]
    if missing:
        raise ValueError(f"{who}: compile_jacobian=True differentiates func's own parameters, "
                         f"but adjoint_params{missing} are not among them. Register them on "
                         f"func (nn.Parameter), or drop compile_jacobian")
    return [named[id(q)] for q in params]


class CompiledJacobian:
    """dfunc/dy and dfunc/dparams of a small system, or of each sample of a batch, from one
    compiled call: torch.compile of torch.func.jacrev over (y, parameters), func called through
    functional_call (per sample under torch.func.vmap for a batch). Measured on ROBER: 90 us for
    both, against 270 us for dfunc/dy alone by the eager stacked reverse pass and about 150 us
    per eager parameter product; 155 us for a batch of 128 (its eager Jacobian callback: about
    550 us). The first call compiles (4-8 s)."""

    def __init__(self, func, params, names, batch_shape=None):
        self.params, self.names = params, names  # (names: func's for params, in their order)
        self.batch = None if batch_shape is None else batch_shape[-1]  # a sample's size
        if batch_shape is None:  # one system: the whole Jacobian
            def rhs(y, values, t):
                return torch.func.functional_call(func, values, (t, y))
            self.call = torch.compile(torch.func.jacrev(rhs, argnums=(0, 1)), dynamic=False,
                                      fullgraph=True)
            return
        row = (1,) * (len(batch_shape) - 1) + batch_shape[-1:]  # one sample, as func takes it

        def sample(y, values, t):
            return torch.func.functional_call(func, values, (t, y.view(row))).reshape(-1)
        self.call = torch.compile(torch.func.vmap(torch.func.jacrev(sample, argnums=(0, 1)),
                                                  in_dims=(0, None, None)), dynamic=False,
                                  fullgraph=True)  # (a graph break would leave it eager: slow)

    @classmethod
    def of(cls, func, params, who, batch_shape=None):
        """For one system (batch_shape None) or the samples (last-dimension rows) of a batch of
        that shape."""
        return cls(func, params, compiled_parameter_names(func, params, who), batch_shape)

    def __call__(self, u, t):
        """(dfunc/dy as (samples, n, n) blocks, [dfunc/dp as (samples, n, p.numel()) for p in
        params]) at (t, u); one system is one sample."""
        n = self.batch or u.numel()
        values = {name: q.detach() for name, q in zip(self.names, self.params)}
        try:
            jac_y, jac_p = self.call(u.reshape(-1, n) if self.batch else u, values, t)
        except Exception as exc:
            raise RuntimeError(f"compile_jacobian=True: torch.compile could not compile func's "
                               f"Jacobian in one graph ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}). func must be "
                               f"traceable without graph breaks (no Python branching on tensor "
                               f"values, no calls torch.compile cannot trace); or drop "
                               f"compile_jacobian to use the eager path") from exc
        return jac_y.reshape(-1, n, n), [jac_p[name].reshape(-1, n, q.numel())
                                         for name, q in zip(self.names, self.params)]


class CompiledLinearisation(Linearisation):
    """A point whose Jacobians come from a `CompiledJacobian`; parameter products are then
    products with the stored dfunc/dp."""

    def __init__(self, compiled, fn, u, t):
        super().__init__(fn, u)
        self.compiled, self.t = compiled, t
        self._jacobians = None

    def _both(self):
        if self._jacobians is None:
            self._jacobians = self.compiled(self.u, self.t)
        return self._jacobians

    @property
    def blocks(self):
        """dfunc/dy of each sample, (samples, n, n)."""
        return self._both()[0]

    @property
    def jacobian(self):
        """dfunc/dy of one system, (n, n)."""
        return self._both()[0][0]

    def param_vjp(self, params, w):  # (params: the compiled ones, see ODEJacobians)
        blocks = self.blocks
        w = w.reshape(blocks.shape[:2])
        return tuple(torch.einsum("bi,bip->p", w, jac).view(q.shape)
                     for q, jac in zip(params, self._both()[1]))
