"""The PETSc adapter: zero-copy Vec transfers, torch Jacobians as PETSc matrices, ODE solves with
TS whose gradients come from TSAdjoint, and nonlinear solves with SNES.

Importing reads no command line; ``bridges.petsc.init()`` hands PETSc the script's (``-ts_type``,
``-ksp_type``, ...).
"""
from ._grid import Grid, sum_gradients
from ._jacobian import ColouredJacobian, TorchJacobian
from ._ode import METHODS, ODESolver, ODEStats, odeint_adjoint
from ._options import UnusedOptionsWarning, set_unused_options
from ._runtime import PETSc, init, scalar_dtype
from ._solve import SNESSolver, SolveStats, mg_levels, solve, stencil_sparsity
from ._vec import as_vec, vec_as_tensor

__all__ = ["PETSc", "init", "scalar_dtype", "as_vec", "vec_as_tensor", "TorchJacobian",
           "ColouredJacobian", "odeint_adjoint", "ODESolver", "ODEStats", "METHODS", "solve",
           "SNESSolver", "SolveStats", "stencil_sparsity", "Grid", "mg_levels", "sum_gradients",
           "set_unused_options", "UnusedOptionsWarning"]
