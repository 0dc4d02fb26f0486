"""ODESolver: one solver object called many times reuses its PETSc objects, stays exact, keeps
flat memory, reports what each call did, and frees everything when it and its pullbacks go."""
import gc

import pytest
import torch

from bridges.petsc import ODESolver, ODEStats, PETSc, odeint_adjoint
from bridges.petsc import _ode

F64 = torch.float64


class Decay(torch.nn.Module):
    """y1' = -a y1 + y2, y2' = -b y2: y(t) in closed form."""

    def __init__(self):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor([0.5, 2.0], dtype=F64))

    def forward(self, t, y):
        return torch.stack([-self.k[0] * y[0] + y[1], -self.k[1] * y[1]])


def _exact(k, y0, t):
    a, b = k
    y2 = y0[1] * torch.exp(-b * t)
    y1 = (y0[0] - y0[1] / (a - b)) * torch.exp(-a * t) + y0[1] / (a - b) * torch.exp(-b * t)
    return torch.stack([y1, y2], dim=-1)


@pytest.fixture
def made(monkeypatch):
    """Counts the runs (TS, matrices, vectors and options) made."""
    count = [0]
    original = _ode._ODESolve.__init__

    def counting(self, *args, **kwargs):
        count[0] += 1
        original(self, *args, **kwargs)
    monkeypatch.setattr(_ode._ODESolve, "__init__", counting)
    return count


def _live(cls):
    return sum(type(o) is cls for o in gc.get_objects())


def _gradients(call, func, y0, t):
    func.zero_grad()
    y0 = y0.clone().requires_grad_()
    ys = call(func, y0, t)
    (ys[-1] * torch.tensor([1.0, 3.0], dtype=F64)).sum().backward()
    return ys.detach(), func.k.grad.clone(), y0.grad.clone()


def test_later_calls_reuse_the_first_calls_objects_and_match_fresh_solves(made):
    settings = dict(rtol=1e-9, atol=1e-12)
    func, solver = Decay(), ODESolver("arkimex", **settings)
    for y0, t in [([1.0, 1.0], [0.0, 0.5, 1.0]), ([2.0, -1.0], [0.0, 2.0]),
                  ([0.5, 0.25], [1.0, 1.5, 2.0, 4.0])]:
        y0, t = torch.tensor(y0, dtype=F64), torch.tensor(t, dtype=F64)
        reused = _gradients(solver, func, y0, t)
        fresh = _gradients(lambda *a: odeint_adjoint(*a, **settings), func, y0, t)
        for a, b in zip(reused, fresh):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(reused[0], _exact(func.k.detach(), y0, t - t[0]), rtol=1e-6,
                                   atol=1e-8)
    assert made[0] == 1 + 3  # the solver's one run, and one per functional call


def test_a_call_waiting_for_backward_keeps_its_run_and_the_next_call_makes_another(made):
    func, solver = Decay(), ODESolver("cn", steps_per_interval=8)
    y0, t = torch.tensor([1.0, 1.0], dtype=F64), torch.linspace(0, 1, 3, dtype=F64)
    first, second = solver(func, y0, t), solver(func, 2 * y0, t)
    assert made[0] == 2
    (g1,) = torch.autograd.grad(first[-1, 0], func.k)
    (g2,) = torch.autograd.grad(second[-1, 0], func.k)
    torch.testing.assert_close(g2, 2 * g1, rtol=1e-12, atol=0)  # linear in y0
    solver(func, y0, t)[-1, 0].backward()
    assert made[0] == 2  # one of the two idle runs served it
    other = Decay()  # another function: its own run
    solver(other, y0, t)
    assert made[0] == 3


@pytest.mark.parametrize("settings", [{}, {"checkpoints": 3}, {"method": "dopri5"}])
def test_a_backward_that_failed_midway_is_not_retried_on_a_broken_run(made, settings):
    """func raising once in the adjoint (a transient error, or Ctrl-C), then the same graph
    differentiated again: the retry met PETSc's half-consumed trajectory ("object in the wrong
    state"). It now says what happened; the run is released, and the solver's next call makes
    a new one whose gradient is right."""
    class Flaky(Decay):
        fail = False

        def forward(self, t, y):
            if self.fail:
                raise RuntimeError("transient")
            return super().forward(t, y)
    func, solver = Flaky(), ODESolver(**settings)
    y0, t = torch.tensor([1.0, 1.0], dtype=F64), torch.linspace(0, 1, 3, dtype=F64)
    loss = solver(func, y0, t)[-1].sum()
    func.fail = True
    with pytest.raises(Exception, match="transient"):
        torch.autograd.grad(loss, func.k, retain_graph=True)
    func.fail = False
    with pytest.raises(RuntimeError, match=r"odeint_adjoint \(backward\): an earlier backward "
                                           r"through these outputs failed midway \(.*transient"
                                           r"\).*run the forward solve again"):
        torch.autograd.grad(loss, func.k)
    assert made[0] == 1
    reused = _gradients(solver, func, y0, t)
    assert made[0] == 2
    fresh = _gradients(lambda *a: odeint_adjoint(*a, **settings), func, y0, t)
    for a, b in zip(reused, fresh):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_stats_describe_the_last_call_and_its_adjoint():
    func, solver = Decay(), ODESolver("beuler", steps_per_interval=5)
    y0, t = torch.tensor([1.0, 1.0], dtype=F64), torch.linspace(0, 1, 4, dtype=F64)
    assert solver.stats is None
    ys = solver(func, y0, t)
    stats = solver.stats
    assert isinstance(stats, ODEStats)
    assert stats.steps == 15 and stats.rejections == 0
    assert stats.newton_iterations >= stats.steps and stats.linear_iterations >= stats.steps
    assert stats.func_calls >= stats.newton_iterations + stats.steps  # F before each update
    assert 1 <= stats.jacobians <= stats.newton_iterations
    assert stats.adjoint_steps == 0
    ys.sum().backward()
    assert stats.adjoint_steps == 15 and stats.adjoint_jacobians >= 15
    assert stats.parameter_products >= 15
    solver(func, y0, torch.linspace(0, 1, 2, dtype=F64))
    assert solver.stats.steps == 5 and solver.stats is not stats


def _petsc_objects():
    return sum(issubclass(type(o), PETSc.Object) for o in gc.get_objects())


def test_a_thousand_calls_make_petsc_objects_once_and_keep_memory_flat(made, memory_growth):
    func, solver = Decay(), ODESolver("cn", steps_per_interval=2)
    y0, t = torch.tensor([1.0, 1.0], dtype=F64), torch.linspace(0, 1, 3, dtype=F64)
    objects = []

    def call(i):
        solver(func, y0, t)[-1].sum().backward()
        if i == 0:
            objects.append(_petsc_objects())
    grown = memory_growth(call, 800)
    gc.collect()
    assert made[0] == 1 and _petsc_objects() == objects[-1]
    assert grown < 8 << 20, f"resident memory grew by {grown / 2**20:.2f} MB"


def test_the_functional_loop_keeps_memory_flat_and_frees_each_call(memory_growth):
    func = Decay()
    y0, t = torch.tensor([1.0, 1.0], dtype=F64), torch.linspace(0, 1, 3, dtype=F64)

    def call(i):
        odeint_adjoint(func, y0, t, method="cn", steps_per_interval=2)[-1].sum().backward()
    grown = memory_growth(call, 400, warm_up=100)
    assert _live(_ode._ODESolve) == 0
    assert grown < 8 << 20, f"resident memory grew by {grown / 2**20:.2f} MB"


def test_objects_go_with_the_solver_and_its_last_pullback():
    func = Decay()
    y0, t = torch.tensor([1.0, 1.0], dtype=F64), torch.linspace(0, 1, 3, dtype=F64)
    gc.collect()
    gc.disable()
    try:
        solver = ODESolver("cn", step_size=0.1)
        solver(func, y0, t)[-1].sum().backward()
        assert _live(_ode._ODESolve) == 1  # idle, kept for the next call
        ys = solver(func, y0, t)
        del solver  # the pending pullback keeps its run until it goes
        assert _live(_ode._ODESolve) == 1
        ys.sum().backward()
        assert _live(_ode._ODESolve) == 0
    finally:
        gc.enable()


def test_settings_are_checked_when_the_solver_is_made():
    with pytest.raises(ValueError, match="odeint_adjoint: unknown method 'rk5'"):
        ODESolver("rk5")
    with pytest.raises(ValueError, match="give step_size or steps_per_interval, not both"):
        ODESolver("cn", step_size=0.1, steps_per_interval=2)
    with pytest.raises(ValueError, match="unknown jacobian 'dense'"):
        ODESolver(jacobian="dense")
    with pytest.raises(ValueError, match="rk4 has no error estimate"):
        ODESolver("rk4")
