"""Glue tests of the Julia adapter (bridges/julia.py): its Python side, run against an in-process
stand-in for the juliacall surface it uses (module creation and evaluation, the BridgesJL pullback
helper and its closure, Julia errors).

These are NOT Julia tests: no Julia runs here, and the stand-in's "Julia code" is Python. They check
what the adapter does with what juliacall hands it: transfers, `nothing`, tuples, errors, the lock,
module caching and lifetimes. tests/test_julia.py runs the same adapter against real Julia.
"""
import gc
import sys
import threading
import time
import traceback
import warnings
import weakref

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

import bridges
import bridges.julia as adapter
from bridges import ForeignError
from bridges.julia import JuliaUnavailableError, julia2pytorch


class StandInJuliaError(Exception):
    """Stands in for juliacall.JuliaError: a Julia exception with its message and backtrace."""

    def __init__(self, message, backtrace):
        super().__init__(message)
        self.message, self.backtrace = message, backtrace


class ArrayValue:
    """Stands in for juliacall.ArrayValue: Julia-owned memory that numpy reads through the array
    interface. Reading the layout calls 'Julia', so it is checked like every other Julia call."""

    def __init__(self, array, julia):
        self.array, self._julia = array, julia

    @property
    def __array_interface__(self):
        with self._julia.call("read an ArrayValue"):
            return self.array.__array_interface__


class GenericFunction:
    """Stands in for a Julia generic function: one method per number of arguments."""

    def __init__(self, name):
        self.name, self.methods = name, {}

    def add(self, rule):
        self.methods[rule.__code__.co_argcount] = rule
        return self


class StandInJulia:
    """Stands in for bridges.julia._JuliaRuntime. A module is a dict; its code is Python in which
    `@method def f(x): return y, back` adds a method to `f`, with `back(dy)` answering like
    Zygote's: a tuple with one gradient (or None for `nothing`) per argument, or a bare None.
    `pullback` plays BridgesJL.pullback: outputs as Julia-owned (column-major) arrays, and a closure
    `back(dy, wanted)` that returns dense gradients of each argument's dtype where wanted."""

    JuliaError = StandInJuliaError

    def __init__(self, delay=0.0):
        self.delay = delay
        self.modules, self.evaluated, self.received, self.cotangents = [], [], [], []
        self.wanted, self.backs, self.arrays, self.unlocked, self.overlaps = [], [], [], [], []
        self._active = 0

    def call(self, what):
        julia = self

        class Call:
            def __enter__(self):
                if not adapter._lock._is_owned():
                    julia.unlocked.append(what)
                julia._active += 1
                if julia._active > 1:
                    julia.overlaps.append(what)
                time.sleep(julia.delay)  # widens any race window

            def __exit__(self, *exc):
                julia._active -= 1
        return Call()

    def new_module(self, name):
        with self.call("new_module"):
            module = {"np": np, "__name__": name}
            module["method"] = lambda rule: module.setdefault(
                rule.__name__, GenericFunction(rule.__name__)).add(rule)
            self.modules.append(module)
            return module

    def evaluate(self, module, code):
        with self.call("evaluate"):
            self.evaluated.append(code)
            try:
                if code.isidentifier():
                    if code not in module:
                        raise NameError(f"UndefVarError: `{code}` not defined in "
                                        f"`{module['__name__']}`")
                    return module[code]
                exec(code, module)
            except Exception as exc:
                raise self._error(exc) from exc

    def pullback(self, f, args):
        with self.call("pullback"):
            assert not any(isinstance(a, torch.Tensor) for a in args), \
                "a tensor crossed as it is (juliacall would make it a PyIterable, not an array)"
            self.received.append(args)
            rule = f.methods.get(len(args))
            if rule is None:
                types = ", ".join(f"::{type(a).__name__}" for a in args)
                raise StandInJuliaError(f"MethodError: no method matching {f.name}({types})",
                                        f"MethodError: no method matching {f.name}({types})\n"
                                        f"Stacktrace:\n [1] pullback")
            y, back = self._run(rule, *args)

            def vjp(dy, wanted):
                with self.call("back"):
                    self.cotangents.append(dy)
                    self.wanted.append(wanted)
                    grads = self._run(back, dy)
                    if grads is None:
                        return None
                    return tuple(self._julia_array(np.asarray(g, dtype=x.dtype))
                                 if w and g is not None and isinstance(x, np.ndarray) else None
                                 for x, g, w in zip(args, grads, wanted))
            self.backs.append(weakref.ref(vjp))
            return self._to_python(y), vjp

    def is_julia_value(self, obj):
        return isinstance(obj, GenericFunction)

    def label(self, f):
        return f.name

    def describe(self, exc):
        return exc.message, exc.backtrace

    def _run(self, fn, *args):
        try:
            return fn(*args)
        except TypeError as exc:
            if str(exc).startswith("Julia: "):  # juliacall raises these as they are
                raise
            raise self._error(exc) from exc
        except Exception as exc:
            raise self._error(exc) from exc

    @staticmethod
    def _error(exc):
        return StandInJuliaError(f"{type(exc).__name__}: {exc}",
                                 "".join(traceback.format_exception(exc)))

    def _julia_array(self, array):
        self.arrays.append(np.asarray(array, order="F"))  # Julia arrays are column-major
        return ArrayValue(self.arrays[-1], self)

    def _to_python(self, y):
        if isinstance(y, tuple):
            return tuple(self._to_python(v) for v in y)
        if isinstance(y, (np.ndarray, np.generic, float, int)):
            return self._julia_array(np.asarray(y))
        return y


SETUP = '''
A = np.array([[1.0, 2.0], [3.0, 4.0]])

@method                 # seed 003, Listing 1: f(x) and f(x, y)
def f(x):
    return A @ x, lambda dy: (A.T @ dy,)

@method
def f(x, y):
    return A @ x + y, lambda dy: (A.T @ dy, dy)

@method                 # a tuple output (an array and a number); s is a plain float
def stats(x, s):
    def back(dy):
        dv, dn = dy
        return s * np.cos(x) * dv + 2 * x * dn, float(np.sum(np.sin(x) * dv))
    return (s * np.sin(x), np.sum(x ** 2)), back

@method                 # Zygote's `nothing` for y
def first_only(x, y):
    return 2 * x, lambda dy: (2 * dy, None)

@method                 # no gradient at all: Zygote's back returns a bare `nothing`
def constant(x):
    return np.ones(3), lambda dy: None

@method                 # a non-square matrix in, a vector out
def rowsums(M):
    return M.sum(axis=1), lambda dy: (np.broadcast_to(dy[:, None], M.shape),)

@method
def cube(T):            # 3-D in, same shape out
    return T ** 3, lambda dy: (3 * T ** 2 * dy,)

@method
def passthrough(x, k, shift, label, nothing):
    assert isinstance(k, int) and isinstance(shift, tuple) and label == "hi" and nothing is None
    return x * k + shift[0], lambda dy: (k * dy, None, None, None, None)

@method
def fails(x):
    raise ValueError("negative conductivity")

@method
def fails_in_back(x):
    def back(dy):
        raise ArithmeticError("singular matrix in transposed solve")
    return 2 * x, back

@method
def method_error_in_back(x):
    def back(dy):
        raise TypeError("Julia: MethodError: no method matching back(::Float64)")
    return 2 * x, back

@method
def not_an_array(x):
    return {"a": 1}, lambda dy: (None,)
'''


@pytest.fixture
def julia(monkeypatch):
    standin = StandInJulia()
    monkeypatch.setattr(adapter, "_runtime", lambda: standin)
    monkeypatch.setattr(adapter, "_modules", {})
    yield standin
    assert not standin.unlocked, f"Julia called without the adapter's lock: {standin.unlocked}"


def _randn(*shape, seed=0, requires_grad=True):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed),
                       requires_grad=requires_grad)


def test_glue_listing1_multiple_dispatch(julia):
    f = julia2pytorch("f", SETUP)
    x = torch.zeros(2).requires_grad_(True)
    y = torch.zeros(2).requires_grad_(True)
    (g,) = torch.autograd.grad(f(x).sum(), [x])
    assert (g.numpy() == [4, 6]).all()
    g0, g1 = torch.autograd.grad(f(x, y).sum(), [x, y])
    assert (g0.numpy() == [4, 6]).all() and (g1.numpy() == [1, 1]).all()
    assert g0.dtype == torch.float32 and f(x).dtype == torch.float32


def test_glue_gradcheck_through_the_stand_in(julia):
    f, stats, rowsums, cube = (julia2pytorch(n, SETUP) for n in ("f", "stats", "rowsums", "cube"))
    x, y = _randn(2, seed=1), _randn(2, seed=2)
    assert gradcheck(f, (x,)) and gradcheck(f, (x, y))
    assert gradcheck(lambda x: stats(x, 1.5), (_randn(4, seed=3),))
    assert gradcheck(rowsums, (_randn(3, 5, seed=4),))
    assert gradcheck(lambda m: rowsums(m.T), (_randn(5, 3, seed=5),))  # non-contiguous input
    assert gradcheck(cube, (_randn(2, 3, 4, seed=6),))


def test_glue_setup_runs_once_per_setup_string_in_its_own_module(julia):
    f = julia2pytorch("f", SETUP)
    julia2pytorch("stats", SETUP)
    for _ in range(5):
        f(_randn(2)).sum().backward()
    assert len(julia.modules) == 1 and julia.evaluated.count(SETUP) == 1
    assert julia.modules[0]["__name__"] == "julia2pytorch"
    julia2pytorch("g", "@method\ndef g(x):\n    return x, lambda dy: (dy,)\n")
    assert len(julia.modules) == 2


def test_glue_tensors_cross_as_views_with_torch_shape_and_indices(julia):
    rowsums, cube = julia2pytorch("rowsums", SETUP), julia2pytorch("cube", SETUP)
    m = _randn(3, 5)
    for tensor in (m, m.T, _randn(2, 3, 4)):
        (cube if tensor.dim() == 3 else rowsums)(tensor)
        (seen,) = julia.received[-1]
        assert type(seen) is np.ndarray and seen.shape == tuple(tensor.shape)
        assert seen.ctypes.data == tensor.data_ptr()  # no copy, even for the transposed view
        np.testing.assert_array_equal(seen, tensor.detach().numpy())
    assert not julia.received[1][0].flags.c_contiguous


def test_glue_outputs_are_views_of_julia_memory_with_the_same_shape(julia):
    cube = julia2pytorch("cube", SETUP)
    t = _randn(2, 3, 4)
    out = cube(t)
    assert out.data_ptr() == julia.arrays[-1].ctypes.data  # no copy
    assert out.shape == (2, 3, 4) and out.stride() == (1, 2, 6)  # Julia's column-major layout
    torch.testing.assert_close(out, t ** 3)
    out.sum().backward()
    torch.testing.assert_close(t.grad, 3 * t.detach() ** 2)


def test_glue_scalar_array_and_tuple_outputs(julia):
    stats = julia2pytorch("stats", SETUP)
    x = _randn(4)
    v, n = stats(x, 2.0)
    assert v.shape == (4,) and n.shape == () and n.dtype == torch.float64
    torch.testing.assert_close(n, (x ** 2).sum())
    (v.sum() + n).backward()
    dv, dn = julia.cotangents[-1]  # one cotangent per output, as numpy, 0-d for the number
    assert type(dv) is np.ndarray and dn.shape == ()
    torch.testing.assert_close(x.grad, 2 * torch.cos(x.detach()) + 2 * x.detach())


def test_glue_nothing_per_argument_and_as_a_whole(julia):
    first_only, constant = julia2pytorch("first_only", SETUP), julia2pytorch("constant", SETUP)
    x, y = _randn(3), _randn(3, seed=1)
    first_only(x, y).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0, dtype=torch.float64))
    assert y.grad is None
    assert torch.autograd.grad(constant(x).sum(), x, allow_unused=True) == (None,)
    assert gradcheck(first_only, (x, y))


def test_glue_plain_arguments_pass_through_without_gradient(julia):
    passthrough = julia2pytorch("passthrough", SETUP)
    x = _randn(3)
    passthrough(x, 3, (0.5, 1.0), "hi", None).sum().backward()
    assert julia.received[-1][1:] == (3, (0.5, 1.0), "hi", None)
    assert julia.wanted[-1] == (True, False, False, False, False)
    torch.testing.assert_close(x.grad, torch.full((3,), 3.0, dtype=torch.float64))


def test_glue_only_wanted_gradients_are_asked_for(julia):
    f = julia2pytorch("f", SETUP)
    x, y = _randn(2), _randn(2, requires_grad=False)
    f(x, y).sum().backward()
    assert julia.wanted[-1] == (True, False)


def test_glue_julia_function_object_and_names(julia):
    f = julia2pytorch("f", SETUP)
    assert repr(f) == "<Julia function 'f' bridged to PyTorch>" and f.op.name == "f"
    assert type(f(_randn(2)).grad_fn).__name__ == "fBackward"
    g = julia2pytorch(julia.modules[0]["stats"])
    assert g.name == "stats" and g(_randn(3), 1.0)[1].shape == ()


def test_glue_torch_func_through_the_bridge(julia):
    f = julia2pytorch("f", SETUP)
    x = torch.randn(2, dtype=torch.float64)
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(torch.func.jacrev(f)(x), a)


def test_glue_julia_errors_become_foreign_errors_with_message_and_backtrace(julia):
    with pytest.raises(ForeignError, match="'fails' raised a Julia error: ValueError: negative "
                                           "conductivity") as info:
        julia2pytorch("fails", SETUP)(_randn(2))
    assert isinstance(info.value.original, StandInJuliaError)
    assert "in fails" in info.value.foreign_traceback  # the frame of the failing function
    assert any("forward of 'fails'" in note for note in info.value.__notes__)

    y = julia2pytorch("fails_in_back", SETUP)(_randn(2))
    with pytest.raises(ForeignError, match="the pullback of 'fails_in_back' raised a Julia "
                                           "error: ArithmeticError: singular matrix") as info:
        y.sum().backward()
    assert "transposed solve" in info.value.foreign_traceback

    y = julia2pytorch("method_error_in_back", SETUP)(_randn(2))
    with pytest.raises(ForeignError, match="raised a Julia error: MethodError: no method "
                                           "matching back") as info:
        y.sum().backward()
    assert isinstance(info.value.original, TypeError)

    with pytest.raises(ForeignError, match=r"no method matching f\(::ndarray, ::ndarray, "
                                           r"::ndarray\)"):
        julia2pytorch("f", SETUP)(_randn(2), _randn(2), _randn(2))


def test_glue_setup_and_lookup_errors(julia):
    with pytest.raises(ForeignError, match="the setup code raised a Julia error: SyntaxError"):
        julia2pytorch("f", "def broken(:\n")
    with pytest.raises(ForeignError, match="looking up 'nope'.*UndefVarError: `nope` not defined"):
        julia2pytorch("nope", SETUP)
    with pytest.raises(ForeignError, match="not_an_array's output: Julia returned .*'a': 1.*not "
                                           "an array or a number"):
        julia2pytorch("not_an_array", SETUP)(_randn(2))


def test_glue_bad_arguments_are_named(julia):
    with pytest.raises(TypeError, match="setup must be a string of Julia code, got int"):
        julia2pytorch("f", 3)
    with pytest.raises(ValueError, match="name must name a Julia function"):
        julia2pytorch(" ", SETUP)
    with pytest.raises(TypeError, match="got function; for Python code.*foreign_function"):
        julia2pytorch(lambda x: x)
    julia2pytorch("f", SETUP)
    with pytest.raises(TypeError, match="setup is only used with a function name"):
        julia2pytorch(julia.modules[0]["f"], SETUP)
    with pytest.raises(ForeignError, match="f: argument 1 is a tuple holding tensors; pass each "
                                           "tensor as an argument of its own"):
        julia2pytorch("f", SETUP)(_randn(2), (_randn(2),))
    with pytest.raises(ForeignError, match="f: argument 0: dtype torch.bfloat16"):
        julia2pytorch("f", SETUP)(torch.zeros(2, dtype=torch.bfloat16))


def test_glue_pullback_released_after_backward(julia):
    f = julia2pytorch("f", SETUP)
    x = _randn(2)
    f(x).sum().backward()
    gc.collect()
    assert julia.backs[-1]() is None
    y = f(x)
    y.sum().backward(retain_graph=True)
    gc.collect()
    assert julia.backs[-1]() is not None
    y.sum().backward()
    gc.collect()
    assert julia.backs[-1]() is None


def test_glue_one_lock_serialises_julia_across_threads(monkeypatch):
    julia = StandInJulia(delay=0.001)
    monkeypatch.setattr(adapter, "_runtime", lambda: julia)
    monkeypatch.setattr(adapter, "_modules", {})
    f = julia2pytorch("f", SETUP)
    errors = []

    def train():
        try:
            for _ in range(20):
                f(_randn(2), _randn(2)).sum().backward()
        except Exception as exc:  # reported below; a thread's exception would be lost
            errors.append(exc)
    threads = [threading.Thread(target=train) for _ in range(3)]
    for t in threads:
        t.start()
    y = f(_randn(2))  # backward on another thread than forward
    backward = threading.Thread(target=lambda: y.sum().backward())
    backward.start()
    for t in [*threads, backward]:
        t.join()
    assert not errors and not julia.unlocked and not julia.overlaps
    assert len(julia.cotangents) == 61


def test_glue_import_order_warning():
    with pytest.warns(RuntimeWarning, match="torch was imported before juliacall.*crash.*make "
                                            "`import juliacall` the first import"):
        adapter._warn_if_torch_first({"torch": torch})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter._warn_if_torch_first({"juliacall": object(), "torch": torch})
        adapter._warn_if_torch_first({})


@pytest.fixture
def no_running_julia(monkeypatch):
    """Forget any Julia this process may already run, and refuse to start one."""
    monkeypatch.delitem(sys.modules, "juliacall", raising=False)
    monkeypatch.setattr(adapter, "_RUNTIME", None)
    started = []
    monkeypatch.setattr(adapter, "_JuliaRuntime", lambda: started.append(1))
    for var in ("PYTHON_JULIACALL_EXE", "PYTHON_JULIACALL_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    return started


def test_glue_missing_julia_error_says_what_and_how(no_running_julia, monkeypatch):
    import juliapkg.find_julia

    def find_nothing(**kwargs):
        assert kwargs["install"] is False  # never download
        raise Exception("could not find Julia")
    monkeypatch.setattr(juliapkg.find_julia, "find_julia", find_nothing)
    with pytest.raises(JuliaUnavailableError) as info:
        bridges.julia2pytorch("f", "f(x) = 2x")
    message = str(info.value)
    for needed in ("Julia is not available", "no Julia executable was found",
                   "could not find Julia", "Julia >= 1.10", "PYTHON_JULIAPKG_EXE",
                   "PYTHON_JULIACALL_EXE=/path/to/julia together with PYTHON_JULIACALL_PROJECT",
                   "internet access once", "Pkg.develop", str(adapter.JULIA_PACKAGE)):
        assert needed in message
    assert not no_running_julia  # juliacall was never imported


def test_glue_julia_detection(no_running_julia, monkeypatch, tmp_path):
    import juliapkg.find_julia
    from juliapkg.compat import Version
    monkeypatch.setattr(juliapkg.find_julia, "find_julia",
                        lambda **kw: ("/opt/julia-1.9/bin/julia", Version(1, 9, 4)))
    assert "/opt/julia-1.9/bin/julia is Julia 1.9.4, too old" in adapter.julia_unavailable_reason()
    monkeypatch.setattr(juliapkg.find_julia, "find_julia",
                        lambda **kw: ("/usr/bin/julia", Version(1, 10, 5)))
    assert adapter.julia_unavailable_reason() is None

    monkeypatch.setenv("PYTHON_JULIACALL_EXE", sys.executable)
    assert adapter.julia_unavailable_reason().startswith("PYTHON_JULIACALL_PROJECT is not set, "
                                                          "and juliacall needs it")
    monkeypatch.setenv("PYTHON_JULIACALL_PROJECT", str(tmp_path))
    assert adapter.julia_unavailable_reason() is None
    monkeypatch.setenv("PYTHON_JULIACALL_EXE", str(tmp_path / "no-julia"))
    assert "no-julia is not an executable" in adapter.julia_unavailable_reason()

    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "pip install 'bridges[julia]'" in adapter.julia_unavailable_reason()
    assert not no_running_julia
