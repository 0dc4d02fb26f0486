"""The finite-difference fallback: any black box R^n -> R^m on float64 numpy arrays as a torch op.

The Jacobian is estimated lazily, at the first backward, by perturbing groups of columns that
share no row (greedy colouring of a known sparsity pattern), and reused for every further
vector-Jacobian product of the same forward.
"""
from __future__ import annotations

import concurrent.futures
import threading

import numpy as np
import scipy.sparse
import torch

from ._core import foreign_function
from ._errors import ForeignError
from ._transfer import as_numpy

EPS = np.finfo(np.float64).eps
# default relative step for each scheme: optimal for truncation vs rounding error
SCHEMES = {"forward": EPS ** 0.5, "central": EPS ** (1 / 3), "complex": 1e-20}


def color_columns(pattern) -> list[np.ndarray]:
    """Group the columns of an m x n sparsity pattern so that no two in a group share a row.

    Greedy colouring of the column-intersection graph, in column order. Returns one array of
    column indices per group.
    """
    csc = scipy.sparse.csc_matrix(pattern, dtype=bool)
    csr = csc.tocsr()
    n = csc.shape[1]
    colour = np.full(n, -1)
    for j in range(n):
        rows = csc.indices[csc.indptr[j]:csc.indptr[j + 1]]
        neighbours = np.concatenate([csr.indices[csr.indptr[r]:csr.indptr[r + 1]] for r in rows]) \
            if len(rows) else np.empty(0, int)
        taken = set(colour[neighbours][colour[neighbours] >= 0].tolist())
        c = 0
        while c in taken:
            c += 1
        colour[j] = c
    return [np.flatnonzero(colour == c) for c in range(colour.max() + 1)] if n else []


class FDFunction:
    """A black-box numpy function made differentiable by finite differences.

    Call it like a function of one tensor. Attributes:
        evaluations: how many times the black box has been called so far.
        groups: the column groups of the last Jacobian built (one evaluation each, two central).
        op: the underlying torch.autograd.Function subclass.
    """

    def __init__(self, func, *, scheme="central", sparsity=None, workers=None, name=None,
                 rel_step=None):
        if not callable(func):
            raise TypeError(f"fd2pytorch: func must be callable, got {type(func).__name__}")
        if scheme not in SCHEMES:
            raise ValueError(f"fd2pytorch: unknown scheme {scheme!r}; valid schemes: "
                             f"{', '.join(SCHEMES)}")
        if not (workers is None or (isinstance(workers, int) and workers >= 1)
                or callable(getattr(workers, "map", None))):
            raise TypeError(f"fd2pytorch: workers must be None, a positive int or an executor "
                            f"with a map method, got {workers!r}")
        if rel_step is not None and not rel_step > 0:
            raise ValueError(f"fd2pytorch: rel_step must be positive, got {rel_step!r}")
        self.func, self.scheme, self.workers = func, scheme, workers
        self.name = name or getattr(func, "__name__", "black_box")
        self.rel_step = rel_step or SCHEMES[scheme]
        self.sparsity = None if sparsity is None else scipy.sparse.csc_matrix(sparsity, dtype=bool)
        self.groups = None
        self.evaluations = 0
        self._lock = threading.Lock()
        self.op = foreign_function(self._forward, name=self.name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.name}: expected a tensor input, got {type(x).__name__}")
        if self.sparsity is not None and self.sparsity.shape[1] != x.numel():
            raise ValueError(f"{self.name}: sparsity has {self.sparsity.shape[1]} columns but the "
                             f"input has {x.numel()} elements; give an m x {x.numel()} pattern")
        return self.op.apply(x)

    # -- evaluation ---------------------------------------------------------------------------
    def _evaluate(self, points, what):
        """The black box at each point, checked; `what(k)` describes point k for errors."""
        with self._lock:
            self.evaluations += len(points)
        if self.workers is None or len(points) == 1:
            results = [self.func(p) for p in points]
        elif isinstance(self.workers, int):
            with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
                results = list(pool.map(self.func, points))
        else:
            results = list(self.workers.map(self.func, points))
        out = []
        for k, y in enumerate(results):
            y = np.asarray(y)
            bad = ~np.isfinite(y)
            if bad.any():
                i = int(np.flatnonzero(bad.ravel())[0])
                raise ForeignError(
                    f"{self.name}: the black box returned {y.ravel()[i]} (output index {i}, "
                    f"{int(bad.sum())} non-finite value(s) in all) {what(k)}. Check that the "
                    f"function is defined there; a smaller rel_step or another scheme may help")
            out.append(y)
        return out

    def _forward(self, x):
        x_np = as_numpy(x.to(torch.float64), who=self.name).reshape(-1)
        (y0,) = self._evaluate([x_np], lambda k: "at the unperturbed input")
        if np.iscomplexobj(y0) or not np.issubdtype(y0.dtype, np.number):
            raise TypeError(f"{self.name}: the black box must return real numbers, got an array "
                            f"of dtype {y0.dtype}")
        y0 = y0.astype(np.float64, copy=False)
        if self.sparsity is not None and self.sparsity.shape != (y0.size, x_np.size):
            raise ValueError(f"{self.name}: sparsity has shape {self.sparsity.shape}, but the "
                             f"black box maps R^{x_np.size} to R^{y0.size}: expected "
                             f"{(y0.size, x_np.size)}")
        jacobian = []  # built at most once, at the first backward

        def pullback(grad):
            if not jacobian:
                jacobian.append(self.jacobian_at(x_np, y0))
            g = as_numpy(grad.to(torch.float64), who=self.name).reshape(-1)
            return torch.from_numpy(np.asarray(jacobian[0].T @ g)).reshape(x.shape)

        def pushforward(tangent):
            if tangent is None:
                return torch.zeros(y0.shape, dtype=torch.float64)
            v = as_numpy(tangent.to(torch.float64), who=self.name).reshape(-1)
            return torch.from_numpy(self._directional(x_np, y0, v)).reshape(y0.shape)

        return torch.from_numpy(y0), pullback, pushforward

    # -- derivatives --------------------------------------------------------------------------
    def _steps(self, x):
        h = self.rel_step * np.maximum(np.abs(x), 1.0)
        return h if self.scheme == "complex" else (x + h) - x  # exactly representable steps

    def jacobian_at(self, x, y0=None):
        """The m x n Jacobian at x (dense ndarray, or scipy CSC when a sparsity is given)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if y0 is None:
            (y0,) = self._evaluate([x], lambda k: "at the unperturbed input")
        y0 = np.asarray(y0, dtype=np.float64).reshape(-1)
        n, h = x.size, self._steps(x)
        pattern = self.sparsity if self.sparsity is not None else \
            scipy.sparse.csc_matrix(np.ones((y0.size, n), dtype=bool))
        self.groups = groups = color_columns(pattern) if self.sparsity is not None \
            else [np.array([j]) for j in range(n)]
        deltas = []
        for cols in groups:
            d = np.zeros(n)
            d[cols] = h[cols]
            deltas.append(d)
        differences = self._differences(x, y0, deltas, lambda k: f"columns "
                                        f"{groups[k].tolist()[:10]}{'...' if len(groups[k]) > 10 else ''}")
        data = np.empty(pattern.nnz)
        for cols, diff in zip(groups, differences):
            for j in cols:
                lo, hi = pattern.indptr[j], pattern.indptr[j + 1]
                data[lo:hi] = diff[pattern.indices[lo:hi]] / h[j]
        jac = scipy.sparse.csc_matrix((data, pattern.indices, pattern.indptr), shape=pattern.shape)
        return jac if self.sparsity is not None else jac.toarray()

    def _directional(self, x, y0, v):
        """J(x) v from one evaluation (two for the central scheme)."""
        scale = np.max(np.abs(v))
        if scale == 0:
            return np.zeros_like(y0)
        h = self.rel_step * max(np.max(np.abs(x)), 1.0) / scale
        (diff,) = self._differences(x, y0, [h * v], lambda k: "along the jvp tangent")
        return diff / h

    def _differences(self, x, y0, deltas, describe):
        """Per delta: f(x+d) - f(x), or its central / complex-step counterpart (times |d|)."""
        k = len(deltas)

        def what(sign):
            return lambda i: f"at x {sign(i)} h for {describe(i % k)} ({self.scheme} scheme)"
        if self.scheme == "forward":
            ys = self._evaluate([x + d for d in deltas], what(lambda i: "+"))
            return [y.reshape(-1) - y0 for y in ys]
        if self.scheme == "central":
            ys = self._evaluate([x + d for d in deltas] + [x - d for d in deltas],
                                what(lambda i: "+" if i < k else "-"))
            return [(ys[i].reshape(-1) - ys[k + i].reshape(-1)) / 2 for i in range(k)]
        ys = self._evaluate([x + 1j * d for d in deltas], what(lambda i: "+ i"))
        if not all(np.iscomplexobj(y) for y in ys):
            raise TypeError(f"{self.name}: the black box returned real values for a complex "
                            f"input, so the complex-step scheme cannot see the derivative; make it "
                            f"propagate complex numbers, or use scheme='central'")
        return [y.reshape(-1).imag for y in ys]


def fd2pytorch(func, *, scheme="central", sparsity=None, workers=None, name=None,
               rel_step=None) -> FDFunction:
    """Make a black box ``func: R^n -> R^m`` on float64 numpy arrays a differentiable torch op.

    Args:
        func: takes a 1-D float64 array of length n (complex128 for ``scheme="complex"``) and
            returns an array of m numbers (any shape).
        scheme: ``"forward"`` (1 extra evaluation per column group), ``"central"`` (2, more
            accurate) or ``"complex"`` (complex step: 1, exact to rounding, needs a func that
            propagates complex numbers).
        sparsity: optional m x n boolean array or scipy sparse matrix of the Jacobian's nonzeros.
            Columns that share no row are perturbed together, so a banded Jacobian costs a few
            evaluations whatever n is.
        workers: evaluate perturbations in parallel: a thread count (good for external programs
            and numpy code that releases the GIL) or any executor with ``map`` (e.g. a
            ProcessPoolExecutor, for pure-Python black boxes that pickle).
        name: names the op in errors and in ``grad_fn``.
        rel_step: relative step, scaled by max(|x_j|, 1); default is optimal for the scheme.

    The input tensor may have any shape and floating dtype; func sees it flattened, in float64.
    """
    return FDFunction(func, scheme=scheme, sparsity=sparsity, workers=workers, name=name,
                      rel_step=rel_step)
