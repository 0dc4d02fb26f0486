"""Backward-stable linear solves for the PETSc adapter, and a guard on every transposed solve.

- `BlockLU`: a PETSc PC (type python) for block-diagonal operators (independent samples, or one
  small dense system). Each block is factored once per operator state with partial pivoting
  (LAPACK getrf/getrs: called per block through scipy for a few blocks, batched through
  `torch.linalg.lu_factor_ex`/`lu_solve` for many), applied by triangular solves, transposed
  for the adjoint, never through an explicit inverse: PETSc's PCPBJACOBI inverts each block,
  and applying an explicit inverse of shift*I - J at a huge step (condition ~1e13 on ROBER at
  t ~ 1e11) lost every digit of the adjoint, which no Newton iteration corrects.
  Transposed applications refine with residuals in extended precision (80-bit long double),
  which brings the forward error from cond * eps (1e-3 at condition 1e13) down to about eps,
  and raise `IllConditionedError` if the backward error stays above its limit after
  `REFINEMENTS` steps.
- `check_solution`: the same guard for any KSP's adjoint solve (Krylov or direct): one product
  with the operator; the residual must be within what the KSP's tolerances promise.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from scipy.linalg.lapack import dgetrf, dgetrs

from .._errors import SolverFailure
from ._runtime import PETSc
from ._vec import VecViews

LAPACK_BLOCKS = 8     # up to this many blocks, LAPACK per block (torch's batched call: ~30 us)
REFINEMENTS = 2       # refinement steps a transposed block solve may take to be accurate
EXTENDED_STEPS = 2    # further steps, until the corrections reach rounding
EPS = float(np.finfo(np.float64).eps)
BACKWARD_ERROR = 1e3  # accepted normwise backward error, in units of n * machine epsilon
KRYLOV_MARGIN = 1e4   # accepted true residual of a Krylov solve, in units of its tolerance
ADJOINT_RTOL = 1e-10  # the loosest relative tolerance an adjoint's Krylov solves get


class IllConditionedError(SolverFailure):
    """A linear solve could not reach an accurate answer (its residual stayed far above what
    the factorisation or the tolerances allow): the gradient it feeds would be wrong."""


class BlockLU:
    """Context of a python-type PETSc PC: exact solves with the diagonal blocks (of the block
    size of the preconditioning matrix, an AIJ matrix whose pattern is exactly its diagonal
    blocks, as `bridges.petsc.block_jacobian` makes)."""

    def __init__(self, who: str):
        self.who = who
        self.blocks = self.lu = self.norms = self._extended = self.views = None
        self.factorisations = 0
        self.refinements = 0

    def setUp(self, pc):
        _, P = pc.getOperators()
        size = max(P.getBlockSize(), 1)
        _, _, values = P.getValuesCSR()  # rows sorted, each row its own block's columns
        blocks = values.reshape(-1, size, size)
        if len(blocks) <= LAPACK_BLOCKS:
            factors = [dgetrf(block) for block in blocks]
            self.lu, info = [(lu, pivots) for lu, pivots, _ in factors], [f[2] for f in factors]
        else:
            lu, pivots, info = torch.linalg.lu_factor_ex(torch.from_numpy(blocks))
            self.lu, info = (lu, pivots), info.numpy()
        singular = np.flatnonzero(info)
        if singular.size:
            raise IllConditionedError(
                f"{self.who}: the Jacobian block of sample {int(singular[0])} is singular (zero "
                f"pivot in its LU factorisation); check func there, or use a smaller step")
        self.blocks, self._extended = blocks, None
        if self.views is None or self.views.shape != blocks.shape[:2]:
            self.views = VecViews(blocks.shape[:2])  # (block, row)
        self.norms = None  # |A_i|_inf, for the adjoint's check (made there)
        self.factorisations += 1

    def _solve(self, b, adjoint):
        """A_i^-1 b_i (A_i^-T b_i with `adjoint`) for every block i; b: (blocks, rows) numpy."""
        if isinstance(self.lu, list):
            trans = 1 if adjoint else 0
            return np.stack([dgetrs(lu, pivots, rhs, trans=trans)[0]
                             for (lu, pivots), rhs in zip(self.lu, b)])
        lu, pivots = self.lu
        return torch.linalg.lu_solve(lu, pivots, torch.from_numpy(b)[..., None],
                                     adjoint=adjoint).numpy()[..., 0]

    def apply(self, pc, x, y):
        self.views.write(y).numpy()[:] = self._solve(self.views.read(x).numpy(), False)

    def applyTranspose(self, pc, x, y):
        """y = A^-T x from the factors, then refined with residuals in long double: the backward
        error must fall within the limit in `REFINEMENTS` corrections, and the corrections go on
        (at most `EXTENDED_STEPS` more) until they reach rounding. In numpy: on blocks this
        small, each torch op would cost more than the arithmetic."""
        if self._extended is None:  # A^T in long double and |A^T|_inf, once per factorisation
            blocks = self.blocks
            self._extended = blocks.transpose(0, 2, 1).astype(np.longdouble)
            self.norms = np.abs(blocks).sum(axis=1).max(axis=1)
        rhs, out = self.views.read(x).numpy(), self.views.write(y).numpy()
        solution = self._solve(rhs, True).astype(np.longdouble)
        limit = BACKWARD_ERROR * self.blocks.shape[-1] * EPS
        b_size, converged = np.abs(rhs).max(axis=1), False
        for step in range(REFINEMENTS + EXTENDED_STEPS + 1):
            residual = rhs - np.einsum("kij,kj->ki", self._extended, solution)
            scale = self.norms * np.abs(solution).max(axis=1).astype(np.float64) + b_size
            error = np.abs(residual).max(axis=1).astype(np.float64) / np.where(scale > 0, scale, 1)
            worst = int(error.argmax())
            accurate = error[worst] <= limit
            if not accurate and step == REFINEMENTS:
                raise IllConditionedError(
                    f"{self.who}: a transposed (adjoint) solve with the Jacobian block of sample "
                    f"{worst} kept a backward error of {error[worst]:.1e} after {REFINEMENTS} "
                    f"refinement steps (accepted: {limit:.1e}); the gradient would be wrong. "
                    f"What to try: smaller steps (a smaller ts_max_time_step or step_size), "
                    f"tighter rtol, or rescaling the states")
            if accurate and converged or step == REFINEMENTS + EXTENDED_STEPS:
                break
            self.refinements += not accurate
            correction = self._solve(residual.astype(np.float64), True)
            solution += correction
            converged = np.abs(correction).max() <= EPS * np.abs(solution).max()
        out[:] = solution

    def view(self, pc, viewer=None):
        if viewer is not None:
            viewer.printfASCII("  bridges BlockLU: pivoted LU of each diagonal block "
                               "(LAPACK getrf), transposed solves refined\n")


def use_block_lu(ksp, who: str) -> BlockLU:
    """Make `ksp`'s PC a BlockLU; returns its context."""
    context = BlockLU(who)
    pc = ksp.getPC()
    pc.setType(PETSc.PC.Type.PYTHON)
    pc.setPythonContext(context)
    return context


@contextlib.contextmanager
def adjoint_tolerance(ksp, snes=None):
    """Inside, the KSP's relative tolerance is at most ADJOINT_RTOL, and the Eisenstat-Walker
    choice of `snes` (snes_ksp_ew), which resets it before each solve, is off (both restored
    after): Newton's later iterations correct a loose linear solve (an inexact Newton's ksp_rtol
    1e-2), but an adjoint's solve goes straight into the gradient (99 % off at 1e-2)."""
    old, ew = ksp.getTolerances(), snes is not None and snes.getUseEW()
    ksp.setTolerances(min(old[0], ADJOINT_RTOL), *old[1:])
    if ew:
        snes.setUseEW(False)
    try:
        yield
    finally:
        ksp.setTolerances(*old)
        if ew:
            snes.setUseEW(True)


def check_solution(ksp, b, x, who: str, what: str, *, transpose: bool, nullspace=None) -> None:
    """Raise IllConditionedError unless x solves A x = b (A^T x = b with `transpose`; A: the
    KSP's operator) as accurately as the KSP promises: to its tolerances for a Krylov method, to
    a small normwise backward error for a direct solve (preonly). Costs one product with A."""
    A, _ = ksp.getOperators()
    r = b.duplicate()
    try:
        (A.multTranspose if transpose else A.mult)(x, r)
        r.aypx(-1.0, b)  # r = b - A x
        if nullspace is not None:  # a singular operator: b's part in the null space is dropped
            nullspace.remove(r)
        residual, b_norm = r.norm(), b.norm()
    finally:
        r.destroy()
    if ksp.getType() == PETSc.KSP.Type.PREONLY:
        n = A.getSize()[0]
        scale = A.norm(PETSc.NormType.INFINITY) * x.norm(PETSc.NormType.INFINITY) + b_norm
        limit = BACKWARD_ERROR * n * torch.finfo(torch.float64).eps * scale
    else:
        rtol, atol, _, _ = ksp.getTolerances()
        limit = KRYLOV_MARGIN * max(rtol * b_norm, atol)
    if residual > limit:
        raise IllConditionedError(
            f"{who}: {what} (KSP {ksp.getType()}, PC {ksp.getPC().getType()}) left a residual "
            f"|b - A{'^T' if transpose else ''} x| = {residual:.2e} against {limit:.2e} allowed "
            f"(|b| = {b_norm:.2e}); the gradient would be wrong. What to try: a pivoting or "
            f"tighter solve (options {{'ksp_type': 'gmres', 'ksp_rtol': 1e-12}}, or a stronger "
            f"pc_type)")
