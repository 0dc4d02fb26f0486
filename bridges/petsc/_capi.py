"""The few PETSc C functions petsc4py does not wrap, called through ctypes on the same library.

- `trajectory_prefix`: TSGetTrajectory + PetscObjectSetOptionsPrefix, so a TS's trajectory reads
  its options under the solver's prefix (TSTrajectory takes none from its TS).
- `colouring`: DMCreateColoring + ISColoringGetColors, the colour of every point of a DM.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os

import numpy as np

from ._runtime import PETSc


@functools.lru_cache(maxsize=None)
def _lib():
    import petsc
    # the library petsc4py has loaded already: the real file, not a wheel's 'libpetsc.so' stub
    candidates = glob.glob(os.path.join(petsc.get_petsc_dir(), "lib", "libpetsc.*"))
    lib = ctypes.CDLL(max(candidates, key=os.path.getsize))
    p, i = ctypes.c_void_p, ctypes.c_int
    for name, args in [("TSGetTrajectory", [p, ctypes.POINTER(p)]),
                       ("PetscObjectSetOptionsPrefix", [p, ctypes.c_char_p]),
                       ("DMCreateColoring", [p, i, ctypes.POINTER(p)]),
                       ("ISColoringGetColors", [p, ctypes.POINTER(_INT), ctypes.POINTER(_INT),
                                                ctypes.POINTER(ctypes.POINTER(_COLOUR))]),
                       ("ISColoringDestroy", [ctypes.POINTER(p)]),
                       ("PetscErrorMessage", [i, ctypes.POINTER(ctypes.c_char_p),
                                              ctypes.POINTER(ctypes.c_char_p)])]:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


_INT = {4: ctypes.c_int32, 8: ctypes.c_int64}[np.dtype(PETSc.IntType).itemsize]
_COLOUR = ctypes.c_ushort  # ISColoringValue: unsigned short in this build (petscconf.h)


def _check(code: int, call: str) -> None:
    if code:
        text, specific = ctypes.c_char_p(), ctypes.c_char_p()
        _lib().PetscErrorMessage(code, ctypes.byref(text), ctypes.byref(specific))
        error = PETSc.Error(code)
        error._traceback = [f"{call}() failed"] + [  # shown by _runtime.translate
            m.value.decode() for m in (specific,) if m.value]
        raise error


def trajectory_prefix(ts, prefix: str) -> None:
    """Make the trajectory of `ts` (after ts.setSaveTrajectory()) read options under prefix."""
    lib, tj = _lib(), ctypes.c_void_p()
    _check(lib.TSGetTrajectory(ts.handle, ctypes.byref(tj)), "TSGetTrajectory")
    _check(lib.PetscObjectSetOptionsPrefix(tj, prefix.encode()), "PetscObjectSetOptionsPrefix")


def colouring(dm, *, ghosted: bool) -> np.ndarray:
    """DMCreateColoring's colour of every point of `dm` on this rank: its owned points
    (IS_COLORING_GLOBAL) or its ghosted local points (IS_COLORING_LOCAL); points of one colour
    share no row of the DM's matrix."""
    lib, coloring = _lib(), ctypes.c_void_p()
    _check(lib.DMCreateColoring(dm.handle, 1 if ghosted else 0, ctypes.byref(coloring)),
           "DMCreateColoring")
    try:
        n, count, values = _INT(), _INT(), ctypes.POINTER(_COLOUR)()
        _check(lib.ISColoringGetColors(coloring, ctypes.byref(n), ctypes.byref(count),
                                       ctypes.byref(values)), "ISColoringGetColors")
        return np.ctypeslib.as_array(values, shape=(n.value,)).astype(np.int64)
    finally:
        lib.ISColoringDestroy(ctypes.byref(coloring))
