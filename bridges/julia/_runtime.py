"""Finding and starting Julia through juliacall, and the part of juliacall the adapter uses."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
import warnings
from pathlib import Path

from ._code import raw_string
from ._threads import JuliaThreadError, check_thread

JULIA_PACKAGE = Path(__file__).resolve().parent / "BridgesJL"  # the Julia side, shipped inside
MIN_JULIA = (1, 10)

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
        f"Pkg.develop(path={raw_string(JULIA_PACKAGE)})'")


def julia_unavailable_reason() -> str | None:
    """None when Julia can be started, else what is missing and how to provide it.

    Looks without downloading or starting anything: juliacall already running,
    PYTHON_JULIACALL_EXE with PYTHON_JULIACALL_PROJECT, or juliapkg's own search
    (PYTHON_JULIAPKG_EXE, a Julia juliapkg installed before, juliaup, PATH) with installing off.
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


def import_order_advice(platform: str, modules) -> str | None:
    """What to change about the import order of torch and juliacall on `platform`, or None.

    Both bring their own LLVM, OpenMP and C++ runtimes, and the library loaded first can capture
    the other's symbols. Which order crashes depends on the platform:
    - macOS: torch first corrupts the heap or segfaults when Julia starts (PythonCall.jl #215,
      #384; the FAQ's "import juliacall before torch" comes from these reports).
    - Linux: the reverse order is the one reported to crash. Julia loads its libraries with
      RTLD_GLOBAL, so torch's pip wheel binds to Julia's LLVM (pytorch#78829), and `import
      juliacall; import torch` segfaulted in libgomp (PythonCall.jl #435). `import bridges`
      imports torch first, which is the order to keep there.
    - Windows: no report either way.
    """
    if platform == "darwin" and "torch" in modules and "juliacall" not in modules:
        return ("bridges.julia2pytorch: torch was imported before juliacall. On macOS this order "
                "is reported to corrupt the heap or segfault when Julia starts (PythonCall.jl "
                "#215, #384). If it crashes, make `import juliacall` the first import of your "
                "program, before torch and bridges.")
    return None


class _JuliaRuntime:
    """The part of juliacall the adapter uses; one instance, made by `get_runtime()`, on the main
    thread."""

    def __init__(self):
        advice = import_order_advice(sys.platform, sys.modules)
        if advice:
            warnings.warn(advice, RuntimeWarning, stacklevel=5)  # the caller of julia2pytorch
        started_before = "juliacall" in sys.modules
        try:
            with warnings.catch_warnings():  # juliacall's own advice is macOS-only, said above
                warnings.filterwarnings("ignore", message="torch was imported before juliacall")
                import juliacall
        except Exception as exc:
            raise JuliaUnavailableError(
                f"juliacall could not start Julia ({type(exc).__name__}: {exc}).\n"
                + _how_to_provide_julia()) from exc
        self._juliacall = juliacall
        self.JuliaError = juliacall.JuliaError
        if started_before and int(juliacall.Main.seval("Threads.threadid()")) != 1:
            raise JuliaThreadError(
                "juliacall was started on another thread than the main thread (Julia sees the "
                "main thread as a foreign one); bridges runs Julia only on the thread that "
                "started it, the main thread. Import juliacall on the main thread")
        try:
            juliacall.Main.seval("import BridgesJL")
        except juliacall.JuliaError as exc:
            raise JuliaUnavailableError(
                f"Julia started, but the helper package BridgesJL ({JULIA_PACKAGE}) could not be "
                f"loaded: {self.describe(exc)[0]}.\n" + _how_to_provide_julia()) from exc
        self._pullback = juliacall.Main.seval("BridgesJL.pullback")
        self._call = juliacall.Main.seval("BridgesJL.call")
        self._label = juliacall.Main.seval("BridgesJL.label")
        self._has_package = juliacall.Main.seval("name -> Base.find_package(name) !== nothing")

    def new_module(self, name):
        return self._juliacall.newmodule(name)

    def evaluate(self, module, code):
        return module.seval(code)

    def pullback(self, f, args):
        """BridgesJL.pullback(f, args...) -> (outputs, back); back(dy, wanted) -> gradients."""
        return self._pullback(f, *args)

    def call(self, f, args):
        """BridgesJL.call(f, args...) -> outputs, without Zygote."""
        return self._call(f, *args)

    def is_julia_value(self, obj) -> bool:
        return isinstance(obj, self._juliacall.AnyValue)

    def label(self, f) -> str:
        return str(self._label(f))

    def has_package(self, name: str) -> bool:
        """Whether `import name` would find the package in Julia's environment."""
        return bool(self._has_package(name))

    def describe(self, exc) -> tuple[str, str]:
        """(message, message and backtrace) of a JuliaError."""
        base = self._juliacall.Base
        return str(base.sprint(base.showerror, exc.exception)), str(exc)


def julia_has_package(name: str) -> bool:
    """Whether the Julia package `name` can be loaded in Julia's environment (starts Julia;
    check `julia_unavailable_reason()` first)."""
    return get_runtime().has_package(name)


def get_runtime() -> _JuliaRuntime:
    """The running Julia, started on first use (on the main thread only)."""
    global _RUNTIME
    if _RUNTIME is None:
        check_thread("starting Julia")
        reason = julia_unavailable_reason()
        if reason is not None:
            raise JuliaUnavailableError(f"Julia is not available: {reason}")
        _RUNTIME = _JuliaRuntime()
    return _RUNTIME
