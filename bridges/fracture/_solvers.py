"""The torch-native (scipy SuperLU) and PETSc solves of A(k) p = b(k) as bridged ops.

Both pullbacks do one transposed solve, lam = A^-T dL/dp, then dL/dk = -(dr/dk)^T lam from torch
autograd of the residual (exact, cheap: no solve). PETSc is imported only when used.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from scipy.sparse.linalg import splu

from .._core import foreign_function
from .._errors import ForeignError
from ._grid import assemble, check_permeability, grad_k

BACKENDS = ("torch", "petsc", "julia")
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
    return _TorchOp.apply(k, float(p_left), float(p_right))


# -- PETSc ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _petsc():
    from ..petsc import PETSc, as_vec, scalar_dtype, vec_as_tensor
    from ..petsc._options import scoped_options
    from ..petsc._runtime import reason_name
    return PETSc, as_vec, vec_as_tensor, scalar_dtype, scoped_options, reason_name


def _ksp_solve(ksp, b, x, transpose, stats):
    PETSc, *_, reason_name = _petsc()
    (ksp.solveTranspose if transpose else ksp.solve)(b, x)
    reason = ksp.getConvergedReason()
    what = "transposed (adjoint)" if transpose else "forward"
    if reason < 0:
        raise ForeignError(f"pressure_petsc: the {what} KSP solve did not converge "
                           f"({reason_name(PETSc.KSP.ConvergedReason, reason)} after "
                           f"{ksp.getIterationNumber()} iterations, residual norm "
                           f"{ksp.getResidualNorm():.3g}); try options={{'pc_type': 'lu'}} or "
                           f"check that k is well scaled")
    stats.append(ksp.getIterationNumber())


def _petsc_forward(k, p_left, p_right, options, prefix, stats):
    PETSc, as_vec, vec_as_tensor, scalar_dtype, scoped_options, _ = _petsc()
    dtype = scalar_dtype()
    kn = k.detach().to(dtype).numpy()
    A, b = assemble(kn, p_left, p_right)
    n = A.shape[0]
    mat = PETSc.Mat().createAIJ([n, n], csr=(A.indptr.astype(PETSc.IntType),
                                             A.indices.astype(PETSc.IntType), A.data),
                                comm=PETSc.COMM_SELF)
    mat.setOption(PETSc.Mat.Option.SYMMETRIC, True)
    mat.assemble()
    ksp = PETSc.KSP().create(comm=PETSc.COMM_SELF)
    if prefix:
        ksp.setOptionsPrefix(prefix)
    ksp.setOperators(mat)
    with scoped_options(prefix, options, PETSC_DEFAULTS, who="pressure_petsc"):
        ksp.setFromOptions()
    p = torch.zeros(n, dtype=dtype)
    x = as_vec(p, who="pressure_petsc")
    rhs = as_vec(torch.from_numpy(b), who="pressure_petsc")
    _ksp_solve(ksp, rhs, x, False, stats)
    p = vec_as_tensor(x).view(k.shape).clone()

    def pullback(grad_p):
        lam = torch.zeros(n, dtype=dtype)
        g = as_vec(grad_p.detach().to(dtype).reshape(-1).clone(), who="pressure_petsc")
        y = as_vec(lam, who="pressure_petsc")
        _ksp_solve(ksp, g, y, True, stats)  # preconditioner set-up reused from the forward
        lam = vec_as_tensor(y).view(k.shape).clone()
        return grad_k(p, lam, k.to(dtype), p_left, p_right), None, None, None, None, None
    return p, pullback


_PetscOp = foreign_function(_petsc_forward, name="fracture_pressure_petsc")


def pressure_petsc(k, p_left=2.0, p_right=1.0, *, options=None, prefix=None, stats=None):
    """Pressure (ny, nx) for cell permeability k (ny, nx): PETSc AIJ matrix, KSP (default CG +
    GAMG, rtol 1e-12); the gradient is one KSPSolveTranspose with the same preconditioner.

    options: PETSc options for this solve (keys without the dash, e.g. {"pc_type": "ilu"}),
    under `prefix` if given; precedence options > command line > defaults (PETSC_DEFAULTS).
    stats: a list that receives the iteration count of every solve (forward and adjoint).
    """
    check_permeability(k, "pressure_petsc")
    _check_values(p_left, p_right, "pressure_petsc")
    if prefix is not None and not isinstance(prefix, str):
        raise TypeError(f"pressure_petsc: prefix must be a string such as 'frac_', got {prefix!r}")
    if stats is not None and not isinstance(stats, list):
        raise TypeError(f"pressure_petsc: stats must be a list (it receives iteration counts)")
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"pressure_petsc: options must be a dict such as {{'pc_type': 'ilu'}}, "
                        f"got {type(options).__name__}")
    return _PetscOp.apply(k, float(p_left), float(p_right), options, prefix,
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
    raise ValueError(f"pressure: backend must be one of {BACKENDS}, got {backend!r}")
