"""The fracture solve by DPFEHM.jl (seed 003's simulator), through `julia2pytorch`, on the same grid
and operator as the other backends (bridges/fracture/FractureDPFEHM.jl).

DPFEHM is an optional Julia dependency: declared in BridgesJL's Project.toml ([weakdeps], with a
compat bound), not installed with bridges. It pulls in a large dependency tree
(DifferentialEquations among it) and holds Zygote at 0.6 (hence BridgesJL's Zygote "0.6, 0.7").
Install it once with the command DPFEHM_INSTALL.
"""
from __future__ import annotations

import functools
import numbers
from pathlib import Path

import numpy as np

from ._grid import check_boundary_values, check_permeability

FRACTURE_DPFEHM_JL = Path(__file__).resolve().with_name("FractureDPFEHM.jl")
DPFEHM_UUID = "8c3ed914-120a-47bd-8d72-56c743732853"
DPFEHM_VERSION = "0.1"
DPFEHM_INSTALL = (f"python -c \"import juliapkg; juliapkg.add('DPFEHM', '{DPFEHM_UUID}', "
                  f"version='{DPFEHM_VERSION}'); juliapkg.resolve()\"")
RELTOL, MAXITER = 1e-13, 500  # DPFEHM's multigrid: near machine precision, as the tests need
WHO = "pressure_dpfehm"


def grid_edges(ny: int, nx: int) -> np.ndarray:
    """DPFEHM's graph of the (ny, nx) cell grid as an (E, 2) int64 array of 1-based node pairs.

    Nodes 1..ny*nx are the cells, numbered column-major (cell (i, j) is i + j*ny + 1, as Julia
    numbers k[i+1, j+1]); then ny left ghost nodes (row i: ny*nx + i + 1) and ny right ones
    (ny*nx + ny + i + 1). Edges: every interior face (between two cells; first all x-faces, then
    all y-faces), then every left and right boundary face (from its cell to its row's ghost).
    """
    n = ny * nx
    cell = np.arange(n).reshape(ny, nx, order="F") + 1
    rows = np.arange(ny)
    pairs = [(cell[:, :-1], cell[:, 1:]), (cell[:-1, :], cell[1:, :]),
             (cell[:, 0], n + rows + 1), (cell[:, -1], n + ny + rows + 1)]
    return np.stack([np.concatenate([a.ravel(order="F") for a, _ in pairs]),
                     np.concatenate([b.ravel(order="F") for _, b in pairs])],
                    axis=1).astype(np.int64)


def dpfehm_unavailable_reason() -> str | None:
    """None when DPFEHM can be loaded, else what is missing and how to install it.

    Unlike `julia_unavailable_reason`, this starts Julia (where Julia exists) to look for DPFEHM.
    """
    from ..julia import julia_has_package, julia_unavailable_reason
    reason = julia_unavailable_reason()
    if reason is not None:
        return f"Julia is not available: {reason}"
    if not julia_has_package("DPFEHM"):
        return (f"DPFEHM is not available: the Julia package DPFEHM is not installed in Julia's "
                f"environment. It is optional; install it once with\n    {DPFEHM_INSTALL}\n"
                f"(or, in a ready environment set by PYTHON_JULIACALL_PROJECT: Pkg.add(name="
                f"\"DPFEHM\", version=\"{DPFEHM_VERSION}\"))")
    return None


@functools.lru_cache(maxsize=None)
def _dpfehm_op():
    from ..julia import JuliaUnavailableError, include_setup, julia2pytorch
    reason = dpfehm_unavailable_reason()
    if reason is not None:
        raise JuliaUnavailableError(f"{WHO}: {reason}")
    setup = include_setup(FRACTURE_DPFEHM_JL, "FractureDPFEHM", "pressure")
    return julia2pytorch("pressure", setup)


def pressure_dpfehm(k, p_left=2.0, p_right=1.0, *, reltol=RELTOL, maxiter=MAXITER):
    """Pressure (ny, nx) for cell permeability k (ny, nx) from DPFEHM's steady-state groundwater
    solver (algebraic multigrid to relative residual `reltol`, at most `maxiter` cycles); the
    gradient is DPFEHM's rrule, one multigrid solve with the transposed matrix."""
    check_permeability(k, WHO)
    check_boundary_values(p_left, p_right, WHO)
    if not (isinstance(reltol, numbers.Real) and not isinstance(reltol, bool) and 0 < reltol < 1):
        raise ValueError(f"{WHO}: reltol must be a float in (0, 1), got {reltol!r}")
    if not (isinstance(maxiter, numbers.Integral) and not isinstance(maxiter, bool)
            and maxiter >= 1):
        raise ValueError(f"{WHO}: maxiter must be an int >= 1, got {maxiter!r}")
    edges = grid_edges(*k.shape)
    return _dpfehm_op()(k, edges, float(p_left), float(p_right), float(reltol),
                         int(maxiter))
