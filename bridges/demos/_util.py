"""Old home of the demos' plumbing, now bridges.plotting: kept until robertson.py and the
benchmarks still importing it have switched."""
from bridges.plotting import output_dir, progress, pyplot  # noqa: F401


def figure_path(out_dir, name):
    return output_dir(out_dir) / name
