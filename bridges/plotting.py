"""What the demos and benchmarks share around the science: command line, progress bar, figures.

matplotlib and tqdm come with the extra ``demo``. Without them a run still computes and prints;
it only goes without the bar (``progress``) or the figure (``pyplot`` returns None).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def demo_parser(doc: str, quick: str | None = None) -> argparse.ArgumentParser:
    """An argument parser whose --help shows ``doc`` as written, with --out and, when ``quick``
    (its help text) is given, --quick."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if quick:
        parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", default=None,
                        help="directory for the figures (default $BRIDGES_OUT or ./bridges-out)")
    return parser


def progress(iterable, **kwargs):
    """tqdm's progress bar over iterable, or the plain iterable without tqdm."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kwargs)


def output_dir(out=None) -> Path:
    """The directory out (default $BRIDGES_OUT or ./bridges-out), created if missing."""
    path = Path(out or os.environ.get("BRIDGES_OUT") or "bridges-out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, out, name: str, dpi: int = 120) -> Path:
    """Lay out fig, write it to ``output_dir(out) / name``, close it and return the path."""
    path = output_dir(out) / name
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def report_figures(*paths) -> None:
    """Print where each figure went, or how to get the figures when matplotlib is missing."""
    for path in paths:
        print(f"figure: {path}" if path else "figure skipped: install matplotlib (extra 'demo')")
