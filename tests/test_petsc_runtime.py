"""The one translator of PETSc failures into ForeignError."""
import pytest

from bridges import ForeignError
from bridges.petsc import PETSc
from bridges.petsc._runtime import destroy, petsc_errors, translate


def test_a_petsc_error_names_the_code_petscs_message_and_what_to_try():
    ksp = PETSc.KSP().create(comm=PETSc.COMM_SELF)
    try:
        with pytest.raises(ForeignError) as info:
            with petsc_errors("my_solver", "choosing the KSP"):
                ksp.setType("not_a_krylov_method")
    finally:
        destroy(ksp)
    message = str(info.value)
    assert message.startswith("my_solver: PETSc error 86 (unknown type name) during choosing the "
                              "KSP: ")
    assert "not_a_krylov_method" in message and "What to try: check the spelling" in message
    assert isinstance(info.value.original, PETSc.Error)
    assert "KSPSetType" in info.value.foreign_traceback


def test_a_python_exception_inside_a_callback_is_reported_as_such():
    snes = PETSc.SNES().create(comm=PETSc.COMM_SELF)
    x, f = PETSc.Vec().createSeq(2), PETSc.Vec().createSeq(2)

    def residual(snes, X, F):
        raise KeyError("rate table missing")
    snes.setFunction(residual, f)
    try:
        with pytest.raises(ForeignError, match="my_solver: a function called by PETSc during "
                                               "the solve raised KeyError: 'rate table missing'") \
                as info:
            with petsc_errors("my_solver", "the solve"):
                snes.computeFunction(x, f)
        assert isinstance(info.value.original, KeyError)
    finally:
        destroy(snes, x, f)


def test_hint_overrides_the_generic_advice_and_none_objects_are_skipped():
    error = PETSc.Error(56)
    error._traceback = ["KSPSolveTranspose() at itfunc.c:1", "no transpose for this PC"]
    translated = translate(error, "solve", "the adjoint", "pass symmetric=True")
    assert str(translated) == ("solve: PETSc error 56 (operation not supported) during the "
                               "adjoint: no transpose for this PC. What to try: pass "
                               "symmetric=True")
    destroy(None, None)
