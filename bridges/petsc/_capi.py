"""The few PETSc C functions petsc4py does not wrap, called through ctypes on the same library.

- `trajectory_prefix`: TSGetTrajectory + PetscObjectSetOptionsPrefix, so a TS's trajectory reads
  its options under the solver's prefix (TSTrajectory takes none from its TS).
- `renew_trajectory`: TSResetTrajectory and the new trajectory's options, before a TS that has
  run an adjoint records another forward solve.
- `trajectory_memory`: TSTrajectorySetType(memory) on a trajectory made after setFromOptions.
- `swap_adapt`: TSGetAdapt + TSAdaptGetType/SetType, to switch step adaptivity off and on.
- `set_pre_stage`: TSSetPreStage with a Python function (petsc4py 3.26 has no setPreStage).
- `aij_values`: the value arrays of a (Seq|MPI)AIJ matrix's blocks on this rank, to write in place.
"""
from __future__ import annotations

import contextlib
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
                       ("TSTrajectorySetType", [p, p, ctypes.c_char_p]),
                       ("TSResetTrajectory", [p]),
                       ("TSTrajectorySetFromOptions", [p, p]),
                       ("TSGetAdapt", [p, ctypes.POINTER(p)]),
                       ("TSSetPreStage", [p, _PRE_STAGE]),
                       ("TSAdaptGetType", [p, ctypes.POINTER(ctypes.c_char_p)]),
                       ("TSAdaptSetType", [p, ctypes.c_char_p]),
                       ("MatMPIAIJGetSeqAIJ", [p, ctypes.POINTER(p), ctypes.POINTER(p),
                                               ctypes.POINTER(p)]),
                       ("MatGetInfo", [p, i, ctypes.POINTER(_MAT_INFO)]),
                       ("MatSeqAIJGetArrayWrite", [p, ctypes.POINTER(_SCALAR_P)]),
                       ("MatSeqAIJRestoreArrayWrite", [p, ctypes.POINTER(_SCALAR_P)]),
                       ("PetscErrorMessage", [i, ctypes.POINTER(ctypes.c_char_p),
                                              ctypes.POINTER(ctypes.c_char_p)])]:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


_PRE_STAGE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_double)
_SCALAR_P = ctypes.POINTER(ctypes.c_double)  # PetscScalar: real double in this build
_MAT_LOCAL = 1  # MatInfoType


class _MAT_INFO(ctypes.Structure):  # MatInfo: ten PetscLogDouble
    _fields_ = [(name, ctypes.c_double) for name in (
        "block_size", "nz_allocated", "nz_used", "nz_unneeded", "memory", "assemblies",
        "mallocs", "fill_ratio_given", "fill_ratio_needed", "factor_mallocs")]


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


def renew_trajectory(ts, prefix: str) -> None:
    """Give `ts` a new, empty trajectory configured from the options under prefix. A memory
    trajectory refilled after TSAdjoint has consumed it crashes PETSc 3.26 when destroyed
    (TSTrajectoryDestroy -> VecDestroy, SIGSEGV) unless a new one is made."""
    lib, tj = _lib(), ctypes.c_void_p()
    _check(lib.TSResetTrajectory(ts.handle), "TSResetTrajectory")
    _check(lib.TSGetTrajectory(ts.handle, ctypes.byref(tj)), "TSGetTrajectory")
    _check(lib.PetscObjectSetOptionsPrefix(tj, prefix.encode()), "PetscObjectSetOptionsPrefix")
    _check(lib.TSTrajectorySetFromOptions(tj, ts.handle), "TSTrajectorySetFromOptions")


def trajectory_memory(ts) -> None:
    """Make the trajectory of `ts` (after ts.setSaveTrajectory()) keep its steps in memory."""
    lib, tj = _lib(), ctypes.c_void_p()
    _check(lib.TSGetTrajectory(ts.handle, ctypes.byref(tj)), "TSGetTrajectory")
    _check(lib.TSTrajectorySetType(tj, ts.handle, b"memory"), "TSTrajectorySetType")


def swap_adapt(ts, kind: str) -> str:
    """Give the step adaptivity of `ts` the type `kind` ("none", "basic", ...); returns the
    type it had."""
    lib, adapt, old = _lib(), ctypes.c_void_p(), ctypes.c_char_p()
    _check(lib.TSGetAdapt(ts.handle, ctypes.byref(adapt)), "TSGetAdapt")
    _check(lib.TSAdaptGetType(adapt, ctypes.byref(old)), "TSAdaptGetType")
    previous = old.value.decode()
    _check(lib.TSAdaptSetType(adapt, kind.encode()), "TSAdaptSetType")
    return previous


def set_pre_stage(ts, fn):
    """Have PETSc call fn() before each stage of a step of `ts`; returns the C callback, which
    must be kept alive as long as the TS may call it."""
    def hook(_ts, _time):
        try:
            fn()
        except BaseException:  # noqa: BLE001 - PETSc must see the failure, not a Python frame
            return 1
        return 0
    callback = _PRE_STAGE(hook)
    _check(_lib().TSSetPreStage(ts.handle, callback), "TSSetPreStage")
    return callback


@contextlib.contextmanager
def aij_values(mat):
    """numpy views of the value arrays, in their CSR order, of the AIJ blocks that hold this
    rank's rows of `mat` (SeqAIJ: one; MPIAIJ: the diagonal and the off-diagonal block), for
    writing in place; None for other matrix types or scalars. The views are valid inside the
    block only; the caller assembles `mat` after it."""
    kind = mat.getType()
    if np.dtype(PETSc.ScalarType) != np.float64 or kind not in ("seqaij", "mpiaij"):
        yield None
        return
    lib = _lib()
    parts = [ctypes.c_void_p(mat.handle)]
    if kind == "mpiaij":
        parts = [ctypes.c_void_p(), ctypes.c_void_p()]
        _check(lib.MatMPIAIJGetSeqAIJ(mat.handle, ctypes.byref(parts[0]),
                                      ctypes.byref(parts[1]), ctypes.byref(ctypes.c_void_p())),
               "MatMPIAIJGetSeqAIJ")
    pointers, arrays = [], []
    try:
        for part in parts:
            info, pointer = _MAT_INFO(), _SCALAR_P()
            _check(lib.MatGetInfo(part, _MAT_LOCAL, ctypes.byref(info)), "MatGetInfo")
            _check(lib.MatSeqAIJGetArrayWrite(part, ctypes.byref(pointer)),
                   "MatSeqAIJGetArrayWrite")
            pointers.append((part, pointer))
            n = int(info.nz_used)
            arrays.append(np.ctypeslib.as_array(pointer, shape=(n,)) if n else
                          np.empty(0, dtype=np.float64))
        yield arrays
    finally:
        for part, pointer in pointers:
            _check(lib.MatSeqAIJRestoreArrayWrite(part, ctypes.byref(pointer)),
                   "MatSeqAIJRestoreArrayWrite")
