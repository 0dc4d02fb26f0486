"""Glue tests of the Julia adapter (bridges/julia/): its Python side, run against in-process
stand-ins for the juliacall surface it uses (module creation and evaluation, the BridgesJL pullback
and call helpers and the pullback closure, Julia errors; a stand-in juliacall module for start-up).

These are NOT Julia tests: no Julia runs here, and the stand-in's "Julia code" is Python. They check
what the adapter does with what juliacall hands it: transfers, copies and views of outputs,
`nothing`, tuples, errors, the thread policy, module caching and lifetimes. tests/test_julia.py runs
the same adapter against real Julia.
"""
import gc
import importlib.util
import sys
import threading
import traceback
import types
import warnings
import weakref

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

import bridges
from bridges import ForeignError
from bridges.julia import JuliaThreadError, JuliaUnavailableError, _bridge, _runtime, _threads
from bridges.julia import julia2pytorch


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
        with self._julia.entered("read an ArrayValue"):
            return self.array.__array_interface__


class GenericFunction:
    """Stands in for a Julia generic function: one method per number of arguments."""

    def __init__(self, name):
        self.name, self.methods = name, {}

    def add(self, rule):
        self.methods[rule.__code__.co_argcount] = rule
        return self


class StandInJulia:
    """Stands in for bridges.julia._runtime._JuliaRuntime. A module is a dict; its code is Python
    in which `@method def f(x): return y, back` adds a method to `f`, with `back(dy)` answering like
    Zygote's: a tuple with one gradient (or None for `nothing`) per argument, or a bare None.
    `pullback` plays BridgesJL.pullback: outputs as Julia-owned (column-major) arrays, and a closure
    `back(dy, wanted)` that returns dense gradients of each argument's dtype where wanted; `call`
    plays BridgesJL.call (outputs only, no pullback). Every entry records the thread it ran on."""

    JuliaError = StandInJuliaError

    def __init__(self, packages=()):
        self.packages = set(packages)
        self.modules, self.evaluated, self.received, self.cotangents = [], [], [], []
        self.wanted, self.backs, self.arrays, self.off_main = [], [], [], []
        self.pullbacks = self.calls = 0

    def entered(self, what):
        julia = self

        class Call:
            def __enter__(self):
                if threading.current_thread() is not threading.main_thread():
                    julia.off_main.append(what)

            def __exit__(self, *exc):
                pass
        return Call()

    def new_module(self, name):
        with self.entered("new_module"):
            module = {"np": np, "__name__": name}
            module["method"] = lambda rule: module.setdefault(
                rule.__name__, GenericFunction(rule.__name__)).add(rule)
            self.modules.append(module)
            return module

    def evaluate(self, module, code):
        with self.entered("evaluate"):
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
        with self.entered("pullback"):
            self.pullbacks += 1
            y, back = self._run(self._method(f, args), *args)

            def vjp(dy, wanted):
                with self.entered("back"):
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

    def call(self, f, args):
        with self.entered("call"):
            self.calls += 1
            y, _ = self._run(self._method(f, args), *args)
            return self._to_python(y)

    def _method(self, f, args):
        assert not any(isinstance(a, torch.Tensor) for a in args), \
            "a tensor crossed as it is (juliacall would make it a PyIterable, not an array)"
        self.received.append(args)
        rule = f.methods.get(len(args))
        if rule is None:
            signature = ", ".join(f"::{type(a).__name__}" for a in args)
            raise StandInJuliaError(f"MethodError: no method matching {f.name}({signature})",
                                    f"MethodError: no method matching {f.name}({signature})\n"
                                    f"Stacktrace:\n [1] pullback")
        return rule

    def has_package(self, name):
        with self.entered("has_package"):
            return name in self.packages

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

G = np.array([1.0, 2.0, 3.0])   # a "Julia global"

@method                 # as Zygote's tanh.(x): the pullback reads the very output it returned
def squash(x):
    y = np.tanh(x)
    return y, lambda dy: (dy * (1 - y ** 2),)

@method                 # returns a global
def global_out(x):
    return G, lambda dy: (np.zeros_like(x),)

@method                 # a pullback that returns a global as the gradient
def global_grad(x):
    return 2 * x, lambda dy: (G,)

@method                 # a method typed ::Vector, which a Python list (a PyList) does not match
def needs_vector(x, v):
    if isinstance(v, list):
        raise TypeError("Julia: MethodError: no method matching needs_vector(::PyArray{Float64, "
                        "1}, ::PyList{Any})")
    return x * v[0], lambda dy: (dy * v[0], None)
'''


@pytest.fixture
def julia(monkeypatch):
    standin = StandInJulia()
    monkeypatch.setattr(_runtime, "get_runtime", lambda: standin)
    monkeypatch.setattr(_bridge, "_modules", {})
    yield standin
    _threads.release_parked()
    assert not standin.off_main, f"Julia entered off the main thread: {standin.off_main}"


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


def test_glue_outputs_are_copied_in_julia_layout_by_default(julia):
    cube = julia2pytorch("cube", SETUP)
    t = _randn(2, 3, 4)
    out = cube(t)
    julia_out = julia.arrays[-1]
    assert out.data_ptr() != julia_out.ctypes.data  # torch owns its copy
    assert out.shape == (2, 3, 4) and out.stride() == (1, 2, 6)  # Julia's column-major layout
    torch.testing.assert_close(out, t ** 3)
    with torch.no_grad():
        out.zero_()
    assert np.abs(julia_out).max() > 0  # Julia's array is untouched
    cube(t).sum().backward()
    torch.testing.assert_close(t.grad, 3 * t.detach() ** 2)
    assert t.grad.data_ptr() != julia.arrays[-1].ctypes.data  # the gradient is a copy too


def test_glue_zero_copy_outputs_are_views_of_julia_memory(julia):
    cube = julia2pytorch("cube", SETUP, copy_outputs=False)
    assert not cube.copy_outputs
    t = _randn(2, 3, 4)
    out = cube(t)
    assert out.data_ptr() == julia.arrays[-1].ctypes.data  # no copy
    assert out.shape == (2, 3, 4) and out.stride() == (1, 2, 6)
    out.sum().backward()
    torch.testing.assert_close(t.grad, 3 * t.detach() ** 2)


def test_glue_inplace_change_of_an_output_the_pullback_reads(julia):
    x = _randn(3)
    expected = 1 - torch.tanh(x.detach()) ** 2
    y = julia2pytorch("squash", SETUP)(x)  # copied: changing it cannot reach the pullback
    kept = julia.arrays[-1].copy()
    with torch.no_grad():
        y.add_(5.0)
    y.backward(torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(x.grad, expected)
    np.testing.assert_array_equal(julia.arrays[-2], kept)  # the output the pullback read

    y = julia2pytorch("squash", SETUP, copy_outputs=False)(x)  # a view: torch must refuse
    with torch.no_grad():
        y.add_(5.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(torch.ones(3, dtype=torch.float64))


def test_glue_globals_are_never_writable_aliases(julia):
    out = julia2pytorch("global_out", SETUP)(_randn(3))
    with torch.no_grad():
        out.fill_(-1.0)
    x = _randn(3)
    julia2pytorch("global_grad", SETUP)(x).sum().backward()
    x.grad.mul_(10.0)  # torch may accumulate into a gradient it was handed
    module = julia.modules[0]
    np.testing.assert_array_equal(module["G"], [1.0, 2.0, 3.0])


def test_glue_no_pullback_when_no_input_needs_a_gradient(julia):
    f = julia2pytorch("f", SETUP)
    x = _randn(2)
    with torch.no_grad():
        y = f(x)
    z = f(x.detach(), _randn(2, requires_grad=False))
    assert (julia.pullbacks, julia.calls) == (0, 2)
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(y, a @ x.detach())
    assert y.grad_fn is None and z.grad_fn is None
    f(x).sum().backward()
    assert (julia.pullbacks, julia.calls) == (1, 2)
    torch.testing.assert_close(x.grad, torch.tensor([4.0, 6.0], dtype=torch.float64))


def test_glue_list_argument_method_error_says_pylist_and_how_to_pass_a_vector(julia):
    needs_vector = julia2pytorch("needs_vector", SETUP)
    with pytest.raises(ForeignError, match=r"(?s)MethodError.*PyList.*argument\(s\) \[1\] are "
                                           r"Python lists.*AbstractVector but not a Vector.*"
                                           r"juliacall.convert\(jl.Vector\[jl.Float64\], v\)"):
        needs_vector(_randn(2), [2.0, 3.0])
    x = _randn(2)
    needs_vector(x, (2.0, 3.0)).sum().backward()  # a tuple is a Tuple: no hint needed
    torch.testing.assert_close(x.grad, torch.full((2,), 2.0, dtype=torch.float64))
    with pytest.raises(ForeignError) as info:
        julia2pytorch("fails", SETUP)(_randn(2))
    assert "PyList" not in str(info.value)  # the hint only where a list was passed


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
    # (nested in tuples or dicts they reached Julia and silently got no gradient; the core
    # refuses those that require grad, the glue any, which Julia could not take as arrays)
    for nested in (lambda v: (v,), lambda v: ((v,),), lambda v: {"k": v}):
        arg = nested(_randn(2))
        with pytest.raises(TypeError, match=f"f: argument 1 is a {type(arg).__name__} holding a "
                                            f"tensor that requires grad"):
            julia2pytorch("f", SETUP)(_randn(2), arg)
        arg = nested(_randn(2, requires_grad=False))
        with pytest.raises(ForeignError, match=f"f: argument 1 is a {type(arg).__name__} holding "
                                               f"tensors; pass each tensor as an argument of its "
                                               f"own"):
            julia2pytorch("f", SETUP)(_randn(2), arg)
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


def _on_worker(fn):
    """fn() on a fresh thread; returns what it raised (None if nothing)."""
    raised = []

    def run():
        try:
            fn()
        except BaseException as exc:  # reported to the caller; a thread's exception is lost
            raised.append(exc)
    worker = threading.Thread(target=run, name="worker")
    worker.start()
    worker.join()
    return raised[0] if raised else None


def test_glue_forward_off_the_main_thread_is_refused_before_julia(julia):
    f = julia2pytorch("f", SETUP)
    exc = _on_worker(lambda: f(_randn(2)))
    assert isinstance(exc, JuliaThreadError)
    message = str(exc)
    for needed in ("'f': called from thread 'worker'", "only on the main thread",
                   "can hang the process", "Thread.join()", "PythonCall.jl issue #578",
                   "run backward() through it on the main thread"):
        assert needed in message
    assert isinstance(_on_worker(lambda: julia2pytorch("f", SETUP)), JuliaThreadError)
    assert julia.pullbacks == 0  # nothing reached the stand-in (the fixture checks the threads)


def test_glue_backward_off_the_main_thread_is_refused(julia):
    f = julia2pytorch("f", SETUP)
    x = _randn(2)
    y = f(x)
    exc = _on_worker(lambda: y.sum().backward())
    assert isinstance(exc, ForeignError) and isinstance(exc.original, JuliaThreadError)
    assert "the pullback of 'f': called from thread 'worker'" in str(exc)
    assert x.grad is None and julia.cotangents == []


def test_glue_julia_objects_dying_on_another_thread_are_released_on_the_main_one(julia):
    f = julia2pytorch("f", SETUP)
    graph = [f(_randn(2))]  # holds the pullback
    back = julia.backs[-1]
    assert _on_worker(graph.clear) is None  # the graph dies on the worker
    gc.collect()
    assert back() is not None and len(_threads._parked) == 1  # parked, not released there
    f(_randn(2))  # the next Julia call on the main thread releases it
    gc.collect()
    assert back() is None and not _threads._parked


def test_glue_julia_is_started_only_on_the_main_thread(monkeypatch):
    monkeypatch.setattr(_runtime, "_RUNTIME", None)
    started = []
    monkeypatch.setattr(_runtime, "_JuliaRuntime", lambda: started.append(1))
    exc = _on_worker(_runtime.get_runtime)
    assert isinstance(exc, JuliaThreadError) and "starting Julia: called from thread" in str(exc)
    assert not started


class StandInJuliacall(types.ModuleType):
    """Stands in for the juliacall module, already started, as _JuliaRuntime sees it: Main.seval
    answers the few expressions the runtime evaluates at start-up (echoing the others)."""

    class JuliaError(Exception):
        pass

    class AnyValue:
        pass

    def __init__(self, threadid):
        super().__init__("juliacall")
        self.CONFIG = {"inited": True}
        self.evaluated = []
        answers = {"Threads.threadid()": threadid, "import BridgesJL": None}
        self.Main = types.SimpleNamespace(
            seval=lambda code: self.evaluated.append(code) or answers.get(code, code))


def test_glue_runtime_start_up_against_a_stand_in_juliacall(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    module = StandInJuliacall(threadid=1)
    monkeypatch.setitem(sys.modules, "juliacall", module)
    runtime = _runtime._JuliaRuntime()
    assert module.evaluated[:2] == ["Threads.threadid()", "import BridgesJL"]
    assert runtime._pullback == "BridgesJL.pullback" and runtime._call == "BridgesJL.call"
    assert runtime.JuliaError is StandInJuliacall.JuliaError

    monkeypatch.setitem(sys.modules, "juliacall", StandInJuliacall(threadid=3))
    with pytest.raises(JuliaThreadError, match="juliacall was started on another thread than "
                                               "the main thread.*Import juliacall on the main"):
        _runtime._JuliaRuntime()


def test_glue_import_order_advice_is_per_platform():
    advice = _runtime.import_order_advice("darwin", {"torch": torch})
    assert "On macOS" in advice and "#215" in advice and "make `import juliacall` the" in advice
    assert _runtime.import_order_advice("darwin", {"torch": torch, "juliacall": object()}) is None
    for platform in ("linux", "win32"):  # Linux: torch first is the order reported to work
        assert _runtime.import_order_advice(platform, {"torch": torch}) is None


class _Importer:
    """Makes `import juliacall` load a StandInJuliacall, warning as juliacall's own import does."""

    def __init__(self, module):
        self.module = module

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name == "juliacall" else None

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        warnings.warn("torch was imported before juliacall. This may cause a segfault.",
                      UserWarning)


@pytest.fixture
def juliacall_unimported(monkeypatch):
    """No juliacall in sys.modules during the test, and none left behind after it."""
    saved = sys.modules.pop("juliacall", None)
    yield
    sys.modules.pop("juliacall", None)
    if saved is not None:
        sys.modules["juliacall"] = saved


@pytest.mark.parametrize("platform", ["darwin", "linux"])
def test_glue_start_up_warns_about_import_order_only_on_macos(monkeypatch, juliacall_unimported,
                                                              platform):
    monkeypatch.setattr(sys, "meta_path", [_Importer(StandInJuliacall(1)), *sys.meta_path])
    monkeypatch.setattr(sys, "platform", platform)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _runtime._JuliaRuntime()
    messages = [str(w.message) for w in caught]
    assert sys.modules["juliacall"].evaluated[0] == "import BridgesJL"  # started here: no check
    assert not any(m.startswith("torch was imported before juliacall") for m in messages)
    macos = [m for m in messages if "On macOS this order" in m]
    assert len(macos) == (1 if platform == "darwin" else 0)


@pytest.mark.parametrize("text, literal", [
    ("/data/$HOME/x.jl", 'raw"/data/$HOME/x.jl"'),     # no interpolation in a raw string
    (r"C:\a\b.jl", r'raw"C:\a\b.jl"'),                  # backslashes stay as they are ...
    ("dir\\", 'raw"dir\\\\"'),                          # ... except before the closing quote
    ('say "hi"', r'raw"say \"hi\""'),                   # quotes escaped
    ('a\\"b', r'raw"a\\\"b"'),                          # a backslash before a quote: doubled
])
def test_glue_raw_strings_keep_dollars_and_backslashes_literal(text, literal):
    from bridges.julia._code import raw_string
    assert raw_string(text) == literal


def test_glue_include_setup_includes_its_file_by_raw_path():
    from bridges.julia import include_setup
    assert include_setup("/tmp/run$1/Fracture.jl", "Fracture", "pressure") == (
        'Base.include(@__MODULE__, raw"/tmp/run$1/Fracture.jl")\nusing .Fracture: pressure\n')


@pytest.fixture
def no_running_julia(monkeypatch):
    """Forget any Julia this process may already run, and refuse to start one."""
    monkeypatch.delitem(sys.modules, "juliacall", raising=False)
    monkeypatch.setattr(_runtime, "_RUNTIME", None)
    started = []
    monkeypatch.setattr(_runtime, "_JuliaRuntime", lambda: started.append(1))
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
                   "internet access once", "Pkg.develop", str(_runtime.JULIA_PACKAGE)):
        assert needed in message
    assert not no_running_julia  # juliacall was never imported


def test_glue_julia_detection(no_running_julia, monkeypatch, tmp_path):
    import juliapkg.find_julia
    from juliapkg.compat import Version
    monkeypatch.setattr(juliapkg.find_julia, "find_julia",
                        lambda **kw: ("/opt/julia-1.9/bin/julia", Version(1, 9, 4)))
    assert "/opt/julia-1.9/bin/julia is Julia 1.9.4, too old" in _runtime.julia_unavailable_reason()
    monkeypatch.setattr(juliapkg.find_julia, "find_julia",
                        lambda **kw: ("/usr/bin/julia", Version(1, 10, 5)))
    assert _runtime.julia_unavailable_reason() is None

    monkeypatch.setenv("PYTHON_JULIACALL_EXE", sys.executable)
    assert _runtime.julia_unavailable_reason().startswith("PYTHON_JULIACALL_PROJECT is not set, "
                                                          "and juliacall needs it")
    monkeypatch.setenv("PYTHON_JULIACALL_PROJECT", str(tmp_path))
    assert _runtime.julia_unavailable_reason() is None
    monkeypatch.setenv("PYTHON_JULIACALL_EXE", str(tmp_path / "no-julia"))
    assert "no-julia is not an executable" in _runtime.julia_unavailable_reason()

    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "pip install 'bridges[julia]'" in _runtime.julia_unavailable_reason()
    assert not no_running_julia


def test_glue_bridges_require_julia_turns_missing_julia_skips_into_failures():
    """tests/conftest.py: the Julia CI must not pass by skipping."""
    import os
    import subprocess
    from pathlib import Path
    if _runtime.julia_unavailable_reason() is None:
        pytest.skip("Julia is available here; this checks what happens where it is not")
    tests = Path(__file__).resolve().parent

    def run(**env):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(tests / "test_julia.py")], capture_output=True, text=True,
                              cwd=tests.parent, env={**os.environ, **env})
    plain = run(BRIDGES_REQUIRE_JULIA="0")
    assert plain.returncode == 5 and "1 skipped" in plain.stdout  # 5: nothing ran, no failure
    required = run(BRIDGES_REQUIRE_JULIA="1")
    assert required.returncode != 0
    assert "BRIDGES_REQUIRE_JULIA=1, but this test was skipped: Julia is not available" in \
        required.stdout
