"""The torch-native (scipy SuperLU) and PETSc solves of A(k) p = b(k) as bridged ops, and the
backend switch `pressure`.

Both pullbacks do one transposed solve, lam = A^-T dL/dp, then dL/dk = -(dr/dk)^T lam from torch
autograd of the residual (exact, cheap: no solve). PETSc is imported only when used.
"""
from __future__ import annotations

import functools
import weakref

import numpy as np
import torch
from scipy.sparse.linalg import splu

from .._core import foreign_function
from ._grid import assemble, check_permeability, grad_k

BACKENDS = ("torch", "petsc", "julia", "dpfehm")
WHO = "pressure_petsc"
PETSC_DEFAULTS = {"ksp_type": "cg", "pc_type": "gamg", "ksp_rtol": 1e-12, "ksp_atol": 1e-50,
                  "ksp_max_it": 10_000}


def _check_values(p_left, p_right, who):
    for name, v in (("p_left", p_left), ("p_right", p_right)):
        if not isinstance(v, (int, float)) or not np.isfinite(v):
            raise TypeError(f"{who}: {name} must be a finite number, got {v!r}")


# -- torch-native reference -----------------------------------------------------------------------
def _torch_forward(k, p_left, p_right):
    kn = k.numpy().astype(np.float64, copy=False)
    A, b = assemble(kn, p_left, p_right)
    lu = splu(A.tocsc(), permc_spec="MMD_AT_PLUS_A")  # symmetric pattern: fill-reducing ordering
    p = torch.from_numpy(lu.solve(b).reshape(k.shape)).to(k.dtype)

    def pullback(grad_p):
        lam = lu.solve(grad_p.detach().double().reshape(-1).numpy(), trans="T")
        lam = torch.from_numpy(lam.reshape(k.shape)).to(k.dtype)
        return grad_k(p, lam, k, p_left, p_right), None, None
    return p, pullback


_TorchOp = foreign_function(_torch_forward, name="fracture_pressure_torch")


def pressure_torch(k, p_left=2.0, p_right=1.0):
    """Pressure (ny, nx) for cell permeability k (ny, nx), by a sparse LU solve (scipy SuperLU);
    its gradient reuses the factorisation for one transposed solve."""
    check_permeability(k, "pressure_torch")
    _check_values(p_left, p_right, "pressure_torch")
    return _TorchOp(k, float(p_left), float(p_right))


# -- PETSc ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _petsc():
    """The PETSc adapter's pieces, imported on first use."""
    import types
    from ..petsc import _linear, _options, _runtime, _vec
    return types.SimpleNamespace(PETSc=_runtime.PETSc, check_solution=_linear.check_solution, scalar_dtype=_runtime.scalar_dtype,
                                 petsc_errors=_runtime.petsc_errors, diverged=_runtime.diverged,
                                 destroy=_runtime.destroy, as_vec=_vec.as_vec,
                                 SolverOptions=_options.SolverOptions,
                                 check_prefix=_options.check_prefix,
                                 check_options=_options.check_options)


class _PetscSolve:
    """One assembled system, its KSP (set-up reused by the adjoint) and options; destroyed when
    the pullback is released."""

    def __init__(self, k, p_left, p_right, options, prefix, stats):
        petsc = _petsc()
        PETSc, self.stats = petsc.PETSc, stats
        self.dtype = petsc.scalar_dtype()
        self.k, self.p_left, self.p_right = k.detach().to(self.dtype), p_left, p_right
        A, self.b = assemble(self.k.numpy(), p_left, p_right)
        self.options = petsc.SolverOptions(WHO, prefix, options, PETSC_DEFAULTS)
        n = A.shape[0]
        self.mat = PETSc.Mat().createAIJ([n, n], csr=(A.indptr.astype(PETSc.IntType),
                                                      A.indices.astype(PETSc.IntType), A.data),
                                         comm=PETSc.COMM_SELF)
        self.mat.setOption(PETSc.Mat.Option.SYMMETRIC, True)
        self.mat.assemble()
        self.ksp = PETSc.KSP().create(comm=PETSc.COMM_SELF)
        self.ksp.setOptionsPrefix(self.options.prefix)
        self.ksp.setOperators(self.mat)
        with petsc.petsc_errors(WHO, "setting up PETSc KSP from the options"):
            self.ksp.setFromOptions()

    def solve(self, rhs, transpose):
        """A^-1 rhs (A^-T rhs for the adjoint, same KSP and preconditioner)."""
        petsc = _petsc()
        x = torch.zeros(rhs.numel(), dtype=self.dtype)
        b_vec, x_vec = petsc.as_vec(rhs.reshape(-1).clone(), who=WHO), petsc.as_vec(x, who=WHO)
        what = "transposed (adjoint)" if transpose else "forward"
        try:
            with petsc.petsc_errors(WHO, f"the {what} KSP solve"):
                (self.ksp.solveTranspose if transpose else self.ksp.solve)(b_vec, x_vec)
            reason = self.ksp.getConvergedReason()
            if reason < 0:
                raise petsc.diverged(WHO, f"the {what} KSP solve",
                                     petsc.PETSc.KSP.ConvergedReason, reason,
                                     f"after {self.ksp.getIterationNumber()} iterations, "
                                     f"residual norm {self.ksp.getResidualNorm():.3g}",
                                     "options={'pc_type': 'lu'}, or check that k is well scaled")
            if transpose:
                petsc.check_solution(self.ksp, b_vec, x_vec, WHO, f"the {what} KSP solve",
                                     transpose=True)
        finally:
            petsc.destroy(b_vec, x_vec)
        self.stats.append(self.ksp.getIterationNumber())
        return x.view(self.k.shape)

    def release(self):
        _petsc().destroy(self.ksp, self.mat)
        self.ksp = self.mat = None
        self.options.close()


class _PetscPullback:
    def __init__(self, run, p):
        self.run, self.p = run, p
        weakref.finalize(self, run.release)

    def __call__(self, grad_p, *, needs_input_grad):
        run = self.run
        lam = run.solve(grad_p.detach().to(run.dtype), transpose=True)
        return grad_k(self.p, lam, run.k, run.p_left, run.p_right), None, None, None, None, None


def _petsc_forward(k, p_left, p_right, options, prefix, stats, needs_input_grad):
    run = _PetscSolve(k, p_left, p_right, options, prefix, stats)
    try:
        p = run.solve(torch.from_numpy(run.b), transpose=False)
        run.options.report_unused()
    except BaseException:
        run.release()
        raise
    if not needs_input_grad[0]:
        run.release()
        return p, None
    return p, _PetscPullback(run, p)


_PetscOp = foreign_function(_petsc_forward, name="fracture_pressure_petsc",
                            pass_needs_input_grad=True)


def pressure_petsc(k, p_left=2.0, p_right=1.0, *, options=None, prefix=None, stats=None):
    """Pressure (ny, nx) for cell permeability k (ny, nx): PETSc AIJ matrix, KSP (default CG +
    GAMG, rtol 1e-12); the gradient is one KSPSolveTranspose with the same preconditioner.

    options: PETSc options for this solve (keys without the dash, e.g. {"pc_type": "ilu"}),
    under `prefix` if given; precedence options > command line > defaults (PETSC_DEFAULTS).
    stats: a list that receives the iteration count of every solve (forward and adjoint).
    """
    check_permeability(k, WHO)
    _check_values(p_left, p_right, WHO)
    if stats is not None and not isinstance(stats, list):
        raise TypeError(f"{WHO}: stats must be a list (it receives iteration counts)")
    petsc = _petsc()
    petsc.check_prefix(WHO, prefix)
    petsc.check_options(WHO, options)
    return _PetscOp(k, float(p_left), float(p_right), options, prefix,
                    [] if stats is None else stats)


def pressure(k, backend="petsc", p_left=2.0, p_right=1.0, **kwargs):
    """Pressure field for cell permeability k with the chosen backend (see BACKENDS)."""
    if backend == "torch":
        return pressure_torch(k, p_left, p_right, **kwargs)
    if backend == "petsc":
        return pressure_petsc(k, p_left, p_right, **kwargs)
    if backend == "julia":
        from ._julia import pressure_julia
        return pressure_julia(k, p_left, p_right, **kwargs)
    if backend == "dpfehm":
        from ._dpfehm import pressure_dpfehm
        return pressure_dpfehm(k, p_left, p_right, **kwargs)
    raise ValueError(f"pressure: backend must be one of {BACKENDS}, got {backend!r}")
