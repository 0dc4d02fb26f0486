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
