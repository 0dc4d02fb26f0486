"""XFOIL, Drela's panel code for airfoils, driven by a command script on its standard input.

Each call writes a NACA 4-digit airfoil's coordinates (camber and thickness as real numbers, so
they can be differentiated), feeds XFOIL a script that loads them, solves the inviscid flow at the
angle of attack and saves the polar, and reads the lift and moment coefficients (printed to 4
decimals: quantisation noise of about 3e-5 that ``fd2pytorch``'s noise estimate sees).

Debian's xfoil 6.99 is built with floating-point traps (gfortran ``-ffpe-trap``), and dies with
SIGFPE in its panel solver on harmless divisions. The runs here preload a two-line library
(xfoil_nofpe.c, compiled on first use) that switches the traps off, so IEEE arithmetic proceeds as
in XFOIL's other builds.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .._program import ExternalProgram
from ._build import compiled

PARAMETERS = ("camber", "position", "thickness", "alpha")
DEFAULTS = {"camber": 0.02, "position": 0.4, "thickness": 0.12, "alpha": 3.0}
MAX_PANELS = 364  # XFOIL's panel-node limit in Debian's build (it prints 'reduced to array limit')
NO_FPE = Path(__file__).with_name("xfoil_nofpe.c")


def naca4(camber, position, thickness, points=100):
    """Coordinates of a NACA 4-digit airfoil (chord 1), from the trailing edge over the upper
    surface to the leading edge and back along the lower one, cosine-spaced: (2*points-1) x 2."""
    if not thickness > 0:  # (a negative one flips the surfaces: the same airfoil, silently)
        raise ValueError(f"naca4: thickness must be > 0, a fraction of the chord (0.12 for a "
                         f"NACA xx12); got {thickness}")
    x = (1 - np.cos(np.linspace(0, np.pi, points))) / 2
    half = 5 * thickness * (0.2969 * np.sqrt(x) - 0.1260 * x - 0.3516 * x ** 2
                            + 0.2843 * x ** 3 - 0.1015 * x ** 4)
    m, p = camber, position
    if m == 0:  # symmetric (NACA 00xx): no camber line, whatever the position
        line = slope = np.zeros_like(x)
    elif not 0 < p < 1:
        raise ValueError(f"naca4: a cambered airfoil (camber {m}) needs its maximum camber "
                         f"inside the chord, 0 < position < 1; got position {p}")
    else:
        front = x < p
        line = np.where(front, m / p ** 2 * (2 * p * x - x ** 2),
                        m / (1 - p) ** 2 * (1 - 2 * p + 2 * p * x - x ** 2))
        slope = np.where(front, 2 * m / p ** 2 * (p - x), 2 * m / (1 - p) ** 2 * (p - x))
    s, c = np.sin(np.arctan(slope)), np.cos(np.arctan(slope))
    upper = np.stack([x - half * s, line + half * c], axis=1)
    lower = np.stack([x + half * s, line - half * c], axis=1)
    return np.concatenate([upper[::-1], lower[1:]])


def xfoil(parameters=("camber", "alpha"), *, panels=160, timeout=60, **settings):
    """XFOIL's inviscid lift and moment coefficients ``[CL, CM]`` as a function of the named
    parameters: camber (max camber, chord fractions), position (of max camber), thickness, alpha
    (degrees). ``settings`` fix the others, e.g. ``xfoil(("alpha",), camber=0.04)``.
    """

    parameters = tuple(parameters)
    if isinstance(panels, bool) or not isinstance(panels, int) or not 8 <= panels <= MAX_PANELS:
        raise ValueError(f"xfoil: panels must be an integer from 8 to {MAX_PANELS} (XFOIL's "
                         f"array limit: it would silently use {MAX_PANELS} for more), got "
                         f"{panels!r}")
    unknown = (set(parameters) | set(settings)) - set(PARAMETERS)
    if unknown:
        raise ValueError(f"xfoil: unknown parameter(s) {sorted(unknown)}; "
                         f"valid: {PARAMETERS}")
    fixed = {**DEFAULTS, **settings}
    alpha = f"{{x[{parameters.index('alpha')}]:.12g}}" if "alpha" in parameters \
        else repr(float(fixed["alpha"]))
    script = "\n".join(["PLOP", "G", "",  # graphics off: no X display needed
                        "LOAD airfoil.dat", "PPAR", f"N {panels}", "", "",
                        "OPER", "PACC", "polar.txt", "", f"ALFA {alpha}", "", "QUIT", ""])

    def write_input(path, x):
        if x.shape != (len(parameters),):
            raise ValueError(f"xfoil: expected {len(parameters)} value(s) for {parameters}, got "
                             f"an array of shape {x.shape}")
        values = {**fixed, **dict(zip(parameters, x.tolist()))}
        shape = naca4(values["camber"], values["position"], values["thickness"])
        np.savetxt(path, shape, fmt="%.10f", header="bridges-naca4", comments="")

    def read_output(path):
        rows = np.loadtxt(path, skiprows=12, ndmin=2)
        if rows.shape[0] != 1:
            raise ValueError(f"expected one operating point in the polar, found {rows.shape[0]}: "
                             f"XFOIL did not converge")
        return rows[0, [1, 4]]  # CL, CM

    env = {**os.environ, "LD_PRELOAD": compiled(NO_FPE, shared=True)}
    return ExternalProgram(["xfoil"], write_input=write_input, read_output=read_output,
                           input_name="airfoil.dat", output_name="polar.txt", stdin=script,
                           env=env, timeout=timeout, name="xfoil")
