"""Nonlinear solves F(x, params) = 0 with PETSc SNES for torch residuals, as one bridged op.

The residual is a torch function; PETSc's SNES (Newton with line search) does the solving, with
the Jacobian dF/dx taken from torch either matrix-free (a python Mat whose products are JVPs and
VJPs) or assembled exactly from coloured JVPs of a known sparsity pattern, so that real
preconditioners (GAMG, MG, ILU, LU) apply. The gradient comes from the implicit function theorem:
one transposed linear solve J^T lam = g at the solution, then dL/dparams = -lam^T dF/dparams by
torch autograd; no iteration is differentiated.
"""
from __future__ import annotations

import itertools
import weakref

import numpy as np
import scipy.sparse
import torch

from .._core import eager_under_compile, foreign_function
from .._errors import ForeignError
from .._linearise import probe
from ._jacobian import ColouredJacobian, TorchJacobian
from ._options import SolverOptions, check_options
from ._runtime import PETSc, destroy, diverged, petsc_errors, reason_name
from ._vec import as_vec, check_tensor, vec_as_tensor

JACOBIANS = ("auto", "assembled", "matrix-free")
PRODUCTS = ("auto", "forward", "reverse", "fd")
WHO = "solve"
# PETSc defaults of each solve; options and the command line override them
DEFAULTS = {"snes_rtol": 1e-10, "snes_atol": 1e-12, "snes_stol": 0.0, "snes_max_it": 50,
            "ksp_rtol": 1e-10, "ksp_atol": 1e-50, "ksp_max_it": 10_000}


# -- sparsity of grid stencils --------------------------------------------------------------------
def stencil_sparsity(shape, offsets=None):
    """The Jacobian pattern of a stencil on a grid, ready for ``solve(..., sparsity=...)``.

    Args:
        shape: grid shape, e.g. (ny, nx); the unknowns are the grid values in C order.
        offsets: the stencil's neighbour offsets, each a tuple of len(shape) ints; default the
            (2*ndim+1)-point star (5-point in 2-D). Entries outside the grid are dropped
            (non-periodic).

    Returns a ColouredJacobian whose columns are coloured by a closed formula
    (colour = a . index mod m, the smallest m found), so that building it costs no greedy
    colouring even for millions of unknowns; reuse it across solves.
    """
    shape = tuple(int(s) for s in shape)
    d = len(shape)
    if d == 0 or min(shape) < 1:
        raise ValueError(f"stencil_sparsity: shape must be a non-empty grid shape, got {shape}")
    if offsets is None:
        offsets = [(0,) * d] + [tuple(s * (k == i) for k in range(d)) for i in range(d)
                                for s in (-1, 1)]
    offsets = [tuple(int(o) for o in off) for off in offsets]
    if any(len(o) != d for o in offsets):
        raise ValueError(f"stencil_sparsity: every offset needs {d} entries for a grid of shape "
                         f"{shape}, got {offsets}")
    if (0,) * d not in offsets:
        offsets.append((0,) * d)
    n = int(np.prod(shape))
    index = np.arange(n).reshape(shape)
    rows, cols = [], []
    for off in offsets:  # row = grid point, column = its neighbour at `off`
        src = tuple(slice(max(0, -o), s - max(0, o)) for o, s in zip(off, shape))
        dst = tuple(slice(max(0, o), s - max(0, -o) if o < 0 else s) for o, s in zip(off, shape))
        rows.append(index[src].ravel())
        cols.append(index[dst].ravel())
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    pattern = scipy.sparse.csc_matrix((np.ones(rows.size, dtype=bool), (rows, cols)),
                                      shape=(n, n))
    colour = _stencil_colour(np.indices(shape).reshape(d, -1).T, offsets)
    groups = [np.flatnonzero(colour == c) for c in range(int(colour.max()) + 1)]
    assembler = ColouredJacobian(pattern, groups=groups)
    assembler.grid_shape = shape  # lets pc_type mg build its geometric hierarchy
    return assembler


def _stencil_colour(points, offsets):
    """colour = (a . point) mod m with no two columns sharing a row coloured alike: the
    conflicting differences are o1 - o2 over stencil offsets; the smallest m that works wins."""
    offs = np.array(offsets)
    diffs = {tuple(x) for x in (offs[:, None, :] - offs[None, :, :]).reshape(-1, offs.shape[1])}
    diffs.discard((0,) * offs.shape[1])
    diffs = np.array(sorted(diffs))
    width = int(2 * np.abs(offs).max() + 1)
    for m in range(len(offsets), width ** offs.shape[1] + 1):
        for a in itertools.product(range(m), repeat=offs.shape[1]):
            if np.all((diffs @ np.array(a)) % m != 0):
                return (points @ np.array(a)) % m
    raise AssertionError("unreachable: the box colouring always works")  # pragma: no cover


def _interpolation_1d(m):
    """Linear interpolation from the m // 2 coarse points (fine points 1, 3, 5, ...) to the m
    fine points of a line whose end values are fixed (Dirichlet: zero beyond the ends)."""
    mc = m // 2
    i = np.arange(m)
    odd = i[i % 2 == 1]
    even = i[i % 2 == 0]
    rows = [odd, even, even]
    cols = [(odd - 1) // 2, even // 2 - 1, even // 2]
    vals = [np.ones(odd.size), np.full(even.size, 0.5), np.full(even.size, 0.5)]
    rows, cols, vals = (np.concatenate(a) for a in (rows, cols, vals))
    keep = (cols >= 0) & (cols < mc)
    return scipy.sparse.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=(m, mc))


def _grid_hierarchy(shape, levels):
    """Interpolation matrices (coarse to fine) of a grid, coarsest first, as PETSc AIJ."""
    shapes = [tuple(shape)]
    while len(shapes) < levels:
        shapes.append(tuple(m // 2 for m in shapes[-1]))
    mats = []
    for fine in shapes[:-1]:
        P = _interpolation_1d(fine[0])
        for m in fine[1:]:
            P = scipy.sparse.kron(P, _interpolation_1d(m), format="csr")
        P.sort_indices()
        mats.append(PETSc.Mat().createAIJ(P.shape, csr=(P.indptr.astype(PETSc.IntType),
                                                         P.indices.astype(PETSc.IntType),
                                                         P.data), comm=PETSc.COMM_SELF))
    return mats[::-1]


def _auto_levels(shape):
    levels, m = 1, min(shape)
    while m // 2 >= 8:
        m //= 2
        levels += 1
    return levels


# -- one solve and its pullback --------------------------------------------------------------------
class _Problem:
    def __init__(self, residual, options, prefix, jacobian, products, assembler, linear,
                 symmetric, n_params):
        self.residual, self.options, self.prefix = residual, options, prefix
        self.jacobian, self.products, self.assembler = jacobian, products, assembler
        self.linear, self.symmetric = linear, symmetric
        self.n_params = n_params
        self.stats = {}


class _Solve:
    """SNES, KSP, matrices and options of one forward solve; they live as long as the pullback
    (PETSc holds this object's bound methods: `release` breaks that cycle)."""

    def __init__(self, problem, x0, params):
        self.p, self.params, self.shape = problem, params, x0.shape
        self.x = x0.detach().clone(memory_format=torch.contiguous_format)
        self.snes = self.x_vec = self.F = self.shell_mat = self.adjoint_ksp = None
        self.transposed = self.shell = None
        grid = getattr(problem.assembler, "grid_shape", None) \
            if problem.jacobian == "assembled" else None
        defaults = {**DEFAULTS, "ksp_type": "gmres",
                    "pc_type": "ilu" if problem.jacobian == "assembled" else "none"}
        if grid:
            defaults["pc_mg_galerkin"] = "both"
        self.options = SolverOptions(WHO, problem.prefix, problem.options, defaults)
        try:
            self._set_up()
        except BaseException:
            self.release()
            raise

    def _set_up(self):
        p = self.p
        self.x_vec = as_vec(self.x)
        self.F = PETSc.Vec().createSeq(self.x.numel(), comm=PETSc.COMM_SELF)
        if p.jacobian == "assembled":
            self.A = self.P = p.assembler.mat
            if p.symmetric:  # lets PCs such as SOR, ICC, Cholesky use the symmetry
                self.A.setOption(PETSc.Mat.Option.SYMMETRIC, True)
                self.A.setOption(PETSc.Mat.Option.SYMMETRY_ETERNAL, True)
        else:
            if p.products == "reverse":
                raise ValueError(f"{WHO}: a matrix-free Jacobian needs J v, which reverse mode "
                                 f"cannot give; use products 'forward', 'fd' or 'auto', or "
                                 f"give sparsity= for an assembled Jacobian")
            products = p.products
            if products != "fd":
                forward = probe(self._residual, self.x, WHO).forward
                if products == "forward" and not forward:
                    raise ValueError(f"{WHO}: products='forward' needs a forward-mode rule for "
                                     f"every op in the residual; one has none. Use 'fd' or "
                                     f"'auto'")
                products = "forward" if forward else "fd"
            self.shell = TorchJacobian(self.shape, products=products)
            self.A = self.P = self.shell_mat = self.shell.mat()
        snes = self.snes = PETSc.SNES().create(comm=PETSc.COMM_SELF)
        snes.setOptionsPrefix(self.options.prefix)
        snes.setType("newtonls")
        snes.setFunction(self._function, self.F)
        snes.setJacobian(self._jacobian, self.A, self.P)
        with petsc_errors(WHO, "setting up PETSc SNES from the options"):
            snes.setFromOptions()
            self._grid_multigrid(snes.getKSP().getPC())

    def _grid_multigrid(self, pc):
        """For pc_type mg on a grid stencil: the geometric hierarchy, coarse operators by
        Galerkin products."""
        grid = getattr(self.p.assembler, "grid_shape", None) \
            if self.p.jacobian == "assembled" else None
        if not grid or pc.getType() != "mg" or min(grid) < 16:
            return
        levels = pc.getMGLevels()
        levels = levels if levels > 1 else _auto_levels(grid)
        cache = self.p.assembler.__dict__.setdefault("_bridges_hierarchy", {})
        if (grid, levels) not in cache:
            cache[grid, levels] = _grid_hierarchy(grid, levels)
        pc.setMGLevels(levels)
        for level, P in enumerate(cache[grid, levels], start=1):
            pc.setMGInterpolation(level, P)
        pc.setFromOptions()

    def _transposed_ksp(self, ksp):
        """A KSP for the explicitly transposed assembled Jacobian, configured from the same
        options, so that every PC applies (many, e.g. PCMG with SOR smoothing, have no
        transpose)."""
        destroy(self.adjoint_ksp, self.transposed)
        self.transposed = self.A.transpose(PETSc.Mat())  # a new AIJ matrix (no arg: in place)
        adjoint = self.adjoint_ksp = PETSc.KSP().create(comm=PETSc.COMM_SELF)
        adjoint.setOptionsPrefix(self.options.prefix)
        adjoint.setOperators(self.transposed)
        adjoint.setType(ksp.getType())
        adjoint.getPC().setType(ksp.getPC().getType())
        with petsc_errors(WHO, "setting up the adjoint KSP from the options"):
            adjoint.setFromOptions()
            self._grid_multigrid(adjoint.getPC())
        return adjoint

    def _residual(self, x):
        out = self.p.residual(x, *self.params)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{WHO}: residual must return a torch.Tensor, got "
                            f"{type(out).__name__}")
        if out.numel() != x.numel():
            raise ValueError(f"{WHO}: residual returned {out.numel()} values for {x.numel()} "
                             f"unknowns (shape {tuple(out.shape)} for x of shape "
                             f"{tuple(x.shape)}); F must have one entry per unknown")
        return out

    # PETSc callbacks
    def _function(self, snes, X, F):
        with torch.no_grad():
            value = self._residual(vec_as_tensor(X, "r").view(self.shape))
            vec_as_tensor(F, "w").copy_(value.reshape(-1))

    def _jacobian(self, snes, X, A, P):
        self._linearise(vec_as_tensor(X, "r").view(self.shape).clone())

    def _linearise(self, x):
        if self.p.jacobian == "assembled":
            assembler = self.p.assembler
            owner = getattr(assembler, "_bridges_owner", None)
            if self.p.linear and owner is not None and owner() is self:
                return  # F is linear in x: its Jacobian does not change (nor does the PC)
            # the matrix is shared by every solve with this sparsity: refill it for this one
            mode = None if self.p.products == "auto" else self.p.products
            assembler.assemble(self._residual, x, mode=mode)
            assembler._bridges_owner = weakref.ref(self)
        else:
            self.shell.at(self._residual, x)

    # forward and backward
    def solve(self):
        snes = self.snes
        with petsc_errors(WHO, f"the nonlinear solve (PETSc SNES '{snes.getType()}')"):
            snes.solve(None, self.x_vec)
        reason = snes.getConvergedReason()
        norm = snes.getFunctionNorm()
        ksp = snes.getKSP()
        if snes.getType() == "ksponly":  # it does not evaluate F at its result
            if self.p.linear and ksp.getNormType() == PETSc.KSP.NormType.UNPRECONDITIONED:
                norm = ksp.getResidualNorm()  # |J dx + F(x0)| = |F(x)| for affine F
            else:
                snes.computeFunction(self.x_vec, self.F)
                norm = self.F.norm()
        self.p.stats.update(snes_type=snes.getType(), ksp_type=ksp.getType(),
                            pc_type=ksp.getPC().getType(),
                            snes_iterations=snes.getIterationNumber(),
                            ksp_iterations=snes.getLinearSolveIterations(),
                            residual_norm=norm, reason=reason_name(
                                PETSc.SNES.ConvergedReason, reason))
        if reason < 0:
            raise diverged(
                WHO, f"PETSc SNES ({snes.getType()}, KSP {ksp.getType()}, PC "
                f"{ksp.getPC().getType()})", PETSc.SNES.ConvergedReason, reason,
                f"after {snes.getIterationNumber()} Newton iterations, residual norm "
                f"{norm:.3e} (last linear solve: "
                f"{reason_name(PETSc.KSP.ConvergedReason, ksp.getConvergedReason())})",
                "check that F(x, params) = 0 has a solution near x0, loosen or raise "
                "snes_rtol, snes_atol, snes_max_it, or choose another ksp_type/pc_type through "
                "options")
        if not bool(torch.isfinite(self.x).all()):
            raise ForeignError(f"{WHO}: the solution contains nan/inf; check the residual")
        self.options.report_unused()
        return self.x.clone()

    def pullback(self, grad_x, *, needs_input_grad):
        want = [needs_input_grad[2 + i] and isinstance(p, torch.Tensor)
                for i, p in enumerate(self.params)]
        grads = [None] * len(self.params)
        if not any(want):
            return (None, None, *grads)
        ksp = self.snes.getKSP()
        self._linearise(self.x)  # the operator (and PC) at the solution itself
        ksp.setOperators(self.A, self.P)
        g = as_vec(grad_x.detach().to(self.x.dtype).contiguous().clone())
        lam = PETSc.Vec().createSeq(self.x.numel(), comm=PETSc.COMM_SELF)
        try:
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
            with petsc_errors(WHO, what, hint):
                if self.p.symmetric or self.p.jacobian == "assembled":
                    ksp.solve(g, lam)
                else:
                    ksp.solveTranspose(g, lam)
            reason = ksp.getConvergedReason()
            self.p.stats.update(adjoint_ksp_iterations=ksp.getIterationNumber())
            if reason < 0:
                raise diverged(
                    f"{WHO} (backward)", f"{what} with PETSc KSP {ksp.getType()}, PC "
                    f"{ksp.getPC().getType()}", PETSc.KSP.ConvergedReason, reason,
                    f"after {ksp.getIterationNumber()} iterations, residual norm "
                    f"{ksp.getResidualNorm():.3e}",
                    "choose a PC with a transpose (ilu, lu, gamg, jacobi) or raise ksp_max_it "
                    "through options")
            lam_t = vec_as_tensor(lam, "r").view(self.shape).clone()
        finally:
            destroy(g, lam)
        wanted = [p for p, w in zip(self.params, want) if w]
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_() for p in wanted]
            it = iter(leaves)
            args = [next(it) if w else p for p, w in zip(self.params, want)]
            value = self.p.residual(self.x, *args)
            parts = torch.autograd.grad(value, leaves, -lam_t.view(value.shape),
                                        allow_unused=True)
        it = iter(parts)
        for i, w in enumerate(want):
            if w:
                part = next(it)
                grads[i] = torch.zeros_like(self.params[i]) if part is None else part
        self.options.report_unused(final=True)
        return (None, None, *grads)

    def release(self):
        """Free this solve's PETSc objects (idempotent; the assembler's matrix is the
        caller's)."""
        destroy(self.snes, self.x_vec, self.F, self.shell_mat, self.adjoint_ksp,
                self.transposed)
        self.snes = self.x_vec = self.F = self.shell_mat = self.adjoint_ksp = None
        self.transposed = self.shell = None  # the shell's point holds this object's method
        self.options.close()


class _Pullback:
    """The op's pullback; releasing it (after backward, or with the outputs) destroys the
    solve's PETSc objects."""

    def __init__(self, run):
        self.run = run
        weakref.finalize(self, run.release)

    def __call__(self, grad_x, *, needs_input_grad):
        return self.run.pullback(grad_x, needs_input_grad=needs_input_grad)


def _forward(x0, problem, *params, needs_input_grad):
    run = _Solve(problem, x0, params)
    try:
        x = run.solve()
    except BaseException:
        run.release()
        raise
    if not any(needs_input_grad):
        run.release()
        return x, None
    return x, _Pullback(run)


_SOLVE = foreign_function(_forward, name="petsc_solve", pass_needs_input_grad=True,
                          protect_outputs=False)


@eager_under_compile(WHO)
def solve(residual, x0, *params, options=None, sparsity=None, prefix=None, jacobian="auto",
          products="auto", linear=False, symmetric=False, stats=None):
    """Find x with residual(x, *params) = 0 by PETSc SNES; differentiable w.r.t. the params.

    Args:
        residual: ``residual(x, *params) -> F`` in torch, F with one entry per entry of x.
        x0: initial guess (any shape, float64, CPU). The solution does not depend on it, so it
            gets no gradient.
        params: tensors (gradients flow to them) or other values, passed to residual as is.
        options: PETSc options of this solve, keyed without the dash, e.g.
            ``{"ksp_type": "cg", "pc_type": "gamg", "snes_monitor": True}``; they stay in force
            for the solve's whole life, its backward included, and options PETSc never reads
            are reported (``bridges.petsc.set_unused_options``). They override the
            command line, which overrides the defaults: Newton with line search (newtonls),
            snes_rtol 1e-10, snes_atol 1e-12 (absolute 2-norm of F), snes_max_it 50,
            ksp_rtol 1e-10; KSP gmres with PC ilu (assembled) or none (matrix-free).
        sparsity: the pattern of dF/dx: an N x N scipy sparse matrix or boolean array
            (N = x0.numel(), coloured greedily, fine up to ~1e5 unknowns), or a ColouredJacobian
            (e.g. from ``stencil_sparsity(shape)`` for grid stencils; reuse it across solves).
            With a stencil_sparsity, ``pc_type mg`` gets a geometric hierarchy (linear
            interpolation, Galerkin coarse operators, levels down to ~8 points per side or
            ``pc_mg_levels``); gamg needs nothing extra.
        prefix: options prefix of this solve (``"heat_"`` makes ``-heat_ksp_type`` apply).
        jacobian: ``"assembled"`` (needs sparsity): the exact sparse Jacobian from one product
            per colour, so preconditioners such as gamg, mg, ilu, lu apply. ``"matrix-free"``: a
            PETSc Mat of Jacobian products (PCs that need matrix entries do not apply).
            ``"auto"``: assembled when sparsity is given.
        products: how Jacobian products are formed. ``"forward"``: forward-mode AD (every op in
            the residual needs one); ``"reverse"``: reverse-mode AD, which every bridged op has
            (assembled Jacobians: rows are coloured instead of columns); ``"fd"``: the
            finite-difference action J v ~ (F(x + h v) - F(x)) / h with PETSc MFFD's default
            step (matrix-free); ``"auto"`` (default) picks forward mode where every op has it
            and it measured faster, reverse mode or fd otherwise. Backward always uses reverse
            mode.
        linear: F is affine in x: the Jacobian is assembled (and the PC set up) once per solve.
        symmetric: dF/dx is symmetric: the matrix is marked so (SOR, ICC, Cholesky may use it)
            and backward reuses the forward's KSP and PC as they are. Otherwise backward solves
            with the explicitly transposed matrix and a KSP/PC set up from the same options
            (assembled), or KSP solveTranspose with VJPs (matrix-free).
        stats: a dict to receive the solve's SNES/KSP/PC types, Newton and linear iterations,
            final residual norm and converged reason (after backward also the transposed
            solve's iterations).

    Returns:
        x with residual(x, *params) ~= 0, shaped like x0. Its gradient solves J^T lam = g once at
        x (see ``symmetric``) and returns -lam^T dF/dparams by torch autograd.

    Raises:
        ForeignError: SNES did not converge (the reason and residual norm reached are named), or
            the transposed solve of backward did not converge.
    """
    who = WHO
    if not callable(residual):
        raise TypeError(f"{who}: residual must be callable as residual(x, *params), got "
                        f"{type(residual).__name__}")
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"{who}: x0 must be a torch.Tensor, got {type(x0).__name__}")
    check_tensor(x0, f"{who}: x0")
    if x0.numel() == 0:
        raise ValueError(f"{who}: x0 is empty")
    for i, p in enumerate(params):
        if isinstance(p, torch.Tensor) and p.device.type != "cpu":
            raise ValueError(f"{who}: params[{i}] is on device '{p.device}', but this PETSc build "
                             f"is CPU-only; move it with .cpu()")
    check_options(who, options)
    if jacobian not in JACOBIANS:
        raise ValueError(f"{who}: unknown jacobian {jacobian!r}; valid: {', '.join(JACOBIANS)}")
    if products not in PRODUCTS:
        raise ValueError(f"{who}: unknown products {products!r}; valid: {', '.join(PRODUCTS)}")
    n = x0.numel()
    assembler = None
    if sparsity is not None:
        if isinstance(sparsity, ColouredJacobian):
            assembler = sparsity
            size = sparsity.pattern.shape
        else:
            try:
                size = sparsity.shape
            except AttributeError:
                raise TypeError(f"{who}: sparsity must be an N x N scipy sparse matrix, boolean "
                                f"array or ColouredJacobian, got {type(sparsity).__name__}") \
                    from None
        if tuple(size) != (n, n):
            raise ValueError(f"{who}: sparsity has shape {tuple(size)}, but x0 has {n} entries: "
                             f"it must be {n} x {n} (one row and column per unknown, x0 "
                             f"flattened in C order)")
        if assembler is None:
            assembler = ColouredJacobian(sparsity)
    if jacobian == "auto":
        jacobian = "assembled" if assembler is not None else "matrix-free"
    if jacobian == "assembled" and assembler is None:
        raise ValueError(f"{who}: jacobian='assembled' needs sparsity= (the pattern of dF/dx, "
                         f"e.g. stencil_sparsity(x0.shape)); or use jacobian='matrix-free'")
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(f"{who}: stats must be a dict or None, got {type(stats).__name__}")
    if jacobian == "assembled" and products == "fd":
        raise ValueError(f"{who}: products='fd' is a matrix-free action; an assembled "
                         f"Jacobian takes products 'forward', 'reverse' or 'auto'")
    problem = _Problem(residual, options, prefix, jacobian, products, assembler, bool(linear),
                       bool(symmetric), len(params))
    if stats is not None:
        problem.stats = stats
    return _SOLVE(x0, problem, *params)
