"""A smooth map R^2 -> R^3 with output noise, like a simulator's: noise of standard deviation sigma
that is a fixed function of the input, so a repeated input gives the repeated output. The
finite-difference tests and benchmark take it, with its exact Jacobian, from here."""
from __future__ import annotations

import numpy as np


def noisy_map(sigma, calls=None):
    """f(x) = (sin(x0) x1, exp(x0 / 2) + x1^2, x0 x1) + noise; each input's bytes are appended to
    the list `calls` when one is given."""
    def f(x):
        if calls is not None:
            calls.append(x.tobytes())
        rng = np.random.default_rng(int.from_bytes(x.tobytes()[:16], "little") % 2 ** 63)
        clean = np.array([np.sin(x[0]) * x[1], np.exp(0.5 * x[0]) + x[1] ** 2, x[0] * x[1]])
        return clean + sigma * rng.standard_normal(3)
    return f


def noisy_map_jacobian(x):
    """The exact Jacobian (3, 2) of the map without its noise."""
    return np.array([[np.cos(x[0]) * x[1], np.sin(x[0])], [0.5 * np.exp(0.5 * x[0]), 2 * x[1]],
                     [x[1], x[0]]])
