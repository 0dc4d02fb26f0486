"""The Julia adapter: Julia functions, differentiated by Zygote, as PyTorch ops (through juliacall).

    f = bridges.julia2pytorch("f", setup)  # setup: Julia code defining f, run once, own module
    y = f(x)                                # or f(x, y), ...: Julia's multiple dispatch decides

Conventions:
- Inputs: a tensor reaches Julia as a numpy view, which juliacall wraps as a `PyArray` without
  copying, whatever the strides (a transposed or sliced tensor is not copied either). Julia sees the
  tensor's shape and indices: `x[i, j]` in Julia is `x[i-1, j-1]` in Python. A `PyArray` is an
  `AbstractArray` but not an `Array`: write methods for `AbstractArray`, or call `Array(x)` in Julia
  for a dense column-major copy (BLAS speed, methods typed `::Array`). Other arguments are converted
  by juliacall (float -> Float64, int -> Int, tuple -> Tuple, None -> nothing, ...) and get no
  gradient.
- Outputs: arrays, numbers, or tuples of them. A strided Julia array comes back as a view of Julia's
  memory with the same shape (column-major strides); lazy arrays (`Fill`, `Adjoint`, ...) are
  collected once; a number becomes a 0-d tensor of its element type.
- Gradients: Zygote's `nothing`, for one argument or for all, becomes None. Lazy or structured
  tangents (`Fill`, `OneElement`, `Adjoint`, thunks) are projected onto their argument with
  `ChainRulesCore.ProjectTo` (its shape and element type) and made dense in Julia before crossing.
- Every Julia call runs under one lock, since autograd may run backward on another thread.

The Julia side is the package BridgesJL in the repository's `julia/` directory, which juliapkg
installs (with Zygote and ChainRulesCore) from `bridges/juliapkg.json` on first use.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from ._core import foreign_function
from ._errors import ForeignError
from ._transfer import as_numpy

JULIA_PACKAGE = Path(__file__).resolve().parent.parent / "julia"  # BridgesJL, the Julia side
MIN_JULIA = (1, 10)

_lock = threading.RLock()  # held around every Julia call
_modules: dict = {}  # setup code -> the Julia module it ran in
_RUNTIME = None


class JuliaUnavailableError(RuntimeError):
    """Julia, or a Julia package the adapter needs, cannot be found or started."""


def _how_to_provide_julia() -> str:
    try:
        version = importlib.metadata.version("juliacall")  # PythonCall must match it exactly
    except importlib.metadata.PackageNotFoundError:
        version = "<the juliacall version>"
    return (
        f"The Julia adapter needs Julia >= {MIN_JULIA[0]}.{MIN_JULIA[1]}. Provide it in one of "
        f"these ways:\n"
        f"  1. Install Julia (https://julialang.org/downloads, or juliaup) so that `julia` is on "
        f"PATH, or set PYTHON_JULIAPKG_EXE=/path/to/julia. On first use juliapkg then installs "
        f"PythonCall, Zygote, ChainRulesCore and BridgesJL ({JULIA_PACKAGE}) into its environment "
        f"(PYTHON_JULIAPKG_PROJECT, default {sys.prefix}/julia_env); this needs internet access "
        f"once.\n"
        f"  2. Or use a ready Julia environment: set PYTHON_JULIACALL_EXE=/path/to/julia together "
        f"with PYTHON_JULIACALL_PROJECT=/path/to/env, an environment that already has PythonCall "
        f"{version}, Zygote, ChainRulesCore and BridgesJL, e.g. after\n"
        f"     julia --project=/path/to/env -e 'using Pkg; Pkg.add([\"Zygote\", "
        f"\"ChainRulesCore\"]); Pkg.add(name=\"PythonCall\", version=\"{version}\"); "
        f"Pkg.develop(path=\"{JULIA_PACKAGE}\")'")


def julia_unavailable_reason() -> str | None:
    """None when Julia can be started, else what is missing and how to provide it.

    Looks without downloading anything: juliacall already running, PYTHON_JULIACALL_EXE with
    PYTHON_JULIACALL_PROJECT, or juliapkg's own search (PYTHON_JULIAPKG_EXE, a Julia juliapkg
    installed before, juliaup, PATH) with installing turned off.
    """
    problem = _julia_problem()
    return None if problem is None else f"{problem}.\n{_how_to_provide_julia()}"


def _julia_problem() -> str | None:
    juliacall = sys.modules.get("juliacall")
    if juliacall is not None and getattr(juliacall, "CONFIG", {}).get("inited"):
        return None
    if importlib.util.find_spec("juliacall") is None:
        return "the Python package juliacall is not installed: pip install 'bridges[julia]'"
    exe = os.environ.get("PYTHON_JULIACALL_EXE")
    project = os.environ.get("PYTHON_JULIACALL_PROJECT")
    if exe or project:
        if not (exe and project):
            missing = "PYTHON_JULIACALL_PROJECT" if exe else "PYTHON_JULIACALL_EXE"
            return f"{missing} is not set, and juliacall needs it together with the other one"
        if shutil.which(exe) is None:
            return f"PYTHON_JULIACALL_EXE={exe} is not an executable"
        if not os.path.isdir(project):
            return f"PYTHON_JULIACALL_PROJECT={project} is not a directory"
        return None
    try:
        from juliapkg.find_julia import find_julia
        from juliapkg.state import STATE
        exe, version = find_julia(prefix=STATE["install"], install=False)
    except Exception as exc:  # juliapkg raises a bare Exception when it finds nothing
        return f"no Julia executable was found (juliapkg: {exc})"
    if (version.major, version.minor) < MIN_JULIA:
        return f"{exe} is Julia {version}, too old"
    return None


def _warn_if_torch_first(modules) -> None:
    """Warn when torch was loaded before juliacall, the order juliacall advises against."""
    if "torch" in modules and "juliacall" not in modules:
        warnings.warn(
            "bridges.julia2pytorch: torch was imported before juliacall. Julia and PyTorch each "
            "bring their own LLVM and C++ runtime libraries, and when torch's are loaded first, "
            "Julia may bind to them: this can crash the process (segfault, heap corruption) while "
            "Julia compiles or runs. If it does, make `import juliacall` the first import of your "
            "program, before torch and bridges (pytorch/pytorch#78829).",
            RuntimeWarning, stacklevel=5)  # the caller of julia2pytorch


class _JuliaRuntime:
    """The part of juliacall the adapter uses; one instance, made by `_runtime()`."""

    def __init__(self):
        _warn_if_torch_first(sys.modules)
        try:
            with warnings.catch_warnings():  # juliacall's own import-order warning, said above
                warnings.filterwarnings("ignore", message="torch was imported before juliacall")
                import juliacall
        except Exception as exc:
            raise JuliaUnavailableError(
                f"juliacall could not start Julia ({type(exc).__name__}: {exc}).\n"
                + _how_to_provide_julia()) from exc
        self._juliacall = juliacall
        self.JuliaError = juliacall.JuliaError
        try:
            juliacall.Main.seval("import BridgesJL")
        except juliacall.JuliaError as exc:
            raise JuliaUnavailableError(
                f"Julia started, but the helper package BridgesJL ({JULIA_PACKAGE}) could not be "
                f"loaded: {self.describe(exc)[0]}.\n" + _how_to_provide_julia()) from exc
        self._pullback = juliacall.Main.seval("BridgesJL.pullback")
        self._label = juliacall.Main.seval("BridgesJL.label")

    def new_module(self, name):
        return self._juliacall.newmodule(name)

    def evaluate(self, module, code):
        return module.seval(code)

    def pullback(self, f, args):
        """BridgesJL.pullback(f, args...) -> (outputs, back); back(dy, wanted) -> gradients."""
        return self._pullback(f, *args)

    def is_julia_value(self, obj) -> bool:
        return isinstance(obj, self._juliacall.AnyValue)

    def label(self, f) -> str:
        return str(self._label(f))

    def describe(self, exc) -> tuple[str, str]:
        """(message, message and backtrace) of a JuliaError."""
        base = self._juliacall.Base
        return str(base.sprint(base.showerror, exc.exception)), str(exc)


def _runtime() -> _JuliaRuntime:
    global _RUNTIME
    with _lock:
        if _RUNTIME is None:
            reason = julia_unavailable_reason()
            if reason is not None:
                raise JuliaUnavailableError(f"Julia is not available: {reason}")
            _RUNTIME = _JuliaRuntime()
        return _RUNTIME


def _in_julia(runtime, where: str, fn, *args):
    """fn(*args) under the lock, a Julia exception re-raised as a ForeignError."""
    with _lock:
        try:
            return fn(*args)
        except runtime.JuliaError as exc:
            message, backtrace = runtime.describe(exc)
            raise ForeignError(f"{where} raised a Julia error: {message}", original=exc,
                               foreign_traceback=backtrace) from exc
        except TypeError as exc:  # juliacall's form of a MethodError of the function it calls
            if not str(exc).startswith("Julia: "):
                raise
            raise ForeignError(f"{where} raised a Julia error: {str(exc)[len('Julia: '):]}",
                               original=exc, foreign_traceback=str(exc)) from exc


def _from_julia(value, what: str):
    """Julia results in numpy form: arrays viewed without copying, tuples kept, nothing as None.
    Runs under the lock: reading a Julia array's memory layout calls Julia."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(_from_julia(v, what) for v in value)
    array = np.asarray(value)
    if array.dtype == object:
        raise TypeError(f"{what}: Julia returned {value!r:.120}, which is not an array or a "
                        f"number; return arrays, numbers, or tuples of them")
    return array


class JuliaFunction:
    """A Julia function as a differentiable PyTorch function; made by `julia2pytorch`.

    Call it with tensors and plain values as the Julia function would be called; ``op`` is the
    underlying `torch.autograd.Function`.
    """

    __slots__ = ("name", "op")

    def __init__(self, name: str, op):
        self.name, self.op = name, op

    def __call__(self, *args):
        return self.op.apply(*args)

    def __repr__(self):
        return f"<Julia function {self.name!r} bridged to PyTorch>"


def julia2pytorch(name, setup: str = "") -> JuliaFunction:
    """A Julia function, differentiated by Zygote, as a PyTorch function.

    Args:
        name: the name of a function that `setup` defines (any Julia expression that evaluates to a
            callable there works, e.g. ``"Base.sin"``), or a Julia function object from juliacall.
        setup: Julia code run once, in a module of its own (not Main); every `julia2pytorch` call
            with the same code shares that module. ``import``/``using`` what the code needs.

    Returns:
        A callable backed by one `bridges.foreign_function` op: in forward Julia runs
        ``Zygote.pullback``; backward calls the kept pullback with the output cotangent. The same
        callable serves every method of the Julia function (multiple dispatch).

    Raises:
        JuliaUnavailableError: Julia, or the Julia packages, cannot be found or started; the
            message says how to provide them.
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
    runtime = _runtime()
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
        f, label = name, runtime.label(name)
    else:
        raise TypeError(f"julia2pytorch: expected the name of a Julia function (str) or a Julia "
                        f"function object from juliacall, got {type(name).__name__}; for Python "
                        f"code with its own pullback use bridges.foreign_function")
    return JuliaFunction(label, _bridge(runtime, f, label))


def _setup_module(runtime, setup: str):
    """The module `setup` ran in, made and run the first time this code is seen."""
    with _lock:
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
    if isinstance(arg, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in arg):
        raise TypeError(f"{name}: argument {i} is a {type(arg).__name__} holding tensors; pass "
                        f"each tensor as an argument of its own, so that it reaches Julia as an "
                        f"array and gets a gradient")
    return arg


def _bridge(runtime, f, name: str):
    """The foreign_function op that runs `f` through BridgesJL.pullback."""

    def forward(*args, needs_input_grad):
        julia_args = tuple(_to_julia(name, i, a) for i, a in enumerate(args))

        def run():
            outputs, back = runtime.pullback(f, julia_args)
            return _from_julia(outputs, f"{name}'s output"), back
        outputs, back = _in_julia(runtime, repr(name), run)
        several = isinstance(outputs, tuple)

        def pullback(*cotangents, needs_input_grad):
            dy = tuple(None if g is None else as_numpy(g, who=f"{name}: cotangent {k}")
                       for k, g in enumerate(cotangents))
            grads = _in_julia(runtime, f"the pullback of {name!r}",
                              lambda: _from_julia(back(dy if several else dy[0], needs_input_grad),
                                                  f"the pullback of {name!r}"))
            return (None,) * len(args) if grads is None else grads
        return outputs, pullback

    return foreign_function(forward, name=name, pass_needs_input_grad=True)
