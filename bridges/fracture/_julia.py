"""The Julia solver (bridges/fracture/Fracture.jl) through `julia2pytorch`, where Julia is
available."""
from __future__ import annotations

import functools
from pathlib import Path

from ._grid import check_boundary_values, check_permeability

FRACTURE_JL = Path(__file__).resolve().with_name("Fracture.jl")  # shipped as package data


@functools.lru_cache(maxsize=None)
def _julia_op():
    from ..julia import (JuliaUnavailableError, include_setup, julia2pytorch,
                         julia_unavailable_reason)
    reason = julia_unavailable_reason()
    if reason is not None:
        raise JuliaUnavailableError(f"pressure_julia: {reason}")
    if not FRACTURE_JL.is_file():
        raise FileNotFoundError(f"pressure_julia: the Julia solver {FRACTURE_JL} is missing")
    return julia2pytorch("pressure", include_setup(FRACTURE_JL, "Fracture", "pressure"))


def pressure_julia(k, p_left=2.0, p_right=1.0):
    """Pressure (ny, nx) for cell permeability k from Fracture.jl; gradient by its rrule (one
    transposed solve). Raises JuliaUnavailableError, saying how to provide Julia, where it is
    not."""
    check_permeability(k, "pressure_julia")
    check_boundary_values(p_left, p_right, "pressure_julia")
    return _julia_op()(k, float(p_left), float(p_right))
