"""The PETSc solve of A(k) p = b(k) as a bridged op: the matrix assembled in scipy handed to PETSc
as AIJ, KSP (CG + GAMG by default), and the gradient's one adjoint solve A^T lam = g by the same
KSP and preconditioner (A is symmetric, so KSPSolve: no PC needs a transpose), then dL/dk =
-(dr/dk)^T lam by torch autograd of the residual."""
from __future__ import annotations

import torch

from .._core import foreign_function
from .._runs import forward as run_forward
from ..petsc import (PETSc, SolverOptions, as_vec, check_options, check_prefix, check_solution,
                     destroy, diverged, petsc_errors, scalar_dtype)
from ._grid import assemble, check_boundary_values, check_permeability, check_values, grad_k

WHO = "pressure_petsc"
PETSC_DEFAULTS = {"ksp_type": "cg", "pc_type": "gamg", "ksp_rtol": 1e-12, "ksp_atol": 1e-50,
                  "ksp_max_it": 10_000}


class _PetscSolve:
    """A run (see bridges._runs): one assembled system, its KSP (whose set-up the adjoint
    reuses) and options."""

    def __init__(self, k, p_left, p_right, options, prefix, stats):
        self.stats, self.dtype, self.ksp = stats, scalar_dtype(), None
        # p depends on k / max(k) alone (A and b are linear in k), and PETSc's eigenvalue
        # estimates underflow for k ~ 1e-155: solve with k / max(k), scale the gradient back
        k = k.detach().to(self.dtype)
        self.scale = float(k.max())
        self.k, self.p_left, self.p_right = k / self.scale, p_left, p_right
        A, self.b = assemble(self.k.numpy(), p_left, p_right)
        self.options = SolverOptions(WHO, prefix, options, PETSC_DEFAULTS)
        n = A.shape[0]
        self.mat = PETSc.Mat().createAIJ([n, n], csr=(A.indptr.astype(PETSc.IntType),
                                                      A.indices.astype(PETSc.IntType), A.data),
                                         comm=PETSc.COMM_SELF)
        try:
            self.mat.setOption(PETSc.Mat.Option.SYMMETRIC, True)
            self.mat.assemble()
            self.ksp = PETSc.KSP().create(comm=PETSc.COMM_SELF)
            self.ksp.setOptionsPrefix(self.options.prefix)
            self.ksp.setOperators(self.mat)
            with petsc_errors(WHO, "setting up PETSc KSP from the options"):
                self.ksp.setFromOptions()
        except BaseException:
            self.release()
            raise

    def solve(self):
        p = self._solve(torch.from_numpy(self.b), transpose=False)
        # the pullback's own alias of the output (same memory): the output itself would tie
        # this run to its graph, which holds the run, a cycle that outlives a skipped backward
        self.p = p.detach()
        self.options.report_unused()
        return p

    def pullback(self, grad_p, *, needs_input_grad):
        lam = self._solve(grad_p.detach().to(self.dtype), transpose=True)
        return (grad_k(self.p, lam, self.k, self.p_left, self.p_right) / self.scale, None, None,
                None, None, None)

    def _solve(self, rhs, transpose):
        """A^-1 rhs (for the adjoint A^-T rhs, which is the same solve: A is symmetric. With
        plain petsc4py, CG + GAMG set from options fails a transposed solve of a 1 x 1 system
        (PETSc error 56, SOR's transpose), and destroying that KSP then aborts the process)."""
        x = torch.zeros(rhs.numel(), dtype=self.dtype)
        b_vec, x_vec = as_vec(rhs.reshape(-1).clone(), who=WHO), as_vec(x, who=WHO)
        what = "transposed (adjoint)" if transpose else "forward"
        try:
            with petsc_errors(WHO, f"the {what} KSP solve"):
                self.ksp.solve(b_vec, x_vec)
            reason = self.ksp.getConvergedReason()
            if reason < 0:
                raise diverged(WHO, f"the {what} KSP solve", PETSc.KSP.ConvergedReason, reason,
                               f"after {self.ksp.getIterationNumber()} iterations, "
                               f"residual norm {self.ksp.getResidualNorm():.3g}",
                               "options={'pc_type': 'lu'}, or check that k is well scaled")
            if transpose:
                check_solution(self.ksp, b_vec, x_vec, WHO, f"the {what} KSP solve",
                               transpose=True)
        finally:
            destroy(b_vec, x_vec)
        self.stats.append(self.ksp.getIterationNumber())
        return x.view(self.k.shape)

    def release(self):
        destroy(self.ksp, self.mat)
        self.ksp = self.mat = None
        self.options.close()


def _petsc_forward(k, p_left, p_right, options, prefix, stats, needs_input_grad):
    check_values(k, WHO)  # (again: under torch.func transforms, only here)
    return run_forward(_PetscSolve(k, p_left, p_right, options, prefix, stats),
                       needs_input_grad[0], who=WHO)


_PetscOp = foreign_function(_petsc_forward, name="fracture_pressure_petsc",
                            pass_needs_input_grad=True)


def pressure_petsc(k, p_left=2.0, p_right=1.0, *, options=None, prefix=None, stats=None):
    """Pressure (ny, nx) for cell permeability k (ny, nx): PETSc AIJ matrix, KSP (default CG +
    GAMG, rtol 1e-12); the gradient is one more solve with the same KSP (A is symmetric).

    options: PETSc options for this solve (keys without the dash, e.g. {"pc_type": "ilu"}),
    under `prefix` if given; precedence options > command line > defaults (PETSC_DEFAULTS).
    stats: a list that receives the iteration count of every solve (forward and adjoint).
    """
    check_permeability(k, WHO)
    check_boundary_values(p_left, p_right, WHO)
    if stats is not None and not isinstance(stats, list):
        raise TypeError(f"{WHO}: stats must be a list (it receives iteration counts)")
    check_prefix(WHO, prefix)
    check_options(WHO, options)
    return _PetscOp(k, float(p_left), float(p_right), options, prefix,
                    [] if stats is None else stats)
