"""The finite-difference fallback: any black box R^n -> R^m on float64 numpy arrays as a torch op.

The Jacobian is estimated lazily, at the first backward, by perturbing groups of columns that
share no row (greedy colouring of a known sparsity pattern), and reused for every further
vector-Jacobian product of the same forward.

Steps are chosen for the black box's noise: a simulator with adaptive time stepping or printed
output is exact to 1e-6 or so, not to rounding, and the steps that suit rounding error then give
gradients wrong by percents. Once per FD function (again when an input has grown or shrunk
twofold, changed sign, or moved at all from 0), the noise level of every output is estimated
from a difference table along a random direction (More and Wild's ECnoise), and the second
(forward) or third (central) derivative along each column from a few probes, repeated nearer
where they were far from the step they suggest; each column's step balances truncation against
noise, and the same numbers give an error estimate of every Jacobian entry.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import threading
import warnings

import numpy as np
import scipy.sparse
import torch

from ._core import foreign_function
from ._errors import ForeignError, NoisyGradientWarning
from ._program import stop_runs
from ._transfer import as_numpy

EPS = np.finfo(np.float64).eps
# default relative step for each scheme: optimal for truncation vs rounding error
SCHEMES = {"forward": EPS ** 0.5, "central": EPS ** (1 / 3), "complex": 1e-20}
NOISE_POINTS = 7          # ECnoise table: f at x + i*delta*p, i = -3..3
NOISE_SPACINGS = (1e-6, 1e-4, 1e-2, 1e-8)  # relative spacings tried in turn until noise shows
WARN_ERROR = 0.01         # warn when a Jacobian column's estimated error exceeds 1 % of it
REPROBES = 3              # curvature probes repeated nearer, at most, where steps fall far inside


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


def noise_from_table(values) -> tuple[np.ndarray, np.ndarray]:
    """Noise level of each output from its values at equally spaced points along a line.

    `values` is (k+1) x m: row i holds the m outputs at x + i*delta*p. After More and Wild
    (ECnoise, SIAM J. Sci. Comput. 33, 2011): the j-th differences of noise of standard deviation
    s have mean square s^2 (2j)!/(j!)^2, while those of a smooth function shrink like delta^j. The
    level is read at the lowest order j whose estimate agrees within a factor 4 with orders j+1
    and j+2 and whose differences change sign. Returns (levels, found); where no order qualifies
    (too smooth at this spacing, or too few distinct values: quantised output) the level is the
    smallest estimate of any order, roughly an upper bound, and found is False.
    """
    table = np.asarray(values, dtype=np.float64)
    k = table.shape[0] - 1
    sigmas, signs, diff = [], [], table
    for j in range(1, k + 1):
        diff = np.diff(diff, axis=0)
        gamma = math.factorial(j) ** 2 / math.factorial(2 * j)
        sigmas.append(np.sqrt(gamma * np.mean(diff ** 2, axis=0)))
        signs.append((diff.max(axis=0) > 0) & (diff.min(axis=0) < 0))
    sigmas = np.array(sigmas)
    level, found = sigmas.min(axis=0), np.zeros(table.shape[1], bool)
    for j in range(k - 3, -1, -1):  # lowest qualifying order last, so it wins
        trio = sigmas[j:j + 3]
        ok = signs[j] & (trio.min(axis=0) > 0) & (trio.max(axis=0) <= 4 * trio.min(axis=0))
        level[ok], found[ok] = sigmas[j][ok], True
    distinct = np.array([np.unique(column).size for column in table.T])
    return level, found & (distinct > (k + 1) // 2)


@dataclasses.dataclass
class NoiseEstimate:
    """What fd2pytorch measured about a black box near the input `at` (flattened).

    level: noise standard deviation of each output (absolute). found: per output, whether the
    difference table showed noise (else level is an upper bound). curvature: per Jacobian entry,
    |f''| (forward scheme) or |f'''| (central) along its column, floored at what the noise lets
    a probe resolve (dense, or sparse like the Jacobian). steps: the step of each input.
    evaluations: the black-box calls the estimate cost.
    """
    at: np.ndarray
    level: np.ndarray
    found: np.ndarray
    curvature: object
    steps: np.ndarray
    evaluations: int


class FDFunction:
    """A black-box numpy function made differentiable by finite differences.

    Call it like a function of one tensor. Attributes:
        evaluations: black-box calls for values and Jacobians so far.
        noise_evaluations: black-box calls spent measuring noise and curvature so far.
        noise: the current NoiseEstimate (None before the first derivative, or with fixed steps).
        jacobian_error, gradient_error: estimated absolute error of the last Jacobian (same
            layout) and of the last vector-Jacobian product (the input's shape), or None with
            fixed steps.
        groups: the column groups of the last Jacobian built (one evaluation each, two central).
        op: the underlying torch.autograd.Function subclass.
    """

    def __init__(self, func, *, scheme="central", sparsity=None, workers=None, name=None,
                 rel_step=None, noise="auto"):
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
        if isinstance(noise, str) and noise != "auto":
            raise ValueError(f"fd2pytorch: noise must be 'auto', None (steps for rounding "
                             f"error only) or the noise level of the outputs, got {noise!r}")
        if not (noise is None or isinstance(noise, str)):
            noise = np.asarray(noise, dtype=np.float64)
            if not (np.all(np.isfinite(noise)) and np.all(noise >= 0)):
                raise ValueError(f"fd2pytorch: noise levels must be finite and >= 0, got {noise}")
        self.func, self.scheme, self.workers = func, scheme, workers
        self.name = name or getattr(func, "__name__", "black_box")
        self.rel_step = rel_step or SCHEMES[scheme]
        self.noise_setting = noise
        self.fixed_steps = rel_step is not None or noise is None or scheme == "complex"
        self.sparsity = None if sparsity is None else scipy.sparse.csc_matrix(sparsity, dtype=bool)
        self.groups = None
        self._unverified = sparsity is not None  # until a Jacobian passes `_check_pattern`
        self.evaluations = self.noise_evaluations = 0
        self.noise = self.jacobian_error = self.gradient_error = None
        self._warned = False
        self._lock = threading.Lock()
        self.op = foreign_function(self._forward, name=self.name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.name}: expected a tensor input, got {type(x).__name__}")
        if x.is_complex():
            raise TypeError(f"{self.name}: the input is complex ({x.dtype}); finite differences "
                            f"here take real inputs (pass the real and imaginary parts as "
                            f"separate real entries)")
        if x.numel() == 0:
            raise ValueError(f"{self.name}: the input is empty (shape {tuple(x.shape)}); the "
                             f"black box needs at least one number to differentiate by")
        if self.sparsity is not None and self.sparsity.shape[1] != x.numel():
            raise ValueError(f"{self.name}: sparsity has {self.sparsity.shape[1]} columns but the "
                             f"input has {x.numel()} elements; give an m x {x.numel()} pattern")
        return self.op.apply(x)

    # -- evaluation ---------------------------------------------------------------------------
    def _evaluate(self, points, what, memo=None, counter="evaluations", check=True, size=None):
        """The black box at each point, checked for numbers, for `size` entries (else those of
        the first point) and (unless not `check`) for non-finite values; `what(k)` describes
        point k for errors. Points already in `memo` (a dict from point bytes to outputs) are
        not run again.
        """
        memo = {} if memo is None else memo
        reference = "at the unperturbed input"  # (where `size` comes from, when given)
        keys = [p.tobytes() for p in points]
        todo = list({key: p for key, p in zip(keys, points) if key not in memo}.items())
        with self._lock:
            setattr(self, counter, getattr(self, counter) + len(todo))
        fresh = [p.copy() for _, p in todo]  # (its own copy: a black box may change it)
        run = functools.partial(_failure_as_value, self.func)
        if self.workers is None or len(fresh) <= 1:
            results = [run(p) for p in fresh]
        elif isinstance(self.workers, int):
            pool = concurrent.futures.ThreadPoolExecutor(self.workers)
            try:
                results = list(pool.map(run, fresh))
            except BaseException:  # (an interrupt: stop the programs under way, not wait)
                pool.shutdown(wait=False, cancel_futures=True)
                stop_runs()
                raise
            pool.shutdown()
        else:
            results = list(self.workers.map(run, fresh))
        for (key, _), y in zip(todo, results):
            if isinstance(y, Exception):
                where = what(keys.index(key))
                if isinstance(y, ForeignError) and check:  # (a program's own report)
                    y.add_note(f"raised by the black box of {self.name} {where}")
                    raise y
                if check:
                    raise ForeignError.wrap(f"{self.name}: the black box, {where},", y) from y
                memo[key] = np.full(size or 1, np.nan)  # a probe outside where the black box
                continue  # is defined: as if it returned nan
            try:
                memo[key] = np.asarray(y)
            except ValueError as exc:  # (ragged nested lists)
                raise TypeError(f"{self.name}: the black box must return an array of numbers, "
                                f"got a {type(y).__name__} numpy cannot read as one "
                                f"({exc})") from None
        out = []
        for k, key in enumerate(keys):
            y = memo[key]
            if not np.issubdtype(y.dtype, np.number):
                raise TypeError(f"{self.name}: the black box must return numbers, got an array "
                                f"of dtype {y.dtype} {what(k)}")
            if size is None:
                if y.size == 0:
                    raise ForeignError(f"{self.name}: the black box returned no numbers "
                                       f"{what(k)}; it must return at least one output")
                size, reference = y.size, what(k)
            if y.size != size:
                raise ForeignError(
                    f"{self.name}: the black box returned {y.size} numbers {what(k)}, but "
                    f"{size} {reference}; its output must have the same length at every input "
                    f"near it (a program that drops or adds lines of output?)")
            bad = ~np.isfinite(y)
            if check and bad.any():
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
        built = []  # (Jacobian, its error estimate): built at most once, at the first backward

        def pullback(grad):
            if not built:
                built.append((self.jacobian_at(x_np, y0), self.jacobian_error))
            jacobian, error = built[0]
            g = as_numpy(grad.to(torch.float64), who=self.name).reshape(-1)
            if error is not None:
                self.gradient_error = torch.from_numpy(
                    np.asarray(error.T @ np.abs(g))).reshape(x.shape)
            return torch.from_numpy(np.asarray(jacobian.T @ g)).reshape(x.shape)

        def pushforward(tangent):
            if tangent is None:
                return torch.zeros(y0.shape, dtype=torch.float64)
            v = as_numpy(tangent.to(torch.float64), who=self.name).reshape(-1)
            return torch.from_numpy(self._directional(x_np, y0, v)).reshape(y0.shape)

        return torch.from_numpy(y0), pullback, pushforward

    # -- steps and noise ----------------------------------------------------------------------
    def _steps(self, x):
        h = self.rel_step * np.maximum(np.abs(x), 1.0)
        return h if self.scheme == "complex" else (x + h) - x  # exactly representable steps

    def _plan(self, m, n):
        """The Jacobian's pattern (CSC) and its column groups."""
        if self.sparsity is not None:
            return self.sparsity, color_columns(self.sparsity)
        return scipy.sparse.csc_matrix(np.ones((m, n), dtype=bool)), \
            [np.array([j]) for j in range(n)]

    def _current_steps(self, x, y0, memo):
        """Each input's step: fixed, or from the noise estimate (made or renewed if stale)."""
        if self.fixed_steps:
            return self._steps(x)
        # renewed once an input moves by half its size, then or now: it has grown or shrunk
        # twofold, or changed sign (one that was 0 when measured: at all, as x = 0 often has
        # outputs that vanish with it, and curvature or noise with them)
        at = None if self.noise is None else self.noise.at
        if at is None or at.shape != x.shape or \
                np.any(np.abs(x - at) > 0.5 * np.maximum(np.abs(x), np.abs(at))):
            if self._estimate(x, y0, memo) is None:
                return self._steps(x)
        return (x + self.noise.steps) - x

    def estimate_noise(self, x) -> NoiseEstimate:
        """Measure the noise and curvature at x now (a tensor or array) and choose new steps."""
        x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x,
                       dtype=np.float64).reshape(-1)
        memo = {}
        (y0,) = self._evaluate([x], lambda k: "at the unperturbed input", memo)
        return self._estimate(x, np.asarray(y0, dtype=np.float64).reshape(-1), memo)

    def _estimate(self, x, y0, memo):
        """Measure noise and curvature at x and choose the steps; None (and no estimate) where
        the black box is not finite at some probe: the fixed steps serve then."""
        self.noise = None
        before = self.noise_evaluations
        memo.setdefault(x.tobytes(), y0)
        y0 = y0.reshape(-1)
        if isinstance(self.noise_setting, np.ndarray):
            if self.noise_setting.size not in (1, y0.size):
                raise ValueError(f"{self.name}: noise has {self.noise_setting.size} levels but "
                                 f"the black box has {y0.size} outputs; give one level or one "
                                 f"per output")
            level = np.broadcast_to(self.noise_setting.ravel(), y0.shape).astype(np.float64)
            found = np.ones(y0.shape, bool)
        else:
            level, found = self._measure_noise(x, memo)
        if level is None:
            return None
        level = np.maximum(level, EPS * np.abs(y0))  # rounding is always there
        pattern, groups = self._plan(y0.size, x.size)
        central = self.scheme == "central"
        relative = max(np.linalg.norm(level) / max(np.linalg.norm(y0), np.finfo(float).tiny), EPS)
        b = (x + min(relative ** (0.2 if central else 0.25), 0.1) * _scale(x)) - x
        noise = np.sqrt(np.asarray(pattern.T.astype(np.float64) @ level ** 2)).ravel()
        curvature = self._curvature(x, y0, b, level, pattern, groups, memo)
        if curvature is None:
            return None
        h = self._balanced_steps(x, curvature, noise, b)
        # probes far beyond the steps can miss what the steps see (a ripple between them reads
        # as little curvature): probe again at the steps' own scale until the two agree
        for _ in range(REPROBES):
            near = h < b / 8
            if not near.any():
                break
            b = (x + np.where(near, 4 * h, b)) - x
            finer = self._curvature(x, y0, b, level, pattern, groups, memo)
            if finer is None:
                break
            agree = _column_norms(finer) <= 4 * _column_norms(curvature)
            np.maximum(curvature.data, finer.data, out=curvature.data)  # (one pattern)
            h = self._balanced_steps(x, curvature, noise, b)
            if agree.all():
                break
        self.noise = NoiseEstimate(at=x.copy(), level=level, found=found,
                                   curvature=curvature if self.sparsity is not None
                                   else curvature.toarray(), steps=h,
                                   evaluations=self.noise_evaluations - before)
        self._warned = False
        return self.noise

    def _curvature(self, x, y0, b, level, pattern, groups, memo):
        """|f'''| (central) or |f''| (forward) of each Jacobian entry (sparse, the pattern's)
        from probes at x +- b, +- 2b (or + b, + 2b) along each group's columns, floored at what
        the noise lets them resolve; None where the black box is not finite at a probe."""
        central = self.scheme == "central"
        multiples = (1, -1, 2, -2) if central else (1, 2)
        deltas = [np.where(np.isin(np.arange(x.size), cols), b, 0.0) for cols in groups]
        ys = self._evaluate([x + c * d for d in deltas for c in multiples],
                            lambda k: f"probing the curvature for columns "
                                      f"{_columns(groups[k // len(multiples)])}", memo,
                            counter="noise_evaluations", check=False, size=y0.size)
        ys = [y.reshape(-1) for y in ys]
        if not all(np.isfinite(y).all() for y in ys):
            return None
        numerators = []
        for g in range(len(groups)):
            f = ys[g * len(multiples):(g + 1) * len(multiples)]
            numerators.append(np.abs(f[2] - 2 * f[0] + 2 * f[1] - f[3]) if central
                              else np.abs(f[1] - 2 * f[0] + y0))
        floor = 4 * level if central else 3 * level  # about the numerators' noise
        curvature = _assemble(pattern, groups, [np.maximum(v, floor) for v in numerators])
        cols = np.repeat(np.arange(x.size), np.diff(curvature.indptr))
        curvature.data /= (2 * b[cols] ** 3) if central else b[cols] ** 2
        return curvature

    def _balanced_steps(self, x, curvature, noise, b):
        """Each column's step balancing truncation (its curvature) against its noise, within
        twice the probes' reach."""
        c = _column_norms(curvature)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = (3 * noise / c) ** (1 / 3) if self.scheme == "central" \
                else 2 * np.sqrt(noise / c)
        return np.clip(np.nan_to_num(h, nan=np.inf), 100 * EPS * _scale(x), 2 * b)

    def _measure_noise(self, x, memo):
        """ECnoise along a fixed random direction, trying coarser and finer spacings in turn."""
        direction = np.random.default_rng(x.size).standard_normal(x.size)
        direction *= _scale(x) / np.abs(direction).max()
        half, best, coarsest = NOISE_POINTS // 2, None, math.inf
        flat_at = np.zeros(memo[x.tobytes()].size)  # per output: the spacing it was constant at
        for spacing in NOISE_SPACINGS:
            if spacing > coarsest:
                continue
            offsets = [i * spacing for i in range(-half, half + 1)]
            ys = self._evaluate([x + t * direction for t in offsets],
                                lambda k: f"at x + {offsets[k]:g} * p while measuring the noise",
                                memo, counter="noise_evaluations", check=False,
                                size=memo[x.tobytes()].size)
            table = np.stack([y.reshape(-1) for y in ys])
            if not np.isfinite(table).all():
                return None, None
            level, found = noise_from_table(table)
            varied = np.ptp(table, axis=0) > 0
            # constant at a finer spacing, varying at this one: printed with few digits, where
            # a linear stretch reads as smooth (CL = 0 at alpha 0): its noise is at least that
            # of rounding to the smallest step between its values
            for j in np.flatnonzero(varied & (flat_at > 0) & (flat_at < spacing)):
                gap = np.diff(np.unique(table[:, j])).min()
                level[j], found[j] = max(level[j], gap / math.sqrt(12)), True
            flat_at[~varied] = np.maximum(flat_at[~varied], spacing)
            if best is None or found.sum() > best[1].sum():
                best = (level, found)
            if varied.any() and 2 * found.sum() >= varied.sum():
                break
            # a table that varies without noise is smooth at this spacing: coarser ones are
            # for quantised output (too few distinct values), and would alias a ripple of
            # the function into "noise"
            distinct = np.array([np.unique(column).size for column in table.T])
            if varied.any() and 2 * (varied & ~found & (distinct > half)).sum() >= varied.sum():
                coarsest = spacing
        return best

    # -- derivatives --------------------------------------------------------------------------
    def jacobian_at(self, x, y0=None):
        """The m x n Jacobian at x (dense ndarray, or scipy CSC when a sparsity is given)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        memo = {}
        if y0 is None:
            (y0,) = self._evaluate([x], lambda k: "at the unperturbed input", memo)
        y0 = np.asarray(y0, dtype=np.float64).reshape(-1)
        memo.setdefault(x.tobytes(), y0)
        n = x.size
        h = self._current_steps(x, y0, memo)
        pattern, groups = self._plan(y0.size, n)
        self.groups = groups
        deltas = [np.where(np.isin(np.arange(n), cols), h, 0.0) for cols in groups]
        differences = self._differences(x, y0, deltas,
                                        lambda k: f"columns {_columns(groups[k])}", memo)
        jac = _assemble(pattern, groups, differences)
        cols = np.repeat(np.arange(n), np.diff(jac.indptr))
        if self.sparsity is not None:
            self._check_pattern(x, y0, h, jac, groups, differences, memo)
        jac.data /= h[cols]
        self.jacobian_error = None if self.noise is None else self._error(jac, h, cols)
        dense = self.sparsity is None
        if dense and self.jacobian_error is not None:
            self.jacobian_error = self.jacobian_error.toarray()
        return jac.toarray() if dense else jac

    def _check_pattern(self, x, y0, h, jac, groups, differences, memo):
        """Raise if the sparsity pattern leaves out a dependence, whose derivative would be
        silently dropped or added to another's: an output changed by a group of columns none
        of which it has an entry for (every Jacobian, free), or, on the first Jacobian, a
        difference along a random mix of all columns that the pattern's entries do not
        reproduce (one or two more evaluations). Both allow for noise and rounding."""
        pattern = self.sparsity
        floor = 8 * EPS * np.abs(y0) + (0 if self.noise is None else 8 * self.noise.level)
        covered = np.zeros((len(groups), y0.size), bool)
        for g, cols in enumerate(groups):
            for j in cols:
                covered[g, pattern.indices[pattern.indptr[j]:pattern.indptr[j + 1]]] = True
        changes = np.abs(np.stack(differences))
        bad = ~covered & (changes > floor + 1e-6 * (changes * covered).max(axis=0))
        if bad.any():
            g, i = (int(v[0]) for v in np.nonzero(bad))
            where = f"when inputs {_columns(groups[g])} were perturbed"
        elif self._unverified:
            rng = np.random.default_rng(0)
            mix = rng.uniform(0.5, 1.0, x.size) * rng.choice([-1.0, 1.0], x.size)
            (along,) = self._differences(x, y0, [mix * h], lambda k: "a random mix of all "
                                         "columns (checking the sparsity pattern)", memo)
            predicted = jac @ mix  # (the entries still hold differences, not yet over h)
            scale = np.abs(jac) @ np.abs(mix) + np.abs(along)
            gap = np.abs(along - predicted)
            bad = gap > floor * x.size ** 0.5 + 1e-4 * scale
            if not bad.any():
                self._unverified = False
                return
            i = int(np.argmax(bad))
            where = "along a random mix of all inputs, unlike the pattern's entries predict"
        else:
            return
        raise ValueError(
            f"{self.name}: output {i} changed {where}: the sparsity pattern leaves out a "
            f"dependence of it, whose derivative would be dropped or credited to another "
            f"input; add the entries to sparsity, or leave sparsity=None")

    def _error(self, jac, h, cols):
        """Estimated absolute error of each Jacobian entry: truncation plus noise over step."""
        est = self.noise
        rows, hc = jac.indices, h[cols]
        # a dense Jacobian's CSC data run down the columns in turn
        curvature = est.curvature.ravel(order="F") if self.sparsity is None \
            else est.curvature.data
        if self.scheme == "central":
            data = curvature * hc ** 2 / 6 + est.level[rows] / hc
        else:
            data = curvature * hc / 2 + 2 * est.level[rows] / hc
        error = scipy.sparse.csc_matrix((data, jac.indices, jac.indptr), shape=jac.shape)
        self._warn_if_inaccurate(jac, error, h)
        return error

    def _warn_if_inaccurate(self, jac, error, h):
        size = np.sqrt(np.asarray(jac.multiply(jac).sum(axis=0))).ravel()
        err = np.sqrt(np.asarray(error.multiply(error).sum(axis=0))).ravel()
        # (against at least 1e-8 of the largest column: an exactly zero column, whose estimate
        # is uncertain only by rounding, is no cause for alarm)
        floor = 1e-8 * size.max(initial=0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            relative = np.where(err > 0, err / np.maximum(size, floor), 0.0)
        j = int(np.argmax(relative))
        if self._warned or not relative[j] > WARN_ERROR:
            return
        self._warned = True
        level = self.noise.level
        warnings.warn(
            f"{self.name}: the finite-difference derivative with respect to input {j} is "
            f"uncertain: estimated error {err[j]:.3g} against its size {size[j]:.3g} "
            f"({relative[j]:.1%}), with step {h[j]:.3g} and output noise up to "
            f"{level.max():.3g} (std). {int((relative > WARN_ERROR).sum())} of {relative.size} "
            f"input(s) exceed {WARN_ERROR:.0%}. Tighten the program's tolerances or output "
            f"precision, or see fd.noise for what was measured", NoisyGradientWarning,
            stacklevel=2)

    def _directional(self, x, y0, v):
        """J(x) v from one evaluation (two for the central scheme)."""
        scale = np.max(np.abs(v))
        if scale == 0:
            return np.zeros_like(y0)
        if self.fixed_steps:
            h = self.rel_step * max(np.max(np.abs(x)), 1.0) / scale
        else:  # the longest step along v that moves no input further than its own step
            steps, moving = self._current_steps(x, y0, {}), v != 0
            h = np.min(steps[moving] / np.abs(v[moving]))
        (diff,) = self._differences(x, y0, [h * v], lambda k: "along the jvp tangent")
        return diff / h

    def _differences(self, x, y0, deltas, describe, memo=None):
        """Per delta: f(x+d) - f(x), or its central / complex-step counterpart (times |d|)."""
        k = len(deltas)

        def what(sign):
            return lambda i: f"at x {sign(i)} h for {describe(i % k)} ({self.scheme} scheme)"
        if self.scheme == "forward":
            ys = self._evaluate([x + d for d in deltas], what(lambda i: "+"), memo,
                                size=y0.size)
            return [y.reshape(-1) - y0 for y in ys]
        if self.scheme == "central":
            ys = self._evaluate([x + d for d in deltas] + [x - d for d in deltas],
                                what(lambda i: "+" if i < k else "-"), memo, size=y0.size)
            return [(ys[i].reshape(-1) - ys[k + i].reshape(-1)) / 2 for i in range(k)]
        ys = self._evaluate([x + 1j * d for d in deltas], what(lambda i: "+ i"), memo,
                            size=y0.size)
        if not all(np.iscomplexobj(y) for y in ys):
            raise TypeError(f"{self.name}: the black box returned real values for a complex "
                            f"input, so the complex-step scheme cannot see the derivative; make it "
                            f"propagate complex numbers, or use scheme='central'")
        return [y.reshape(-1).imag for y in ys]


def _failure_as_value(func, x):
    """func(x), or the exception it raised (for probes whose failure is not fatal)."""
    try:
        y = func(x)
    except Exception as exc:
        return exc
    try:
        return np.array(y)  # a copy, now: a black box may reuse one output buffer for every call
    except ValueError:  # (ragged nested lists: named by the caller)
        return y


def _column_norms(matrix):
    """The 2-norm of each column of a sparse matrix."""
    return np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=0))).ravel()


def _scale(x):
    """Each input's size for relative steps: |x_j|, or 1 where x_j is 0."""
    return np.where(x != 0, np.abs(x), 1.0)


def _columns(cols) -> str:
    return f"{cols.tolist()[:10]}{'...' if len(cols) > 10 else ''}"


def _assemble(pattern, groups, vectors):
    """A CSC matrix on `pattern` whose column j holds vectors[g] on its rows (j in group g)."""
    data = np.empty(pattern.nnz)
    for cols, vector in zip(groups, vectors):
        for j in cols:
            lo, hi = pattern.indptr[j], pattern.indptr[j + 1]
            data[lo:hi] = vector[pattern.indices[lo:hi]]
    return scipy.sparse.csc_matrix((data, pattern.indices.copy(), pattern.indptr.copy()),
                                   shape=pattern.shape)


def fd2pytorch(func, *, scheme="central", sparsity=None, workers=None, name=None,
               rel_step=None, noise="auto") -> FDFunction:
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
        rel_step: a fixed relative step, scaled by max(|x_j|, 1); it overrides ``noise``.
        noise: ``"auto"`` measures the outputs' noise and each column's curvature at the first
            derivative (again when an input has grown or shrunk twofold or changed sign, or on
            ``estimate_noise(x)``) and chooses each column's step from them; a number or an
            array of m numbers gives the noise level (standard deviation) instead of measuring
            it; ``None`` uses the fixed default step, optimal for rounding error only.

    The input tensor may have any shape and floating dtype; func sees it flattened, in float64.
    """
    return FDFunction(func, scheme=scheme, sparsity=sparsity, workers=workers, name=name,
                      rel_step=rel_step, noise=noise)
