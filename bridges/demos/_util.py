"""Small helpers the demos share: progress bars and figure output."""
from __future__ import annotations

import os
from pathlib import Path


def progress(iterable, **kwargs):
    """tqdm's progress bar when tqdm is installed, else the plain iterable."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kwargs)


def figure_path(out_dir, name: str) -> Path:
    """Path for a demo's PNG in out_dir (created), default $BRIDGES_OUT or ./bridges-out."""
    path = Path(out_dir or os.environ.get("BRIDGES_OUT") or "bridges-out")
    path.mkdir(parents=True, exist_ok=True)
    return path / name


def pyplot():
    """matplotlib.pyplot on a file-only backend, or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
