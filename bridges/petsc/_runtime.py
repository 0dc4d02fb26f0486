"""petsc4py, initialised once with the command line so PETSc options work as usual."""
from __future__ import annotations

import sys

import numpy as np
import torch

try:
    import petsc4py
except ImportError as exc:  # pragma: no cover - depends on the machine
    raise ImportError("bridges.petsc needs petsc4py, which is not installed. Run `bash .ci/setup` "
                      "(builds PETSc and petsc4py from source) or `pip install petsc petsc4py`, "
                      "then retry") from exc

# PETSc reads -ts_type, -ksp_type, ... from the command line. Scripts' own arguments (pytest's,
# argparse's) would be reported as unused PETSc options at exit, so that report is off unless
# asked for with -options_left.
_argv = sys.argv if "-options_left" in sys.argv else [*sys.argv, "-options_left", "no"]
petsc4py.init(_argv)
from petsc4py import PETSc  # noqa: E402


def scalar_dtype() -> torch.dtype:
    """The torch dtype of PETSc's scalar type (float64 for a default build)."""
    return torch.from_numpy(np.zeros(0, dtype=PETSc.ScalarType)).dtype


def reason_name(reasons, value: int) -> str:
    """The name of a PETSc converged/diverged reason code, e.g. PETSc.TS.ConvergedReason."""
    for name in dir(reasons):
        if not name.startswith("_") and getattr(reasons, name) == value:
            if name.startswith(("CONVERGED_", "DIVERGED_")):
                return name
    extra = {-3: "DIVERGED_LINEAR_SOLVE (forward sensitivity)", -4: "DIVERGED_LINEAR_SOLVE (adjoint)"}
    return extra.get(value, f"reason code {value}")
