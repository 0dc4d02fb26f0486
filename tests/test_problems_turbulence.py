"""Solver in the loop's problem: the gradient of the unrolled hybrid solver through PETSc pressure
solves against central differences and the FFT solve, and memory over a long unrolled backward."""
import gc
import re

import pytest
import torch

from bridges.flow import Flow, random_flow, restrict
from bridges.problems import turbulence

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_problem(pressure, n=8):
    torch.manual_seed(0)
    net = turbulence.Correction(2 * torch.pi / n, width=4, dtype=F64)
    with torch.no_grad():  # every layer random, so that every parameter gets a gradient
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, dtype=F64))
    flow = Flow(n, viscosity=1e-2, dt=0.05, pressure=pressure,
                **({"options": {"ksp_rtol": 1e-13}} if pressure == "petsc" else {}))
    vel0 = restrict(random_flow(64, 2, seed=3), 64 // n)
    target = restrict(random_flow(64, 2, seed=4), 64 // n)[:, None].expand(2, 3, 2, n, n)
    return net, flow, vel0, target


def _loss(net, flow, vel0, target):
    return turbulence.relative_mse(flow.rollout(vel0, 3, correction=net), target)


def test_unrolled_hybrid_gradient_matches_central_differences():
    """3 hybrid steps on an 8 x 8 grid: 6 PETSc pressure solves each way."""
    net, flow, vel0, target = _tiny_problem("petsc")
    params = list(net.parameters())
    grads = torch.autograd.grad(_loss(net, flow, vel0, target), params)
    gen = torch.Generator().manual_seed(5)
    eps = 1e-5
    for _ in range(3):  # directional derivatives along random directions of all parameters
        dirs = [torch.randn(p.shape, dtype=F64, generator=gen) for p in params]
        with torch.no_grad():
            for p, d in zip(params, dirs):
                p.add_(eps * d)
            up = float(_loss(net, flow, vel0, target))
            for p, d in zip(params, dirs):
                p.sub_(2 * eps * d)
            down = float(_loss(net, flow, vel0, target))
            for p, d in zip(params, dirs):
                p.add_(eps * d)
        fd = (up - down) / (2 * eps)
        ad = float(sum((g * d).sum() for g, d in zip(grads, dirs)))
        assert abs(fd - ad) <= 1e-6 * abs(ad), (fd, ad)
    # and the whole gradient equals torch autograd through the FFT pressure solves
    net_f, flow_f, _, _ = _tiny_problem("fft")
    grads_f = torch.autograd.grad(_loss(net_f, flow_f, vel0, target), list(net_f.parameters()))
    for g, g_f in zip(grads, grads_f):
        torch.testing.assert_close(g, g_f, rtol=1e-7, atol=1e-12)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _live_solves():
    """Bridged PETSc solves not yet released: each keeps its options in the database under a
    prefix of its own (bridges<k>_) until its PETSc objects are destroyed."""
    from bridges.petsc import PETSc
    return {m.group() for key in PETSc.Options().getAll()
            if (m := re.match(r"bridges\d+_", key))}


def test_memory_stays_flat_over_200_step_unrolled_backwards():
    """200 hybrid steps = 400 PETSc solves held for backward, then 400 adjoint solves. Each solve
    is released as soon as the backward has passed it: memory does not grow during the backward
    nor from one iteration to the next, and no solve outlives it. The PC is Jacobi: with pc_type
    mg, bridges.petsc.solve on a shared grid keeps ~0.4 KB per pair of solves alive at once
    (~14 MB over a 400-solve unroll, measured; a defect of bridges.petsc, not of the flow solver),
    which would hide what this test checks."""
    n = 8
    torch.manual_seed(0)
    net = turbulence.Correction(2 * torch.pi / n, width=4)
    torch.nn.init.normal_(net.body[-1].weight, std=0.01)
    flow = Flow(n, viscosity=1e-2, dt=0.05, options={"pc_type": "jacobi"})
    vel0 = restrict(random_flow(64, 1, seed=3), 64 // n)
    idle = _live_solves()

    def iteration():
        """Returns the solves alive before the backward and the resident memory when it starts
        and as it passes steps 200, 160, ..., 40."""
        steps, memory = [], []

        def corrected(vel):
            out = net(vel)
            steps.append(None)
            if len(steps) % 40 == 0:
                out.register_hook(lambda grad: memory.append(_rss_bytes()))
            return out
        net.zero_grad()
        states = flow.rollout(vel0, 200, correction=corrected)
        alive = len(_live_solves() - idle)
        memory.append(_rss_bytes())
        states.pow(2).mean().backward()
        del states
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in net.parameters())
        return alive, memory

    iteration()  # warm up: allocators and caches reach a 200-step unroll's high-water mark
    gc.collect()
    before = _rss_bytes()
    alive, during = iteration()
    gc.collect()
    assert alive == 2 * 199  # the solves of steps 2-200 await the backward (step 1's has no
    # input that needs a gradient: released at once) ...
    assert _live_solves() == idle  # ... and none is left after it
    assert len(during) == 6
    rise = max(during) - during[0]
    assert rise < 2 * 2 ** 20, f"resident memory rose by {rise / 2 ** 20:.1f} MB in the backward"
    grown = _rss_bytes() - before
    assert grown < 4 * 2 ** 20, f"resident memory grew by {grown / 2 ** 20:.1f} MB"
    assert flow.poisson.stats["ksp_iterations"] > 0
