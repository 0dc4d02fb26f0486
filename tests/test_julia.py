"""The Julia adapter against real Julia (juliacall + Zygote): seed 003's Listing 1, gradcheck, plain
arguments, output kinds, layouts (non-square, 3-D, transposed), lazy tangents, errors, lifetimes,
the thread policy, outputs that alias what the pullback reads or a global, the no-gradient path,
list arguments, raw paths, and a DPFEHM-like linear solve with a custom rrule.

Skipped, saying what is missing and how to provide it, where Julia is not available (these tests
have not yet run on any machine: see README, "Verifying the Julia adapter"); the Python glue is
tested without Julia in tests/test_julia_glue.py.
"""
import gc
import shutil
import threading
import time

import pytest
import torch
from torch.autograd import gradcheck

from bridges.julia import julia_unavailable_reason

_missing = julia_unavailable_reason()
if _missing is not None:
    pytest.skip(f"Julia is not available (these tests run real Julia): {_missing}",
                allow_module_level=True)

from bridges import ForeignError, julia2pytorch  # noqa: E402
from bridges.julia import JuliaThreadError  # noqa: E402

# torch is always imported first under pytest; the adapter's warning about it is expected here
pytestmark = pytest.mark.filterwarnings("ignore:.*torch was imported before juliacall")

LISTING_1 = """
        import Zygote
        A = [1 2; 3 4]
        f(x, y) = A * x + y
        f(x) = A * x
    """

FUNCTIONS = r"""
W = [0.5 -1.0 2.0; 1.5 0.3 -0.7]
layer(x) = tanh.(W * x)
both(x, y) = (x .* y, sum(abs2, x), x * y')       # array, number and matrix outputs
ignores_y(x, y) = 3 .* x                           # Zygote: `nothing` for y
constant(x) = [1.0, 2.0]                           # Zygote: no gradient at all
scaled(x, c, p, shift, label, ::Nothing) = c .* x .^ p .+ shift[2] .+ length(label)
energy(x) = sum(abs2, x) / 2                       # a number
sum_and_count(x) = (sum(x), count(>(0), x))        # a number and an integer
rowsums(M) = M * ones(size(M, 2))
scale_rows(M, v) = v .* M
slab(T) = 2 .* T[:, 2, :]
firstrow(M) = M[1, :]
total(x) = sum(x)                                  # tangent: a Fill
pick(x) = x[2, 3]                                  # tangent: a OneElement
flip(M) = M'                                       # output and tangent: an Adjoint
only_vectors(x::AbstractVector) = 2 .* x
vector_typed(x, v::Vector) = v[1] .* x             # a Python list (a PyList) does not match
abstract_typed(x, v::AbstractVector) = v[1] .* x   # ... but matches this
const G = [1.0, 2.0, 3.0]
global_out(x) = G                                  # returns a global
global_value() = copy(G)
check_positive(x) = all(>(0), x) ? sqrt.(x) : error("negative permeability: $(minimum(x))")
import ChainRulesCore
fragile(x) = 2 .* x
ChainRulesCore.rrule(::typeof(fragile), x) = (fragile(x), dy -> error("adjoint solve diverged"))
"""

LIFETIME = r"""
import ChainRulesCore
mutable struct Token end
const FREED = Ref(0)
tracked(x) = 2 .* x
function ChainRulesCore.rrule(::typeof(tracked), x)
    token = Token()
    finalizer(_ -> (FREED[] += 1), token)
    tracked_pullback(dy) = (token; (ChainRulesCore.NoTangent(), 2 .* dy))
    return tracked(x), tracked_pullback
end
freed() = ChainRulesCore.@ignore_derivatives (GC.gc(); GC.gc(); FREED[])
const RULES = Ref(0)
counted(x) = 2 .* x
function ChainRulesCore.rrule(::typeof(counted), x)
    RULES[] += 1
    return counted(x), dy -> (ChainRulesCore.NoTangent(), 2 .* dy)
end
rules() = RULES[]
"""

# Steady 1-D Darcy flow with upwind advection, as DPFEHM solves it in 2-D/3-D: n cells between two
# boundaries held at pressure 0; face f (1..n+1) has conductance k[f], v is the advection velocity.
DARCY = r"""
using LinearAlgebra, SparseArrays
import ChainRulesCore
const ADJOINT_SOLVES = Ref(0)

function assemble(k, v)
    n = length(k) - 1
    diagonal = [k[i] + k[i + 1] + v for i in 1:n]
    lower = [-k[i] - v for i in 2:n]
    upper = [-k[i + 1] for i in 1:n-1]
    return spdiagm(-1 => lower, 0 => diagonal, 1 => upper)
end

pressure(k, q, v) = lu(assemble(k, v)) \ Vector(q)

function ChainRulesCore.rrule(::typeof(pressure), k, q, v)
    F = lu(assemble(k, v))
    p = F \ Vector(q)
    function pressure_pullback(dp)
        ADJOINT_SOLVES[] += 1
        λ = F' \ Vector(ChainRulesCore.unthunk(dp))     # one transposed solve
        n = length(p)
        dk = similar(p, n + 1)                            # -λᵀ (∂A/∂k_f) p
        dk[1], dk[n + 1] = -λ[1] * p[1], -λ[n] * p[n]
        for f in 2:n
            dk[f] = -(λ[f - 1] - λ[f]) * (p[f - 1] - p[f])
        end
        return ChainRulesCore.NoTangent(), dk, λ, ChainRulesCore.NoTangent()
    end
    return p, pressure_pullback
end

adjoint_solves() = ADJOINT_SOLVES[]
"""


def _randn(*shape, seed=0, requires_grad=True, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed),
                       requires_grad=requires_grad)


def _fn(name, setup=FUNCTIONS):
    return julia2pytorch(name, setup)


def test_seed_003_listing_1():
    f = julia2pytorch("f", LISTING_1)
    x = torch.zeros(2).requires_grad_(True)
    y = torch.zeros(2).requires_grad_(True)
    f_eval = f(x)
    g = torch.autograd.grad(f_eval.sum(), [x])
    assert (g[0].detach().numpy() == [4, 6]).all()
    f_eval = f(x, y)
    g = torch.autograd.grad(f_eval.sum(), [x, y])
    assert (g[0].detach().numpy() == [4, 6]).all() and (g[1].detach().numpy() == [1, 1]).all()
    assert f_eval.dtype == g[0].dtype == torch.float32
    import juliacall
    assert not juliacall.Main.seval("isdefined(Main, :A) || isdefined(Main, :f)")  # not in Main


def test_listing_1_jacobian_and_values():
    f = julia2pytorch("f", LISTING_1)
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    x, y = _randn(2), _randn(2, seed=1)
    torch.testing.assert_close(f(x, y), a @ x + y)
    torch.testing.assert_close(torch.func.jacrev(f)(x.detach()), a)


def test_gradcheck_several_functions():
    layer, both, ignores_y = _fn("layer"), _fn("both"), _fn("ignores_y")
    assert gradcheck(layer, (_randn(3),))
    assert gradcheck(both, (_randn(4, seed=1), _randn(4, seed=2)))  # tuple output
    assert gradcheck(ignores_y, (_randn(3, seed=3), _randn(3, seed=4)))  # `nothing` for y
    w = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]], dtype=torch.float64)
    x = _randn(3)
    torch.testing.assert_close(layer(x), torch.tanh(w @ x))
    v, n, m = both(x, x)
    torch.testing.assert_close(m, torch.outer(x, x))
    assert v.shape == (3,) and n.shape == () and m.shape == (3, 3)


def test_nothing_gradients_become_none():
    x, y = _randn(3), _randn(3, seed=1)
    _fn("ignores_y")(x, y).sum().backward()
    assert y.grad is None
    torch.testing.assert_close(x.grad, torch.full((3,), 3.0, dtype=torch.float64))
    assert torch.autograd.grad(_fn("constant")(x).sum(), x, allow_unused=True) == (None,)


def test_plain_arguments_pass_through():
    scaled = _fn("scaled")
    x = _randn(4)
    torch.testing.assert_close(scaled(x, 2.5, 3, (0.0, 1.0), "ab", None), 2.5 * x ** 3 + 3)
    assert gradcheck(lambda x: scaled(x, 2.5, 3, (0.0, 1.0), "ab", None), (x,))


def test_scalar_integer_and_tuple_outputs():
    x = _randn(5, dtype=torch.float32)
    e = _fn("energy")(x)
    assert e.shape == () and e.dtype == torch.float32
    torch.testing.assert_close(e, (x ** 2).sum() / 2)
    s, count = _fn("sum_and_count")(x)
    assert count.dtype == torch.int64 and count.item() == int((x > 0).sum())
    s.backward()
    torch.testing.assert_close(x.grad, torch.ones(5))


def test_non_square_3d_and_transposed_inputs_keep_torch_shapes_and_indices():
    m, v, t = _randn(3, 5), _randn(3, seed=1), _randn(2, 3, 4, seed=2)
    torch.testing.assert_close(_fn("rowsums")(m), m.sum(1))
    torch.testing.assert_close(_fn("scale_rows")(m, v), v[:, None] * m)
    torch.testing.assert_close(_fn("slab")(t), 2 * t[:, 1, :])
    torch.testing.assert_close(_fn("firstrow")(m.T), m.T[0, :])
    assert gradcheck(_fn("scale_rows"), (m, v))
    assert gradcheck(_fn("slab"), (t,))
    assert gradcheck(lambda m: _fn("firstrow")(m.T), (m,))  # a non-contiguous view
    assert gradcheck(lambda m: _fn("rowsums")(m.T), (_randn(5, 3, seed=3),))


def test_lazy_tangents_are_materialised_with_the_input_shape_and_dtype():
    x = _randn(3, 4, dtype=torch.float32)
    one_hot = torch.zeros(3, 4)
    one_hot[1, 2] = 1.0
    for name, expected in [("total", torch.ones(3, 4)), ("pick", one_hot)]:
        (g,) = torch.autograd.grad(_fn(name)(x), x)
        assert g.shape == (3, 4) and g.dtype == torch.float32
        torch.testing.assert_close(g, expected)
    flipped = _fn("flip")(x)
    torch.testing.assert_close(flipped, x.T)
    w = torch.randn(4, 3)
    (g,) = torch.autograd.grad((flipped * w).sum(), x)
    torch.testing.assert_close(g, w.T)
    assert gradcheck(_fn("flip"), (_randn(2, 3),))


def test_julia_exceptions_become_foreign_errors():
    with pytest.raises(ForeignError, match="'check_positive' raised a Julia error: negative "
                                           "permeability: -1.0") as info:
        _fn("check_positive")(torch.tensor([4.0, -1.0], dtype=torch.float64))
    assert "Stacktrace" in info.value.foreign_traceback
    assert "check_positive" in info.value.foreign_traceback
    assert any("forward of 'check_positive'" in note for note in info.value.__notes__)
    with pytest.raises(ForeignError, match="MethodError: no method matching only_vectors"):
        _fn("only_vectors")(_randn(2, 2))
    y = _fn("fragile")(_randn(3))
    with pytest.raises(ForeignError, match="the pullback of 'fragile' raised a Julia error: "
                                           "adjoint solve diverged"):
        y.sum().backward()


def test_setup_and_lookup_errors_are_foreign_errors():
    with pytest.raises(ForeignError, match="the setup code raised a Julia error"):
        julia2pytorch("f", "f(x) = (")
    with pytest.raises(ForeignError, match="looking up 'g'.*UndefVarError"):
        julia2pytorch("g", LISTING_1)


def test_setup_runs_once_per_setup_string():
    setup = "seed = rand()\nseed_value() = seed\n"
    first = julia2pytorch("seed_value", setup)().item()
    assert julia2pytorch("seed_value", setup)().item() == first
    assert julia2pytorch("seed_value", setup + "\n")().item() != first  # other code, other module


def test_julia_function_object():
    import juliacall
    triple = julia2pytorch(juliacall.Main.seval("x -> 3 .* x"))
    x = _randn(3)
    triple(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 3.0, dtype=torch.float64))
    sin = julia2pytorch(juliacall.Main.seval("sin"))
    assert sin.name == "sin"


def test_pullback_freed_after_backward():
    tracked, freed = julia2pytorch("tracked", LIFETIME), julia2pytorch("freed", LIFETIME)

    def freed_count(expected):
        for _ in range(20):  # Julia runs finalizers soon after a collection, not always during it
            gc.collect()
            if freed().item() >= expected:
                break
            time.sleep(0.05)
        return freed().item()
    x = _randn(3)
    tracked(x).sum().backward()
    assert freed_count(1) == 1
    y = tracked(x)
    y.sum().backward(retain_graph=True)
    assert freed_count(2) == 1  # still needed
    y.sum().backward()
    assert freed_count(2) == 2
    torch.testing.assert_close(x.grad, torch.full((3,), 6.0, dtype=torch.float64))


def _on_worker(fn):
    raised = []

    def run():
        try:
            fn()
        except BaseException as exc:  # reported to the caller
            raised.append(exc)
    worker = threading.Thread(target=run, name="worker")
    worker.start()
    worker.join()
    return raised[0] if raised else None


def test_thread_policy_refuses_other_threads_and_backward_still_works_on_main():
    f = julia2pytorch("f", LISTING_1)
    x = _randn(2)
    assert isinstance(_on_worker(lambda: f(x)), JuliaThreadError)
    y = f(x)
    exc = _on_worker(lambda: y.sum().backward(retain_graph=True))
    assert isinstance(exc, ForeignError) and isinstance(exc.original, JuliaThreadError)
    assert "PythonCall.jl issue #578" in str(exc)
    y.sum().backward()  # the graph is intact: backward on the main thread works
    torch.testing.assert_close(x.grad, torch.tensor([4.0, 6.0], dtype=torch.float64))


def test_pullback_dropped_on_another_thread_is_freed_on_the_main_one():
    tracked, freed = julia2pytorch("tracked", LIFETIME), julia2pytorch("freed", LIFETIME)
    before = freed().item()
    graph = [tracked(_randn(3))]
    assert _on_worker(graph.clear) is None  # the pullback's last reference dies on the worker
    for _ in range(20):  # each freed() call is a Julia call on the main thread
        gc.collect()
        if freed().item() > before:
            break
        time.sleep(0.05)
    assert freed().item() == before + 1


def test_inplace_change_of_an_output_the_pullback_reads():
    layer = _fn("layer")  # tanh.(W * x): Zygote's pullback reads the output it returned
    w = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]], dtype=torch.float64)
    x = _randn(3)
    expected = w.T @ (1 - torch.tanh(w @ x.detach()) ** 2)
    y = layer(x)  # copied (default): an in-place change cannot reach the pullback
    with torch.no_grad():
        y.mul_(0.0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, expected)
    y = julia2pytorch("layer", FUNCTIONS, copy_outputs=False)(x)  # a view: torch refuses
    with torch.no_grad():
        y.mul_(0.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_a_returned_global_is_not_a_writable_alias():
    out = _fn("global_out")(_randn(3))
    with torch.no_grad():
        out.fill_(-1.0)
    torch.testing.assert_close(_fn("global_value")(), torch.tensor([1.0, 2.0, 3.0],
                                                                   dtype=torch.float64))


def test_no_zygote_when_no_input_needs_a_gradient():
    counted, rules = julia2pytorch("counted", LIFETIME), julia2pytorch("rules", LIFETIME)
    x = _randn(3)
    before = rules().item()
    with torch.no_grad():
        y = counted(x)
    counted(x.detach())
    assert rules().item() == before and y.grad_fn is None
    torch.testing.assert_close(y, 2 * x.detach())
    counted(x).sum().backward()
    assert rules().item() == before + 1


def test_list_arguments_arrive_as_pylist():
    import juliacall
    jl = juliacall.Main
    x = _randn(2)
    with pytest.raises(ForeignError, match=r"(?s)MethodError.*vector_typed.*PyList.*Python lists"):
        _fn("vector_typed")(x, [3.0])
    torch.testing.assert_close(_fn("abstract_typed")(x, [3.0]), 3 * x)
    v = juliacall.convert(jl.Vector[jl.Float64], [3.0])
    torch.testing.assert_close(_fn("vector_typed")(x, v), 3 * x)


def test_setup_includes_a_file_whose_path_has_a_dollar(tmp_path):
    from bridges.fracture import FRACTURE_JL, pressure_torch
    from bridges.julia import include_setup
    folder = tmp_path / "run$HOME\\x"
    folder.mkdir()
    shutil.copy(FRACTURE_JL, folder / "Fracture.jl")
    setup = include_setup(folder / "Fracture.jl", "Fracture", "pressure")
    pressure = julia2pytorch("pressure", setup)
    k = torch.exp(_randn(3, 4, requires_grad=False))
    torch.testing.assert_close(pressure(k, 2.0, 1.0), pressure_torch(k))


def _darcy_matrix(k, v):
    """The same operator assembled independently, densely, with torch (0-based faces)."""
    n = k.shape[0] - 1
    a = torch.zeros(n, n, dtype=k.dtype)
    for f in range(n + 1):  # face f joins cell f-1 (left) and cell f (right)
        if f > 0:
            a[f - 1, f - 1] += k[f]
        if f < n:
            a[f, f] += k[f]
        if 0 < f < n:
            a[f - 1, f] -= k[f]
            a[f, f - 1] -= k[f]
    for i in range(n):  # upwind advection to the right
        a[i, i] += v
        if i > 0:
            a[i, i - 1] -= v
    return a


def test_dpfehm_like_linear_solve_with_custom_rrule():
    pressure = julia2pytorch("pressure", DARCY)
    adjoint_solves = julia2pytorch("adjoint_solves", DARCY)
    n, v = 8, 0.7
    k = (torch.rand(n + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
         + 0.5).requires_grad_(True)
    q = _randn(n, seed=1)
    p = pressure(k, q, v)
    p_ref = torch.linalg.solve(_darcy_matrix(k, v), q)
    torch.testing.assert_close(p, p_ref)
    weights = _randn(n, seed=2, requires_grad=False)
    before = adjoint_solves().item()
    grads = torch.autograd.grad((p * weights).sum(), (k, q))
    assert adjoint_solves().item() == before + 1  # the custom rrule ran, once
    for g, g_ref in zip(grads, torch.autograd.grad((p_ref * weights).sum(), (k, q))):
        torch.testing.assert_close(g, g_ref)
    assert gradcheck(lambda k, q: pressure(k, q, v), (k, q))
