"""The PETSc adapter: zero-copy Vec transfers, torch Jacobians as PETSc matrices, ODE solves with
TS whose gradients come from TSAdjoint, and nonlinear solves with SNES.

Importing reads no command line; ``bridges.petsc.init()`` hands PETSc the script's (``-ts_type``,
``-ksp_type``, ...).

For a bridged op of your own that drives petsc4py directly (bridges.fracture's pressure_petsc is
one): ``SolverOptions`` keeps a solver's options under a prefix of its own (validated by
``check_options`` and ``check_prefix``), ``petsc_errors`` and ``diverged`` turn PETSc failures into
errors that say what to try, ``check_solution`` checks a KSP's answer, and ``destroy`` frees PETSc
objects now.
"""
from ._grid import Grid, sum_gradients
from ._jacobian import ColouredJacobian, TorchJacobian
from ._linear import check_solution
from ._ode import METHODS, ODESolver, ODEStats, odeint_adjoint
from ._options import (SolverOptions, UnusedOptionsWarning, check_options, check_prefix,
                       set_unused_options)
from ._runtime import PETSc, destroy, diverged, init, petsc_errors, scalar_dtype
from ._solve import SNESSolver, SolveStats, mg_levels, solve, stencil_sparsity
from ._vec import as_vec, vec_as_tensor

__all__ = ["PETSc", "init", "scalar_dtype", "as_vec", "vec_as_tensor", "TorchJacobian",
           "ColouredJacobian", "odeint_adjoint", "ODESolver", "ODEStats", "METHODS", "solve",
           "SNESSolver", "SolveStats", "stencil_sparsity", "Grid", "mg_levels", "sum_gradients",
           "set_unused_options", "UnusedOptionsWarning",
           "SolverOptions", "check_options", "check_prefix", "petsc_errors", "diverged",
           "check_solution", "destroy"]
