"""An ODE solve's Jacobians: compile_jacobian=True forms dfunc/dy and dfunc/dparams of a small
system, or of each sample of a batch, in one compiled call and gives the eager path's gradients,
or refuses with the reason; a coupled system without a sparsity gets one dense block."""
import warnings
from unittest import mock

import numpy as np
import pytest
import torch

from bridges import ForeignError
from bridges.petsc import ODESolver, odeint_adjoint
from bridges.petsc._ode_jacobians import CompiledJacobian
from bridges.problems import problem

F64 = torch.float64


class Pendulum(torch.nn.Module):
    """A damped pendulum with a stiff damping term: nonlinear in y and in its parameters."""

    def __init__(self):
        super().__init__()
        self.omega = torch.nn.Parameter(torch.tensor(1.3, dtype=F64))
        self.damping = torch.nn.Parameter(torch.tensor([40.0, 0.5], dtype=F64))

    def forward(self, t, y):
        angle, speed = y[..., 0], y[..., 1]
        accel = -self.omega ** 2 * torch.sin(angle) - self.damping[0] * speed \
            - self.damping[1] * speed ** 3
        return torch.stack([speed, accel], dim=-1)


class Untraceable(Pendulum):
    """Branches in Python on a value of y: a graph break, which a single graph refuses."""

    def forward(self, t, y):
        if float(y.detach().abs().max()) > 10.0:  # data-dependent control flow
            raise RuntimeError("the state diverged")
        return super().forward(t, y)


def _gradients(func, y0, t, **settings):
    y0 = y0.clone().requires_grad_()
    func.zero_grad()
    ys = odeint_adjoint(func, y0, t, **settings)
    (ys[-1] * torch.tensor([1.0, -2.0], dtype=F64)[:ys.shape[-1]]).sum().backward()
    return [ys.detach(), y0.grad, *[q.grad.clone() for q in func.parameters()]]


@pytest.mark.parametrize("settings", [dict(rtol=1e-8, atol=1e-10),
                                      dict(method="cn", steps_per_interval=4)])
# one system; a dense pair; blocks by COO insertion; blocks written into the AIJ arrays
@pytest.mark.parametrize("batch", [(), (2,), (40,), (1200,)])
def test_compiled_jacobians_give_the_eager_gradients(settings, batch):
    func = Pendulum()
    y0 = torch.stack([torch.linspace(0.5, 1.5, max(batch, default=1), dtype=F64),
                      torch.zeros(max(batch, default=1), dtype=F64)], dim=-1).reshape(*batch, 2)
    t = torch.linspace(0.0, 2.0, 5, dtype=F64)
    eager = _gradients(func, y0, t, **settings)
    original = CompiledJacobian.__call__
    with mock.patch.object(CompiledJacobian, "__call__", autospec=True,
                           side_effect=original) as called:
        compiled = _gradients(func, y0, t, compile_jacobian=True, **settings)
    assert called.call_count > 10  # every Jacobian of the solve and its adjoint came from it
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("samples", [None, 33])  # one system; a batch assembled as blocks
def test_compiled_jacobians_pass_gradcheck(samples):
    func = Pendulum()
    t = torch.linspace(0.0, 1.0, 3, dtype=F64)
    solver = ODESolver("cn", steps_per_interval=3, compile_jacobian=True)
    y0 = torch.tensor([0.7, -0.2], dtype=F64)
    if samples:
        y0 = y0 * torch.linspace(0.5, 1.5, samples, dtype=F64)[:, None]
    y0.requires_grad_()
    # gradcheck moves its inputs in place: func's own parameters, which the compiled call reads
    assert torch.autograd.gradcheck(lambda y, *params: solver(func, y, t, params)[-1],
                                    (y0, func.omega, func.damping))


def test_rober_gradient_with_compiled_jacobians_matches_scipy_sensitivities():
    rober = problem("rober", t_end=1e2, n_times=5)
    func, y0, t = rober.tensors()
    ys = odeint_adjoint(func, y0, t, rtol=1e-9, atol=1e-14, compile_jacobian=True)
    ys[-1, 0].backward()

    def last_first(y):  # d(y[-1, 0])/dy
        seed = np.zeros_like(y)
        seed[-1, 0] = 1.0
        return seed
    reference = rober.gradient(last_first)["k"]
    scale = np.abs(np.asarray(rober.params["k"]))
    error = np.abs((func.k.grad.numpy() - reference) * scale).max()
    assert error / np.abs(reference * scale).max() < 1e-5


@pytest.mark.parametrize("call, message", [
    (lambda: odeint_adjoint(lambda t, y: -y, torch.ones(2, dtype=F64),
                            torch.tensor([0.0, 1.0], dtype=F64), compile_jacobian=True),
     "needs func to be a torch.nn.Module"),
    (lambda: odeint_adjoint(Pendulum(), torch.ones(2, dtype=F64),
                            torch.tensor([0.0, 1.0], dtype=F64), method="dopri5",
                            compile_jacobian=True), "is for implicit methods"),
    (lambda: odeint_adjoint(Pendulum(), torch.ones(40, 2, dtype=F64),
                            torch.tensor([0.0, 1.0], dtype=F64), jacobian="matrix-free",
                            compile_jacobian=True),
     "is for small systems"),  # (raised inside the op: a ForeignError, with the reason)
    (lambda: odeint_adjoint(Pendulum(), torch.ones(2, dtype=F64),
                            torch.tensor([0.0, 1.0], dtype=F64), compile_jacobian=True,
                            adjoint_params=(torch.ones(1, dtype=F64, requires_grad=True),)),
     r"adjoint_params\[0\] are not among them"),
    (lambda: ODESolver(compile_jacobian="yes"), "compile_jacobian must be True or False"),
    (lambda: odeint_adjoint(Untraceable(), torch.ones(2, dtype=F64),
                            torch.tensor([0.0, 1.0], dtype=F64), compile_jacobian=True),
     "could not compile func's Jacobian in one graph"),
])
def test_compile_jacobian_refuses_what_it_cannot_do_and_says_why(call, message):
    with pytest.raises((ValueError, TypeError, ForeignError), match=message):
        call()


@pytest.mark.parametrize("batch", [(), (100,)])
def test_a_thousand_compiled_calls_keep_memory_flat(batch, memory_growth):
    func, solver = Pendulum(), ODESolver("cn", steps_per_interval=2, compile_jacobian=True)
    y0 = torch.ones(*batch, 2, dtype=F64)
    t = torch.linspace(0.0, 1.0, 3, dtype=F64)

    def call(i):
        solver(func, y0, t)[-1].sum().backward()
    grown = memory_growth(call, 1000)
    assert grown < 8 << 20, f"resident memory grew by {grown / 2**20:.2f} MB"


def test_compiled_jacobians_inside_a_torch_compiled_loss():
    func, y0 = Pendulum(), torch.tensor([1.0, 0.0], dtype=F64)
    t = torch.linspace(0.0, 1.0, 3, dtype=F64)
    solver = ODESolver("cn", steps_per_interval=2, compile_jacobian=True)

    def loss(y):
        return (solver(func, y, t)[-1] ** 2).sum() * 0.5  # the solve breaks the graph

    grads = []
    for fn in (loss, torch.compile(loss)):
        y = y0.clone().requires_grad_()
        fn(y).backward()
        grads.append(y.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=0)
    assert grads[0].abs().sum() > 0


class Brusselator1D(torch.nn.Module):
    """The 1-D Brusselator on N interior points with Dirichlet ends, state (u, v) stacked: a
    stiff system whose unknowns are all coupled through diffusion."""

    def __init__(self, points):
        super().__init__()
        self.points = points
        self.alpha = torch.nn.Parameter(torch.tensor(0.02, dtype=F64))
        self.a = torch.nn.Parameter(torch.tensor(1.0, dtype=F64))

    def forward(self, t, y):
        u, v = y[:self.points], y[self.points:]
        one, h2 = self.a.new_ones(1), (self.points + 1.0) ** -2
        lap_u = torch.diff(torch.cat([one, u, one]), 2) / h2
        lap_v = torch.diff(torch.cat([3 * one, v, 3 * one]), 2) / h2
        return torch.cat([self.a + u * u * v - 4 * u + self.alpha * lap_u,
                          3 * u - u * u * v + self.alpha * lap_v])


class Paired(torch.nn.Module):
    """A flat func on a state stored as (points, 2): rows coupled, so no per-sample blocks."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, t, y):
        return self.inner(t, y.t().reshape(-1)).reshape(2, -1).t()


def test_a_coupled_system_without_sparsity_gets_one_dense_block():
    """80 coupled states (above the 64 of per-sample blocks, no sparsity), flat or as
    (points, 2): by default one dense Jacobian block, solved directly (one linear iteration per
    Newton iteration), with the gradients of the matrix-free path and of central differences."""
    points = 40
    func = Brusselator1D(points)
    x = torch.linspace(0, 1, points + 2, dtype=F64)[1:-1]
    y0 = torch.cat([1 + torch.sin(2 * np.pi * x), torch.full_like(x, 3.0)])
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)

    def loss(paired=False, **kwargs):
        solver = ODESolver(rtol=1e-7, atol=1e-9, **kwargs)
        if paired:
            end = solver(Paired(func), y0.reshape(2, -1).t().contiguous(), t)[-1].t()
        else:
            end = solver(func, y0, t)[-1]
        return (end ** 2).sum(), solver.stats

    gradients = {}
    for label, kwargs in [("flat", {}), ("paired", {"paired": True}),
                          ("matrix-free", {"jacobian": "matrix-free",
                                           "options": {"ksp_rtol": 1e-12}})]:
        value, stats = loss(**kwargs)
        gradients[label] = torch.stack(torch.autograd.grad(value, (func.alpha, func.a)))
        direct = stats.linear_iterations == stats.newton_iterations
        assert direct == (label != "matrix-free"), label
    torch.testing.assert_close(gradients["paired"], gradients["flat"], rtol=1e-9, atol=0)
    torch.testing.assert_close(gradients["matrix-free"], gradients["flat"], rtol=1e-6, atol=0)
    with torch.no_grad():  # central differences in alpha
        h = 1e-6
        func.alpha += h
        up = loss()[0]
        func.alpha -= 2 * h
        down = loss()[0]
        func.alpha += h
    np.testing.assert_allclose(float(gradients["flat"][0]), float((up - down) / (2 * h)),
                               rtol=1e-5)


def test_a_func_slicing_its_first_axis_gets_its_parameter_gradient():
    """Diffusion written with slices of y (y[2:] - 2 y[1:-1] + y[:-2]) mixes the stacked copies
    the dense Jacobian's one reverse pass takes, and its symmetric Jacobian passed that pass's
    check: dL/dD came out exactly 0. Now against central differences of the same solve."""
    class Heat(torch.nn.Module):
        def __init__(self, D):
            super().__init__()
            self.D = torch.nn.Parameter(torch.tensor(D, dtype=F64))

        def forward(self, t, y):
            return self.D * torch.cat([y[1:2] - y[:1], y[2:] - 2 * y[1:-1] + y[:-2],
                                       y[-2:-1] - y[-1:]])
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    y0, w = (torch.tensor(v, dtype=F64) for v in ([1.0, 0.5, 0.2, 0.1], [1.0, 2.0, 3.0, 4.0]))
    for method, kwargs in (("arkimex", {"rtol": 1e-10, "atol": 1e-12}),
                           ("cn", {"steps_per_interval": 20})):
        def loss(D):
            return (w * odeint_adjoint(Heat(D), y0, t, method=method, **kwargs)[-1]).sum()
        heat = Heat(1.0)
        (w * odeint_adjoint(heat, y0, t, method=method, **kwargs)[-1]).sum().backward()
        with torch.no_grad():
            central = (loss(1 + 1e-6) - loss(1 - 1e-6)) / 2e-6
        np.testing.assert_allclose(heat.D.grad.item(), central.item(), rtol=1e-6)


def test_a_coupled_system_too_large_for_one_dense_block_warns_of_matrix_free_steps():
    """Past DENSE_LIMIT states without sparsity= or grid=, implicit steps fall to unpreconditioned
    matrix-free GMRES: 40x slower on a 1-D Brusselator of 1026 states than of 1024, silently."""
    from bridges.petsc._ode_jacobians import DENSE_LIMIT

    def coupled(t, y):
        return -y + y.mean()
    t = torch.tensor([0.0, 0.01], dtype=F64)
    with pytest.warns(UserWarning, match=rf"odeint_adjoint: func couples all {DENSE_LIMIT + 1} "
                                         rf"states .* matrix-free GMRES and no preconditioner"):
        odeint_adjoint(coupled, torch.ones(DENSE_LIMIT + 1, dtype=F64), t, method="cn",
                       steps_per_interval=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        odeint_adjoint(coupled, torch.ones(DENSE_LIMIT, dtype=F64), t, method="cn",
                       steps_per_interval=1)
        odeint_adjoint(coupled, torch.ones(DENSE_LIMIT + 1, dtype=F64), t, method="cn",
                       steps_per_interval=1, options={"pc_type": "jacobi"})


def test_a_batch_of_independent_samples_gets_per_sample_blocks_not_one_dense_block():
    """A batch of 30 samples (90 states, below the dense limit): its Jacobian blocks come from
    func evaluated on the batch alone, never on 90 stacked copies of it (6x slower at 128
    samples), and the gradients are those of the samples solved one by one."""
    func, seen = Pendulum(), set()

    def recorded(t, y):
        seen.add(tuple(y.shape))
        return func(t, y)
    y0 = torch.stack([torch.linspace(0.1, 2.0, 30, dtype=F64), torch.zeros(30, dtype=F64)], 1)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    ys = odeint_adjoint(recorded, y0, t, rtol=1e-8, atol=1e-10, adjoint_params=tuple(
        func.parameters()))
    batched = torch.autograd.grad(ys[-1, :, 0].sum(), tuple(func.parameters()))
    assert seen == {(30, 2)}
    alone = [torch.autograd.grad(odeint_adjoint(func, y, t, rtol=1e-8, atol=1e-10)[-1, 0],
                                 tuple(func.parameters())) for y in y0]
    for got, want in zip(batched, map(sum, zip(*alone))):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_a_sparsity_missing_a_coupling_that_starts_at_zero_is_caught_at_the_adjoint():
    """dF2/dy0 = k y1 is zero at y0 = (1, 0, 0), so the pattern's first check passes without
    entry (2, 0); the adjoint checks again at the end state and names the omission instead of
    using a Jacobian without it."""
    k = torch.tensor(2.0, dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=F64, requires_grad=True)

    def func(t, y):
        return torch.stack([-y[0], y[0] - y[1], y[1] - y[2] + k * y[1] * y[0]])
    pattern = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1]], bool)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    ys = odeint_adjoint(func, y0, t, sparsity=pattern, jacobian="assembled",
                        adjoint_params=(k,))
    with pytest.raises(ForeignError, match=r"the sparsity pattern leaves out"):
        ys[-1, 2].backward()
    full = pattern | np.array([[0, 0, 0], [0, 0, 0], [1, 0, 0]], bool)
    ys = odeint_adjoint(func, y0, t, sparsity=full, jacobian="assembled", adjoint_params=(k,),
                        rtol=1e-10, atol=1e-12)
    ys[-1, 2].backward()
    dense = y0.grad.clone()
    y0.grad = None
    odeint_adjoint(func, y0, t, rtol=1e-10, atol=1e-12, adjoint_params=(k,))[-1, 2].backward()
    torch.testing.assert_close(dense, y0.grad, rtol=1e-7, atol=1e-12)
