"""The class factory: gradients, validation, lifetimes, errors and torch.func support."""
import gc
import weakref

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

import bridges
from bridges import ForeignError, as_numpy, foreign_function


def _numpy_op():
    """y1 = s*a*b + sin(c), y2 = sum(a^2) * c: 3 tensor inputs, 1 non-tensor, 2 outputs."""
    def forward(a, b, scale, c):
        A, B, C = as_numpy(a), as_numpy(b), as_numpy(c)
        y1, y2 = scale * A * B + np.sin(C), (A ** 2).sum() * C

        def pullback(g1, g2):
            g1, g2 = as_numpy(g1), as_numpy(g2)
            return (scale * B * g1 + 2 * A * (g2 * C).sum(), scale * A * g1, None,
                    np.cos(C) * g1 + (A ** 2).sum() * g2)

        def pushforward(ta, tb, ts, tc):
            ta, tb, tc = (np.zeros_like(A) if t is None else as_numpy(t) for t in (ta, tb, tc))
            return (scale * (ta * B + A * tb) + np.cos(C) * tc,
                    2 * (A * ta).sum() * C + (A ** 2).sum() * tc)
        return (y1, y2), pullback, pushforward
    return foreign_function(forward, name="numpy_op")


NumpyOp = _numpy_op()


def _inputs(n=5, requires_grad=True):
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(n, dtype=torch.float64, generator=gen, requires_grad=requires_grad)
                 for _ in range(3))


def _analytic_jacobian_y1_wrt_a(a, b, scale):
    return torch.diag(scale * b)


def test_gradcheck_three_tensors_one_constant_two_outputs():
    a, b, c = _inputs()
    assert gradcheck(lambda a, b, c: NumpyOp.apply(a, b, 2.5, c), (a, b, c))


def test_gradcheck_forward_mode():
    a, b, c = _inputs()
    assert gradcheck(lambda a, b, c: NumpyOp.apply(a, b, 2.5, c), (a, b, c),
                     check_forward_ad=True, check_backward_ad=False, check_undefined_grad=False)


def test_generated_class_is_named_and_outputs_are_tensors():
    a, b, c = _inputs()
    y1, y2 = NumpyOp.apply(a, b, 1.0, c)
    assert NumpyOp.name == "numpy_op" and issubclass(NumpyOp.function, torch.autograd.Function)
    assert NumpyOp.function.__name__ == "numpy_op" and repr(NumpyOp) == "<bridged op 'numpy_op'>"
    assert type(y1.grad_fn).__name__ == "numpy_opBackward"
    assert y1.shape == (5,) and y2.shape == (5,)


def test_jacrev_vmap_jacfwd_match_analytic_jacobian():
    a, b, c = (t.detach() for t in _inputs())
    f = lambda a: NumpyOp.apply(a, b, 2.0, c)[0]
    expected = _analytic_jacobian_y1_wrt_a(a, b, 2.0)
    torch.testing.assert_close(torch.func.jacrev(f)(a), expected)
    torch.testing.assert_close(torch.func.jacfwd(f)(a), expected)
    batch = torch.randn(7, 5, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(f)(batch), 2.0 * batch * b + torch.sin(c))
    # per-sample Jacobians through ordinary autograd over the vmapped op (a block diagonal)
    batch.requires_grad_()
    jac = torch.autograd.functional.jacobian(torch.func.vmap(f), batch)
    torch.testing.assert_close(torch.einsum("bibj->bij", jac), expected.expand(7, 5, 5))


def test_derivatives_inside_and_outside_vmap_reach_each_samples_rules():
    """y2 = sum(a^2) c is nonlinear in a, so every sample has its own pullback and pushforward.
    grad over vmap, and grad, jacrev and jacfwd inside vmap, give each sample its own
    derivative (inside vmap they used to take the last sample's rules for all); inside two
    nested vmaps they are refused by name."""
    _, b, c = (t.detach() for t in _inputs())
    batch = torch.randn(4, 5, dtype=torch.float64)
    f = lambda a: NumpyOp.apply(a, b, 2.0, c)[1]  # noqa: E731
    g = torch.func.grad(lambda a: torch.func.vmap(f)(a).sum())(batch)
    torch.testing.assert_close(g, 2 * batch * c.sum())
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(lambda a: f(a).sum()))(batch),
                               2 * batch * c.sum())
    jacobians = 2 * c[None, :, None] * batch[:, None, :]
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        torch.testing.assert_close(torch.func.vmap(transform(f))(batch), jacobians)
    with pytest.raises(bridges.MissingDerivativeError,
                       match=r"numpy_op: torch.func.grad, vjp, jacrev, jvp or jacfwd inside "
                             r"nested torch.func.vmaps"):
        torch.func.vmap(torch.func.vmap(torch.func.grad(lambda a: f(a).sum())))(
            batch.reshape(2, 2, 5))


def test_torch_func_grad_and_vjp():
    a, b, c = (t.detach() for t in _inputs())
    g = torch.func.grad(lambda a: NumpyOp.apply(a, b, 2.0, c)[1].sum())(a)
    torch.testing.assert_close(g, 2 * a * c.sum())
    _, vjp_fn = torch.func.vjp(lambda c: NumpyOp.apply(a, b, 2.0, c), c)
    (gc_,) = vjp_fn((torch.ones(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)))
    torch.testing.assert_close(gc_, torch.cos(c))


def test_pullback_learns_which_inputs_need_grad():
    seen = []

    def forward(x, y, needs_input_grad):
        seen.append(("forward", needs_input_grad))
        if not any(needs_input_grad):
            return 2 * x + 3 * y, None  # nothing to differentiate: no pullback needed

        def pullback(g, needs_input_grad):
            seen.append(("pullback", needs_input_grad))
            return (g * 2 if needs_input_grad[0] else None, g * 3 if needs_input_grad[1] else None)
        return 2 * x + 3 * y, pullback
    op = foreign_function(forward, name="masked", pass_needs_input_grad=True)
    x = torch.ones(3, requires_grad=True)
    y = torch.ones(3)
    op(x, y).sum().backward()
    assert seen == [("forward", (True, False)), ("pullback", (True, False))]
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))
    seen.clear()
    with torch.no_grad():
        op(x, y)
    op(x.detach(), y)
    assert seen == [("forward", (False, False))] * 2


def test_missing_pullback_when_gradients_are_needed_is_an_error():
    op = foreign_function(lambda x, needs_input_grad: (x * 2, None), name="lazy",
                          pass_needs_input_grad=True)
    assert op(torch.ones(2)).shape == (2,)
    # the op's own forward was told a gradient is needed, so None is a bug in it
    with pytest.raises(TypeError, match="lazy: forward returned no pullback, but inputs \\[0\\]"):
        op.function.apply(torch.ones(2, requires_grad=True))


def test_outputs_and_grads_come_back_in_input_dtype():
    def forward(x):  # the foreign side always answers in float64
        xf = as_numpy(x).astype(np.float64)
        return xf ** 2, lambda g: 2 * xf * as_numpy(g).astype(np.float64)
    op = foreign_function(forward, name="square64")
    x = torch.tensor([1.0, 2.0], dtype=torch.float32, requires_grad=True)
    y = op.apply(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, torch.tensor([2.0, 4.0]))


def test_outputs_share_memory_with_foreign_arrays():
    result = np.arange(4.0)

    def forward(x):
        return result, lambda g: g
    y = foreign_function(forward, name="view").apply(torch.zeros(4, dtype=torch.float64))
    assert y.data_ptr() == result.ctypes.data


def _tracked_op():
    refs = []

    class Pullback:
        def __call__(self, g):
            return g * 2

    def forward(x):
        pb = Pullback()
        refs.append(weakref.ref(pb))
        return 2 * x, pb
    return foreign_function(forward, name="tracked"), refs


def test_pullback_released_after_backward():
    op, refs = _tracked_op()
    x = torch.ones(3, requires_grad=True)
    y = op.apply(x)
    y.sum().backward()
    gc.collect()
    assert refs[0]() is None
    with pytest.raises(RuntimeError, match="tracked: backward was called a second time.*retain_graph"):
        y.sum().backward()


def test_pullback_kept_with_retain_graph():
    op, refs = _tracked_op()
    x = torch.ones(3, requires_grad=True)
    y = op.apply(x)
    y.sum().backward(retain_graph=True)
    gc.collect()
    assert refs[0]() is not None
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 4.0))
    gc.collect()
    assert refs[0]() is None


def test_pullback_not_kept_when_no_input_needs_grad():
    op, refs = _tracked_op()
    y = op.apply(torch.ones(3))
    gc.collect()
    assert refs[0]() is None and not y.requires_grad


def test_wrong_gradient_shape_names_op_position_and_shapes():
    op = foreign_function(lambda x, y: (x + y, lambda g: (g, g[:2])), name="badshape")
    x = torch.ones(3, requires_grad=True)
    y = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"badshape: the pullback's gradient for argument 1 has "
                                         r"shape \(2,\), expected \(3,\)"):
        op.apply(x, y).sum().backward()


def test_wrong_gradient_count_and_gradient_for_constant():
    op = foreign_function(lambda x, k: (x * k, lambda g: (g,)), name="badcount")
    with pytest.raises(ValueError, match="badcount: the pullback returned 1 gradient.*2 argument"):
        op.apply(torch.ones(2, requires_grad=True), 3.0).sum().backward()
    op = foreign_function(lambda x, k: (x * k, lambda g: (g, g)), name="constgrad")
    with pytest.raises(ValueError, match="constgrad.*argument 1, which is not a tensor"):
        op.apply(torch.ones(2, requires_grad=True), 3.0).sum().backward()


def test_forward_must_return_outputs_and_pullback():
    op = foreign_function(lambda x: x * 2, name="nopullback")
    with pytest.raises(TypeError, match="nopullback: forward must return \\(outputs, pullback\\)"):
        op.apply(torch.ones(2))


def test_foreign_exceptions_are_wrapped_with_original_and_traceback():
    def forward(x):
        def pullback(g):
            raise KeyError("missing adjoint state")
        if x.sum() < 0:
            raise ZeroDivisionError("negative input")
        return x, pullback
    op = foreign_function(forward, name="fails")
    with pytest.raises(ForeignError, match="the forward of 'fails' raised ZeroDivisionError") as info:
        op.apply(-torch.ones(2))
    assert isinstance(info.value.original, ZeroDivisionError)
    assert "raise ZeroDivisionError" in info.value.foreign_traceback
    with pytest.raises(ForeignError, match="the pullback of 'fails' raised KeyError") as info:
        op.apply(torch.ones(2, requires_grad=True)).sum().backward()
    assert isinstance(info.value.original, KeyError)


def test_foreign_error_from_adapter_passes_through_with_note():
    def forward(x):
        raise ForeignError("solver diverged", foreign_traceback="frame 1\nframe 2")
    with pytest.raises(ForeignError, match="solver diverged") as info:
        foreign_function(forward, name="adapter").apply(torch.ones(1))
    assert info.value.foreign_traceback == "frame 1\nframe 2"
    assert any("adapter" in note for note in info.value.__notes__)


def test_double_backward_raises_naming_the_op():
    a, b, c = _inputs()
    y1, _ = NumpyOp.apply(a, b, 2.0, c)
    (ga,) = torch.autograd.grad(y1.sum(), a, create_graph=True)
    assert ga.requires_grad
    with pytest.raises(RuntimeError, match="double backward through 'numpy_op' is not supported"):
        ga.sum().backward()
    with pytest.raises(RuntimeError, match="double backward through 'numpy_op'"):
        torch.func.hessian(lambda a: NumpyOp.apply(a, b.detach(), 2.0, c.detach())[0].sum())(
            a.detach())


def test_missing_pushforward_has_clear_error():
    op = foreign_function(lambda x: (x * 2, lambda g: 2 * g), name="reverse_only")
    with pytest.raises(RuntimeError, match="reverse_only has no forward-mode"):
        torch.func.jvp(op.apply, (torch.ones(2),), (torch.ones(2),))


def test_inplace_change_after_forward_is_detected():
    op, _ = _tracked_op()
    x = torch.ones(3, requires_grad=True)
    z = x * 1
    y = op.apply(z)
    z.add_(1)  # the foreign side may hold a view of z: its pullback would be silently wrong
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_bridged_op_inside_foreign_forward():
    inner = foreign_function(lambda x: (x * 3, lambda g: 3 * g), name="inner")
    outer = foreign_function(lambda x: (inner.apply(x) + 1, lambda g: 3 * g), name="outer")
    x = torch.ones(2, requires_grad=True)
    outer.apply(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((2,), 3.0))


def test_bad_factory_arguments():
    with pytest.raises(TypeError, match="forward must be callable"):
        foreign_function(None, name="x")
    with pytest.raises(TypeError, match="name must be a non-empty string"):
        foreign_function(lambda x: x, name="")


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_ten_thousand_calls_do_not_grow_memory():
    a, b, c = _inputs(n=16)

    def step():
        y1, y2 = NumpyOp.apply(a, b, 2.0, c)
        (y1.sum() + y2.sum()).backward()
    for _ in range(500):  # warm up allocator and caches
        step()
    gc.collect()
    before = _rss_bytes()
    for _ in range(10_000):
        step()
    gc.collect()
    grown = _rss_bytes() - before
    assert grown < 10 * 2 ** 20, f"resident memory grew by {grown / 2 ** 20:.1f} MB"


def test_package_exports():
    assert bridges.foreign_function is foreign_function
    with pytest.raises(AttributeError):
        bridges.not_a_thing


# -- first-class behaviour: call form, dtype promotion, in-place protection, compile -------------
def _scale_op(protect_outputs=True):
    def forward(x, y):
        X, Y = as_numpy(x).astype(np.float64), as_numpy(y).astype(np.float64)
        out = np.tanh(X * Y)

        def pullback(g):  # reads the output, as tanh's derivative does
            g = as_numpy(g).astype(np.float64)
            return (1 - out ** 2) * Y * g, (1 - out ** 2) * X * g
        return out, pullback
    return foreign_function(forward, name="tanh_mul", protect_outputs=protect_outputs)


def test_the_op_is_callable_and_gradchecks_in_call_form():
    op = _scale_op()
    x, y = (torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert gradcheck(lambda a, b: op(a, b), (x, y))
    torch.testing.assert_close(op(x, y), op.apply(x, y))


@pytest.mark.parametrize("dtypes,expected", [((torch.float32, torch.float64), torch.float64),
                                             ((torch.float64, torch.float32), torch.float64),
                                             ((torch.float32, torch.float32), torch.float32),
                                             ((torch.float16, torch.float32), torch.float32)])
def test_outputs_take_the_promoted_dtype_and_grads_the_input_dtypes(dtypes, expected):
    op = _scale_op()
    x = torch.rand(3, dtype=dtypes[0], requires_grad=True)
    y = torch.rand(3, dtype=dtypes[1], requires_grad=True)
    out = op(x, y)
    assert out.dtype == expected == torch.result_type(x, y)
    out.sum().backward()
    assert x.grad.dtype == dtypes[0] and y.grad.dtype == dtypes[1]


@pytest.mark.parametrize("x,y", [((3,), ()), ((), (3,)), ((), ())])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                    (torch.float32, torch.complex128)])
def test_a_zero_dimensional_input_promotes_as_torch_result_type_says(x, y, dtypes):
    """A 0-d float64 scale next to a float32 array gave float64; torch keeps float32."""
    op = foreign_function(lambda a, b: (as_numpy(a) * as_numpy(b), None), name="product")
    x, y = torch.ones(x, dtype=dtypes[0]), torch.ones(y, dtype=dtypes[1])
    assert op(x, y).dtype == torch.result_type(x, y) == (x * y).dtype


def test_in_place_change_of_an_output_raises_instead_of_a_wrong_gradient():
    op = _scale_op()
    x, y = (torch.rand(3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = op(x, y)
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    # unprotected ops (whose pullback never reads its outputs) allow it, as native ops do
    unprotected = foreign_function(lambda a: (2 * as_numpy(a), lambda g: 2 * as_numpy(g)),
                                   name="double", protect_outputs=False)
    z = unprotected(x)
    z.add_(1)
    z.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0, dtype=torch.float64))


def test_an_output_viewing_an_input_is_copied_so_in_place_changes_stay_apart():
    """A forward returning a numpy view of its input (a reshape): changing the output in place
    rewrote the input leaf behind torch's back, and a gradient saved elsewhere came out 10x."""
    op = foreign_function(lambda a: (as_numpy(a).reshape(2, 2),
                                     lambda g: as_numpy(g).reshape(4)), name="np_reshape")
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64, requires_grad=True)
    squares = (x ** 2).sum()  # saves x
    y = op(x)
    y.mul_(10)
    squares.backward()
    torch.testing.assert_close(x.detach(), torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(x.grad, 2 * x.detach())



@pytest.mark.parametrize("forward", [lambda a: a, lambda a: a.view(2, 2), lambda a: a[1:]])
def test_an_output_that_is_an_input_tensor_or_its_view_is_copied(forward):
    """A forward returning its (detached) input tensor, or a view of it: y.mul_(10) rewrote a
    leaf parameter silently (torch refuses it for its own Functions)."""
    op = foreign_function(lambda a: (forward(a), lambda g: None), name="same")
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    y = op(w)
    y.mul_(10)
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))


def test_a_read_only_foreign_array_is_copied_into_the_output():
    """A forward returning a cached array marked read-only: an in-place change of the output
    rewrote the cache, and every later call returned the changed values."""
    table = np.array([1.0, 2.0, 3.0])
    table.flags.writeable = False
    op = foreign_function(lambda a: (table, lambda g: None), name="cached")
    op(torch.zeros(3, dtype=torch.float64)).mul_(100)
    np.testing.assert_array_equal(table, [1.0, 2.0, 3.0])


def test_legacy_batched_gradients_get_a_clear_error():
    op = _scale_op()
    x, y = (torch.rand(3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    with pytest.raises(RuntimeError, match="tanh_mul: .*is_grads_batched=True.*torch.func.vmap"):
        torch.autograd.grad(op(x, y), x, torch.eye(3, dtype=torch.float64),
                            is_grads_batched=True)
    # the supported route: torch.func batches through the op
    jac = torch.func.jacrev(lambda a: op(a, y.detach()))(x.detach())
    expected = torch.diag((1 - torch.tanh(x * y) ** 2) * y).detach()
    torch.testing.assert_close(jac, expected)


def test_torch_compile_breaks_the_graph_only_at_the_op_and_matches_eager():
    op = _scale_op()
    layer = torch.nn.Linear(3, 3).double()

    def model(x):
        h = torch.sin(layer(x))
        return (op(h, h + 1) ** 2).sum() * torch.cos(x).sum()
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    eager = torch.autograd.grad(model(x), (x, layer.weight))
    torch._dynamo.reset()
    compiled = torch.autograd.grad(torch.compile(model)(x), (x, layer.weight))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 1
    assert "bridged op 'tanh_mul'" in str(explanation.break_reasons[0].reason)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="bridged op 'tanh_mul' runs foreign code"):
        torch.compile(model, fullgraph=True)(x)


def test_a_batched_pullback_is_called_once_for_all_cotangents_under_vmap():
    """A pullback marked `batched = True` gets every cotangent at once under torch.func.vmap
    (here vmap over autograd.grad, as jacrev does), and its gradients equal the per-row ones."""
    a = torch.tensor([[2.0, 1.0], [0.5, 3.0]], dtype=torch.float64)
    calls = []

    def forward(x):
        def pullback(g, batched=False):
            calls.append(tuple(g.shape))
            return g @ a  # (..., 2) @ (2, 2): each row's J^T g
        pullback.batched = True
        return a @ x, pullback
    op = bridges.foreign_function(forward, name="batched_matvec")
    x = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    y = op(x)
    rows = torch.eye(2, dtype=torch.float64)
    jac = torch.func.vmap(lambda v: torch.autograd.grad(y, x, v, retain_graph=True)[0])(rows)
    torch.testing.assert_close(jac, a)
    assert calls == [(2, 2)]  # one call, with the batch of two cotangents
    (g,) = torch.autograd.grad(y, x, torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(g, a[0])
    assert calls[-1] == (2,)  # plain backward: one cotangent, no batch


def test_tensors_requiring_grad_inside_containers_and_keywords_are_refused_by_name():
    """A tensor requiring grad in a list argument got no gradient, silently; keywords failed
    with a TypeError that did not name the op."""
    op = foreign_function(lambda xs: (sum(as_numpy(x) for x in xs), lambda g: None),
                          name="sum_list")
    a = torch.ones(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match=r"sum_list: argument 0 is a list holding a tensor that "
                                        r"requires grad.*argument of its own"):
        op([a, torch.ones(2, dtype=torch.float64)])
    with torch.no_grad():  # (no gradient is wanted: nothing is lost)
        torch.testing.assert_close(op([a, a]), torch.full((2,), 2.0, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"bridged op 'sum_list' takes positional arguments only, "
                                        r"got keyword\(s\) xs"):
        op(xs=[a])
