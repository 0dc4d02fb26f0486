"""A registry of stiff test problems with independent reference solutions.

    >>> from bridges.problems import problem, names
    >>> p = problem("hires")
    >>> func, y0, t = p.tensors()          # torch: an nn.Module f(t, y), float64 y0 and times
    >>> y_ref = p.reference()              # scipy Radau, analytic Jacobian, tight tolerances

Each problem carries a torch right-hand side whose physical constants are ``nn.Parameter``s, the
same right-hand side in numpy with its analytic Jacobians (w.r.t. the state and the parameters)
for scipy, suggested solver tolerances, and, where the IVP test set (F. Mazzia, C. Magherini et
al., *Test Set for IVP Solvers*, University of Bari, release 2.4, https://archimede.uniba.it/
~testset/) publishes one, its reference value at the final time. ``reference`` and
``sensitivities`` (forward sensitivities, for reference gradients) are computed by scipy's Radau
and cached per process. Nothing here imports a solver of bridges.

The models the demos, benchmarks and tests share have modules of their own: `brusselator`
(BRUSS-2D, whole-array and on a `bridges.petsc.Grid`), `diffusion` (steady diffusion and its
solvers), `turbulence` (solver in the loop's flows, network and unrolled loss) and `noisy` (a
noisy map for finite differences). They import bridges.petsc and bridges.flow where they need them.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch
from scipy.integrate import solve_ivp

from . import brusselator

__all__ = ["Problem", "ProblemRHS", "problem", "names", "log_times", "clear_cache", "ROBER_K_START",
           "RoberNeural", "RoberTraining", "rober_training"]

F64 = torch.float64


class ProblemRHS(torch.nn.Module):
    """dy/dt = fn(t, y, *parameters), with the problem's constants as float64 nn.Parameters."""

    def __init__(self, fn: Callable, params: dict):
        super().__init__()
        self.fn = fn
        for name, value in params.items():
            self.register_parameter(name, torch.nn.Parameter(torch.tensor(value, dtype=F64)))

    def forward(self, t, y):
        return self.fn(t, y, *self.parameters())


@dataclass(eq=False)
class Problem:
    """One stiff initial-value problem (see the module docstring); build it with ``problem``.

    ``rhs(t, y, p)``, ``jac(t, y, p)`` and ``jac_p(t, y, p)`` act on the flattened state y, with
    ``p`` a dict of numpy parameter values; ``jac`` is a dense array or a scipy sparse matrix of
    shape (y.size, y.size), ``jac_p`` a dense (y.size, number of parameter entries) array whose
    columns follow ``params`` (and ``func().parameters()``) flattened in order. ``jac_mul(t, y,
    p, V)``, if given, is ``jac(t, y, p) @ V`` without forming the matrix.
    """
    name: str
    description: str
    torch_rhs: Callable
    params: dict
    y0: np.ndarray
    t: np.ndarray
    rhs: Callable
    jac: Callable
    jac_p: Callable
    rtol: float  # suggested tolerances for a solver under test
    atol: float
    ref_rtol: float = 1e-10  # tolerances of the scipy Radau reference
    ref_atol: float = 1e-14
    sens_atol: float | None = None  # absolute tolerance of the sensitivities (default ref_atol)
    published: np.ndarray | None = None  # the test set's value at t[-1]
    source: str = ""
    key: tuple = field(default=())
    jac_mul: Callable | None = None

    def __post_init__(self):
        self.params = {k: np.array(v, dtype=np.float64) for k, v in self.params.items()}
        self.y0 = np.asarray(self.y0, dtype=np.float64)
        self.t = np.asarray(self.t, dtype=np.float64)
        self.key = self.key or (self.name,)
        if self.sens_atol is None:
            self.sens_atol = self.ref_atol

    def __repr__(self):
        return (f"Problem({self.name!r}: y of shape {self.y0.shape}, t in [{self.t[0]:g}, "
                f"{self.t[-1]:g}], {len(self.t)} output times)")

    @property
    def shape(self):
        return self.y0.shape

    def func(self, params: dict | None = None) -> ProblemRHS:
        """The torch right-hand side, with default constants or those in ``params`` (by name)."""
        return ProblemRHS(self.torch_rhs, self._params(params))

    def tensors(self, params: dict | None = None):
        """(func, y0, t) for a torch solver: an nn.Module, and float64 tensors."""
        return self.func(params), torch.tensor(self.y0), torch.tensor(self.t)

    def reference(self, t=None, params=None) -> np.ndarray:
        """The solution at the times t (default: self.t, with t[0] the initial time), shape
        (len(t), *y0.shape), by scipy Radau with the analytic Jacobian at ref_rtol/ref_atol.
        Cached; the returned array is read-only."""
        return self._solve(t, params, sensitivities=False)[0]

    def sensitivities(self, t=None, params=None):
        """(y, dy/dp): the reference solution and its derivatives w.r.t. every parameter, a dict
        name -> array of shape (len(t), *y0.shape, *param.shape), by forward sensitivities
        integrated with the state (Radau, same tolerances, scaled by |p|). Cached."""
        return self._solve(t, params, sensitivities=True)

    def gradient(self, dloss_dy, t=None, params=None) -> dict:
        """dL/dp of a loss L(y) of the reference solution y at times t, given ``dloss_dy(y)`` ->
        dL/dy (same shape as y): a dict name -> array shaped like the parameter."""
        y, dy = self.sensitivities(t, params)
        g = np.asarray(dloss_dy(y), dtype=np.float64)
        if g.shape != y.shape:
            raise ValueError(f"Problem.gradient: dloss_dy must return an array of the solution's "
                             f"shape {y.shape}, got {g.shape}")
        return {name: np.tensordot(g, s, axes=g.ndim) for name, s in dy.items()}

    def error(self, ys, t=None, params=None, rtol=None, atol=None) -> float:
        """max |y - y_ref| / (atol + rtol |y_ref|) over all times and components (default: the
        suggested rtol/atol): about 1 to 100 for a solver run at those tolerances."""
        ref = self.reference(t, params)
        ys = ys.detach().numpy() if isinstance(ys, torch.Tensor) else np.asarray(ys)
        if ys.shape != ref.shape:
            raise ValueError(f"Problem.error: ys has shape {ys.shape}, the reference "
                             f"{ref.shape} (times x state)")
        rtol = self.rtol if rtol is None else rtol
        atol = self.atol if atol is None else atol
        return float(np.max(np.abs(ys - ref) / (atol + rtol * np.abs(ref))))

    # -- internals --------------------------------------------------------------------------------
    def _params(self, params):
        values = {k: v.copy() for k, v in self.params.items()}
        for name, value in (params or {}).items():
            if name not in values:
                raise KeyError(f"problem {self.name!r}: no parameter {name!r}; its parameters are "
                               f"{', '.join(values)}")
            value = np.asarray(value, dtype=np.float64)
            if value.shape != values[name].shape:
                raise ValueError(f"problem {self.name!r}: parameter {name!r} has shape "
                                 f"{values[name].shape}, got {value.shape}")
            values[name] = value.copy()
        return values

    def _solve(self, t, params, sensitivities):
        t = self.t if t is None else np.asarray(t, dtype=np.float64)
        if t.ndim != 1 or len(t) < 2 or not np.all(np.diff(t) > 0):
            raise ValueError(f"problem {self.name!r}: t must be increasing times, the initial "
                             f"one first, got {t!r}")
        p = self._params(params)
        key = (self.key, self.y0.tobytes(), t.tobytes(), tuple(v.tobytes() for v in p.values()),
               sensitivities, self.ref_rtol, self.ref_atol, self.sens_atol)
        if key not in _CACHE:
            _CACHE[key] = _radau(self, t, p, sensitivities)
        return _CACHE[key]


_CACHE: dict = {}


def clear_cache():
    """Forget every cached reference solution."""
    _CACHE.clear()


def _radau(prob: Problem, t, p, sensitivities):
    n = prob.y0.size
    sizes = [v.size for v in p.values()]
    if not sensitivities:
        def fun(s, y):
            return prob.rhs(s, y, p)

        def jac(s, y):
            return prob.jac(s, y, p)
        z0, atol = prob.y0.ravel(), prob.ref_atol
    else:  # z = [y, c_1 dy/dp_1, ..., c_P dy/dp_P], c_j = |p_j| so all share y's scale
        flat = np.concatenate([v.ravel() for v in p.values()])
        c = np.where(flat != 0, np.abs(flat), 1.0)
        m = len(flat)

        def fun(s, z):
            y, Z = z[:n], z[n:].reshape(m, n)
            JZ = prob.jac_mul(s, y, p, Z.T) if prob.jac_mul else prob.jac(s, y, p) @ Z.T
            return np.concatenate([prob.rhs(s, y, p), (JZ + c * prob.jac_p(s, y, p)).T.ravel()])

        def jac(s, z):
            y, Z = z[:n], z[n:].reshape(m, n)
            J = prob.jac(s, y, p)
            if sp.issparse(J):  # block diagonal: fine for Newton when the stiff part is linear
                return sp.block_diag([J] * (m + 1), format="csc")
            full = np.kron(np.eye(m + 1), J)

            def g(w):  # the sensitivities' right-hand sides as a function of y: (n, m)
                return prob.jac(s, w, p) @ Z.T + c * prob.jac_p(s, w, p)
            h = 1e-6 * np.maximum(np.abs(y), 1e-6 * np.abs(y).max())
            for i in range(n):  # their coupling to y, by central differences (exact for
                e = np.zeros(n)  # Jacobians quadratic in y, as here)
                e[i] = h[i]
                full[n:, i] = ((g(y + e) - g(y - e)) / (2 * h[i])).T.ravel()
            return sp.csc_matrix(full) if len(full) > 64 else full  # sparse LU when large
        z0 = np.concatenate([prob.y0.ravel(), np.zeros(m * n)])
        atol = np.concatenate([np.full(n, prob.ref_atol), np.full(m * n, prob.sens_atol)])
    sol = solve_ivp(fun, (t[0], t[-1]), z0, method="Radau", t_eval=t, rtol=prob.ref_rtol,
                    atol=atol, jac=jac)
    if not sol.success or sol.y.shape[1] != len(t):
        raise RuntimeError(f"problem {prob.name!r}: the scipy Radau reference failed: "
                           f"{sol.message}")
    y = sol.y[:n].T.reshape(len(t), *prob.shape)
    y.setflags(write=False)
    if not sensitivities:
        return y, None
    dy, start = {}, 0
    for (name, value), size in zip(p.items(), sizes):
        block = sol.y[n + start * n: n + (start + size) * n]  # (size * n, T)
        s = block.reshape(size, n, len(t)) / c[start:start + size, None, None]
        s = s.transpose(2, 1, 0).reshape(len(t), *prob.shape, *value.shape)
        s.setflags(write=False)
        dy[name] = s
        start += size
    return y, dy


def log_times(t_max, n, t_min=1e-5):
    """t = 0 followed by n log-spaced times in [t_min, t_max] (the last one exactly t_max)."""
    t = np.concatenate([[0.0], np.logspace(math.log10(t_min), math.log10(t_max), n)])
    t[-1] = t_max
    return t


# -- ROBER ------------------------------------------------------------------------------------------
def _rober_torch(t, y, k):
    k1, k2, k3 = k
    y1, y2, y3 = y.unbind(-1)
    return torch.stack([-k1 * y1 + k3 * y2 * y3, k1 * y1 - k2 * y2 ** 2 - k3 * y2 * y3,
                        k2 * y2 ** 2], -1)


def _rober_rhs(t, y, p):
    k1, k2, k3 = p["k"].tolist()
    return np.array([-k1 * y[0] + k3 * y[1] * y[2],
                     k1 * y[0] - k2 * y[1] ** 2 - k3 * y[1] * y[2],
                     k2 * y[1] ** 2])


def _rober_jac(t, y, p):
    k1, k2, k3 = p["k"].tolist()
    return np.array([[-k1, k3 * y[2], k3 * y[1]],
                     [k1, -2 * k2 * y[1] - k3 * y[2], -k3 * y[1]],
                     [0.0, 2 * k2 * y[1], 0.0]])


def _rober_jac_p(t, y, p):
    return np.array([[-y[0], 0.0, y[1] * y[2]],
                     [y[0], -y[1] ** 2, -y[1] * y[2]],
                     [0.0, y[1] ** 2, 0.0]])


def rober(t_end=1e11, n_times=48, name="rober"):
    """ROBER, Robertson's autocatalytic reactions (test set: t in [0, 1e11]).

        y1' = -k1 y1 + k3 y2 y3
        y2' =  k1 y1 - k2 y2^2 - k3 y2 y3
        y3' =  k2 y2^2,          k = (0.04, 3e7, 1e4),  y(0) = (1, 0, 0)

    y2 stays below 4e-5 while y1 and y3 change over sixteen decades of time. Output times: 0 and
    n_times log-spaced times in [1e-5, t_end].
    """
    # test set, rober.f (solut): RADAU5 in quadruple precision, rtol = atol = 1.1e-18
    published = np.array([0.2083340149701255e-7, 0.8333360770334713e-13, 0.9999999791665050])
    return Problem(
        name=name, description=rober.__doc__,
        torch_rhs=_rober_torch, params={"k": (0.04, 3e7, 1e4)}, y0=(1.0, 0.0, 0.0),
        t=log_times(t_end, n_times), rhs=_rober_rhs, jac=_rober_jac, jac_p=_rober_jac_p,
        rtol=1e-6, atol=1e-12, ref_atol=1e-20, sens_atol=1e-14,
        published=published if t_end == 1e11 else None,
        source="IVP test set, problem ROBER" if t_end == 1e11 else "", key=("rober", t_end, n_times))


ROBER_K_START = (0.05, 4e7, 2e4)  # perturbed rate constants: seed 000's fitting problem starts here


class RoberNeural(torch.nn.Module):
    """Seed 000's neural ODE for ROBER in scaled variables z = y / scale: dz/dt = rate * net(z),
    net a bias-free 3->5->3 GELU network. The first layer has torch's default initialisation
    (drawn from ``seed`` without touching the global generator), the second is minus its
    transpose: the untrained model is then dissipative (z . net(z) <= 0, as h GELU(h) >= 0),
    while torch's default for both grows and overflows before t = 100 for most seeds."""

    def __init__(self, rate, seed=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = torch.nn.Sequential(torch.nn.Linear(3, 5, bias=False), torch.nn.GELU(),
                                           torch.nn.Linear(5, 3, bias=False)).to(F64)
        with torch.no_grad():
            self.net[2].weight.copy_(-self.net[0].weight.T)
        self.register_buffer("rate", torch.as_tensor(rate, dtype=F64).clone())

    def forward(self, t, z):
        return self.rate * self.net(z)


@dataclass(eq=False)
class RoberTraining:
    """Training data of the ROBER neural ODE: the scipy Radau solution y at the times t, the
    state scale (max |y| per component) and the rates (the largest |dz/dt| between consecutive
    data points, per component), so that z = y / scale and the network's outputs are of order 1.
    """
    t: np.ndarray
    y: np.ndarray
    scale: np.ndarray
    rate: np.ndarray
    # PETSc options the training solves use: Newton on a large implicit step of a GELU network can
    # need many damped iterations (PETSc's default is 50), and a failed step is retried smaller
    options: dict = field(default_factory=lambda: {"snes_max_it": 200,
                                                   "ts_max_snes_failures": -1})

    @property
    def target(self) -> np.ndarray:
        """The scaled data z = y / scale, shape (len(t), 3); z[0] is the initial state."""
        return self.y / self.scale

    def model(self, seed=0) -> RoberNeural:
        return RoberNeural(self.rate, seed)


def rober_training(t_max=100.0, n_times=40) -> RoberTraining:
    """ROBER's training data at 0 and n_times log-spaced times in [1e-5, t_max] (default 100,
    where torchdiffeq's explicit solvers already fail)."""
    t = log_times(t_max, n_times)
    y = np.array(rober(t_max, n_times).reference())
    scale = np.abs(y).max(axis=0)
    rate = (np.abs(np.diff(y / scale, axis=0)) / np.diff(t)[:, None]).max(axis=0)
    return RoberTraining(t, y, scale, rate)


# -- HIRES ----------------------------------------------------------------------------------------
# k = (k1, ..., k9, oks): 1.71, 0.43, 8.32, 0.69, 0.035, 8.32, 280, 0.69, 0.69 and the source 7e-4
HIRES_K = (1.71, 0.43, 8.32, 0.69, 0.035, 8.32, 280.0, 0.69, 0.69, 0.0007)


def _hires_torch(t, y, k):
    k1, k2, k3, k4, k5, k6, k7, k8, k9, oks = k
    y1, y2, y3, y4, y5, y6, y7, y8 = y.unbind(-1)
    r = k7 * y6 * y8
    f7 = r - (k2 + k8 + k9) * y7
    return torch.stack([-k1 * y1 + k2 * y2 + k6 * y3 + oks, k1 * y1 - (k2 + k3) * y2,
                        -(k6 + k1) * y3 + k2 * y4 + k5 * y5, k3 * y2 + k1 * y3 - (k4 + k2) * y4,
                        -(k5 + k1) * y5 + k2 * (y6 + y7), -r + k8 * y4 + k1 * y5 - k2 * y6 + k8 * y7,
                        f7, -f7], -1)


def _hires_rhs(t, y, p):
    return _hires_jac_p(t, y, p) @ p["k"]  # f is linear in k


def _hires_jac(t, y, p):
    k1, k2, k3, k4, k5, k6, k7, k8, k9, _ = p["k"].tolist()
    J = np.zeros((8, 8))
    J[0, :3] = -k1, k2, k6
    J[1, :2] = k1, -(k2 + k3)
    J[2, 2:5] = -(k6 + k1), k2, k5
    J[3, 1:4] = k3, k1, -(k4 + k2)
    J[4, 4:7] = -(k5 + k1), k2, k2
    J[5, 3:8] = k8, k1, -k7 * y[7] - k2, k8, -k7 * y[5]
    J[6, 5:8] = k7 * y[7], -(k2 + k8 + k9), k7 * y[5]
    J[7, 5:8] = -J[6, 5:8]
    return J


def _hires_jac_p(t, y, p):
    y1, y2, y3, y4, y5, y6, y7, y8 = y.tolist()
    G = np.zeros((8, 10))  # G[i, j] = df_i / dk_j
    G[:6, 0] = -y1, y1, -y3, y3, -y5, y5
    G[:, 1] = y2, -y2, y4, -y4, y6 + y7, -y6, -y7, y7
    G[[1, 3], 2] = -y2, y2
    G[3, 3] = -y4
    G[[2, 4], 4] = y5, -y5
    G[[0, 2], 5] = y3, -y3
    G[5:, 6] = -y6 * y8, y6 * y8, -y6 * y8
    G[5:, 7] = y4 + y7, -y7, y7
    G[6:, 8] = -y7, y7
    G[0, 9] = 1.0
    return G


def hires():
    """HIRES, high irradiance responses of photomorphogenesis (test set: t in [0, 321.8122]).

        y1' = -k1 y1 + k2 y2 + k6 y3 + oks         y5' = -(k5 + k1) y5 + k2 (y6 + y7)
        y2' =  k1 y1 - (k2 + k3) y2                y6' = -k7 y6 y8 + k8 y4 + k1 y5 - k2 y6 + k8 y7
        y3' = -(k6 + k1) y3 + k2 y4 + k5 y5        y7' =  k7 y6 y8 - (k2 + k8 + k9) y7
        y4' =  k3 y2 + k1 y3 - (k4 + k2) y4        y8' = -y7'

    k = (1.71, 0.43, 8.32, 0.69, 0.035, 8.32, 280, 0.69, 0.69), oks = 7e-4 (the parameter k holds
    all ten), y(0) = (1, 0, 0, 0, 0, 0, 0, 0.0057). Output times: 0 and 24 log-spaced times in
    [1e-2, 321.8122].
    """
    # test set, hires.f (solut): RADAU5 in quadruple precision, rtol = atol = h0 = 1.1e-18
    published = np.array([0.7371312573325668e-3, 0.1442485726316185e-3, 0.5888729740967575e-4,
                          0.1175651343283149e-2, 0.2386356198831331e-2, 0.6238968252742796e-2,
                          0.2849998395185769e-2, 0.2850001604814231e-2])
    return Problem(
        name="hires", description=hires.__doc__, torch_rhs=_hires_torch, params={"k": HIRES_K},
        y0=(1.0, 0, 0, 0, 0, 0, 0, 0.0057), t=log_times(321.8122, 24, t_min=1e-2),
        rhs=_hires_rhs, jac=_hires_jac, jac_p=_hires_jac_p, rtol=1e-6, atol=1e-10,
        ref_atol=1e-16, published=published, source="IVP test set, problem HIRES")


# -- VDPOL ----------------------------------------------------------------------------------------
def _vdpol_torch(t, y, mu):
    y1, y2 = y.unbind(-1)
    return torch.stack([y2, mu ** 2 * ((1 - y1 ** 2) * y2 - y1)], -1)


def _vdpol_rhs(t, y, p):
    mu2 = float(p["mu"]) ** 2
    return np.array([y[1], mu2 * ((1 - y[0] ** 2) * y[1] - y[0])])


def _vdpol_jac(t, y, p):
    mu2 = float(p["mu"]) ** 2
    return np.array([[0.0, 1.0], [mu2 * (-2 * y[0] * y[1] - 1), mu2 * (1 - y[0] ** 2)]])


def _vdpol_jac_p(t, y, p):
    return np.array([[0.0], [2 * float(p["mu"]) * ((1 - y[0] ** 2) * y[1] - y[0])]])


def vdpol():
    """VDPOL, the Van der Pol oscillator with mu = 1e3, scaled as in the test set.

        y1' = y2,   y2' = mu^2 ((1 - y1^2) y2 - y1),   y(0) = (2, 0),   t in [0, 2]

    (time scaled by 1/mu and y2 by mu, i.e. eps = 1/mu^2 = 1e-6); the relaxation oscillation has a
    period of about 1.6 with jumps of width ~1/mu^2. Output times: 21 equally spaced in [0, 2].
    """
    # test set, vdpol.f (solut): RADAU in quadruple precision, rtol = atol = h0 = 1.1e-18
    return Problem(
        name="vdpol", description=vdpol.__doc__, torch_rhs=_vdpol_torch, params={"mu": 1e3},
        y0=(2.0, 0.0), t=np.linspace(0.0, 2.0, 21), rhs=_vdpol_rhs, jac=_vdpol_jac,
        jac_p=_vdpol_jac_p, rtol=1e-6, atol=1e-6, ref_atol=1e-10,
        published=np.array([0.1706167732170483e1, -0.8928097010247975]),
        source="IVP test set, problem VDPOL")


# -- OREGO ----------------------------------------------------------------------------------------
def _orego_torch(t, y, c):
    s, w, q = c
    y1, y2, y3 = y.unbind(-1)
    return torch.stack([s * (y2 - y1 * y2 + y1 - q * y1 ** 2), (-y2 - y1 * y2 + y3) / s,
                        w * (y1 - y3)], -1)


def _orego_rhs(t, y, p):
    s, w, q = p["c"].tolist()
    return np.array([s * (y[1] - y[0] * y[1] + y[0] - q * y[0] ** 2),
                     (-y[1] - y[0] * y[1] + y[2]) / s, w * (y[0] - y[2])])


def _orego_jac(t, y, p):
    s, w, q = p["c"].tolist()
    return np.array([[s * (1 - y[1] - 2 * q * y[0]), s * (1 - y[0]), 0.0],
                     [-y[1] / s, -(1 + y[0]) / s, 1 / s],
                     [w, 0.0, -w]])


def _orego_jac_p(t, y, p):
    s, w, q = p["c"].tolist()
    return np.array([[y[1] - y[0] * y[1] + y[0] - q * y[0] ** 2, 0.0, -s * y[0] ** 2],
                     [-(-y[1] - y[0] * y[1] + y[2]) / s ** 2, 0.0, 0.0],
                     [0.0, y[0] - y[2], 0.0]])


def orego():
    """OREGO, the Oregonator model of the Belousov-Zhabotinskii reaction (t in [0, 360]).

        y1' = s (y2 - y1 y2 + y1 - q y1^2)
        y2' = (-y2 - y1 y2 + y3) / s
        y3' = w (y1 - y3),       c = (s, w, q) = (77.27, 0.161, 8.375e-6),  y(0) = (1, 2, 3)

    A relaxation oscillation with y1 and y2 spiking over five decades. Output times: 37 equally
    spaced in [0, 360].
    """
    # test set, orego.f (solut): RADAU in quadruple precision, rtol = h0 = 1.1e-18, atol = 1.1e-40
    return Problem(
        name="orego", description=orego.__doc__, torch_rhs=_orego_torch,
        params={"c": (77.27, 0.161, 8.375e-6)}, y0=(1.0, 2.0, 3.0), t=np.linspace(0, 360, 37),
        rhs=_orego_rhs, jac=_orego_jac, jac_p=_orego_jac_p, rtol=1e-6, atol=1e-6,
        ref_atol=1e-12,
        published=np.array([0.1000814870318523e1, 0.1228178521549917e4, 0.1320554942846706e3]),
        source="IVP test set, problem OREGO")


# -- POLLU: mass-action kinetics --------------------------------------------------------------------
# (reactants, products) of the 25 reactions, species numbered from 1 as in the test set
POLLU_REACTIONS = [
    ((1,), (2, 3)), ((2, 4), (1,)), ((5, 2), (1, 6)), ((7,), (5, 5, 8)), ((7,), (8,)),
    ((7, 6), (5, 8)), ((9,), (5, 8, 10)), ((9, 6), (11,)), ((11, 2), (1, 10, 12)),
    ((11, 1), (13,)), ((13,), (1, 11)), ((10, 2), (1, 14)), ((14,), (5, 7)), ((1, 6), (15,)),
    ((3,), (4,)), ((4,), (16,)), ((4,), (3,)), ((16,), (6, 6)), ((16,), (3,)), ((17, 6), (5, 18)),
    ((19,), (2,)), ((19,), (1, 3)), ((1, 4), (19,)), ((19, 1), (20,)), ((20,), (1, 19))]
POLLU_K = (0.35, 26.6, 1.23e4, 8.6e-4, 8.2e-4, 1.5e4, 1.3e-4, 2.4e4, 1.65e4, 9e3, 0.022, 1.2e4,
           1.88, 1.63e4, 4.8e6, 3.5e-4, 0.0175, 1e8, 4.44e11, 1.24e3, 2.1, 5.78, 0.0474, 1.78e3,
           3.12)


class _MassAction:
    """Rates r_j = k_j prod(y[reactants of j]) (one or two reactants), dy/dt = S r."""

    def __init__(self, reactions, n):
        self.n = n
        self.S = np.zeros((n, len(reactions)))
        self.a = np.zeros(len(reactions), dtype=np.int64)
        self.b = np.full(len(reactions), n, dtype=np.int64)  # index n: a constant 1
        for j, (reactants, products) in enumerate(reactions):
            for i in reactants:
                self.S[i - 1, j] -= 1
            for i in products:
                self.S[i - 1, j] += 1
            self.a[j] = reactants[0] - 1
            if len(reactants) == 2:
                self.b[j] = reactants[1] - 1
        self._S_torch = torch.tensor(self.S.T)
        self._a, self._b = torch.from_numpy(self.a), torch.from_numpy(self.b)

    def torch(self, t, y, k):
        y1 = torch.cat([y, torch.ones_like(y[..., :1])], -1)
        return (k * y1[..., self._a] * y1[..., self._b]) @ self._S_torch

    def _monomials(self, y):
        y1 = np.append(y, 1.0)
        return y1[self.a] * y1[self.b]

    def rhs(self, t, y, p):
        return self.S @ (p["k"] * self._monomials(y))

    def jac(self, t, y, p):
        y1 = np.append(y, 1.0)
        dr = np.zeros((len(self.a), self.n + 1))  # dr_j/dy_m, the last column is discarded
        rows = np.arange(len(self.a))
        np.add.at(dr, (rows, self.a), p["k"] * y1[self.b])
        np.add.at(dr, (rows, self.b), p["k"] * y1[self.a])
        return self.S @ dr[:, :self.n]

    def jac_p(self, t, y, p):
        return self.S * self._monomials(y)


def pollu():
    """POLLU, the air pollution model of Verwer (1994): 20 species, 25 reactions (t in [0, 60]).

        y' = S r(y),   r_j = k_j * (product of the concentrations of reaction j's reactants)

    with the stoichiometry S and rate constants k of POLLU_REACTIONS and POLLU_K (from 0.00013 to
    4.4e11), y(0) = 0 except y2 = 0.2, y4 = 0.04, y7 = 0.1, y8 = 0.3, y9 = 0.01, y17 = 0.007.
    Output times: 13 equally spaced in [0, 60].
    """
    # test set, pollu.f (solut): RADAU5 in quadruple precision, rtol = atol = h0 = 1.1e-18
    published = np.array([
        0.5646255480022769e-01, 0.1342484130422339e+00, 0.4139734331099427e-08,
        0.5523140207484359e-02, 0.2018977262302196e-06, 0.1464541863493966e-06,
        0.7784249118997964e-01, 0.3245075353396018e+00, 0.7494013383880406e-02,
        0.1622293157301561e-07, 0.1135863833257075e-07, 0.2230505975721359e-02,
        0.2087162882798630e-03, 0.1396921016840158e-04, 0.8964884856898295e-02,
        0.4352846369330103e-17, 0.6899219696263405e-02, 0.1007803037365946e-03,
        0.1772146513969984e-05, 0.5682943292316392e-04])
    y0 = np.zeros(20)
    y0[[1, 3, 6, 7, 8, 16]] = 0.2, 0.04, 0.1, 0.3, 0.01, 0.007
    kinetics = _MassAction(POLLU_REACTIONS, 20)
    return Problem(
        name="pollu", description=pollu.__doc__, torch_rhs=kinetics.torch, params={"k": POLLU_K},
        y0=y0, t=np.linspace(0.0, 60.0, 13), rhs=kinetics.rhs, jac=kinetics.jac,
        jac_p=kinetics.jac_p, rtol=1e-6, atol=1e-10, ref_atol=1e-22, sens_atol=1e-16,
        published=published,
        source="IVP test set, problem POLLU")


# -- 2-D Brusselator -------------------------------------------------------------------------------
def bruss2d(n=32, t_end=1.5, n_times=3):
    """BRUSS-2D (see bridges.problems.brusselator) on an n x n grid, the whole array at once:
    y has shape (2, n, n) = (u, v), the Laplacian is written with torch.roll. Output times:
    n_times + 1 equally spaced in [0, t_end]."""
    if n < 3:
        raise ValueError(f"bruss2d: n must be at least 3 (the periodic stencil), got {n}")
    scipy_side = brusselator.BrusselatorScipy(n)
    return Problem(
        name="bruss2d", description=bruss2d.__doc__, torch_rhs=brusselator.bruss_torch,
        params=dict(zip(brusselator.NAMES, brusselator.RATES)),
        y0=brusselator.initial_state(n).permute(2, 0, 1).numpy(),
        t=np.linspace(0, t_end, n_times + 1), rhs=scipy_side.rhs, jac=scipy_side.jac,
        jac_p=scipy_side.jac_p, jac_mul=scipy_side.jac_mul, rtol=1e-6, atol=1e-8,
        ref_rtol=1e-10, ref_atol=1e-12, key=("bruss2d", n, t_end, n_times))


# -- the registry ---------------------------------------------------------------------------------
_REGISTRY = {
    "rober": rober,
    "rober_1e5": lambda: rober(t_end=1e5, n_times=40, name="rober_1e5"),
    "hires": hires,
    "vdpol": vdpol,
    "orego": orego,
    "pollu": pollu,
    "bruss2d": bruss2d,
}


def names():
    """The registered problems' names."""
    return list(_REGISTRY)


def problem(name: str, **kwargs) -> Problem:
    """The named problem; keyword arguments go to its builder (e.g. ``problem("bruss2d",
    n=64)``). ``rober_1e5`` is ROBER on the log grid [0, 1e-5 ... 1e5] of the Robertson demo."""
    if name not in _REGISTRY:
        raise ValueError(f"problem: unknown problem {name!r}; valid names: {', '.join(names())}")
    builder = _REGISTRY[name]
    try:
        inspect.signature(builder).bind(**kwargs)
    except TypeError as exc:
        raise TypeError(f"problem({name!r}): {exc}; its builder takes "
                        f"{inspect.signature(builder)}") from None
    return builder(**kwargs)
