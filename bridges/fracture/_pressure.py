"""The backend switch: one `pressure` call for the four solvers of the same operator. Each backend's
module is imported when first used (PETSc and Julia only where they are asked for)."""
from __future__ import annotations

BACKENDS = ("torch", "petsc", "julia", "dpfehm")


def pressure(k, backend="petsc", p_left=2.0, p_right=1.0, **kwargs):
    """Pressure field for cell permeability k with the chosen backend (see BACKENDS); keyword
    arguments go to that backend's function (e.g. ``options=`` for petsc)."""
    if backend == "torch":
        from ._torch import pressure_torch as solver
    elif backend == "petsc":
        from ._petsc import pressure_petsc as solver
    elif backend == "julia":
        from ._julia import pressure_julia as solver
    elif backend == "dpfehm":
        from ._dpfehm import pressure_dpfehm as solver
    else:
        raise ValueError(f"pressure: backend must be one of {BACKENDS}, got {backend!r}")
    return solver(k, p_left, p_right, **kwargs)
