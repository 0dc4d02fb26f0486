"""Simulator programs as numpy functions of their parameters, ready for ``fd2pytorch``.

``heat1d`` (heat1d.c) is a small transient heat-conduction code shipped here and built on first
use with the C compiler; it has its own command line (``heat1d INPUT OUTPUT``, ``heat1d --help``).
``ngspice`` (circuits, bridges/programs/spice.py) and ``xfoil`` (airfoils, xfoil.py) drive real
legacy programs that Debian packages: ``apt-get install ngspice xfoil``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .._program import ExternalProgram
from ._build import cache_dir, compiled
from .spice import ngspice
from .xfoil import naca4, xfoil

__all__ = ["heat1d", "heat1d_executable", "ngspice", "xfoil", "naca4", "compiled", "cache_dir"]

SOURCE = Path(__file__).with_name("heat1d.c")


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
