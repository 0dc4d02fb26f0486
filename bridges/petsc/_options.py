"""PETSc's options database, per solver: each solver's options live under a prefix of its own for
the solver's whole life, so two solvers never see each other's, and what PETSc never read is
reported by name.

Precedence for one solver: its ``options`` dict > the command line (or anything else in the
database) under the user's prefix > the adapter's defaults.
"""
from __future__ import annotations

import heapq
import itertools
import numbers
import os
import re
import threading
import warnings

from ._runtime import PETSc

# Prefix numbers are reused once their solver has closed: PETSc remembers every prefix it has
# seen (for -help), so fresh numbers for every solve would grow memory without bound.
_free_ids: list[int] = []
_next_id = itertools.count()
_ids_lock = threading.Lock()
_OWN = re.compile(r"(^|_)bridges\d+_")  # the per-solver part of a prefix, see SolverOptions
_DEFERRED = re.compile(r"adjoint|trajectory")  # read only when a gradient is computed
_OFF = object()  # a viewer or monitor switched off: the option is removed
UNUSED_ACTIONS = ("warn", "error", "ignore")
_unused = {"action": None}


class UnusedOptionsWarning(UserWarning):
    """PETSc options were given for a solver that never read them (misspelt, or for a solver
    type not in use)."""


def set_unused_options(action: str) -> None:
    """What to do with options PETSc never read: ``"warn"`` (the default), ``"error"`` (raise
    ValueError, a strict mode for scripts and tests) or ``"ignore"``. The environment variable
    BRIDGES_UNUSED_OPTIONS sets the default."""
    if action not in UNUSED_ACTIONS:
        raise ValueError(f"set_unused_options: action must be one of {UNUSED_ACTIONS}, got "
                         f"{action!r}")
    _unused["action"] = action


def _unused_action() -> str:
    if _unused["action"] is None:
        action = os.environ.get("BRIDGES_UNUSED_OPTIONS", "warn")
        if action not in UNUSED_ACTIONS:
            raise ValueError(f"the environment variable BRIDGES_UNUSED_OPTIONS is {action!r}; "
                             f"valid values: {', '.join(UNUSED_ACTIONS)}")
        _unused["action"] = action
    return _unused["action"]


def check_prefix(who: str, prefix) -> str:
    """The user's options prefix, validated ('' for none)."""
    if prefix is None:
        return ""
    if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", prefix):
        raise ValueError(f"{who}: prefix must be a string of letters, digits and underscores "
                         f"that starts with a letter, such as 'heat_', got {prefix!r}")
    return prefix


def _is_viewer(key: str) -> bool:
    return bool(re.search(r"(^|_)view(_|$)|monitor|converged_reason$", key))


def _value(key: str, value):
    """The database string for a Python value: True/None switch a flag or viewer on (PETSc
    reads an empty value so), False switches a flag off and leaves a viewer off."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()  # a 0-d tensor or numpy scalar (str() would print "tensor(...)")
    if value is None or value is True:
        return ""
    if value is False:
        return _OFF if _is_viewer(key) else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def check_options(who: str, options) -> dict:
    """The user's options dict, validated: keys without the leading dash, values as PETSc reads
    them (see `_value`)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"{who}: options must be a dict of PETSc option names (without the "
                        f"leading dash) to values, e.g. {{'ksp_type': 'cg'}}, got "
                        f"{type(options).__name__}")
    checked = {}
    for key, value in options.items():
        if not isinstance(key, str) or not key.strip("-") or " " in key:
            raise TypeError(f"{who}: option names must be non-empty strings without spaces, "
                            f"got {key!r}")
        key = key.lstrip("-")
        if not isinstance(value, (str, numbers.Number, list, tuple, type(None))) and \
                getattr(value, "ndim", None) != 0:
            raise TypeError(f"{who}: option {key!r} must be a string, a number, a bool, None or "
                            f"a list of them, got {type(value).__name__}"
                            + (f" of shape {tuple(value.shape)}" if hasattr(value, "shape")
                               else ""))
        checked[key] = _value(key, value)
    return checked


class SolverOptions:
    """The options of one solver, written to the database under ``prefix`` (the user's prefix
    followed by ``bridges<n>_``, n unique among open solvers) until `close`.

    Args:
        who: names the solver in messages.
        prefix: the user's prefix ('' or e.g. 'heat_'): command-line options under it apply.
        options: the user's dict for this solver (validated by `check_options`).
        defaults: the adapter's values for keys neither of the above sets.
    """

    def __init__(self, who: str, prefix, options, defaults=None):
        self.who = who
        self.user_prefix = check_prefix(who, prefix)
        self.given = check_options(who, options)
        with _ids_lock:
            self._id = heapq.heappop(_free_ids) if _free_ids else next(_next_id)
        self.prefix = f"{self.user_prefix}bridges{self._id}_"
        db = PETSc.Options()
        entries = {key: _value(key, value) for key, value in (defaults or {}).items()}
        self.inherited = {}
        for key, value in db.getAll().items():
            rest = key[len(self.user_prefix):]
            if key.startswith(self.user_prefix) and rest and not _OWN.search(key):
                entries[rest] = "" if value is None else value
                self.inherited[rest] = key
        entries.update(self.given)
        self.keys = []
        for key, value in entries.items():
            if value is not _OFF:
                db[self.prefix + key] = value
                self.keys.append(key)
        self._reported = set()

    def __getitem__(self, key):
        """The value in force for `key` (without prefix), or None."""
        db = PETSc.Options()
        return db.getString(self.prefix + key) if db.hasName(self.prefix + key) else None

    def report_unused(self, *, final: bool = False) -> None:
        """Report the user's options PETSc has not read. Options for the adjoint and its
        trajectory are only reported when `final` (after a backward)."""
        db = PETSc.Options()
        unused = [key for key in self.given if key not in self._reported
                  and self.given[key] is not _OFF and (final or not _DEFERRED.search(key))
                  and not db.used(self.prefix + key)]
        self._reported.update(unused)
        if not unused:
            return
        action = _unused_action()
        message = (f"{self.who}: PETSc never read the option(s) {', '.join(unused)}: misspelt, "
                   f"or for a solver type that is not in use (options are keyed without the "
                   f"leading dash and without the prefix)")
        if action == "error":
            raise ValueError(message)
        if action == "warn":
            warnings.warn(message, UnusedOptionsWarning, stacklevel=2)

    def close(self) -> None:
        """Remove this solver's entries; the command-line originals of entries PETSc read are
        marked as used, so that -options_left does not list them."""
        db = PETSc.Options()
        for key in self.keys:
            name = self.prefix + key
            original = self.inherited.get(key)
            if original is not None and db.used(name) and db.hasName(original):
                db.getString(original)  # marks the original as used
            db.delValue(name)
        self.keys = []
        if self._id is not None:
            with _ids_lock:
                heapq.heappush(_free_ids, self._id)
            self._id = None
