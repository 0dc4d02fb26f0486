"""Jacobian products of torch functions that may contain bridged ops, without double backward.

A bridged op has a pullback (reverse mode) and, depending on its adapter, a pushforward (forward
mode), but never a second derivative. So J v comes from forward mode and J^T w from reverse mode;
nothing differentiates a derivative. `Linearisation` holds one point; `probe` finds out once what a
function supports there. `DenseLinearisation` adds the whole Jacobian of a small function of plain
torch, from one reverse pass.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.autograd.forward_ad as fwAD

from . import _core
from ._errors import MissingDerivativeError

# "auto": forward mode where every op has one and it measured faster, reverse mode otherwise
MODES = ("auto", "forward", "reverse")
# In benchmarks/bench_jacobian.py, coloured assembly of plain torch functions was faster in
# reverse mode below about this many unknowns and in forward mode above it.
FORWARD_FROM = 4096
_SQRT_EPS = float(torch.finfo(torch.float64).eps) ** 0.5


def grads(value, inputs, seed, *, batched=False, zeros=False):
    """torch.autograd.grad(value, inputs, seed), graph kept, for a value that may not depend on
    some or all inputs (func(t, y) = constant, or 0 * y): None for those, or zeros if `zeros`.
    `batched`: seed has a leading batch dimension (is_grads_batched)."""
    inputs = tuple(inputs)
    if value.requires_grad:
        out = torch.autograd.grad(value, inputs, seed, retain_graph=True, allow_unused=True,
                                  is_grads_batched=batched)
    else:
        out = (None,) * len(inputs)
    if not zeros:
        return out
    lead = seed.shape[:1] if batched else ()
    return tuple(x.new_zeros((*lead, *x.shape)) if g is None else g
                 for g, x in zip(out, inputs))


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a function supports at a point: forward mode, and whether it calls bridged ops."""
    forward: bool
    bridged: bool


def probe(fn, u, who: str) -> Capabilities:
    """Evaluate one forward-mode product of fn at u to learn whether every op in fn has a
    forward-mode rule, and count the bridged ops it calls."""
    before = _core.bridged_calls()
    forward = True
    try:
        with torch.no_grad():
            _dual_jvp(fn, u.detach(), torch.zeros_like(u))
    except (MissingDerivativeError, NotImplementedError):
        forward = False
    return Capabilities(forward=forward, bridged=_core.bridged_calls() != before)


def choose(mode: str, caps: Capabilities, n: int, who: str) -> str:
    """The product mode to use: the user's choice (checked against caps) or the automatic one."""
    if mode not in MODES:
        raise ValueError(f"{who}: unknown jacobian mode {mode!r}; valid: {', '.join(MODES)}")
    if mode == "forward" and not caps.forward:
        raise MissingDerivativeError(
            f"{who}: jacobian mode 'forward' needs a forward-mode rule for every op in the "
            f"function, but one of them has none (a bridged op with only a pullback, or a torch "
            f"op without forward AD); use mode 'reverse' or 'auto'")
    if mode != "auto":
        return mode
    if caps.forward and (caps.bridged or n >= FORWARD_FROM):
        return "forward"
    return "reverse"


def evaluate(fn, *args):
    """fn(*args) without recording a graph; cheaper than a no_grad block where grad mode is off
    already (PETSc's callbacks, which run inside a bridged op's forward or backward)."""
    if not torch.is_grad_enabled():
        return fn(*args)
    with torch.no_grad():
        return fn(*args)


def untracked_inputs(value, tracked=()) -> list:
    """The tensors requiring grad that `value` was computed from, other than those in `tracked`
    (by identity) and what they were computed from: inputs a solver's gradient would miss, such
    as a model's weights captured by a plain function instead of passed to the solver."""
    if not isinstance(value, torch.Tensor) or not value.requires_grad or \
            torch._C._are_functorch_transforms_active():  # (captured tensors are constants there)
        return []
    ids = {id(t) for t in tracked}
    stops = {t.grad_fn for t in tracked if t.grad_fn is not None}
    if value.grad_fn is None:
        return [] if id(value) in ids else [value]
    found, seen, nodes = [], set(), [value.grad_fn]
    while nodes:
        node = nodes.pop()
        if node is None or node in seen or node in stops:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)  # an AccumulateGrad: a leaf's gradient sink
        if leaf is None:
            nodes.extend(following for following, _ in node.next_functions)
        elif id(leaf) not in ids:
            found.append(leaf)
    return found


def describe_tensors(tensors) -> str:
    """'2 tensor(s) that require grad (shapes (3,), ())', for errors about `untracked_inputs`."""
    shapes = ", ".join(str(tuple(t.shape)) for t in tensors[:4])
    return (f"{len(tensors)} tensor(s) that require grad (shapes {shapes}"
            f"{', ...' if len(tensors) > 4 else ''})")


def _dual_jvp(fn, u, v):
    # forward AD is switched off inside a Function's forward, where PETSc's callbacks run
    with fwAD._set_fwd_grad_enabled(True), fwAD.dual_level():
        out = fn(fwAD.make_dual(u, v))
        primal, tangent = fwAD.unpack_dual(out)
    return torch.zeros_like(primal) if tangent is None else tangent


class Linearisation:
    """fn at one point u, for many Jacobian products there.

    jvp/jvps use forward mode (one evaluation of fn with dual numbers per product, or one
    batched evaluation for many), fd_jvp finite differences; vjp/vjps use reverse mode (one
    graph of fn at u, kept for every product at this point).
    """

    def __init__(self, fn, u):
        self.fn, self.u = fn, u.detach()
        self._graph = self._f0 = None
        self._paired = None  # (w, params, their products) of the last vjp with params
        self._unvectorised = False  # torch.func cannot transform fn (see jvps)

    def graph(self):
        """(leaf, fn(leaf)) with leaf = u requiring grad: one evaluation, kept; anything else
        fn depends on that requires grad (parameters) is in the graph too."""
        if self._graph is None:
            with torch.enable_grad():
                leaf = self.u.clone().requires_grad_()
                self._graph = (leaf, self.fn(leaf))
        return self._graph

    def vjp(self, w, params=()):
        """J^T w. With `params`, the same backward pass also forms (d fn / d p)^T w for them, and
        keeps it for `param_vjp` with this w (an explicit Runge-Kutta adjoint asks both products
        of each stage with one vector: one pass instead of two)."""
        leaf, value = self.graph()
        found = grads(value, (leaf, *params), w.reshape(value.shape))
        if params:
            self._paired = (w.clone(), params, found[1:])
        return torch.zeros_like(leaf) if found[0] is None else found[0]

    def param_vjp(self, params, w):
        """(d fn / d p)^T w for each tensor p of params (None where fn does not use it), through
        the graph kept at this point (or from the last `vjp` with these params and this w)."""
        paired, self._paired = self._paired, None
        if paired is not None and paired[1] is params and torch.equal(paired[0], w):
            return paired[2]
        _, value = self.graph()
        return grads(value, params, w.reshape(value.shape))

    def vjps(self, W, batched=False):
        """J^T W[k] for every row k of W: one backward pass each through the same graph, which
        passes through bridged ops and measured as fast as a batched backward at large sizes;
        `batched` (plain torch functions only) makes it one call, faster for small ones."""
        if not batched:
            return torch.stack([self.vjp(w) for w in W])
        leaf, value = self.graph()
        return grads(value, (leaf,), W.reshape(-1, *value.shape), batched=True, zeros=True)[0]

    def jvp(self, v):
        """J v."""
        with torch.no_grad():
            return _dual_jvp(self.fn, self.u, v.reshape(self.u.shape))

    def fd_jvp(self, v):
        """J v ~ (fn(u + h v) - fn(u)) / h, with PETSc MFFD's default step (Walker and
        Pernice): h = sqrt(eps) sqrt(1 + |u|) / |v|. For functions with an op that has no
        forward mode; one evaluation of fn per product."""
        v = v.reshape(self.u.shape)
        with torch.no_grad():
            if self._f0 is None:
                self._f0 = self.fn(self.u)
            norm = float(torch.linalg.vector_norm(v))
            if norm == 0.0:
                return torch.zeros_like(self._f0)
            h = _SQRT_EPS * (1.0 + float(torch.linalg.vector_norm(self.u))) ** 0.5 / norm
            return (self.fn(self.u + h * v) - self._f0) / h

    def jvps(self, V):
        """J V[k] for every row k of V, in one vectorised forward-mode pass; one pass per row
        for functions torch.func cannot transform (an autograd.Function in the classic form,
        with jvp but without setup_context)."""
        def single(v):
            return torch.func.jvp(self.fn, (self.u,), (v,))[1]
        V = V.reshape(-1, *self.u.shape)
        with torch.no_grad():
            if not self._unvectorised:
                try:
                    return torch.func.vmap(single)(V)
                except RuntimeError as exc:
                    if "setup_context" not in str(exc):
                        raise
                    self._unvectorised = True
            return torch.stack([_dual_jvp(self.fn, self.u, v) for v in V])


class DenseLinearisation(Linearisation):
    """A Linearisation of a small function of plain torch (no bridged ops: it differentiates
    through a batched backward) with its whole n x n Jacobian, made on first use by one reverse
    pass: over n stacked copies of the point when fn acts on each row of a leading batch
    dimension on its own (`stacked`, see `acts_on_rows`), else batched over the n unit
    cotangents. The pass keeps its graph, and parameter products reuse it."""

    def __init__(self, fn, u, stacked):
        super().__init__(fn, u)
        self.stacked = stacked
        self._jacobian = self._stacked_graph = self._seed = None

    @property
    def jacobian(self):
        """d fn / d u, (n, n)."""
        if self._jacobian is None:
            if self.stacked:
                self._stacked_graph = leaf, value = _stacked_graph(self.fn, self.u)
                self._jacobian = _stacked_pass(leaf, value)
            else:
                self._jacobian = _batched_pass(*self.graph())
        return self._jacobian

    def param_vjp(self, params, w):
        if self._stacked_graph is None:
            return super().param_vjp(params, w)
        _, value = self._stacked_graph  # row 0 of the stacked copies, seeded with w
        if self._seed is None:
            self._seed = value.new_zeros(value.shape)
        self._seed[0].copy_(w.reshape(value.shape[1:]))  # (the other rows stay zero)
        return grads(value, params, self._seed)


def _stacked_graph(fn, u):
    """(leaf, fn(leaf)) for a leaf of n stacked copies of u, shaped (n, *u.shape)."""
    n = u.numel()
    with torch.enable_grad():
        leaf = u.reshape(1, n).expand(n, n).clone().requires_grad_()
        return leaf, fn(leaf.view(n, *u.shape))


@functools.lru_cache(maxsize=16)
def _identity(n, dtype):
    """The n x n identity (shared: autograd only reads its cotangents)."""
    return torch.eye(n, dtype=dtype)


def _stacked_pass(leaf, value):
    """J from the stacked graph (kept): row i of the output is seeded with e_i, so the
    gradient's row i is J's row i."""
    n = leaf.shape[0]
    return grads(value, (leaf,), _identity(n, leaf.dtype).view(value.shape), zeros=True)[0]


def _batched_pass(leaf, value):
    """J from one backward (graph kept) batched over the n unit cotangents."""
    n = leaf.numel()
    seed = _identity(n, leaf.dtype).view(n, *value.shape)
    return grads(value, (leaf,), seed, batched=True, zeros=True)[0].reshape(n, n)


def stacked_jacobian(fn, u):
    """J of fn at u (n = u.numel()) from one reverse pass over n stacked copies of u."""
    return _stacked_pass(*_stacked_graph(fn, u))


def batched_jacobian(fn, u):
    """J of fn at u from one backward batched over the n unit cotangents."""
    with torch.enable_grad():
        leaf = u.clone().requires_grad_()
        return _batched_pass(leaf, fn(leaf))


def probe_points(u):
    """u and a fixed random point near it (relative distance 1e-3), for structure checks that a
    coincidence at u alone would fool (a coupling whose derivative vanishes there)."""
    nudge = torch.randn(u.shape, dtype=u.dtype, generator=torch.Generator().manual_seed(1))
    scale = float(u.abs().max()) or 1.0
    return u, u + 1e-3 * (u.abs() + 1e-3 * scale) * nudge


def acts_on_rows(fn, u):
    """Whether fn, given n stacked copies of u, returns n copies of fn(u) whose Jacobians are
    fn's at u: checked against the batched backward at u and at a random point near it (at u
    alone, a term coupling the copies with zero derivative there, such as (y - y.mean(0))^2,
    would pass)."""
    try:
        with torch.no_grad():
            value = fn(u.reshape(1, -1).expand(u.numel(), -1).reshape(u.numel(), *u.shape))
            single = fn(u)
        # (the values too: slices along the first axis, y[2:] - 2 y[1:-1] + y[:-2], mix the
        # copies, and a symmetric Jacobian passes the Jacobian check)
        if value.shape != (u.numel(), *u.shape) or not torch.allclose(
                value, single.expand_as(value), rtol=1e-12,
                atol=1e-14 * float(single.abs().max())):
            return False
        return all(bool(torch.allclose(stacked_jacobian(fn, v), batched_jacobian(fn, v),
                                       rtol=1e-12, atol=0)) for v in probe_points(u))
    except (RuntimeError, IndexError, ValueError):  # func does not take a batch dimension
        return False
