"""The PETSc adapter: Vec transfers through DLPack (and, later, TS/SNES solves)."""
from ._runtime import PETSc, scalar_dtype
from ._vec import as_vec, vec_as_tensor

__all__ = ["PETSc", "scalar_dtype", "as_vec", "vec_as_tensor"]
