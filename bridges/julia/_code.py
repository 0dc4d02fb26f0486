"""Python values written into Julia source text, and setup code that includes a Julia file."""
from __future__ import annotations

import os
import re


def raw_string(text) -> str:
    """`text` (a str or path) as a Julia raw string literal, raw"...".

    In a raw string `$` and backslashes are literal, so a path needs no interpolation escapes.
    Julia's one rule: a quote is written \\", and backslashes right before a quote (or before
    the closing quote) are doubled.
    """
    text = os.fspath(text)
    body = re.sub(r'(\\*)"', lambda m: 2 * m.group(1) + '\\"', text)
    body = re.sub(r"(\\+)$", lambda m: 2 * m.group(1), body)
    return f'raw"{body}"'


def include_setup(path, module: str, name: str) -> str:
    """Setup code for `julia2pytorch` that includes the Julia file `path`, which defines the
    module `module`, and imports `name` from it: ``julia2pytorch(name, include_setup(...))``.
    The path is written as a raw string, so `$` and backslashes in it stay literal."""
    return f"Base.include(@__MODULE__, {raw_string(path)})\nusing .{module}: {name}\n"
