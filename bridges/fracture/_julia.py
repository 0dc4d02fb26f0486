"""The Julia solver (bridges/fracture/Fracture.jl) through `julia2pytorch`, where Julia is
available."""
from __future__ import annotations

import functools
from pathlib import Path

from ._grid import check_permeability

FRACTURE_JL = Path(__file__).resolve().with_name("Fracture.jl")  # shipped as package data


def include_setup(path: Path, module: str, name: str = "pressure") -> str:
    """Julia setup code that includes the file `path` (which defines `module`) and imports
    `name` from it. The path is a raw string, so `$` and backslashes in it stay literal."""
    from ..julia._code import raw_string
    return f"Base.include(@__MODULE__, {raw_string(path)})\nusing .{module}: {name}\n"


@functools.lru_cache(maxsize=None)
def _julia_op():
    from ..julia import JuliaUnavailableError, julia2pytorch, julia_unavailable_reason
    reason = julia_unavailable_reason()
    if reason is not None:
        raise JuliaUnavailableError(f"pressure_julia: {reason}")
    if not FRACTURE_JL.is_file():
        raise FileNotFoundError(f"pressure_julia: the Julia solver {FRACTURE_JL} is missing")
    return julia2pytorch("pressure", include_setup(FRACTURE_JL, "Fracture"))


def pressure_julia(k, p_left=2.0, p_right=1.0):
    """Pressure (ny, nx) for cell permeability k from Fracture.jl; gradient by its rrule (one
    transposed solve). Raises JuliaUnavailableError, saying how to provide Julia, where it is
    not."""
    from ._solvers import _check_values
    check_permeability(k, "pressure_julia")
    _check_values(p_left, p_right, "pressure_julia")
    return _julia_op()(k, float(p_left), float(p_right))
