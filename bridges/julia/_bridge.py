"""`julia2pytorch`: a Julia function, differentiated by Zygote, as one bridged op."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils._pytree import tree_leaves

from .._core import foreign_function
from .._errors import ForeignError
from .._transfer import as_numpy
from . import _runtime
from ._threads import Held, check_thread, release_parked

_modules: dict = {}  # setup code -> the Julia module it ran in


def _in_julia(runtime, where: str, fn, *args, hint: str = ""):
    """fn(*args) on the main thread, a Julia exception re-raised as a ForeignError (with `hint`
    appended to a MethodError)."""
    check_thread(where)
    release_parked()
    try:
        return fn(*args)
    except runtime.JuliaError as exc:
        message, backtrace = runtime.describe(exc)
        raise ForeignError(f"{where} raised a Julia error: {message}{_hinted(message, hint)}",
                           original=exc, foreign_traceback=backtrace) from exc
    except TypeError as exc:  # juliacall's form of a MethodError of the function it calls
        if not str(exc).startswith("Julia: "):
            raise
        message = str(exc)[len("Julia: "):]
        raise ForeignError(f"{where} raised a Julia error: {message}{_hinted(message, hint)}",
                           original=exc, foreign_traceback=str(exc)) from exc


def _hinted(message: str, hint: str) -> str:
    return f"\n{hint}" if hint and "MethodError" in message else ""


def _list_hint(args) -> str:
    lists = [i for i, a in enumerate(args) if isinstance(a, list)]
    if not lists:
        return ""
    return (f"Hint: argument(s) {lists} are Python lists, which reach Julia as PyList, an "
            f"AbstractVector but not a Vector. Write the method for AbstractVector, convert in "
            f"Julia with collect(v), or pass juliacall.convert(jl.Vector[jl.Float64], v) "
            f"(with jl = juliacall.Main) to hand Julia a Vector")


class _JuliaMemory:
    """numpy's view of a Julia array: holds the array (released on the main thread only) and its
    array interface, read once."""

    __slots__ = ("_held", "_interface")

    def __init__(self, value, interface):
        self._held, self._interface = Held(value), interface

    @property
    def __array_interface__(self):
        return self._interface


def _from_julia(value, what: str, copy: bool):
    """Julia results in numpy form, tuples kept and nothing as None: arrays copied into numpy's
    memory, or (copy=False) viewed in Julia's. Reading the layout calls Julia."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(_from_julia(v, what, copy) for v in value)
    try:
        interface = value.__array_interface__
    except AttributeError:
        raise TypeError(f"{what}: Julia returned {value!r:.120}, which is not an array or a "
                        f"number; return arrays, numbers, or tuples of them") from None
    view = np.asarray(_JuliaMemory(value, interface))
    return view.copy(order="K") if copy else view


class JuliaFunction:
    """A Julia function as a differentiable PyTorch function; made by `julia2pytorch`.

    Call it with tensors and plain values as the Julia function would be called; ``op`` is the
    underlying `bridges.foreign_function` op.
    """

    __slots__ = ("name", "op", "copy_outputs")

    def __init__(self, name: str, op, copy_outputs: bool):
        self.name, self.op, self.copy_outputs = name, op, copy_outputs

    def __call__(self, *args):
        check_thread(repr(self.name))
        return self.op(*args)

    def __repr__(self):
        return f"<Julia function {self.name!r} bridged to PyTorch>"


def julia2pytorch(name, setup: str = "", *, copy_outputs: bool = True) -> JuliaFunction:
    """A Julia function, differentiated by Zygote, as a PyTorch function.

    Args:
        name: the name of a function that `setup` defines (any Julia expression that evaluates to a
            callable there works, e.g. ``"Base.sin"``), or a Julia function object from juliacall.
        setup: Julia code run once, in a module of its own (not Main); every `julia2pytorch` call
            with the same code shares that module. ``import``/``using`` what the code needs.
        copy_outputs: copy the arrays Julia returns (outputs and gradients) into torch's own
            memory, one memcpy each (the default). With False they stay views of Julia's memory,
            which is only safe when the function returns fresh arrays: never a global or other
            array Julia keeps, since torch could then write into it. An in-place change of such
            an output before backward then raises, because Zygote's pullback may read it
            (``tanh.(x)`` keeps its result).

    Returns:
        A callable backed by one `bridges.foreign_function` op: when an input needs a gradient,
        forward runs ``Zygote.pullback`` and backward calls the kept pullback with the output
        cotangent; otherwise forward just calls the function. The same callable serves every
        method of the Julia function (multiple dispatch). Call it, and backward through it, on
        the main thread only (see `bridges.julia.JuliaThreadError`).

    Raises:
        JuliaUnavailableError: Julia, or the Julia packages, cannot be found or started; the
            message says how to provide them.
        JuliaThreadError: called off the main thread.
        ForeignError: the setup code or the lookup of `name` failed in Julia.

    Example (seed 003, Listing 1)::

        f = julia2pytorch("f", '''
            A = [1 2; 3 4]
            f(x, y) = A * x + y
            f(x) = A * x
        ''')
        x = torch.zeros(2, requires_grad=True)
        torch.autograd.grad(f(x).sum(), x)    # (tensor([4., 6.]),)
    """
    if not isinstance(setup, str):
        raise TypeError(f"julia2pytorch: setup must be a string of Julia code, got "
                        f"{type(setup).__name__}")
    if not isinstance(copy_outputs, bool):
        raise TypeError(f"julia2pytorch: copy_outputs must be True or False, got "
                        f"{copy_outputs!r}")
    check_thread("julia2pytorch")
    runtime = _runtime.get_runtime()
    if isinstance(name, str):
        if not name.strip():
            raise ValueError("julia2pytorch: name must name a Julia function, got an empty string")
        f = _in_julia(runtime, f"julia2pytorch: looking up {name!r} in the setup code's module",
                      runtime.evaluate, _setup_module(runtime, setup), name)
        label = name
    elif runtime.is_julia_value(name):
        if setup:
            raise TypeError("julia2pytorch: setup is only used with a function name; a Julia "
                            "function object is used as it is, so run its setup code yourself")
        f = name
        label = _in_julia(runtime, "julia2pytorch: naming the Julia function", runtime.label, f)
    else:
        raise TypeError(f"julia2pytorch: expected the name of a Julia function (str) or a Julia "
                        f"function object from juliacall, got {type(name).__name__}; for Python "
                        f"code with its own pullback use bridges.foreign_function")
    return JuliaFunction(label, _bridge(runtime, Held(f), label, copy_outputs), copy_outputs)


def _setup_module(runtime, setup: str):
    """The module `setup` ran in, made and run the first time this code is seen."""
    module = _modules.get(setup)
    if module is None:
        module = _in_julia(runtime, "julia2pytorch: creating a Julia module",
                           runtime.new_module, "julia2pytorch")
        _in_julia(runtime, "julia2pytorch: the setup code", runtime.evaluate, module, setup)
        _modules[setup] = module
    return module


def _to_julia(name: str, i: int, arg):
    """A tensor as a numpy view (juliacall makes it a PyArray); anything else as it is."""
    if isinstance(arg, torch.Tensor):
        return as_numpy(arg, who=f"{name}: argument {i}")
    if any(isinstance(v, torch.Tensor) for v in tree_leaves(arg)):  # (nested, in dicts too)
        raise TypeError(f"{name}: argument {i} is a {type(arg).__name__} holding tensors; pass "
                        f"each tensor as an argument of its own, so that it reaches Julia as an "
                        f"array and gets a gradient")
    return arg


def _bridge(runtime, f: Held, name: str, copy: bool):
    """The foreign_function op that runs `f` through BridgesJL.pullback (or BridgesJL.call)."""

    def forward(*args, needs_input_grad):
        julia_args = tuple(_to_julia(name, i, a) for i, a in enumerate(args))
        hint = _list_hint(args)
        if not any(needs_input_grad):  # nobody will call backward: skip Zygote
            outputs = _in_julia(runtime, repr(name), lambda: _from_julia(
                runtime.call(f.value, julia_args), f"{name}'s output", copy), hint=hint)
            return outputs, None

        def run():
            outputs, back = runtime.pullback(f.value, julia_args)
            return _from_julia(outputs, f"{name}'s output", copy), Held(back)
        outputs, back = _in_julia(runtime, repr(name), run, hint=hint)
        several = isinstance(outputs, tuple)

        def pullback(*cotangents, needs_input_grad):
            dy = tuple(None if g is None else as_numpy(g, who=f"{name}: cotangent {k}")
                       for k, g in enumerate(cotangents))
            grads = _in_julia(runtime, f"the pullback of {name!r}", lambda: _from_julia(
                back.value(dy if several else dy[0], needs_input_grad),
                f"the pullback of {name!r}", copy))
            return (None,) * len(args) if grads is None else grads
        return outputs, pullback

    return foreign_function(forward, name=name, pass_needs_input_grad=True,
                            protect_outputs=not copy)
