"""PETSc's options database: per-solve option dicts, applied for one setFromOptions call."""
from __future__ import annotations

import contextlib

from ._runtime import PETSc


def _value(v) -> str:
    if v is None or v is True:
        return "true" if v is True else ""  # None: a flag such as ts_monitor
    if v is False:
        return "false"
    return str(v)


@contextlib.contextmanager
def scoped_options(prefix: str | None, options: dict | None, defaults: dict | None = None,
                   who: str = "options"):
    """Put `options` (keys without the leading dash) in the database under `prefix` for the
    duration of the block, then restore what was there. `defaults` apply only to keys that neither
    `options` nor the command line set. Precedence: options > command line > defaults."""
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"{who}: options must be a dict of PETSc option names (without the "
                        f"leading dash) to values, e.g. {{'ksp_type': 'cg'}}, got "
                        f"{type(options).__name__}")
    db = PETSc.Options()
    prefix = prefix or ""
    entries = {}
    for key, value in (defaults or {}).items():
        if not db.hasName(prefix + key):
            entries[prefix + key] = value
    for key, value in (options or {}).items():
        if not isinstance(key, str) or not key.strip("-"):
            raise TypeError(f"{who}: option names must be non-empty strings, got {key!r}")
        entries[prefix + key.lstrip("-")] = value
    saved = {key: db.getString(key) if db.hasName(key) else None for key in entries}
    for key, value in entries.items():
        db[key] = _value(value)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                db.delValue(key)
            else:
                db[key] = old
