"""The class factory: a foreign forward-with-pullback becomes a `torch.autograd.Function`.

A foreign forward computes outputs together with a pullback (a vector-Jacobian-product closure).
`foreign_function` manufactures a Function subclass whose forward calls the foreign code and keeps
the pullback for backward. The pullback lives in a closure over the generated class, because
Functions are static-method classes that are never instantiated. The factory hands back a
`BridgedOp`: the callable users see, which also keeps torch.compile from tracing foreign code.
"""
from __future__ import annotations

import functools
import threading

import torch
from torch.utils._pytree import tree_leaves

from ._errors import ForeignError, MissingDerivativeError
from ._functorch import (ANY_LEVEL, RuleCall, in_functorch_transform, per_sample_result,
                         select)
from ._transfer import conform, spec_of, to_tensor

# forward -> setup_context hand-over. Under torch.func transforms setup_context runs once per
# transform level after a single forward, so the record stays until the next forward or backward.
_pending = threading.local()
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead
_transforms_active = torch._C._are_functorch_transforms_active
_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor
_keep_graph = torch._C._autograd._get_current_graph_task_keep_graph  # retain_graph of a backward
_is_compiling = torch.compiler.is_compiling
_forward_calls = [0]
_TRANSFORMED = "transformed"  # grad mode recorded by apply inside torch.func transforms


def bridged_calls() -> int:
    """How many bridged-op forwards have run so far (a function that leaves this unchanged
    called none)."""
    return _forward_calls[0]


def eager_under_compile(what: str):
    """Decorator: torch.compile runs the function eagerly, breaking the graph at its call and
    only there (foreign code cannot be traced). With fullgraph=True compiling fails, naming
    `what`."""
    reason = (f"{what} runs foreign code, which torch.compile cannot trace: it runs eagerly, "
              f"with a graph break at this call. Drop fullgraph=True to compile the rest")
    return functools.partial(torch.compiler.disable, reason=reason)


def _foreign_failure(name, rule, exc):
    """What to raise for `exc` from the `rule` (forward, pullback, ...) of op `name`: the
    toolkit's own errors with a note, anything else as a ForeignError naming op and rule."""
    if isinstance(exc, (ForeignError, MissingDerivativeError)):
        exc.add_note(f"raised in the {rule} of '{name}'")
        return exc
    return ForeignError.wrap(f"the {rule} of '{name}'", exc)


def _run_foreign(name, rule, fn, *args):
    """fn(*args); any failure is raised as by `_foreign_failure`."""
    try:
        return fn(*args)
    except Exception as exc:
        raise _foreign_failure(name, rule, exc) from exc


class _Call:
    """What one forward call's derivative rules need, kept on ctx (the pullback is kept apart,
    on ctx.pullback, so it can be freed after backward)."""

    __slots__ = ("name", "pushforward", "input_specs", "output_specs", "single", "pass_mask",
                 "n_inputs")

    def __init__(self, name, pushforward, inputs, outputs, single, pass_mask, needs_grad):
        self.name, self.pushforward, self.single, self.pass_mask = name, pushforward, single, pass_mask
        specs = [spec_of(a) if isinstance(a, torch.Tensor) else None for a in inputs]
        self.n_inputs = len(specs) - specs.count(None)
        self.input_specs = specs if needs_grad else None
        self.output_specs = None if pushforward is None else tuple(
            spec_of(o) for o in ((outputs,) if single else outputs))

    def call_pullback(self, pullback, needs_input_grad, *grad_outputs, batch=None):
        """The pullback's gradients, checked; with `batch` (a batched pullback under vmap)
        every cotangent and gradient has a leading dimension of that size."""
        try:
            if batch is None and not self.pass_mask:
                grads = pullback(*grad_outputs)
            else:
                kwargs = {"batched": True} if batch is not None else {}
                if self.pass_mask:
                    kwargs["needs_input_grad"] = tuple(needs_input_grad)
                grads = pullback(*grad_outputs, **kwargs)
        except Exception as exc:
            raise _foreign_failure(self.name, "pullback", exc) from exc
        specs = self.input_specs
        if type(grads) is not tuple:
            grads = tuple(grads) if isinstance(grads, list) else (grads,)
        if len(grads) != len(specs):
            raise ValueError(f"{self.name}: the pullback returned {len(grads)} gradient(s) but "
                             f"forward takes {len(specs)} argument(s); return one per argument, "
                             f"with None where there is none")
        checked = []
        for i, grad in enumerate(grads):
            if grad is not None:
                if specs[i] is None:
                    raise ValueError(f"{self.name}: the pullback returned a gradient for "
                                     f"argument {i}, which is not a tensor; return None in "
                                     f"that position")
                grad = self._check_grad(i, grad, batch) if needs_input_grad[i] else None
            checked.append(grad)
        return tuple(checked)

    def _check_grad(self, i, grad, batch):
        spec = self.input_specs[i]
        if batch is not None:
            spec = (torch.Size((batch, *spec[0])), *spec[1:])
        what = lambda: f"{self.name}: the pullback's gradient for argument {i}"  # noqa: E731
        return conform(to_tensor(grad, what), spec, what)

    def call_pushforward(self, *tangents, batch=None):
        """The pushforward's tangents, checked; with `batch` (a batched pushforward under vmap)
        every tangent has a leading dimension of that size."""
        rule = self.pushforward if batch is None else functools.partial(self.pushforward,
                                                                         batched=True)
        out = _run_foreign(self.name, "pushforward", rule, *tangents)
        out = (out,) if not isinstance(out, (tuple, list)) else tuple(out)
        if len(out) != len(self.output_specs):
            raise ValueError(f"{self.name}: the pushforward returned {len(out)} tangent(s) for "
                             f"{len(self.output_specs)} output(s)")
        conformed = []
        for k, (t, spec) in enumerate(zip(out, self.output_specs)):
            what = lambda: f"{self.name}: the pushforward's tangent for output {k}"  # noqa: E731
            if batch is not None:
                spec = (torch.Size((batch, *spec[0])), *spec[1:])
            conformed.append(conform(to_tensor(t, what), spec, what))
        return tuple(conformed)


def _reference(args):
    """dtype and device of the outputs: the promoted dtype of the floating-point (and complex)
    tensor inputs, as torch.result_type would give (a 0-d tensor counts only where the others
    have none, or where it is complex and they are not), and the device of the first tensor
    (None for the CPU)."""
    dtype = scalar = device = None
    first = True
    for a in args:
        if isinstance(a, torch.Tensor):
            if first:
                device, first = (None if a.is_cpu else a.device), False
            if a.is_floating_point() or a.is_complex():
                if a.ndim:
                    dtype = a.dtype if dtype is None else torch.promote_types(dtype, a.dtype)
                else:
                    scalar = a.dtype if scalar is None else torch.promote_types(scalar, a.dtype)
    if scalar is not None and (dtype is None or scalar.is_complex and not dtype.is_complex):
        dtype = scalar if dtype is None else torch.promote_types(dtype, torch.complex64)
    return dtype, device


def _span(t):
    """Memory a tensor may read: (first byte, one past the last)."""
    if t.is_contiguous():
        return t.data_ptr(), t.data_ptr() + t.nbytes
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _to_output(array, dtype, device, name, k, args):
    """Output k as a tensor of the reference dtype and device; a copy where it shares memory
    with a tensor among `args` (an in-place change of one would change the other silently)."""
    foreign = not isinstance(array, torch.Tensor)
    t = to_tensor(array, lambda: f"{name}: forward's output {k}")
    if dtype is not None and t.dtype != dtype and (t.is_floating_point() or t.is_complex()
                                                   and dtype.is_complex):
        t = t.to(dtype)
    if not t.is_cpu if device is None else t.device != device:
        t = t.to("cpu" if device is None else device)
    elif _shares_memory(t, args, foreign):
        return t.clone()
    return t


def _shares_memory(t, args, foreign):
    """Whether t shares memory with a tensor in args: its storage (a tensor the forward
    returned: an input, or a view of one), or for a foreign array viewed as t (a numpy
    reshape of an input), overlapping bytes."""
    if foreign:
        lo, hi = _span(t)
    else:
        ptr = t.untyped_storage().data_ptr()
    for a in args:
        if isinstance(a, torch.Tensor):
            if foreign:
                start, end = _span(a)
                if start < hi and lo < end:
                    return True
            elif a.untyped_storage().data_ptr() == ptr:
                return True
    return False


def _refuse_nested_tensors(name, i, container):
    """Tensors inside a list, tuple or dict argument are constants to the op (only tensor
    arguments get gradients): refuse any that requires grad, which would get none silently."""
    if torch.is_grad_enabled() and any(isinstance(leaf, torch.Tensor) and leaf.requires_grad
                                       for leaf in tree_leaves(container)):
        raise TypeError(f"{name}: argument {i} is a {type(container).__name__} holding a tensor "
                        f"that requires grad, which would get no gradient (only tensor "
                        f"arguments are differentiated); pass each such tensor as an argument "
                        f"of its own")


class BridgedOp:
    """A bridged op, as `foreign_function` returns it: call it like a function, ``op(*args)``
    (or ``op.apply(*args)``). ``op.function`` is the generated torch.autograd.Function subclass.

    Under torch.compile the op runs eagerly and the graph breaks at its call, and only there;
    with ``fullgraph=True`` compiling fails with an error that names the op.
    """

    __slots__ = ("name", "function", "apply", "__weakref__")

    def __init__(self, name, function, apply):
        self.name, self.function, self.apply = name, function, apply

    def __call__(self, *args, **kwargs):
        if kwargs:
            raise TypeError(f"bridged op '{self.name}' takes positional arguments only, got "
                            f"keyword(s) {', '.join(kwargs)}; pass them by position")
        return self.apply(*args)

    def __repr__(self):
        return f"<bridged op {self.name!r}>"


def foreign_function(forward, *, name: str, pass_needs_input_grad: bool = False,
                     protect_outputs: bool = True) -> BridgedOp:
    """Turn a foreign forward-with-pullback into a differentiable torch op.

    Args:
        forward: ``forward(*args) -> (outputs, pullback)`` or ``(outputs, pullback, pushforward)``.
            It receives detached tensors and any non-tensor arguments unchanged. ``outputs`` is
            one array or a tuple of arrays: tensors, or objects exposing DLPack or the array
            interface (viewed without copying). ``pullback(*grad_outputs)`` returns one gradient
            per argument of forward, None where there is none; it must not change its
            cotangents in place (autograd may hand the same tensor to other ops). The optional
            ``pushforward(*input_tangents)`` returns the output tangents (forward-mode AD);
            input tangents are None for arguments without one. A pullback with the attribute
            ``batched = True`` is called once for a whole batch of cotangents under
            ``torch.func.vmap`` (``jacrev``, vmap over ``vjp``): with the keyword
            ``batched=True`` and a leading batch dimension on every cotangent, it returns
            gradients with that leading dimension (an adjoint solver can then sweep once for
            all of them).
        name: names the generated class (its grad_fn shows as ``<name>Backward``) and every
            error message.
        pass_needs_input_grad: call forward and the pullback with the keyword
            ``needs_input_grad``, a tuple of bools, one per argument, so they can skip work
            nobody needs. When no entry is True, forward may return None as its pullback.
        protect_outputs: save the outputs for torch's in-place check, as native ops that read
            their result in backward do (tanh, exp): changing an output in place, then calling
            backward, raises "modified by an inplace operation" instead of silently giving a
            wrong gradient. Pass False only when the pullback never reads the output arrays
            (e.g. forward returns fresh copies).

    Returns:
        A `BridgedOp`, called as ``op(*args)`` or ``op.apply(*args)``. Floating-point outputs
        come back in the promoted dtype of the floating-point tensor inputs
        (`torch.result_type` semantics), and all outputs on the device of the first tensor
        input. Under ``torch.func.vmap`` the op runs once per sample.
    """
    if not callable(forward):
        raise TypeError(f"foreign_function: forward must be callable, got "
                        f"{type(forward).__name__}")
    if not isinstance(name, str) or not name:
        raise TypeError(f"foreign_function: name must be a non-empty string, got {name!r}")

    def run(args):
        """The foreign forward on detached args: (outputs, its result, single, grad mode)."""
        _forward_calls[0] += 1
        grad, _pending.grad = getattr(_pending, "grad", True), True  # True: past the entry
        detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        try:
            if pass_needs_input_grad:
                needs = tuple(grad and isinstance(a, torch.Tensor) and a.requires_grad
                              for a in args) if grad is not _TRANSFORMED else \
                    tuple(isinstance(a, torch.Tensor) for a in args)
                result = forward(*detached, needs_input_grad=needs)
            else:
                result = forward(*detached)
        except Exception as exc:
            raise _foreign_failure(name, "forward", exc) from exc
        if type(result) is not tuple or len(result) not in (2, 3) or not (
                callable(result[1]) or result[1] is None):
            raise TypeError(f"{name}: forward must return (outputs, pullback) or (outputs, "
                            f"pullback, pushforward) with a callable pullback, got "
                            f"{type(result).__name__}")
        outputs = result[0]
        single = not isinstance(outputs, (tuple, list))
        dtype, device = _reference(args)
        if single:
            outs = _to_output(outputs, dtype, device, name, 0, args)
        else:
            outs = tuple(_to_output(o, dtype, device, name, k, args)
                         for k, o in enumerate(outputs))
        return outs, result, single, grad

    def setup(ctx, inputs, output, result, single, grad):
        # (under no_grad ctx.needs_input_grad still reflects requires_grad)
        needs_grad = grad and True in ctx.needs_input_grad
        ctx.call = _Call(name, result[2] if len(result) == 3 else None, inputs, output, single,
                         pass_needs_input_grad, needs_grad)
        if needs_grad:
            if result[1] is None:
                raise TypeError(f"{name}: forward returned no pullback, but inputs "
                                f"{[i for i, n in enumerate(ctx.needs_input_grad) if n]} need "
                                f"gradients; return None only when needs_input_grad is all "
                                f"False")
            ctx.pullback = result[1]
            # inputs: an in-place change of one, which the foreign side may still view, is
            # caught at backward, and they anchor second derivatives (refused by name);
            # outputs: the pullback may read them (see protect_outputs)
            saved = [a for a in inputs if isinstance(a, torch.Tensor)]
            if protect_outputs:
                if single:
                    saved.append(output)
                else:
                    saved += output
            ctx.save_for_backward(*saved)

    def op_forward(*args):  # the modern form: forward, then setup_context
        outs, *_pending.call = run(args)
        return outs

    def setup_context(ctx, inputs, output):
        record = _pending.call
        if record is None:  # (see `vmap` below)
            raise MissingDerivativeError(
                f"{name}: torch.func.grad, vjp, jacrev, jvp or jacfwd inside nested "
                f"torch.func.vmaps cannot reach this op's derivative rules, which vmap runs "
                f"once per sample; use one vmap over the samples flattened, or differentiate "
                f"outside vmap")
        if record[2] is not _TRANSFORMED and not in_functorch_transform():
            _pending.call = None  # plain autograd: this is the only setup_context
        setup(ctx, inputs, output, *record)

    def classic_forward(ctx, *args):  # both in one call, outside torch.func transforms
        outs, *record = run(args)
        setup(ctx, args, outs, *record)
        return outs

    def backward(ctx, *grad_outputs):
        _pending.call = None
        first = grad_outputs[0]
        if first is not None and _is_legacy_batched(first):
            raise MissingDerivativeError(
                f"{name}: torch.autograd.grad(..., is_grads_batched=True) and "
                f"torch.autograd.functional's vectorize=True use a legacy batching that cannot "
                f"reach foreign code; use torch.func.vmap over torch.func.vjp, or "
                f"torch.func.jacrev, which batch through this op (one call per sample)")
        pullback = ctx.pullback
        if pullback is None:
            raise RuntimeError(f"{name}: backward was called a second time, but the pullback was "
                               f"released after the first; pass retain_graph=True to the first "
                               f"backward")
        anchors = ctx.saved_tensors[:ctx.call.n_inputs]  # unpacking runs the in-place check
        if not _keep_graph():
            ctx.pullback = None  # free foreign memory now, as autograd frees saved tensors
        if not torch.is_grad_enabled() and not in_functorch_transform():
            return ctx.call.call_pullback(pullback, ctx.needs_input_grad, *grad_outputs)
        rule = functools.partial(ctx.call.call_pullback, pullback, ctx.needs_input_grad)
        rule.batched = getattr(pullback, "batched", False)
        rule.level = getattr(pullback, "level", ANY_LEVEL)
        return RuleCall.apply(name, rule, len(grad_outputs), *grad_outputs, *anchors)

    def jvp(ctx, *tangents):
        call = ctx.call
        if call.pushforward is None:
            raise MissingDerivativeError(
                f"{name} has no forward-mode (jvp) rule: its adapter gives only a pullback. Use "
                f"reverse mode instead (backward, torch.func.vjp, torch.func.jacrev)")
        if in_functorch_transform():
            rule = functools.partial(call.call_pushforward)
            rule.batched = getattr(call.pushforward, "batched", False)
            rule.level = getattr(call.pushforward, "level", ANY_LEVEL)
            out = RuleCall.apply(name, rule, len(tangents), *tangents)
        else:
            out = call.call_pushforward(*tangents)
        return out[0] if call.single else out

    def vmap(info, in_dims, *args):
        grad, per_sample, records = getattr(_pending, "grad", True), [], []
        for b in range(info.batch_size):
            _pending.grad = grad  # (each sample's call sees the caller's grad mode)
            per_sample.append(function.apply(*select(args, in_dims, b)))
            records.append(_pending.call)  # kept (not None) when a transform waits outside
        single = isinstance(per_sample[0], torch.Tensor)
        outs = torch.stack(per_sample) if single else tuple(
            torch.stack([s[k] for s in per_sample]) for k in range(len(per_sample[0])))
        # a derivative transform outside (torch.func.grad inside vmap) gets every sample's
        # rules in one; nested vmaps under it are refused there (its setup_context finds none)
        _pending.call = None if None in records or any(
            getattr(r[0][1], "samples", None) for r in records) else \
            [per_sample_result(records, per_sample, outs, single, args, in_dims), single,
             records[0][2]]
        return outs, (0 if single else (0,) * len(outs))

    doc = f"Bridged op '{name}' (made by bridges.foreign_function)."
    rules = [("backward", backward), ("jvp", jvp)]
    function = type(name, (torch.autograd.Function,), {"__doc__": doc, **{
        key: staticmethod(fn) for key, fn in [("forward", op_forward),
                                              ("setup_context", setup_context), ("vmap", vmap),
                                              *rules]}})
    # torch.func needs the modern form above (forward without ctx, then setup_context); outside
    # its transforms the classic form does the same in one Python call, and its apply is what
    # Function.apply ends in (which binds default arguments with inspect.signature on every
    # call, doubling a small op's cost)
    classic = type(name, (torch.autograd.Function,), {"__doc__": doc, **{
        key: staticmethod(fn) for key, fn in [("forward", classic_forward), *rules]}})
    base_apply = super(torch.autograd.Function, classic).apply

    def apply(*args):
        if _is_compiling():  # (its graph break costs microseconds on every eager call)
            return eager_apply(*args)
        for i, a in enumerate(args):
            if type(a) in (list, tuple, dict):
                _refuse_nested_tensors(name, i, a)
        if _transforms_active():
            _pending.grad = _TRANSFORMED
            return function.apply(*args)
        _pending.grad = torch.is_grad_enabled()
        return base_apply(*[_unwrap_if_dead(a) if isinstance(a, torch.Tensor) else a
                            for a in args])
    eager_apply = eager_under_compile(f"bridged op '{name}'")(apply)

    return BridgedOp(name, function, apply)
