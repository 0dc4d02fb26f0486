"""bridges.flow: the MAC operators, the PETSc and FFT pressure solves, and the flow solver
(Taylor-Green convergence, divergence to the solver tolerance, gradients through unrolled
PETSc solves)."""
import math

import pytest
import torch

from bridges.flow import (FFTPoisson, Flow, PetscPoisson, advection, curl, divergence,
                          face_coordinates, gradient, laplacian, random_flow, restrict,
                          taylor_green, vorticity)

F64 = torch.float64
L = 2 * math.pi


def _randn(*shape, seed=0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


# -- discrete operators ------------------------------------------------------------------------
def test_divergence_of_gradient_is_the_five_point_laplacian_and_curls_are_solenoidal():
    n, h = 12, 0.3
    p = _randn(3, n, n)
    five_point = torch.zeros_like(p)
    for j in range(n):
        for i in range(n):
            five_point[:, j, i] = (p[:, j, (i + 1) % n] + p[:, j, i - 1] + p[:, (j + 1) % n, i]
                                   + p[:, j - 1, i] - 4 * p[:, j, i]) / h ** 2
    torch.testing.assert_close(divergence(gradient(p, h), h), five_point)
    torch.testing.assert_close(laplacian(p, h), five_point)
    assert divergence(curl(p, h), h).abs().max() < 1e-12


def test_advection_is_second_order_and_conserves_energy():
    # Taylor-Green: (u . grad) u = (sin 2x / 2, sin 2y / 2), sampled at the u and v faces
    errors = []
    for n in (16, 32, 64):
        (xu, _), (_, yv) = face_coordinates(n)
        exact = torch.stack((0.5 * torch.sin(2 * xu), 0.5 * torch.sin(2 * yv)))
        errors.append(float((advection(taylor_green(n), L / n) - exact).abs().max()))
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert min(orders) > 1.9, (errors, orders)
    # divergence form on the MAC grid: sum u . (u . grad) u = 0 for a divergence-free u
    vel = random_flow(64, 2, seed=3)
    power = (vel * advection(vel, L / 64)).sum((-3, -2, -1))
    assert power.abs().max() < 1e-10 * vel.pow(2).sum()


def test_restriction_keeps_fluxes_and_zero_divergence():
    fine = random_flow(64, 2, seed=1)
    coarse = restrict(fine, 4)
    assert coarse.shape == (2, 2, 16, 16)
    assert divergence(coarse, L / 16).abs().max() < 1e-12
    # the coarse u face at column I carries the mean of the 4 fine faces below it
    torch.testing.assert_close(coarse[1, 0, 3, 5], fine[1, 0, 12:16, 20].mean())
    with pytest.raises(ValueError, match="divisible by the factor 3"):
        restrict(fine, 3)


def test_random_flows_are_seeded_solenoidal_and_normalised():
    a, b = random_flow(64, 3, seed=7), random_flow(64, 3, seed=7)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, random_flow(64, 3, seed=8))
    assert divergence(a, L / 64).abs().max() < 1e-11
    torch.testing.assert_close(a.pow(2).mean((-3, -2, -1)).sqrt(), torch.ones(3, dtype=F64))
    # the same flow at a finer grid: restricted back it is close (resolved, smooth)
    fine = restrict(random_flow(128, 3, seed=7), 2)
    assert float((fine - a).norm() / a.norm()) < 0.02
    with pytest.raises(ValueError, match="n must be at least 64"):
        random_flow(32, 1, seed=0)


# -- pressure solves -------------------------------------------------------------------------------
def _zero_mean(b):
    return b - b.mean((-2, -1), keepdim=True)


def test_petsc_and_fft_poisson_solve_the_same_system_and_agree_on_gradients():
    n, h = 32, L / 32
    b = _zero_mean(_randn(2, n, n, seed=2)).requires_grad_()
    w = _randn(2, n, n, seed=3)
    petsc, fft = PetscPoisson(n, h), FFTPoisson(n, h)
    phi_p, phi_f = petsc(b), fft(b)
    # the FFT solution is exact: its 5-point Laplacian is b to round-off, with zero mean
    torch.testing.assert_close(laplacian(phi_f, h), b.detach(), atol=1e-10, rtol=0)
    assert phi_f.mean((-2, -1)).abs().max() < 1e-12
    assert float((phi_p - phi_f).detach().norm() / phi_f.detach().norm()) < 1e-8
    assert petsc.stats["pc_type"] == "mg" and petsc.stats["ksp_iterations"] < 20
    g_p, = torch.autograd.grad((w * phi_p).sum(), b)
    g_f, = torch.autograd.grad((w * phi_f).sum(), b)
    assert float((g_p - g_f).norm() / g_f.norm()) < 1e-7
    with pytest.raises(ValueError, match=r"PetscPoisson: expected a right-hand side of shape "
                                         r"\(\.\.\., 32, 32\), got \(16, 16\)"):
        petsc(torch.zeros(16, 16, dtype=F64))


def test_petsc_options_pass_through():
    n, h = 32, L / 32
    b = _zero_mean(_randn(n, n, seed=4))
    gamg = PetscPoisson(n, h, options={"pc_type": "gamg"})
    phi = gamg(b)
    assert gamg.stats["pc_type"] == "gamg"
    torch.testing.assert_close(phi, FFTPoisson(n, h)(b), atol=1e-9 * float(phi.abs().max()),
                               rtol=0)


@pytest.mark.parametrize("rtol", [1e-4, 1e-10])
def test_projection_is_divergence_free_to_the_solver_tolerance(rtol):
    n = 32
    flow = Flow(n, viscosity=1e-3, dt=0.03, options={"ksp_rtol": rtol})
    h = flow.h
    divergent = restrict(random_flow(64, 2, seed=5), 2) + gradient(_randn(2, n, n, seed=6), h)
    before = divergence(divergent, h).flatten(1).norm(dim=1)
    after = divergence(flow.project(divergent), h).flatten(1).norm(dim=1)
    # CG stops when the true residual h^2 |div u| <= rtol h^2 |div u*|
    assert (after <= rtol * before * (1 + 1e-6)).all(), (after / before, rtol)
    # the FFT projection, by contrast, is exact to round-off
    exact = Flow(n, viscosity=1e-3, dt=0.03, pressure="fft").project(divergent)
    assert (divergence(exact, h).flatten(1).norm(dim=1) < 1e-12 * before).all()
    if rtol == 1e-10:
        # and the flow solver's steps stay divergence-free to the tolerance
        vel = flow.step(flow.step(restrict(random_flow(64, 2, seed=5), 2)))
        scale = vel.flatten(1).norm(dim=1) / h
        assert (divergence(vel, h).flatten(1).norm(dim=1) < 1e-9 * scale).all()


# -- the flow solver -------------------------------------------------------------------------------
def test_taylor_green_decay_converges_at_second_order():
    nu, t_end, errors = 0.05, 1.0, []
    for n in (16, 32, 64):
        h = L / n
        steps = math.ceil(t_end / (0.4 * h))   # CFL 0.4, viscous number nu dt / h^2 <= 0.2
        flow = Flow(n, viscosity=nu, dt=t_end / steps)
        vel = taylor_green(n)
        with torch.no_grad():
            for _ in range(steps):
                vel = flow.step(vel)
        exact = taylor_green(n, t=t_end, viscosity=nu)
        errors.append(float((vel - exact).norm() / exact.norm()))
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert min(orders) > 1.9, (errors, orders)
    assert errors[-1] < 2e-4
    # the decay itself: 10 % of the amplitude, far above the discretisation error
    assert abs(math.exp(-2 * nu * t_end) - 1) > 100 * errors[-1]


def test_gradient_through_unrolled_petsc_solves_matches_the_fft_solver():
    """Three steps = six PETSc solves alive at once, then six adjoint solves in reverse order."""
    n = 16
    vel0 = restrict(random_flow(64, 1, seed=9), 4).requires_grad_()
    weights = _randn(1, 3, 2, n, n, seed=10)
    grads = []
    for pressure in ("petsc", "fft"):
        flow = Flow(n, viscosity=1e-2, dt=0.05, pressure=pressure,
                    **({"options": {"ksp_rtol": 1e-12}} if pressure == "petsc" else {}))
        states = flow.rollout(vel0, 3)
        grads.append(torch.autograd.grad((weights * states).sum(), vel0)[0])
    assert float((grads[0] - grads[1]).norm() / grads[1].norm()) < 1e-8


def test_rollout_adds_the_correction_after_every_step():
    flow = Flow(16, viscosity=1e-2, dt=0.05, pressure="fft")
    vel = restrict(random_flow(64, 2, seed=11), 4)
    shift = curl(_randn(16, 16, seed=12), flow.h) * 1e-3
    states = flow.rollout(vel, 2, correction=lambda u: shift)
    assert states.shape == (2, 2, 2, 16, 16)
    torch.testing.assert_close(states[:, 0], flow.step(vel) + shift)
    torch.testing.assert_close(states[:, 1], flow.step(states[:, 0]) + shift)
    assert vorticity(states[:, 1], flow.h).shape == (2, 16, 16)


def test_flow_errors_name_the_argument_and_the_fix():
    with pytest.raises(ValueError, match="unknown pressure solver 'spectral'; valid: petsc, fft"):
        Flow(16, viscosity=0.0, dt=0.1, pressure="spectral")
    with pytest.raises(ValueError, match="n must be an int >= 4"):
        Flow(2, viscosity=0.0, dt=0.1)
    with pytest.raises(ValueError, match="need viscosity >= 0 and dt > 0"):
        Flow(16, viscosity=0.0, dt=0.0)
    with pytest.raises(ValueError, match="options are PETSc options; they need pressure='petsc'"):
        Flow(16, viscosity=0.0, dt=0.1, pressure="fft", options={"pc_type": "lu"})
    flow = Flow(16, viscosity=0.0, dt=0.1, pressure="fft")
    with pytest.raises(ValueError, match=r"expected a velocity of shape \(\.\.\., 2, 16, 16\)"):
        flow.step(torch.zeros(3, 16, 16, dtype=F64))
