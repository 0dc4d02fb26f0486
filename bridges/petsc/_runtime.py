"""petsc4py, initialised once without the command line, the explicit call that hands PETSc a
command line, and the one translator of PETSc failures."""
from __future__ import annotations

import contextlib
import re
import sys

import numpy as np
import torch

from .._errors import ForeignError, SolverFailure

try:
    import petsc4py
except ImportError as exc:  # pragma: no cover - depends on the machine
    raise ImportError("bridges.petsc needs petsc4py, which is not installed. Run `bash .ci/setup` "
                      "(builds PETSc and petsc4py from source) or `pip install petsc petsc4py`, "
                      "then retry") from exc

# Importing reads no command line: a script's own arguments are not PETSc's (see `init`). The
# PETSC_OPTIONS environment variable still applies, as PETSc reads it at start-up.
petsc4py.init(["-options_left", "no"])
from petsc4py import PETSc  # noqa: E402

_NUMBER = re.compile(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def init(argv=None) -> dict:
    """Hand PETSc a command line: each ``-name value`` (or ``-name`` alone, a flag) in argv goes
    into PETSc's options database, as PetscInitialize would have read it, so that
    ``-ksp_type cg`` or ``-heat_ts_type bdf`` reach the solvers made afterwards. A solver's own
    ``options`` dict still beats them; they beat the adapter's defaults. Words that do not start
    with a dash are skipped; ``-options_left`` reports unused options at exit. Options PETSc
    reads only at start-up (``-malloc_debug``, ``-help``) belong in the environment variable
    PETSC_OPTIONS.

    argv: a list of words (default ``sys.argv[1:]``), e.g. what argparse's
    ``parse_known_args`` left over. Returns the options inserted, name to value (None for a flag).
    """
    words = sys.argv[1:] if argv is None else list(argv)
    if not all(isinstance(word, str) for word in words):
        raise TypeError(f"bridges.petsc.init: argv must be a list of strings, such as "
                        f"sys.argv[1:], got {argv!r}")
    inserted, db, i = {}, PETSc.Options(), 0
    while i < len(words):
        word = words[i]
        if not word.startswith("-") or _NUMBER.fullmatch(word):
            i += 1  # not an option name: PETSc skips it too
            continue
        value = words[i + 1] if i + 1 < len(words) else None
        if value is not None and value.startswith("-") and not _NUMBER.fullmatch(value):
            value = None  # the next word is another option: this one is a flag
        inserted[word.lstrip("-")] = value
        db.setValue(word.lstrip("-"), value)
        i += 1 if value is None else 2
    if any(name.endswith("log_view") for name in inserted):
        PETSc.Log.begin()  # PetscInitialize would have started the log it prints at exit
    return inserted


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


# PETSc error codes (petscsystypes.h) with what usually causes them and what to try
_ERRORS = {
    55: ("out of memory", "use a smaller problem, or a method that keeps less (e.g. options "
                          "{'ts_trajectory_solution_only': True})"),
    56: ("operation not supported", "the chosen KSP/PC/matrix cannot do this, e.g. apply its "
                                    "transpose; choose another type through options"),
    58: ("operation done in the wrong order", None),
    60: ("nonconforming object sizes", None),
    62: ("wrong argument", "check the option values"),
    63: ("argument out of range", "check the option values"),
    71: ("zero pivot in LU factorisation", "the Jacobian is singular: check the function, or use "
                                           "options {'pc_factor_shift_type': 'nonzero'}"),
    72: ("floating-point exception", "a value became inf or nan: check the function there, "
                                     "and that atol suits the solution's scale (below its "
                                     "smallest component that matters)"),
    73: ("object in the wrong state", None),
    75: ("incompatible arguments", None),
    76: ("error in a library PETSc called", None),
    82: ("an iterative method failed", "loosen tolerances or choose another method"),
    83: ("a function PETSc needs was not provided", "the chosen solver needs a callback this "
                                                     "problem does not define (read PETSc's "
                                                     "message above); choose another method or "
                                                     "jacobian mode"),
    86: ("unknown type name", "check the spelling of the type in the options (e.g. ksp_type)"),
    91: ("solver did not converge", "loosen tolerances or choose another method"),
    92: ("no factorisation package for this matrix", "choose another pc_factor_mat_solver_type "
                                                     "or pc_type"),
}


_NUMERIC = (71, 72)  # errors of the numbers, not of the solver chosen: their own advice wins


def translate(exc: PETSc.Error, who: str, what: str, hint: str = "") -> BaseException:
    """A PETSc error as a ForeignError: who failed doing what, PETSc's code and message, and
    what to try. A Python exception raised inside a callback PETSc made is reported as such;
    an interrupt (KeyboardInterrupt, SystemExit) stays what it was."""
    cause = exc.__cause__
    if isinstance(cause, SolverFailure) or (  # complete already: what failed, where, what to try
            cause is not None and not isinstance(cause, Exception)):
        return cause
    if cause is not None and not isinstance(cause, PETSc.Error):
        error = ForeignError.wrap(f"{who}: a function called by PETSc during {what}", cause)
        error.__cause__ = cause
        return error
    name, advice = _ERRORS.get(exc.ierr, (None, None))
    lines = [line.split("] ", 1)[-1] for line in str(exc).splitlines()[1:]]
    messages = [line for line in lines if "() at " not in line]  # PETSc's own words
    code = f"PETSc error {exc.ierr}" + (f" ({name})" if name else "")
    text = f"{who}: {code} during {what}"
    if messages:
        text += ": " + "; ".join(messages)
    advice = advice if exc.ierr in _NUMERIC else hint or advice  # (hints: for what is missing)
    if advice:
        text += f". What to try: {advice}"
    return ForeignError(text, original=exc, foreign_traceback=str(exc))


@contextlib.contextmanager
def petsc_errors(who: str, what: str, hint: str = ""):
    """Translate PETSc errors raised in the block (see `translate`)."""
    try:
        yield
    except PETSc.Error as exc:
        error = translate(exc, who, what, hint)
        raise error from (None if error is exc.__cause__ else exc)


def diverged(who: str, what: str, reasons, reason: int, details: str, advice: str) -> ForeignError:
    """A solver's negative converged reason as a ForeignError, with details and advice."""
    return ForeignError(f"{who}: {what} failed: {reason_name(reasons, reason)} {details}. "
                        f"What to try: {advice}")


def destroy(*objects) -> None:
    """Destroy PETSc objects now (None entries are skipped), rather than whenever Python's
    garbage collector gets to them; breaks the cycles their callbacks form."""
    for obj in objects:
        if obj is not None:
            obj.destroy()


def petsc_real(value) -> float:
    """`value` for a PETSc setter of a real that reads -1 as PETSC_DETERMINE (TSSetMaxTime
    replaces it with its default): -1 itself becomes the double just below it."""
    value = float(value)
    return np.nextafter(-1.0, -np.inf) if value == -1.0 else value


@contextlib.contextmanager
def agreed_checks(comm):
    """Checks of each rank's own block (a NaN in y0, func's value there): when one rank's fail,
    every rank raises, the others the same kind of error naming that rank (they would
    otherwise wait for it in the next collective call, forever)."""
    if comm is None or comm.getSize() == 1:
        yield
        return
    error = None
    try:
        yield
    except Exception as exc:  # (raised again below, on this rank)
        error = exc
    found = comm.tompi4py().allgather(None if error is None else (type(error), str(error)))
    if error is not None:
        raise error
    failed = [(rank, *f) for rank, f in enumerate(found) if f is not None]
    if failed:
        rank, kind, message = failed[0]
        kind = kind if kind in (ValueError, TypeError) else ForeignError
        raise kind(f"rank {rank} failed a check of its own block: {message}")
