"""Simulator programs as numpy functions of their parameters, ready for ``fd2pytorch``.

``heat1d`` (heat1d.c) is a small transient heat-conduction code shipped here and built on first
use with the C compiler; it has its own command line (``heat1d INPUT OUTPUT``, ``heat1d --help``).
``ngspice`` (circuits, bridges/programs/spice.py) and ``xfoil`` (airfoils, xfoil.py) drive real
legacy programs that Debian packages: ``apt-get install ngspice xfoil``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .._program import ExternalProgram

SOURCE = Path(__file__).with_name("heat1d.c")


def cache_dir() -> Path:
    """Where built programs are kept: $BRIDGES_CACHE, else ~/.cache/bridges."""
    return Path(os.environ.get("BRIDGES_CACHE") or Path.home() / ".cache" / "bridges")


def compiled(source: Path, *, shared=False) -> str:
    """Path of `source` (C) compiled with $CC (default cc) into the cache, built once per content:
    an executable, or a shared library with ``shared=True``."""
    text = source.read_bytes()
    suffix = ".so" if shared else ""
    target = cache_dir() / "bin" / f"{source.stem}-{hashlib.sha1(text).hexdigest()[:12]}{suffix}"
    if target.exists():
        return str(target)
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise FileNotFoundError(f"compiling {source.name}: the C compiler {compiler!r} (from $CC, "
                                f"default 'cc') was not found; install gcc or set CC")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        flags = ["-shared", "-fPIC"] if shared else []
        cmd = [compiler, "-O2", "-std=c99", "-D_GNU_SOURCE", *flags, "-o", str(built), str(source),
               "-lm"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed ({' '.join(cmd)}):\n{run.stderr}")
        os.replace(built, target)  # atomic, so concurrent builders never see half a file
    return str(target)


def heat1d_executable() -> str:
    """Path of the heat1d executable, compiled from heat1d.c if needed."""
    return compiled(SOURCE)


def heat1d(parameters=("conductivity", "convection"), **settings) -> ExternalProgram:
    """The heat1d simulator as a numpy function of the named input parameters.

    The returned program maps a vector of values for ``parameters`` to the sensor temperatures,
    shape (outputs * sensors,), time-major. ``settings`` fix the other input keys, e.g.
    ``heat1d(("conductivity",), convection=0.2, sensors="0.2,0.6")``.
    """
    parameters = tuple(parameters)

    def write_input(path, x):
        if x.shape != (len(parameters),):
            raise ValueError(f"heat1d: expected {len(parameters)} value(s) for {parameters}, got "
                             f"an array of shape {x.shape}")
        lines = [f"{k} {v}" for k, v in settings.items()]
        lines += [f"{k} {v!r}" for k, v in zip(parameters, x.tolist())]
        Path(path).write_text("\n".join(lines) + "\n")

    def read_output(path):
        return np.loadtxt(path, ndmin=2)[:, 1:].ravel()  # drop the time column

    return ExternalProgram([heat1d_executable(), "{input}", "{output}"], write_input=write_input,
                           read_output=read_output, name="heat1d")


from .spice import ngspice  # noqa: E402  (they use compiled() and cache_dir() above)
from .xfoil import naca4, xfoil  # noqa: E402
