"""bridges: foreign and legacy solvers as native PyTorch autograd ops.

Core: `foreign_function` (the class factory), `ForeignError`, `MissingDerivativeError`, zero-copy `as_numpy`/`as_tensor`,
the finite-difference fallback `fd2pytorch` and `ExternalProgram` for simulator executables.
Adapters load on first use: `bridges.julia2pytorch` (Julia) and `bridges.petsc` (PETSc).
"""
from ._core import foreign_function
from ._errors import ForeignError, MissingDerivativeError, NoisyGradientWarning, SolverFailure
from ._fd import fd2pytorch
from ._program import ExternalProgram
from ._transfer import as_numpy, as_tensor

__all__ = ["foreign_function", "ForeignError", "MissingDerivativeError", "SolverFailure",
           "NoisyGradientWarning", "fd2pytorch", "ExternalProgram", "as_numpy", "as_tensor",
           "julia2pytorch"]


def __getattr__(name):
    if name == "julia2pytorch":  # imported lazily: it loads juliacall
        from .julia import julia2pytorch
        return julia2pytorch
    raise AttributeError(f"module 'bridges' has no attribute {name!r}")
