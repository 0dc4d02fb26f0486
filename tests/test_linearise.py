"""Jacobian products without double backward: forward mode, reverse mode, finite differences,
and the automatic choice, for plain torch functions and functions with bridged ops."""
import numpy as np
import pytest
import scipy.sparse
import torch

from bridges import as_numpy, fd2pytorch, foreign_function
from bridges._errors import MissingDerivativeError
from bridges._linearise import (FORWARD_FROM, DenseLinearisation, Linearisation, acts_on_rows,
                                choose, grads, probe, untracked_inputs)

F64 = torch.float64


def _cube_forward(x):
    X = as_numpy(x).copy()
    return X ** 3, lambda g: 3 * X ** 2 * as_numpy(g)


CUBE = foreign_function(_cube_forward, name="cube")  # a pullback and no pushforward
A = torch.tensor([[2.0, -1.0, 0.3], [0.4, 1.5, -0.2], [0.0, 0.7, 3.0]], dtype=F64)


def plain(u):
    return A @ u + torch.sin(u) * u[0]


def reverse_only(u):
    return A @ u + CUBE(u)


FD_SIN = fd2pytorch(np.sin, sparsity=scipy.sparse.identity(3), name="fd_sin")


def with_fd_op(u):
    return A @ u + FD_SIN(u)


EXACT = {plain: lambda u: A + torch.diag(torch.cos(u) * u[0]) + torch.outer(torch.sin(u),
                                                                           torch.eye(3, dtype=F64)[0]),
         reverse_only: lambda u: A + torch.diag(3 * u ** 2),
         with_fd_op: lambda u: A + torch.diag(torch.cos(u))}
U = torch.tensor([0.3, -0.8, 1.1], dtype=F64)
V = torch.tensor([1.0, 0.5, -2.0], dtype=F64)


@pytest.mark.parametrize("fn", [plain, reverse_only, with_fd_op])
def test_reverse_mode_products_are_exact(fn):
    lin, J = Linearisation(fn, U), EXACT[fn](U)
    torch.testing.assert_close(lin.vjp(V), J.T @ V)
    torch.testing.assert_close(lin.vjps(torch.eye(3, dtype=F64)), J)  # row k = J^T e_k


@pytest.mark.parametrize("fn", [plain, with_fd_op])
def test_forward_mode_products_match_the_jacobian(fn):
    lin, J = Linearisation(fn, U), EXACT[fn](U)
    tol = dict(rtol=1e-7, atol=1e-9) if fn is with_fd_op else {}
    torch.testing.assert_close(lin.jvp(V), J @ V, **tol)
    torch.testing.assert_close(lin.jvps(torch.eye(3, dtype=F64)), J.T, **tol)  # row k = J e_k


class ClassicCube(torch.autograd.Function):
    """u^3 in the classic form (forward with ctx), with a jvp: forward-mode AD works, but
    torch.func (vmap, jvp), which needs setup_context, refuses it."""

    @staticmethod
    def forward(ctx, u):
        ctx.u = u
        return u ** 3

    @staticmethod
    def backward(ctx, g):
        return 3 * ctx.u ** 2 * g

    @staticmethod
    def jvp(ctx, t):
        return 3 * ctx.u ** 2 * t


def test_batched_forward_products_of_a_classic_form_function_fall_back_to_one_pass_each():
    def fn(u):
        return A @ u + ClassicCube.apply(u)
    with pytest.raises(RuntimeError, match="setup_context"):  # what the fallback is for
        torch.func.jvp(fn, (U,), (V,))
    J = A + torch.diag(3 * U ** 2)
    torch.testing.assert_close(Linearisation(fn, U).jvps(torch.eye(3, dtype=F64)), J.T)


def test_a_pullback_only_op_refuses_forward_mode_by_name():
    with pytest.raises(MissingDerivativeError, match="cube has no forward-mode"):
        Linearisation(reverse_only, U).jvp(V)


@pytest.mark.parametrize("fn", [plain, reverse_only, with_fd_op])
def test_finite_difference_products_are_close(fn):
    got = Linearisation(fn, U).fd_jvp(V)
    expected = EXACT[fn](U) @ V
    assert float((got - expected).norm() / expected.norm()) < 1e-6
    assert float(Linearisation(fn, U).fd_jvp(torch.zeros(3, dtype=F64)).abs().max()) == 0.0


def test_probe_and_the_automatic_choice():
    caps = {fn: probe(fn, U, "test") for fn in (plain, reverse_only, with_fd_op)}
    assert (caps[plain].forward, caps[plain].bridged) == (True, False)
    assert (caps[reverse_only].forward, caps[reverse_only].bridged) == (False, True)
    assert (caps[with_fd_op].forward, caps[with_fd_op].bridged) == (True, True)
    assert choose("auto", caps[plain], 10, "t") == "reverse"  # measured faster when small
    assert choose("auto", caps[plain], FORWARD_FROM, "t") == "forward"
    assert choose("auto", caps[reverse_only], 10 ** 6, "t") == "reverse"
    assert choose("auto", caps[with_fd_op], 10, "t") == "forward"
    with pytest.raises(MissingDerivativeError, match="mode 'forward' needs a forward-mode rule"):
        choose("forward", caps[reverse_only], 10, "t")
    with pytest.raises(ValueError, match="unknown jacobian mode 'sideways'; valid: auto, "
                                         "forward, reverse"):
        choose("sideways", caps[plain], 10, "t")


def test_products_work_inside_a_bridged_forward():
    # PETSc calls back from inside an op's forward, where torch switches forward AD off
    seen = []

    def outer(x):
        lin = Linearisation(plain, U)
        seen.append((lin.jvp(V), lin.vjp(V)))
        return as_numpy(x) * 1.0, lambda g: g
    foreign_function(outer, name="outer")(torch.ones(2, requires_grad=True))
    J = EXACT[plain](U)
    torch.testing.assert_close(seen[0][0], J @ V)
    torch.testing.assert_close(seen[0][1], J.T @ V)


def test_dense_linearisation_parameter_products_reuse_the_jacobian_graph():
    """The dense Jacobian of a parameterised function and (d fn / d k)^T w through the graph
    that Jacobian's pass kept equal the analytic ones, stacked or batched."""
    k = torch.tensor([0.04, 3e7, 1e4], dtype=F64, requires_grad=True)

    def fn(y):  # Robertson's kinetics, rows of a leading batch dimension independent
        y1, y2, y3 = y.unbind(-1)
        return torch.stack([-k[0] * y1 + k[2] * y2 * y3,
                            k[0] * y1 - k[2] * y2 * y3 - k[1] * y2 ** 2, k[1] * y2 ** 2], -1)
    u = torch.tensor([0.9, 2e-5, 0.1], dtype=F64)
    w = torch.tensor([0.3, -1.2, 0.7], dtype=F64)
    y1, y2, y3 = u.tolist()
    jac = torch.tensor([[-0.04, 1e4 * y3, 1e4 * y2],
                        [0.04, -1e4 * y3 - 6e7 * y2, -1e4 * y2],
                        [0.0, 6e7 * y2, 0.0]], dtype=F64)
    jac_k = torch.tensor([[-y1, 0.0, y2 * y3], [y1, -y2 ** 2, -y2 * y3], [0.0, y2 ** 2, 0.0]],
                         dtype=F64)
    assert acts_on_rows(fn, u)
    for stacked in (True, False):
        point = DenseLinearisation(fn, u, stacked)
        torch.testing.assert_close(point.jacobian, jac, rtol=1e-14, atol=0)
        (grad,) = point.param_vjp((k,), w)
        torch.testing.assert_close(grad, jac_k.T @ w, rtol=1e-14, atol=1e-20)
        (again,) = Linearisation(fn, u).param_vjp((k,), w)
        torch.testing.assert_close(grad, again, rtol=1e-14, atol=0)


def test_a_paired_product_serves_the_parameter_product_for_its_own_vector_only():
    """vjp(w, params) forms J^T w and (d fn / d k)^T w in one pass; param_vjp with that w takes
    the kept product, with another w it makes a new one. All against the analytic values."""
    k = torch.tensor([1.5, -0.4], dtype=F64, requires_grad=True)

    def fn(u):  # (k0 u0 u1, sin(u0) + k1 u1)
        return torch.stack([k[0] * u[0] * u[1], torch.sin(u[0]) + k[1] * u[1]])
    u = torch.tensor([0.3, -1.1], dtype=F64)
    jac = torch.tensor([[1.5 * -1.1, 1.5 * 0.3], [np.cos(0.3), -0.4]], dtype=F64)
    jac_k = torch.tensor([[0.3 * -1.1, 0.0], [0.0, -1.1]], dtype=F64)
    point = Linearisation(fn, u)
    w, other = torch.tensor([0.7, -2.0], dtype=F64), torch.tensor([1.0, 0.5], dtype=F64)
    torch.testing.assert_close(point.vjp(w, (k,)), jac.T @ w)
    torch.testing.assert_close(point.param_vjp((k,), other)[0], jac_k.T @ other)
    point.vjp(w, (k,))
    torch.testing.assert_close(point.param_vjp((k,), w)[0], jac_k.T @ w)
    torch.testing.assert_close(point.param_vjp((k,), w)[0], jac_k.T @ w)  # kept once only


@pytest.mark.parametrize("stacked", [True, False])
def test_functions_that_ignore_their_input_have_zero_jacobians_and_products(stacked):
    """fn constant in u (or depending on a parameter only): zeros, not autograd's error."""
    k = torch.tensor(2.0, dtype=F64, requires_grad=True)
    u = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    for fn in (lambda v: torch.ones_like(v), lambda v: k * torch.ones_like(v)):
        lin = DenseLinearisation(fn, u, stacked)
        assert torch.equal(lin.jacobian, torch.zeros(3, 3, dtype=F64))
        assert torch.equal(lin.vjp(torch.ones(3, dtype=F64)), torch.zeros(3, dtype=F64))
        assert lin.vjps(torch.eye(3, dtype=F64), batched=True).shape == (3, 3)
    (gk,) = lin.param_vjp((k,), torch.ones(3, dtype=F64))
    assert float(gk) == 3.0
    value = torch.ones(2, dtype=F64)  # requires no grad at all
    assert grads(value, (k,), torch.ones(2, dtype=F64)) == (None,)
    (zero,) = grads(value, (u,), torch.ones(4, 2, dtype=F64), batched=True, zeros=True)
    assert torch.equal(zero, torch.zeros(4, 3, dtype=F64))


def test_untracked_inputs_finds_captured_leaves_but_not_tracked_ones_or_their_sources():
    w = torch.ones(3, dtype=F64, requires_grad=True)
    b = torch.ones(3, dtype=F64, requires_grad=True)
    scaled = 2 * w  # a tracked non-leaf: what it was computed from is covered by it
    value = (scaled * b).sum()
    found = untracked_inputs(value, (scaled,))
    assert len(found) == 1 and found[0] is b
    assert untracked_inputs(value, (scaled, b)) == []
    assert [t is w for t in untracked_inputs(value, (b,))] == [True]
    assert untracked_inputs(w, ()) == [w] and untracked_inputs(w, (w,)) == []
    with torch.no_grad():
        assert untracked_inputs((w * b).sum(), ()) == []
