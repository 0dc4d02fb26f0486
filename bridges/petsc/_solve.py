"""Nonlinear solves F(x, params) = 0 with PETSc SNES for torch residuals, as one bridged op.

The residual is a torch function; PETSc's SNES (Newton with line search) does the solving, with
the Jacobian dF/dx taken from torch either matrix-free (a python Mat of Jacobian products) or
assembled exactly from coloured products of a known sparsity, so that real preconditioners
(GAMG, MG, ILU, LU) apply. On a `Grid` the solve is distributed over the grid's ranks: the
residual sees each rank's ghosted block and returns its owned block. The gradient comes from the
implicit function theorem: one transposed linear solve J^T lam = g at the solution, then
dL/dparams = -lam^T dF/dparams by torch autograd; no iteration is differentiated.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref

import numpy as np
import torch

from .._core import eager_under_compile, foreign_function
from .._errors import ForeignError, SolverFailure, check_finite
from .._linearise import describe_tensors, grads, probe, untracked_inputs
from .._runs import (RefuseTransformedReads, RunPool, check_choice, check_state,
                     refuse_forward_mode, warn_if_rounded)
from .._runs import forward as run_forward
from ._grid import Grid, SerialLayout
from ._jacobian import PRODUCTS, ColouredJacobian, TorchJacobian, plan_jacobian
from ._linear import KRYLOV_MARGIN, adjoint_tolerance, check_solution
from ._options import SolverOptions, check_options
from ._runtime import PETSc, agreed_checks, destroy, diverged, petsc_errors, reason_name
from ._vec import check_tensor, vec_as_tensor

JACOBIANS = ("auto", "assembled", "matrix-free")
WHO = "solve"
# PETSc defaults of each solve; options and the command line override them
DEFAULTS = {"snes_rtol": 1e-10, "snes_atol": 1e-12, "snes_stol": 0.0, "snes_max_it": 50,
            "ksp_rtol": 1e-10, "ksp_atol": 1e-50, "ksp_max_it": 10_000, "ksp_type": "gmres"}


def stencil_sparsity(shape, offsets=None):
    """The Jacobian of a stencil on a grid held whole on this rank, for ``solve(...,
    sparsity=...)`` or ``odeint_adjoint(..., sparsity=...)`` with functions of the full array.

    Args:
        shape: grid shape, e.g. (ny, nx); the unknowns are the grid values in C order.
        offsets: the stencil's neighbour offsets, each a tuple of len(shape) ints; default the
            (2*ndim+1)-point star (5-point in 2-D). Points beyond the edges are not unknowns.

    Returns a ColouredJacobian on a one-rank `Grid` (PETSc's DMDA, no ghost points): its colouring
    is the grid's (see `Grid.colours`), and ``pc_type mg`` takes the DMDA's multigrid hierarchy. Reuse it across
    solves. For the same code on many ranks, use ``grid=Grid(...)`` instead.
    """
    shape = tuple(int(s) for s in shape) if isinstance(shape, (tuple, list)) else (int(shape),)
    d = len(shape)
    if not 1 <= d <= 3 or min(shape) < 1:
        raise ValueError(f"stencil_sparsity: shape must be a grid shape of 1 to 3 positive "
                         f"sizes, got {shape}")
    offsets = [(0,) * d] if offsets is None else [tuple(int(o) for o in off) for off in offsets]
    if any(len(o) != d for o in offsets):
        raise ValueError(f"stencil_sparsity: every offset needs {d} entries for a grid of shape "
                         f"{shape}, got {offsets}")
    width = max(1, max(max(abs(o) for o in off) for off in offsets))
    star = all(sum(o != 0 for o in off) <= 1 for off in offsets)
    grid = Grid(shape, stencil="star" if star else "box", stencil_width=width, boundary="none",
                comm=PETSc.COMM_SELF)
    return ColouredJacobian.on_grid(grid)


def mg_levels(grid) -> int:
    """How many multigrid levels the DMDA hierarchy of `grid` allows: each coarsening halves
    every axis (periodic: M -> M / 2; otherwise M -> (M - 1) / 2 + 1, so sizes 2^k m + 1) while
    sizes stay divisible, each rank keeps a point, and the coarsest grid keeps at least 3 points
    per axis."""
    sizes = list(grid.shape)
    procs = grid.dm.getProcSizes()[::-1]
    levels = 1
    while True:
        coarse = []
        for m, boundary in zip(sizes, grid.boundary):
            if boundary != "periodic":
                if (m - 1) % 2:
                    return levels
                coarse.append((m - 1) // 2 + 1)
            else:
                if m % 2:
                    return levels
                coarse.append(m // 2)
        if min(coarse) < 3 or any(c < p for c, p in zip(coarse, procs)) or levels >= 12:
            return levels
        sizes, levels = coarse, levels + 1


def multigrid_defaults(grid, use=True) -> dict:
    """PETSc options for geometric multigrid on `grid`'s DMDA hierarchy as the preconditioner of
    a Jacobian assembled on the fine grid only: Galerkin coarse operators, as many levels as
    `mg_levels`, one smoothing step of block Jacobi + ILU (it has a transpose, for adjoints; SOR
    has none for a non-symmetric matrix). With ``use=False`` all but ``pc_type mg``, so that
    choosing mg by options gets the rest. Empty when the grid allows fewer than 3 levels."""
    levels = mg_levels(grid)
    if levels < 3:
        return {}
    return {**({"pc_type": "mg"} if use else {}), "pc_mg_levels": levels,
            "pc_mg_galerkin": "both", "mg_levels_ksp_type": "richardson",
            "mg_levels_ksp_max_it": 1, "mg_levels_pc_type": "bjacobi"}


def multigrid_levels(pc, layout, options) -> None:
    """For pc_type mg on a grid without pc_mg_levels given: as many levels as `mg_levels`."""
    if layout.dm is not None and pc.getType() == "mg" and options["pc_mg_levels"] is None:
        pc.setMGLevels(mg_levels(layout))
        pc.setFromOptions()
        warn_if_shallow(pc, layout, WHO)


def warn_if_shallow(pc, layout, who) -> None:
    """Warn when pc_type mg on a grid has fewer than 3 levels: the preconditioner is then little
    more than its smoother, and Krylov iterations grow with the grid without a word."""
    if layout.dm is None or pc.getType() != "mg" or min(layout.shape) < 9:
        return
    levels = pc.getMGLevels()
    if levels >= 3:
        return
    sizes = tuple(1 << (m - 1).bit_length() if boundary == "periodic"
                  else (1 << (m - 2).bit_length()) + 1
                  for m, boundary in zip(layout.shape, layout.boundary))
    warnings.warn(f"{who}: pc_type mg on a grid of shape {layout.shape} has {levels} level"
                  f"{'s' if levels > 1 else ''}: the grid's DMDA coarsens by halving every axis, "
                  f"which needs sizes 2^k m + 1 (periodic: 2^k m) with a point per rank left. "
                  f"With so few levels the iterations grow with the grid. Use sizes such as "
                  f"{sizes}, or options {{'pc_type': 'gamg'}}", stacklevel=2)


# -- one solve and its pullback --------------------------------------------------------------------
@dataclasses.dataclass
class SolveStats:
    """What the last call of a `SNESSolver` did (after backward, its transposed solve too)."""
    snes_type: str = ""
    ksp_type: str = ""
    pc_type: str = ""
    snes_iterations: int = 0
    ksp_iterations: int = 0       # linear iterations over all Newton steps
    residual_norm: float = float("nan")
    reason: str = ""
    adjoint_ksp_iterations: int | None = None


class _Problem:
    def __init__(self, residual, *, options, prefix, jacobian, products, assembler, grid,
                 linear, symmetric, nullspace, solver=None, key=None, sink=None):
        self.residual, self.options, self.prefix = residual, options, prefix
        self.jacobian, self.products, self.assembler = jacobian, products, assembler
        self.grid, self.linear, self.symmetric = grid, linear, symmetric
        self.nullspace, self.key, self.sink = nullspace, key, sink
        self.solver = weakref.ref(solver) if solver is not None else None
        # grad mode at the call: with it on, tensors requiring grad that residual captures
        # must be differentiated even when no input requires grad
        self.grad_mode = torch.is_grad_enabled()
        self.transformed = torch._C._are_functorch_transforms_active()  # (torch.func at the call)


class _Solve:
    """SNES, KSP, matrices, vectors and options of a solver; a run (see bridges._runs) that
    serves one call after another with the same residual, shape and dtype (`start`)."""

    def __init__(self, problem, x0, params, key=None):
        self.p, self.params, self._key = problem, params, key
        self.stats, self.sink = SolveStats(), problem.sink
        self.layout = problem.grid or SerialLayout(x0.shape)
        self.snes = self.x_vec = self.F = self.shell_mat = self.adjoint_ksp = None
        self.transposed = self.shell = self.nullspace = None
        defaults = dict(DEFAULTS)
        if problem.jacobian != "assembled":
            defaults["pc_type"] = "none"
        elif problem.grid is not None:
            defaults["pc_mg_galerkin"] = "both"  # coarse operators from our fine matrix
        self.options = SolverOptions(WHO, problem.prefix, problem.options, defaults)
        try:
            self._set_up(x0)
        except BaseException:
            self.release()
            raise

    @property
    def key(self):
        return None if self.snes is None else self._key

    def start(self, problem, x0, params):
        """Prepare a call of `problem` (its key this run's: the same residual, shape and dtype;
        its flags, such as a torch.func transform around the call, its own) from x0."""
        self.p, self.params, self.sink, self.stats = problem, params, problem.sink, SolveStats()
        self.layout.owned_view(self.x_vec, "w").copy_(x0.detach())
        if self.p.assembler is not None:
            self.p.assembler.holder = None  # new params: a linear F is reassembled

    def _report(self, **values):
        for key, value in values.items():
            setattr(self.stats, key, value)
        if self.sink is not None:
            self.sink.update(values)

    def _set_up(self, x0):
        p, layout = self.p, self.layout
        self.x_vec = layout.global_vec()
        layout.owned_view(self.x_vec, "w").copy_(x0.detach())
        self.F = layout.global_vec()
        forward = p.products != "fd" and (p.jacobian != "assembled" or p.products == "forward") \
            and probe(self._residual, self._ghosted(self.x_vec), WHO).forward
        kind, products = plan_jacobian(WHO, p.jacobian, p.products, assembler=p.assembler,
                                       forward=forward)
        if kind == "assembled":
            self.A = self.P = p.assembler.mat
            if p.symmetric:  # lets PCs such as SOR, ICC, Cholesky use the symmetry
                self.A.setOption(PETSc.Mat.Option.SYMMETRIC, True)
                self.A.setOption(PETSc.Mat.Option.SYMMETRY_ETERNAL, True)
        else:
            self.shell = TorchJacobian(layout.ghosted_shape, products=products, layout=layout)
            self.A = self.P = self.shell_mat = self.shell.mat()
        if p.nullspace:  # dF/dx is singular: constants are its null space (periodic Poisson)
            self.nullspace = PETSc.NullSpace().create(constant=True, comm=layout.comm)
        self._claim_operator()
        snes = self.snes = PETSc.SNES().create(comm=layout.comm)
        snes.setOptionsPrefix(self.options.prefix)
        if layout.dm is not None:  # multigrid takes the grid's hierarchy
            snes.setDM(layout.dm)
        snes.setType("newtonls")
        snes.setConvergenceHistory(reset=True)  # (see _warn_if_singular_root)
        snes.setFunction(self._function, self.F)
        snes.setJacobian(self._jacobian, self.A, self.P)
        with petsc_errors(WHO, "setting up PETSc SNES from the options"):
            snes.setFromOptions()
            multigrid_levels(snes.getKSP().getPC(), layout, self.options)

    def _claim_operator(self):
        """Give the operator this solve's null space (or none) before each use: an assembled
        matrix is shared by every live solve with the same sparsity."""
        if self.nullspace is None and self.p.jacobian != "assembled":
            return
        space = self.nullspace or PETSc.NullSpace().create(constant=False, vectors=[],
                                                           comm=self.layout.comm)
        self.A.setNullSpace(space)
        self.A.setTransposeNullSpace(space)
        if space is not self.nullspace:
            space.destroy()  # the matrix holds it

    def _ghosted(self, vec):
        return self.layout.exchange(vec).clone()

    def _residual(self, u):
        out = self.p.residual(u, *self.params)
        shape = self.layout.owned_shape
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{WHO}: residual must return a torch.Tensor, got "
                            f"{type(out).__name__}")
        if out.numel() != int(np.prod(shape)):
            raise ValueError(f"{WHO}: residual returned {out.numel()} values (shape "
                             f"{tuple(out.shape)}) for {int(np.prod(shape))} unknowns (shape "
                             f"{shape}){' of its ghosted block ' + str(tuple(u.shape)) if self.p.grid else ''}"
                             f"; F must have one entry per unknown")
        warn_if_rounded(WHO, "residual", out, u.dtype)
        return out

    def check_tracked(self):
        """Refuse tensors requiring grad that residual captures instead of receiving as params
        (which arrive detached): their gradients would be silently missing."""
        refuse = RefuseTransformedReads(WHO, "residual", "x0 and the params passed to solve") \
            if self.p.transformed else contextlib.nullcontext()
        with torch.enable_grad(), refuse:
            missed = untracked_inputs(self._residual(self._ghosted(self.x_vec)))
        if missed:
            raise ValueError(f"{WHO}: residual uses {describe_tensors(missed)} without "
                             f"receiving them as params, so they would get no gradient; pass "
                             f"them, solve(residual, x0, w, ...) with residual(x, w, ...), or "
                             f"detach them if no gradient is wanted")

    # PETSc callbacks
    def _function(self, snes, X, F):
        with torch.no_grad():
            value = self._residual(self.layout.exchange(X))
            vec_as_tensor(F, "w").copy_(value.reshape(-1))

    def _jacobian(self, snes, X, A, P):
        self._linearise(self._ghosted(X))

    def _linearise(self, u):
        if self.p.jacobian == "assembled":
            assembler = self.p.assembler
            holder = assembler.holder
            if self.p.linear and holder is not None and holder() is self:
                return  # F is linear in x: its Jacobian does not change (nor does the PC)
            # the matrix is shared by every solve (and ODE) with this sparsity: refill it
            mode = None if self.p.products == "auto" else self.p.products
            assembler.assemble(self._residual, u, mode=mode, out_shape=self.layout.owned_shape)
            assembler.holder = weakref.ref(self)
        else:
            self.shell.at(self._residual, u)

    def _transposed_ksp(self, ksp):
        """A KSP for the explicitly transposed assembled Jacobian, configured from the same
        options, so that every PC applies (many, e.g. PCMG with SOR smoothing, have no
        transpose)."""
        destroy(self.adjoint_ksp, self.transposed)
        self.transposed = self.A.transpose(PETSc.Mat())  # a new matrix (no argument: in place)
        if self.nullspace is not None:
            self.transposed.setNullSpace(self.nullspace)
            self.transposed.setTransposeNullSpace(self.nullspace)
        adjoint = self.adjoint_ksp = PETSc.KSP().create(comm=self.layout.comm)
        adjoint.setOptionsPrefix(self.options.prefix)
        if self.layout.dm is not None:
            adjoint.setDM(self.layout.dm)
            adjoint.setDMActive(PETSc.KSP.DMActive.ALL, False)
        adjoint.setOperators(self.transposed)
        with petsc_errors(WHO, "setting up the adjoint KSP from the options"):
            adjoint.setFromOptions()
            multigrid_levels(adjoint.getPC(), self.layout, self.options)
        return adjoint

    # forward and backward
    def solve(self):
        snes = self.snes
        self._claim_operator()
        hint = ("a matrix-free Jacobian has no entries for a preconditioner to use: keep "
                "pc_type none, or give sparsity= or grid= for an assembled Jacobian"
                if self.shell is not None else "for pc_type mg on a grid, choose sizes that "
                "halve evenly (see bridges.petsc.mg_levels) or options {'pc_type': 'gamg'}")
        ksp = snes.getKSP()
        # ksponly evaluates F neither at its result nor (for us) at x0: both are checked
        one_step = snes.getType() == "ksponly" and not (
            self.p.linear and ksp.getNormType() == PETSc.KSP.NormType.UNPRECONDITIONED)
        if one_step:
            snes.computeFunction(self.x_vec, self.F)
            start = self.F.norm()  # |F(x0)|
        with petsc_errors(WHO, f"the nonlinear solve (PETSc SNES '{snes.getType()}')", hint):
            snes.solve(None, self.x_vec)
            if self._newton_skipped():  # |F| is small by its units, not near a root: solve
                # again against |F(x0)| alone
                rtol, atol, stol, max_it = snes.getTolerances()
                snes.setTolerances(rtol, 0.0, stol, max_it)
                try:
                    snes.solve(None, self.x_vec)
                finally:
                    snes.setTolerances(rtol, atol, stol, max_it)
        reason = snes.getConvergedReason()
        norm = snes.getFunctionNorm()
        if snes.getType() == "ksponly":
            if not one_step:
                norm = ksp.getResidualNorm()  # |J dx + F(x0)| = |F(x)| for affine F
            else:
                snes.computeFunction(self.x_vec, self.F)
                norm = self.F.norm()
                rtol, atol, _, _ = ksp.getTolerances()
                if reason >= 0 and norm > max(KRYLOV_MARGIN * max(rtol * start, atol), 1e-300):
                    raise SolverFailure(
                        f"{WHO}: snes_type ksponly makes one linear solve, which solves F = 0 "
                        f"only for a residual affine in x; after it |F(x)| = {norm:.3e} "
                        f"(|F(x0)| = {start:.3e}, the linear solve's tolerance rtol {rtol:g}), "
                        f"so x is no root. Drop snes_type ksponly (Newton iterates), or check "
                        f"that the residual is linear in x")
        if self.p.linear and self.p.jacobian == "assembled" and reason >= 0:
            self._check_affine()
        if reason >= 0 and snes.getType() != "ksponly":
            self._warn_if_singular_root()
        self._report(snes_type=snes.getType(), ksp_type=ksp.getType(),
                     pc_type=ksp.getPC().getType(), snes_iterations=snes.getIterationNumber(),
                     ksp_iterations=snes.getLinearSolveIterations(), residual_norm=norm,
                     reason=reason_name(PETSc.SNES.ConvergedReason, reason))
        if reason == PETSc.SNES.ConvergedReason.DIVERGED_FUNCTION_NANORINF:
            self._name_non_finite()
        if reason < 0:
            self._check_depends_on_x()
            if self.p.linear and self.p.jacobian == "assembled":
                self._check_affine()  # (Newton with the Jacobian frozen at x0 fails if not)
            singular = " (with a null space, F = 0 has a solution only if F's constant part " \
                "is orthogonal to it: for constants, a right-hand side summing to zero)" \
                if self.p.nullspace is not None else ""
            if ksp.getConvergedReason() == PETSc.KSP.ConvergedReason.DIVERGED_PCSETUP_FAILED:
                singular += (" (the PC's set-up failed, e.g. a zero pivot: is dF/dx singular "
                             "there?)")
            raise diverged(
                WHO, f"PETSc SNES ({snes.getType()}, KSP {ksp.getType()}, PC "
                f"{ksp.getPC().getType()})", PETSc.SNES.ConvergedReason, reason,
                f"after {snes.getIterationNumber()} Newton iterations, residual norm "
                f"{norm:.3e} (last linear solve: "
                f"{reason_name(PETSc.KSP.ConvergedReason, ksp.getConvergedReason())})",
                f"check that F(x, params) = 0 has a solution near x0{singular}, loosen or "
                f"raise snes_rtol, snes_atol, snes_max_it, or choose another ksp_type/pc_type "
                f"through options")
        x = self.layout.owned_view(self.x_vec, "r").clone()
        if not bool(torch.isfinite(x).all()):
            raise ForeignError(f"{WHO}: the solution contains nan/inf; check the residual")
        self.options.report_unused()
        return x

    def _newton_skipped(self):
        """Whether SNES stopped at x0 only because 0 < |F(x0)| <= snes_atol, our default rather
        than the user's, though x0 is no root: fine for a warm start at a root, wrong for a
        residual whose units make every value tiny (a diode's currents, 1e-13 A: x0 came back
        with a gradient 3-7x off). One Newton step at x0 tells them apart."""
        snes = self.snes
        if snes.getIterationNumber() or "snes_atol" in {**self.options.given,
                                                         **self.options.inherited} or \
                snes.getConvergedReason() != PETSc.SNES.ConvergedReason.CONVERGED_FNORM_ABS \
                or snes.getType() == "ksponly" or self.F.norm() == 0.0:
            return False
        ksp, step = snes.getKSP(), self.x_vec.duplicate()
        try:
            snes.computeJacobian(self.x_vec, self.A, self.P)
            ksp.setOperators(self.A, self.P)
            ksp.solve(self.F, step)
            return step.norm(PETSc.NormType.INFINITY) > \
                1e-8 * self.x_vec.norm(PETSc.NormType.INFINITY)
        finally:
            step.destroy()

    def _warn_if_singular_root(self):
        """Warn when |F| fell by a steady factor over Newton's last iterations (linear, not
        quadratic, convergence): dF/dx is singular at the root, which Newton then finds only to
        about its last step, and where dx/dparams is unbounded."""
        norms = self.snes.getConvergenceHistory()[0]
        if len(norms) < 5 or norms[-4] == 0 or self.snes.getKSP().getTolerances()[0] > 0.01:
            return  # (an inexact Newton, with loose linear solves, converges linearly too)
        rates = norms[-3:] / norms[-4:-1]
        if rates.min() < 0.1 or rates.max() > 0.9 or rates.max() > 1.25 * rates.min():
            return
        warnings.warn(
            f"{WHO}: Newton converged only linearly (|F| fell by a steady factor of "
            f"{rates[-1]:.2f} per iteration over the last of {len(norms) - 1}): dF/dx is "
            f"singular at this root (a multiple root, as of x^2 = 0). x is then accurate only to "
            f"about Newton's last step, {self.snes.getSolutionUpdate().norm():.1e}, however "
            f"small |F| is, and dx/dparams is unbounded there, so the gradient means little. "
            f"Pose F so that its root is simple, or check the parameters", stacklevel=2)

    def _check_depends_on_x(self):
        """After a failed solve: raise if F has no derivative in x at all (it detaches x, or
        uses only params), which no Newton iteration can fix."""
        with torch.enable_grad():
            leaf = self._ghosted(self.x_vec).requires_grad_()
            value = self._residual(leaf)
        if not value.requires_grad or grads(value, (leaf,), torch.ones_like(value))[0] is None:
            raise ValueError(f"{WHO}: the residual does not depend on x through torch (it "
                             f"detaches x, converts it to numpy, or uses only the params), so "
                             f"its Jacobian is zero and Newton cannot move; compute F from x "
                             f"with torch ops, or wrap foreign code with bridges."
                             f"foreign_function")

    def _name_non_finite(self):
        """Raise naming where a non-finite residual comes from: a param, or F at the iterate
        Newton had reached."""
        for i, p in enumerate(self.params):
            if isinstance(p, torch.Tensor) and p.is_floating_point():
                check_finite(p, f"{WHO}: params[{i}]", "every param must be finite",
                             error=ForeignError)
        with torch.no_grad():
            value = self._residual(self._ghosted(self.x_vec))
        check_finite(value, f"{WHO}: the residual F(x, params) after "
                     f"{self.snes.getIterationNumber()} Newton iterations",
                     "check the residual for a division by zero, a log or sqrt of a negative "
                     "number, or an overflow there (a closer x0 may avoid it)", error=ForeignError)

    def _random_vecs(self, count):
        """`count` Vecs like x with fixed random (standard normal) entries; the caller destroys
        them."""
        vecs, rng = [self.x_vec.duplicate() for _ in range(count)], np.random.default_rng(0)
        for vec in vecs:
            owned = self.layout.owned_view(vec, "w")
            owned.copy_(torch.from_numpy(rng.standard_normal(owned.shape)))
        return vecs

    def _check_affine(self):
        """linear=True keeps the Jacobian assembled at x0: at the root x, F(x + v) - F(x) must
        equal that matrix times v (exactly, for an affine F; v a fixed random vector scaled to
        x), or the adjoint would use a wrong Jacobian."""
        v = self._random_vecs(1)[0]
        shifted, change, product = (self.x_vec.duplicate() for _ in range(3))
        try:
            v.scale(max(float(self.x_vec.norm(PETSc.NormType.INFINITY)), 1.0))
            self.x_vec.copy(shifted)
            shifted.axpy(1.0, v)
            self.snes.computeFunction(self.x_vec, self.F)
            self.snes.computeFunction(shifted, change)
            size = change.norm() + self.F.norm()  # (the rounding in the difference)
            change.axpy(-1.0, self.F)  # F(x + v) - F(x)
            self.A.mult(v, product)
            size += product.norm()
            product.axpy(-1.0, change)
            gap = product.norm()
        finally:
            destroy(v, shifted, change, product)
        _kept("linear=True", "the residual is not affine in x: |F(x + v) - F(x) - J(x0) v|, "
              "with J(x0) the Jacobian at x0 and v random,", gap, size, 1e-8)

    def _check_symmetric(self):
        """symmetric=True lets the adjoint solve with J for J^T: at the root, u^T J v must
        equal v^T J u (u, v fixed random vectors; two products with J)."""
        u, v = self._random_vecs(2)
        ju, jv = u.duplicate(), v.duplicate()
        try:
            self.A.mult(u, ju)
            self.A.mult(v, jv)
            gap = abs(u.dot(jv) - v.dot(ju))
            size = u.norm() * jv.norm() + v.norm() * ju.norm()
        finally:
            destroy(u, v, ju, jv)
        _kept("symmetric=True", "dF/dx is not symmetric at the root: u^T J v - v^T J u, for "
              "random u and v,", gap, size, 1e-6)

    def pullback(self, grad_x, *, needs_input_grad):
        want = [needs_input_grad[2 + i] and isinstance(p, torch.Tensor)
                for i, p in enumerate(self.params)]
        param_grads = [None] * len(self.params)
        if not any(want):
            return (None, None, *param_grads)
        ksp = self.snes.getKSP()
        u = self._ghosted(self.x_vec)
        if self.p.jacobian == "assembled":
            self.p.assembler.verify_next()  # (the pattern, at the root too)
        self._linearise(u)  # the operator (and PC) at the solution itself
        self._claim_operator()
        if self.p.symmetric:
            with petsc_errors(f"{WHO} (backward)", "the check that dF/dx is symmetric"):
                self._check_symmetric()
        ksp.setOperators(self.A, self.P)
        g, lam = self.layout.global_vec(), self.layout.global_vec()
        try:
            self.layout.owned_view(g, "w").copy_(grad_x.detach())
            lam.zeroEntries()
            ksp.setInitialGuessNonzero(False)
            if self.p.symmetric:  # J^T = J: the forward's KSP and PC as they are
                what = "the adjoint solve J lam = g (symmetric J)"
            elif self.p.jacobian == "assembled":
                ksp, what = self._transposed_ksp(ksp), "the adjoint solve J^T lam = g"
            else:
                what = "the adjoint solve J^T lam = g (KSPSolveTranspose, reverse-mode products)"
            hint = ("the KSP or PC cannot apply the transpose; if dF/dx is symmetric pass "
                    "symmetric=True, else choose e.g. pc_type ilu, lu or jacobi")
            transpose = not (self.p.symmetric or self.p.jacobian == "assembled")
            with petsc_errors(WHO, what, hint), adjoint_tolerance(ksp, self.snes):
                (ksp.solveTranspose if transpose else ksp.solve)(g, lam)
            reason = ksp.getConvergedReason()
            self._report(adjoint_ksp_iterations=ksp.getIterationNumber())
            if reason < 0:
                raise diverged(
                    f"{WHO} (backward)", f"{what} with PETSc KSP {ksp.getType()}, PC "
                    f"{ksp.getPC().getType()}", PETSc.KSP.ConvergedReason, reason,
                    f"after {ksp.getIterationNumber()} iterations, residual norm "
                    f"{ksp.getResidualNorm():.3e}",
                    "dF/dx may be singular at the solution (a multiple root, or roots forming "
                    "a curve), where dx/dparams does not exist; if not, choose a PC with a "
                    "transpose (ilu, lu, gamg, jacobi) or raise ksp_max_it through options")
            with adjoint_tolerance(ksp, self.snes):  # (the guard's limit is its tolerance)
                check_solution(ksp, g, lam, f"{WHO} (backward)", what, transpose=transpose,
                               nullspace=self.nullspace)
            lam_t = self.layout.owned_view(lam, "r").clone()
        finally:
            destroy(g, lam)
        # this rank's share of -lam^T dF/dparams (the shares of all ranks sum to the gradient)
        wanted = [p for p, w in zip(self.params, want) if w]
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_() for p in wanted]
            it = iter(leaves)
            args = [next(it) if w else p for p, w in zip(self.params, want)]
            value = self.p.residual(u, *args)
            parts = iter(grads(value, leaves, -lam_t.view(value.shape)))
        for i, w in enumerate(want):
            if w:
                param_grads[i] = next(parts)
                if param_grads[i] is None:
                    warnings.warn(f"{WHO}: params[{i}] requires grad, but the residual does not "
                                  f"depend on it through torch ops (unused, or read with .item(), "
                                  f"float() or numpy?), so its gradient is zero. Compute with it "
                                  f"as a tensor", stacklevel=2)
                    param_grads[i] = torch.zeros_like(self.params[i])
        self.options.report_unused(final=True)
        return (None, None, *param_grads)

    def release(self):
        """Free this solve's PETSc objects (idempotent; the assembler's matrix is the
        caller's)."""
        destroy(self.snes, self.x_vec, self.F, self.shell_mat, self.adjoint_ksp,
                self.transposed, self.nullspace)
        self.snes = self.x_vec = self.F = self.shell_mat = self.adjoint_ksp = None
        self.transposed = self.shell = self.nullspace = None  # the shell holds our method
        self.options.close()


def _kept(option, broken, gap, size, tolerance):
    """Raise unless a promise `option` makes of the residual holds: `gap` (what `broken`
    measures, zero when it holds) within `tolerance` of `size`."""
    if gap > tolerance * size:
        raise ValueError(f"{WHO}: {option}, but {broken} is {gap:.3e} against {size:.3e}, so the "
                         f"gradient would be wrong. Drop {option}")


def _forward(x0, problem, *params, needs_input_grad):
    refuse_forward_mode(WHO)  # (here, so that a probe sees a bridged op)
    solver = problem.solver() if problem.solver is not None else None
    pool = solver._pool if solver is not None else None
    run = pool.take(problem.key) if pool is not None else None
    if run is None:
        run = _Solve(problem, x0, params, problem.key)
    else:
        run.start(problem, x0, params)
    if any(needs_input_grad) or problem.grad_mode:
        try:
            run.check_tracked()
        except BaseException:
            run.release()
            raise
    out = run_forward(run, any(needs_input_grad), pool.ref if pool is not None else None,
                      who=WHO)
    if solver is not None:
        solver.stats = run.stats
    return out


_SOLVE = foreign_function(_forward, name="petsc_solve", pass_needs_input_grad=True,
                          protect_outputs=False)


def _assembler(who, sparsity, grid, n):
    """The ColouredJacobian for sparsity= (a pattern or a ColouredJacobian) or grid=."""
    if grid is not None:
        if not isinstance(grid, Grid):
            raise TypeError(f"{who}: grid must be a bridges.petsc.Grid, got "
                            f"{type(grid).__name__}")
        if sparsity is not None:
            raise ValueError(f"{who}: give sparsity= or grid=, not both (a grid brings its "
                             f"stencil's sparsity)")
        cache = grid.__dict__.setdefault("_bridges_jacobian", {})
        if "assembler" not in cache:  # built once per grid, shared by its solves
            cache["assembler"] = ColouredJacobian.on_grid(grid)
        return cache["assembler"]
    if sparsity is None:
        return None
    if isinstance(sparsity, ColouredJacobian):
        size = (sparsity.n_out, sparsity.n_in)
    else:
        try:
            size = sparsity.shape
        except AttributeError:
            raise TypeError(f"{who}: sparsity must be an N x N scipy sparse matrix, boolean array "
                            f"or ColouredJacobian, got {type(sparsity).__name__}") from None
    if tuple(size) != (n, n):
        raise ValueError(f"{who}: sparsity has shape {tuple(size)}, but the unknowns are {n}: it "
                         f"must be {n} x {n} (one row and column per unknown, flattened in C "
                         f"order)")
    return sparsity if isinstance(sparsity, ColouredJacobian) else ColouredJacobian(sparsity)


@eager_under_compile(WHO)
def solve(residual, x0, *params, options=None, sparsity=None, grid=None, prefix=None,
          jacobian="auto", products="auto", linear=False, symmetric=False, nullspace=None,
          stats=None):
    """Find x with residual(x, *params) = 0 by PETSc SNES; differentiable w.r.t. the params.

    Args:
        residual: ``residual(x, *params) -> F`` in torch, F with one entry per entry of x. On a
            grid it receives this rank's ghosted block and returns F on its owned block. x
            views PETSc's work vector, valid for the call only: clone it to keep it.
        x0: initial guess (float64, CPU): any shape, or on a grid this rank's owned block
            (``grid.owned_shape``). The solution does not depend on it, so it gets no gradient.
        params: tensors (gradients flow to them) or other values, passed to residual as is.
            A tensor requiring grad that residual captures instead is refused by name when a
            gradient is wanted (it would get none).
        options: PETSc options of this solve, keyed without the dash, e.g.
            ``{"ksp_type": "cg", "pc_type": "gamg", "snes_monitor": True}``; they stay in force
            for the solve's whole life, its backward included, and options PETSc never reads
            are reported (``bridges.petsc.set_unused_options``). They override the command
            line, which overrides the defaults: Newton with line search (newtonls),
            snes_rtol 1e-10, snes_atol 1e-12 (absolute 2-norm of F), snes_max_it 50,
            ksp_rtol 1e-10; KSP gmres with PETSc's default PC for an assembled Jacobian (ILU on
            one rank, block Jacobi with ILU on many) or none (matrix-free).
        sparsity: the pattern of dF/dx for a residual of the full array: an N x N scipy sparse
            matrix or boolean array (N = x0.numel(), coloured greedily), or a ColouredJacobian
            (e.g. ``stencil_sparsity(shape)``; reuse it across solves).
        grid: a `Grid` to solve on, over all of its ranks: the Jacobian is assembled from the
            grid's stencil, colouring and matrix, and ``pc_type mg`` uses the grid's multigrid
            hierarchy (levels from `mg_levels`, Galerkin coarse operators), as with a
            stencil_sparsity.
        prefix: options prefix of this solve (``"heat_"`` makes ``-heat_ksp_type`` apply).
        jacobian: ``"assembled"`` (needs sparsity or grid): the exact sparse Jacobian from one
            product per colour, so preconditioners such as gamg, mg, ilu, lu apply.
            ``"matrix-free"``: a PETSc Mat of Jacobian products (PCs that need matrix entries do
            not apply). ``"auto"``: assembled when sparsity or a grid is given.
        products: how Jacobian products are formed. ``"forward"``: forward-mode AD (every op in
            the residual needs one); ``"reverse"``: reverse-mode AD, which every bridged op has
            (assembled Jacobians: rows are coloured instead of columns); ``"fd"``: the
            finite-difference action J v ~ (F(x + h v) - F(x)) / h with PETSc MFFD's default
            step (matrix-free); ``"auto"`` (default) picks forward mode where every op has it
            and it measured faster, reverse mode or fd otherwise. Backward always uses reverse
            mode.
        linear: F is affine in x: the Jacobian is assembled (and the PC set up) once per solve
            (checked at the root with two residuals and one product; a non-affine F is refused).
        symmetric: dF/dx is symmetric (checked at the root with two products before backward):
            the matrix is marked so (SOR, ICC, Cholesky may use it)
            and backward reuses the forward's KSP and PC as they are. Otherwise backward solves
            with the explicitly transposed matrix and a KSP/PC set up from the same options
            (assembled), or KSP solveTranspose with reverse-mode products (matrix-free).
        nullspace: ``"constant"`` when dF/dx is singular with the constants as its null space
            (e.g. a pressure Poisson equation with periodic or Neumann boundaries): the linear
            solves project it out, so x has zero mean and the gradient is that of the zero-mean
            solution; the residual's right-hand side must then have zero mean. Default None.
        stats: a dict to receive the solve's SNES/KSP/PC types, Newton and linear iterations,
            final residual norm and converged reason (after backward also the transposed
            solve's iterations).

    Returns:
        x with residual(x, *params) ~= 0, shaped like x0. Its gradient solves J^T lam = g once at
        x (see ``symmetric``) and returns -lam^T dF/dparams by torch autograd. On a grid, each
        rank's x is its owned block, and each rank's parameter gradient is its share: the
        shares of all ranks sum to the gradient of the total loss (see `sum_gradients`).

    Raises:
        ForeignError: SNES did not converge (the reason and residual norm reached are named), or
            the transposed solve of backward did not converge.
    """
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(f"{WHO}: stats must be a dict or None, got {type(stats).__name__}")
    solver = SNESSolver(options=options, sparsity=sparsity, grid=grid, prefix=prefix,
                        jacobian=jacobian, products=products, linear=linear,
                        symmetric=symmetric, nullspace=nullspace)
    return solver._call(residual, x0, params, stats)


class SNESSolver:
    """A PETSc SNES solver that lives across calls: ``x = solver(residual, x0, *params)``.

    Takes the keywords of `solve` except stats; ``stats`` (a `SolveStats`) describes the last
    call, after backward its transposed solve too. The SNES, KSP, matrices, vectors and options
    are made on the first call and reused by later calls with the same residual, shape and
    dtype (params may change); a call whose output still waits for backward cannot share
    them, so it makes its own. Everything is freed when the solver and the last pullback that
    uses it are gone.
    """

    def __init__(self, *, options=None, sparsity=None, grid=None, prefix=None, jacobian="auto",
                 products="auto", linear=False, symmetric=False, nullspace=None):
        check_options(WHO, options)
        check_choice(WHO, "jacobian", jacobian, JACOBIANS)
        check_choice(WHO, "products", products, PRODUCTS)
        if nullspace not in (None, "constant"):
            raise ValueError(f"{WHO}: nullspace must be None or 'constant', got {nullspace!r}")
        self.settings = dict(options=options, prefix=prefix, jacobian=jacobian,
                             products=products, linear=bool(linear), symmetric=bool(symmetric),
                             nullspace=nullspace)
        self.sparsity, self.grid, self.stats = sparsity, grid, None
        self._pool = RunPool(self)

    def __call__(self, residual, x0, *params):
        """x with residual(x, *params) ~= 0 (see `solve`)."""
        return self._call(residual, x0, params, None)

    @eager_under_compile(WHO)
    def _call(self, residual, x0, params, sink):
        if not callable(residual):
            raise TypeError(f"{WHO}: residual must be callable as residual(x, *params), got "
                            f"{type(residual).__name__}")
        with agreed_checks(None if self.grid is None else self.grid.comm):
            check_state(WHO, "x0", x0, "the initial guess", check_tensor)
        for i, p in enumerate(params):
            if isinstance(p, torch.Tensor) and p.device.type != "cpu":
                raise ValueError(f"{WHO}: params[{i}] is on device '{p.device}', but this PETSc "
                                 f"build is CPU-only; move it with .cpu()")
            inner = p.values() if isinstance(p, dict) else p if isinstance(p, (list, tuple)) \
                else ()
            if any(isinstance(v, torch.Tensor) and v.requires_grad for v in inner):
                raise TypeError(f"{WHO}: params[{i}] is a {type(p).__name__} holding tensors "
                                f"that require grad, which would get no gradient: only tensors "
                                f"passed directly are differentiated; pass them one by one, "
                                f"solve(residual, x0, *tensors)")
        grid = self.grid
        assembler = _assembler(WHO, self.sparsity, grid, x0.numel())
        if assembler is not None and grid is None:
            grid = getattr(assembler, "grid", None)  # a stencil_sparsity's one-rank grid
        if grid is not None:
            grid._check_owned(x0, f"{WHO}: x0")
        jacobian, _ = plan_jacobian(WHO, self.settings["jacobian"], self.settings["products"],
                                    assembler=assembler)
        settings = dict(self.settings, jacobian=jacobian)
        key = (id(residual), tuple(x0.shape), x0.dtype, id(assembler))
        problem = _Problem(residual, assembler=assembler, grid=grid, solver=self, key=key,
                           sink=sink, **settings)
        return _SOLVE(x0, problem, *params)
