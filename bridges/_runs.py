"""Scaffolding shared by every solver op: a *run* is one forward solve that keeps what its
adjoint needs (PETSc objects, factors, options), and its pullback decides when the run ends.

A run has ``solve() -> outputs``, ``pullback(*cotangents, needs_input_grad, ...)`` and
``release()``. Foreign libraries hold the run's bound methods as callbacks, a reference cycle the
garbage collector cannot see, so a run is never freed by reference counting alone: `Pullback`
returns it to its pool or releases it when the pullback dies (after backward, or with the
outputs), and `forward` does so at once when no gradient is wanted or the solve fails.
"""
from __future__ import annotations

import warnings
import weakref

import torch
import torch.autograd.forward_ad as fwAD
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ._errors import ForeignError, MissingDerivativeError, check_finite


class Pullback:
    """The op's pullback around a run; `batched` pullbacks take a leading batch dimension.
    `who` names the op when a cotangent is not finite (a foreign solver would fail on it with
    its own message, or blame its matrix)."""

    def __init__(self, run, pool=None, *, batched=False, who="the solver"):
        self.run, self.batched, self.who = run, batched, who
        self.failure = None  # what ended an adjoint midway: the run is gone with it
        self._retire = weakref.finalize(self, retire, run, pool)

    def __call__(self, *cotangents, needs_input_grad, **kwargs):
        if self.failure is not None:
            raise ForeignError(f"{self.who} (backward): an earlier backward through these outputs "
                               f"failed midway ({self.failure}), and the solver state it needed "
                               f"went with it; run the forward solve again to differentiate")
        for cotangent in cotangents:
            if isinstance(cotangent, torch.Tensor):
                check_finite(cotangent, f"{self.who} (backward): the gradient reaching its "
                             f"output", "the loss's derivative is not finite there: check the "
                             "loss (a sqrt, log or division at 0?), or find the op that made it "
                             "with torch.autograd.set_detect_anomaly(True)")
        try:
            return self.run.pullback(*cotangents, needs_input_grad=needs_input_grad, **kwargs)
        except BaseException as exc:  # foreign objects left in any state: never reused
            self.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" \
                if str(exc) else type(exc).__name__
            self._retire.detach()
            release_quietly(self.run)
            raise


def retire(run, pool):
    """Give `run` back to its pool (a weak reference to a `RunPool`) or release it."""
    keeper = pool() if pool is not None else None
    if keeper is None or not keeper.give(run):
        run.release()


def release_quietly(run):
    """Release a run that failed (its foreign objects may be in any state: it is never reused),
    keeping the failure's own error the one reported."""
    try:
        run.release()
    except Exception:  # noqa: BLE001
        pass


def forward(run, record, pool=None, *, batched=False, who="the solver"):
    """Solve with `run`; returns (outputs, pullback), the pullback None when not `record`."""
    try:
        outputs = run.solve()
    except BaseException:
        release_quietly(run)
        raise
    if not record:
        retire(run, pool)
        return outputs, None
    return outputs, Pullback(run, pool, batched=batched, who=who)


class RunPool:
    """Idle runs of one solver object, by key (whatever fixes their PETSc objects: shapes,
    dtypes, the function). A call takes a matching run or makes one; a run comes back when its
    pullback dies. At most `size` idle runs are kept (the oldest is released), and all of them
    when the owner dies."""

    def __init__(self, owner, size=4):
        self.idle, self.size, self.open = {}, size, True
        weakref.finalize(owner, self.clear)
        self.ref = weakref.ref(self)

    def take(self, key):
        return self.idle.pop(key, None)

    def give(self, run):
        key = getattr(run, "key", None)
        if not self.open or key is None or key in self.idle:
            return False
        self.idle[key] = run
        while len(self.idle) > self.size:
            self.idle.pop(next(iter(self.idle))).release()
        return True

    def clear(self):
        self.open = False
        while self.idle:
            self.idle.popitem()[1].release()


def check_state(who, name, value, what, check=None):
    """A state or initial guess: a non-empty, finite torch tensor, which `check(value,
    label)` (the adapter's dtype and device rules) accepts."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if check is not None:
        check(value, f"{who}: {name}")
    if value.numel() == 0:
        raise ValueError(f"{who}: {name} is empty")
    check_finite(value, f"{who}: {name}", f"{what} must be finite")


def refuse_forward_mode(who):
    """A solver's Jacobian products use forward-mode AD themselves, which torch cannot nest,
    and the solver has no forward-mode derivative: refuse a call inside forward-mode AD
    (torch.func.jvp, jacfwd, torch.autograd.forward_ad) by name."""
    if fwAD._current_level >= 0:
        raise MissingDerivativeError(
            f"{who} cannot run inside forward-mode AD (torch.func.jvp, jacfwd, "
            f"torch.autograd.forward_ad.dual_level): its Jacobian products use forward mode "
            f"themselves, and it has no forward-mode derivative. Use reverse mode (backward, "
            f"torch.func.vjp, jacrev), or call it outside the forward-mode block")


class RefuseTransformedReads(TorchFunctionMode):
    """A torch function mode that refuses a user function reading a tensor of an enclosing
    torch.func transform (grad, vmap, jacrev, ...; a functorch wrapper) which it captures
    rather than receives: the solver differentiates the function with ordinary autograd, to
    which such a tensor is a constant, so its derivative would be lost silently (or, under
    vmap, one sample would stand for all). `passed` names what is differentiated instead."""

    def __init__(self, who, what, passed):
        super().__init__()
        self.who, self.what, self.passed = who, what, passed

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(a, torch.Tensor) and _is_wrapped(a)
               for a in tree_leaves((args, kwargs))):
            raise ValueError(f"{self.who}: {self.what} uses a tensor captured from an enclosing "
                             f"torch.func transform (grad, vmap, jacrev, ...), whose derivative "
                             f"would be lost. Under torch.func only {self.passed} are "
                             f"differentiated; for the captured tensors use ordinary autograd "
                             f"(loss.backward())")
        return func(*args, **kwargs)


_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def warn_if_rounded(who, what, value, dtype):
    """Warn when `what` (a user function's output) is a floating-point tensor less precise than
    the state's `dtype`: the solve is then only as accurate as that precision."""
    if value.dtype != dtype and value.is_floating_point() and \
            torch.finfo(value.dtype).eps > torch.finfo(dtype).eps:
        warnings.warn(f"{who}: {what} returned {value.dtype} for a {dtype} state, so its "
                      f"values carry only {value.dtype}'s precision (about "
                      f"{torch.finfo(value.dtype).eps:.0e}) and the solve can be no more "
                      f"accurate; compute it in {dtype}", stacklevel=2)


def check_choice(who, name, value, choices):
    if value not in choices:
        raise ValueError(f"{who}: unknown {name} {value!r}; valid: {', '.join(choices)}")
