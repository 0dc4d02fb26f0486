"""The Julia solver (julia/src/Fracture.jl) through `julia2pytorch`, where Julia is available."""
from __future__ import annotations

import functools
from pathlib import Path

from ._grid import check_permeability

FRACTURE_JL = Path(__file__).resolve().parents[2] / "julia" / "src" / "Fracture.jl"


@functools.lru_cache(maxsize=None)
def _julia_op():
    from ..julia import JuliaUnavailableError, julia2pytorch, julia_unavailable_reason
    reason = julia_unavailable_reason()
    if reason is not None:
        raise JuliaUnavailableError(f"pressure_julia: {reason}")
    if not FRACTURE_JL.is_file():
        raise FileNotFoundError(f"pressure_julia: the Julia solver {FRACTURE_JL} is missing")
    path = str(FRACTURE_JL).replace("\\", "/")
    setup = f'Base.include(@__MODULE__, "{path}")\nusing .Fracture: pressure\n'
    return julia2pytorch("pressure", setup)


def pressure_julia(k, p_left=2.0, p_right=1.0):
    """Pressure (ny, nx) for cell permeability k from Fracture.jl; gradient by its rrule (one
    transposed solve). Raises JuliaUnavailableError, saying how to provide Julia, where it is not."""
    check_permeability(k, "pressure_julia")
    return _julia_op()(k, float(p_left), float(p_right))
