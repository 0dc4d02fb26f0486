"""Python values written into Julia source text."""
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
