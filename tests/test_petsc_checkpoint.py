"""odeint_adjoint(..., checkpoints=): gradients from a budget of stored states and recomputation,
checked against the gradient over PETSc's stored trajectory, central differences, the
schedule's step count, and across MPI ranks (tests/mpi_checkpoint_cases.py)."""

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from bridges.petsc import PETSc, odeint_adjoint
from bridges.petsc._checkpoint import budget, predicted_steps

F64 = torch.float64
TIGHT = {"snes_rtol": 1e-13, "snes_atol": 1e-50}


class Forced(torch.nn.Module):
    """A nonlinear, non-autonomous system: y' = k0 A y - k1 y^3 + sin(3 t)."""

    def __init__(self, n=6):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.A = 0.5 * torch.randn(n, n, dtype=F64, generator=generator) - 2 * torch.eye(n)
        self.k = torch.nn.Parameter(torch.tensor([1.0, 0.5], dtype=F64))

    def forward(self, t, y):
        return self.k[0] * (y @ self.A.T) - self.k[1] * y ** 3 + torch.sin(3 * t)


TIMES = torch.tensor([0.1, 0.4, 0.75, 1.2], dtype=F64)  # a loss at every output time


def gradient(method, checkpoints, **kwargs):
    func = Forced()
    y0 = torch.linspace(-1, 1, 6, dtype=F64).requires_grad_()
    ys = odeint_adjoint(func, y0, TIMES, method=method, checkpoints=checkpoints, **kwargs)
    weights = torch.arange(1, len(TIMES) + 1, dtype=F64).view(-1, 1)
    (weights * ys ** 2).sum().backward()
    return ys.detach(), torch.cat([y0.grad, func.k.grad])


CASES = {  # method, step options: fixed and adaptive steps, implicit and explicit
    "cn fixed": ("cn", {"step_size": 0.02, "options": TIGHT}),
    "beuler fixed": ("beuler", {"steps_per_interval": 9, "options": TIGHT}),
    "rk4 fixed": ("rk4", {"step_size": 0.01}),
    "cn adaptive": ("cn", {"rtol": 1e-4, "atol": 1e-6, "options": TIGHT}),
    "dopri5 adaptive": ("dopri5", {"rtol": 1e-6, "atol": 1e-8}),
    "bosh3 adaptive": ("bosh3", {"rtol": 1e-5, "atol": 1e-7}),
}


@pytest.mark.parametrize("case", CASES)
def test_checkpointed_gradient_equals_the_stored_trajectory_gradient(case):
    method, kwargs = CASES[case]
    ys, reference = gradient(method, None, **kwargs)
    for checkpoints in (5, 10_000):
        ys_k, grad = gradient(method, checkpoints, **kwargs)
        torch.testing.assert_close(ys_k, ys, rtol=1e-12, atol=1e-14)
        error = ((grad - reference).abs().max() / reference.abs().max()).item()
        assert error < 1e-10, f"{case}, checkpoints={checkpoints}: {error:.2e}"


@pytest.mark.parametrize("steps", [{"step_size": 0.05}, {"rtol": 1e-6, "atol": 1e-8}])
def test_arkimex_recomputes_its_own_forward_exactly(steps):
    """Checkpointed, the ESDIRK restarts every step (see bridges/petsc/_checkpoint.py), so its
    forward differs from the stored-trajectory one by the Newton tolerance; the gradient is the
    exact one of the forward returned, whatever the budget."""
    ys, reference = gradient("arkimex", None, **steps)
    grads = []
    for checkpoints in (4, "1MB"):
        ys_k, grad = gradient("arkimex", checkpoints, **steps)
        torch.testing.assert_close(ys_k, ys, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-6)
        grads.append(grad)
    assert ((grads[1] - grads[0]).abs().max() / grads[0].abs().max()).item() < 1e-11


@pytest.mark.parametrize("steps", [dict(steps_per_interval=20), dict(rtol=1e-10, atol=1e-12)])
def test_arkimex_checkpointed_adjoint_of_a_func_of_t(steps):
    """y' = -(1 + 3t) y: y(1) = y0 exp(-2.5), so dy(1)/dy0 = exp(-2.5). After a recomputation
    ARKIMEX's restart flag stayed on, and every adjoint stage's Jacobian took the step's start
    time: 7 % off with 20 steps, 1.5 % adaptive."""
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for checkpoints in (None, 2):
        y0 = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
        ys = odeint_adjoint(lambda t, y: -(1 + 3 * t) * y, y0, t, checkpoints=checkpoints,
                            **steps)
        ys[-1].sum().backward()
        np.testing.assert_allclose(y0.grad.item(), np.exp(-2.5), rtol=1e-6)
        np.testing.assert_allclose(y0.grad.item(), ys[-1].item(), rtol=1e-9)  # (linear in y0)


def test_checkpointed_gradient_passes_gradcheck():
    A = Forced().A

    def f(y0, k):
        return odeint_adjoint(lambda t, y: k[0] * (y @ A.T) - k[1] * y ** 3 + torch.sin(3 * t),
                              y0, TIMES, method="cn", step_size=0.1, checkpoints=2,
                              adjoint_params=(k,), options=TIGHT)[1:]
    y0 = torch.linspace(-1, 1, 6, dtype=F64).requires_grad_()
    k = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    assert gradcheck(f, (y0, k), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_recomputed_steps_match_the_binomial_schedule():
    """TS steps in the backward pass, counted by PETSc's log: the schedule's optimum."""
    PETSc.Log.begin()
    event = PETSc.Log.Event("TSStep")
    func = Forced()
    y0 = torch.linspace(-1, 1, 6, dtype=F64).requires_grad_()
    for checkpoints in (1, 3, 8):
        before = event.getPerfInfo()["count"]
        ys = odeint_adjoint(func, y0, TIMES, method="rk4", step_size=0.01,
                            checkpoints=checkpoints)
        forward = event.getPerfInfo()["count"] - before
        ys.sum().backward()
        backward = event.getPerfInfo()["count"] - before - forward
        assert forward == 110  # steps of 0.01 from 0.1 to 1.2
        assert backward == predicted_steps(forward, checkpoints), checkpoints
    # the schedule is Griewank and Walther's optimum: n (n + 1) / 2 steps with one state
    from checkpoint_schedules.multistage import optimal_steps_binomial
    for checkpoints in (1, 2, 3, 8, 20):
        assert predicted_steps(110, checkpoints) == optimal_steps_binomial(110, checkpoints)
    assert predicted_steps(110, 1) == 110 * 111 // 2


def test_second_backward_recomputes_again():
    func = Forced()
    y0 = torch.linspace(-1, 1, 6, dtype=F64).requires_grad_()
    ys = odeint_adjoint(func, y0, TIMES, method="cn", step_size=0.05, checkpoints=2,
                        options=TIGHT)
    loss = (ys ** 2).sum()
    first = torch.autograd.grad(loss, (y0, func.k), retain_graph=True)
    second = torch.autograd.grad(loss, (y0, func.k))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_budget_in_bytes_counts_whole_states():
    assert budget("f", "8kB", 100) == 10  # 100 unknowns: 800 bytes a state
    assert budget("f", "1 KiB", 100) == 1
    assert budget("f", "2GB", 10 ** 6) == 250
    assert budget("f", None, 100) is None


@pytest.mark.parametrize("checkpoints, message", [
    (0, r"checkpoints=0 stores no state.*checkpoints >= 1"),
    (-3, r"checkpoints=-3 stores no state"),
    ("10B", r"checkpoints='10B' holds no state: one state of 6 unknowns takes 48 bytes"),
    ("lots", r"checkpoints='lots' is not a memory size"),
])
def test_a_budget_too_small_or_unreadable_is_refused_by_name(checkpoints, message):
    y0 = torch.ones(6, dtype=F64)
    with pytest.raises(ValueError, match=message):
        odeint_adjoint(Forced(), y0, TIMES, method="cn", step_size=0.1, checkpoints=checkpoints)


def test_checkpoints_refuse_trajectory_options_and_non_integers():
    y0 = torch.ones(6, dtype=F64)
    with pytest.raises(ValueError, match="ts_trajectory_"):
        odeint_adjoint(Forced(), y0, TIMES, checkpoints=3,
                       options={"ts_trajectory_solution_only": True})
    with pytest.raises(TypeError, match="checkpoints must be"):
        odeint_adjoint(Forced(), y0, TIMES, checkpoints=2.5)
    with pytest.raises(TypeError, match="checkpoints must be"):
        odeint_adjoint(Forced(), y0, TIMES, checkpoints=True)


# -- many ranks -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def distributed(run_under_mpiexec):
    return {ranks: run_under_mpiexec("mpi_checkpoint_cases.py", ranks) for ranks in (1, 2)}


@pytest.mark.parametrize("ranks", [1, 2])
def test_checkpointed_grid_gradient_equals_stored_on_each_rank_count(distributed, ranks):
    result = distributed[ranks]
    for key in sorted(result):
        method, checkpoints, what = key.split("_")
        if checkpoints != "all":
            reference = result[f"{method}_all_{what}"]
            error = np.abs(result[key] - reference).max() / np.abs(reference).max()
            assert error < 1e-10, f"{key} on {ranks} ranks: {error:.2e}"


def test_checkpointed_grid_gradients_agree_across_rank_counts(distributed):
    one, two = distributed[1], distributed[2]
    assert set(one) == set(two)
    for key in sorted(one):
        error = np.abs(two[key] - one[key]).max() / max(np.abs(one[key]).max(), 1e-300)
        assert error < 1e-10, f"{key}: 2 ranks differ from 1 by {error:.2e} (relative)"
