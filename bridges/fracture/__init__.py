"""Steady single-phase flow through a rough fracture (DPFEHM-style), as differentiable torch ops.

Darcy flow on a regular nx x ny cell-centred grid of square cells (width 1/nx; the fracture plane
spans 1 x ny/nx), two-point flux: face permeability = geometric mean of the two cells, pressure
fixed on the left and right boundary faces (through half-cell transmissibilities), no flow across
top and bottom, no sources. The same discrete operator has four solvers, each a bridged op whose
gradient is one transposed solve:

    pressure(k, backend="torch")   # scipy SuperLU, the reference (one factorisation, two solves)
    pressure(k, backend="petsc")   # PETSc AIJ + KSP (CG + GAMG), adjoint by the same KSP
    pressure(k, backend="julia")   # Fracture.jl (ours) through julia2pytorch (where Julia runs)
    pressure(k, backend="dpfehm")  # DPFEHM.jl's groundwater solver, as in seed 003 (optional)

k is the cell permeability, shape (ny, nx): k = cubic_law(aperture) * W for learned weights W.
"""
from ._data import SyntheticFracture, aperture_field, cubic_law, roughness_factor, synthetic_fracture
from ._grid import boundary_flux, linear_profile, residual
from ._pressure import BACKENDS, pressure
from ._torch import pressure_torch
from ._julia import FRACTURE_JL, pressure_julia
from ._dpfehm import (DPFEHM_INSTALL, FRACTURE_DPFEHM_JL, dpfehm_unavailable_reason, grid_edges,
                      pressure_dpfehm)

__all__ = ["pressure", "pressure_torch", "pressure_petsc", "pressure_julia", "pressure_dpfehm",
           "BACKENDS", "residual", "boundary_flux", "linear_profile", "cubic_law",
           "aperture_field", "roughness_factor", "synthetic_fracture", "SyntheticFracture",
           "FRACTURE_JL", "FRACTURE_DPFEHM_JL", "DPFEHM_INSTALL", "dpfehm_unavailable_reason",
           "grid_edges"]


def __getattr__(name):
    """pressure_petsc on first use, so that importing bridges.fracture does not start PETSc."""
    if name == "pressure_petsc":
        from ._petsc import pressure_petsc
        return pressure_petsc
    raise AttributeError(f"module 'bridges.fracture' has no attribute {name!r}")
