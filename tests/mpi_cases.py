"""Distributed cases for tests/test_petsc_grid.py, run as ``mpiexec -n N python mpi_cases.py OUT``.

The same code runs on any number of ranks; rank 0 gathers every solution and gradient (the
parameter gradients summed over the ranks' shares) and saves them to OUT (.npz), which the test
compares across rank counts. Tolerances are tight (rtol 1e-13) so that the comparison to 1e-10
measures the distribution, not the solvers' stopping tests.
"""
import os
import re
import sys
import time

import numpy as np
import torch

from bridges.petsc import (ColouredJacobian, Grid, PETSc, odeint_adjoint, solve,
                           sum_gradients)

F64 = torch.float64
TIGHT = {"ksp_rtol": 1e-13, "ksp_atol": 1e-50, "snes_rtol": 1e-13, "snes_atol": 1e-50}


def _field(shape, phase=0.0):
    """A smooth, non-symmetric global field: the same on every rank."""
    axes = [torch.linspace(0, 1, n, dtype=F64) for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return sum(torch.sin((3 + k) * m + phase + k) for k, m in enumerate(mesh))


def _laplacian(grid, u):
    """5-point Laplacian of the owned block, read from the ghosted block."""
    i = grid.interior
    return 4 * u[i] - u[:-2, 1:-1] - u[2:, 1:-1] - u[1:-1, :-2] - u[1:-1, 2:]


def poisson(results):
    """Linear solve, CG + the grid's geometric multigrid: x, dL/dkappa and dL/dsource."""
    grid = Grid((33, 33))
    kappa = torch.tensor(1.3, dtype=F64, requires_grad=True)
    source = _field(grid.shape).requires_grad_()

    def residual(u, kappa, source):
        return kappa * _laplacian(grid, u) - source[grid.owned]
    x = solve(residual, grid.zeros(), kappa, source, grid=grid, linear=True, symmetric=True,
              options={**TIGHT, "ksp_type": "cg", "pc_type": "mg", "snes_type": "ksponly"})
    weights = _field(grid.shape, 1.0)[grid.owned]
    ((weights * x).sum() + (x ** 2).sum()).backward()
    sum_gradients([kappa, source])
    results.update(poisson_x=grid.gather(x.detach()), poisson_kappa=kappa.grad,
                   poisson_source=source.grad)


def nonlinear(results):
    """Newton on a cubic reaction term, GMRES + GAMG: x and dL/dkappa."""
    grid = Grid((20, 28))
    kappa = torch.tensor([0.8, 2.0], dtype=F64, requires_grad=True)
    source = _field(grid.shape)[grid.owned]

    def residual(u, kappa):
        c = u[grid.interior]
        return _laplacian(grid, u) + kappa[0] * c ** 3 + kappa[1] * c - source
    x = solve(residual, grid.zeros(), kappa, grid=grid, options={**TIGHT, "pc_type": "gamg"})
    (x.sin().sum()).backward()
    sum_gradients([kappa])
    results.update(nonlinear_x=grid.gather(x.detach()), nonlinear_kappa=kappa.grad)


def heat_ode(results):
    """Implicit (CN) reaction-diffusion with TSAdjoint: y(T), dL/dy0 and dL/dkappa."""
    grid = Grid((24, 16))
    kappa = torch.tensor([0.7, 0.3], dtype=F64, requires_grad=True)

    def rhs(t, u):
        c = u[grid.interior]
        return -40 * kappa[0] * _laplacian(grid, u) - kappa[1] * c ** 3
    y0 = (0.5 * _field(grid.shape))[grid.owned].clone().requires_grad_()
    ys = odeint_adjoint(rhs, y0, torch.tensor([0.0, 0.02, 0.05], dtype=F64), method="cn",
                        step_size=0.005, grid=grid, adjoint_params=(kappa,), options=TIGHT)
    weights = _field(grid.shape, 2.0)[grid.owned]
    ((weights * ys[-1]).sum() + ys[1].square().sum()).backward()
    sum_gradients([kappa])
    results.update(ode_y=grid.gather(ys[-1].detach()), ode_y0=grid.gather(y0.grad),
                   ode_kappa=kappa.grad)


def wide_stencil(results):
    """A fourth-order Laplacian (stencil width 2) with a manufactured solution, solved by one
    linear solve with the assembled Jacobian: the solution is exact only if halo exchange and
    colouring are right across rank boundaries."""
    grid = Grid((21, 18), stencil_width=2)
    exact = _field(grid.shape)

    def apply(u):  # -u[-2] + 16 u[-1] - 30 u + 16 u[+1] - u[+2], along both axes
        i, w = grid.interior, 2
        c = u[i]
        out = 60 * c
        for axis in (0, 1):
            for shift, weight in ((-2, 1.0), (-1, -16.0), (1, -16.0), (2, 1.0)):
                index = [slice(w, -w), slice(w, -w)]
                index[axis] = slice(w + shift, u.shape[axis] - w + shift)
                out = out + weight * u[tuple(index)]
        return out + 0.5 * c * torch.arange(c.numel(), dtype=F64).view(c.shape).cos()

    rhs = grid.global_vec()  # apply(exact) on every rank's block
    grid.owned_view(rhs, "w").copy_(exact[grid.owned])
    target = apply(grid.exchange(rhs).clone())
    rhs.destroy()
    x = solve(lambda u: apply(u) - target, grid.zeros(), grid=grid, linear=True,
              options={**TIGHT, "snes_type": "ksponly", "pc_type": "bjacobi"})
    results.update(wide_x=grid.gather(x), wide_exact=exact)


def ddp(results):
    """Three SGD steps of a model trained through a distributed solve, under torch's
    DistributedDataParallel (gloo); each rank's loss is scaled by the world size, so DDP's
    average is the gradient of the total loss."""
    import torch.distributed as dist
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    port = comm.bcast(29500 + os.getpid() % 2000 if comm.rank == 0 else None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=comm.rank,
                            world_size=comm.size)
    try:
        grid = Grid((17, 17))
        coords = torch.stack([m.to(F64) / 16 for m in torch.meshgrid(
            torch.arange(17), torch.arange(17), indexing="ij")], -1)[grid.owned]

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(),
                                               torch.nn.Linear(8, 1)).double()

            def forward(self, coords):
                source = self.net(coords)[..., 0]  # rank-local work
                return solve(lambda u, s: _laplacian(grid, u) - s, grid.zeros(), source,
                             grid=grid, linear=True, symmetric=True,
                             options={**TIGHT, "ksp_type": "cg", "pc_type": "gamg"})
        model = torch.nn.parallel.DistributedDataParallel(Model())
        optimiser = torch.optim.SGD(model.parameters(), lr=0.001)
        target = _field(grid.shape)[grid.owned]
        losses = []
        for _ in range(3):
            optimiser.zero_grad()
            loss = ((model(coords) - target) ** 2).sum() / 17 ** 2  # this rank's part
            (loss * comm.size).backward()
            optimiser.step()
            losses.append(comm.allreduce(loss.item()))
        results.update(ddp_params=torch.cat([p.detach().reshape(-1)
                                             for p in model.parameters()]),
                       ddp_losses=torch.tensor(losses))
        # let gloo's worker threads finish and free their work objects before the process
        # group dies: freeing one takes the GIL, which the main thread holds while it joins
        # those threads in the group's destructor (a deadlock seen here with torch 2.13)
        dist.barrier()
        del model, optimiser
        time.sleep(0.2)
    finally:
        dist.destroy_process_group()


def brusselator(results):
    """BRUSS-2D on a periodic Grid (dof 2, CN with TSAdjoint) on 16 x 16: y at the outputs,
    dL/dy0 and dL/d(log rates)."""
    from bridges.problems.brusselator import bruss2d_grid
    problem = bruss2d_grid(16, t_end=0.2, frames=2, step_size=0.05)
    grid = problem.grid
    y0 = problem.y0.clone().requires_grad_()
    ys = problem.solve(options=TIGHT, y0=y0)
    weights = torch.stack([_field(grid.shape, phase) for phase in (0.0, 1.0)], -1)[grid.owned]
    ((weights * ys[-1]).sum() + (ys[1] ** 2).sum() / 100).backward()
    sum_gradients(problem.func.parameters())
    results.update(bruss_y=grid.gather(ys[-1].detach()), bruss_y0=grid.gather(y0.grad),
                   bruss_rates=problem.func.log_rates.grad)


def multigrid_ode(results):
    """CN steps whose Newton solves use the grid's geometric multigrid (options pc_type mg: the
    levels and Galerkin coarse operators are the grid defaults): y(T), dL/dkappa by TSAdjoint and
    by central differences of the total loss."""
    grid = Grid((33, 33))
    times = torch.tensor([0.0, 0.02, 0.05], dtype=F64)
    y0 = (0.5 * _field(grid.shape))[grid.owned]
    weights = _field(grid.shape, 2.0)[grid.owned]

    def loss(kappa):  # this rank's share
        def rhs(t, u):
            return -40 * kappa[0] * _laplacian(grid, u) - kappa[1] * u[grid.interior] ** 3
        ys = odeint_adjoint(rhs, y0, times, method="cn", step_size=0.005, grid=grid,
                            adjoint_params=(kappa,), options={**TIGHT, "pc_type": "mg"})
        return (weights * ys[-1]).sum() + ys[1].square().sum(), ys[-1]
    kappa = torch.tensor([0.7, 0.3], dtype=F64, requires_grad=True)
    share, y = loss(kappa)
    share.backward()
    sum_gradients([kappa])
    comm, h, central = PETSc.COMM_WORLD.tompi4py(), 1e-6, []
    with torch.no_grad():
        for i in range(2):
            step = torch.zeros(2, dtype=F64)
            step[i] = h
            up, down = (comm.allreduce(float(loss(kappa + s * step)[0])) for s in (1, -1))
            central.append((up - down) / (2 * h))
    results.update(mg_y=grid.gather(y.detach()), mg_kappa=kappa.grad,
                   mg_central=torch.tensor(central))


def gray_scott_like(v):
    """A 2-species reaction-diffusion right-hand side on a periodic grid's ghosted block: the
    species meet only at their own point."""
    c = v[1:-1, 1:-1]
    lap = v[:-2, 1:-1] + v[2:, 1:-1] + v[1:-1, :-2] + v[1:-1, 2:] - 4 * c
    uvv = c[..., 0] * c[..., 1] ** 2
    return torch.stack([0.3 * lap[..., 0] - uvv + 0.1 * (1 - c[..., 0]),
                        0.2 * lap[..., 1] + uvv - 0.2 * c[..., 1]], -1)


def periodic_jacobian(results):
    """The assembled Jacobian of a Gray-Scott-like function on a 16 x 16 periodic grid (dof 2:
    a power of 2, which DMDA's colouring cannot serve), with every component coupled to every
    neighbour ("full", 10 products) and with the coupling the function really has ("coupled",
    6), in forward and reverse mode: its products J x and J^T x with a fixed field, gathered in
    natural order."""
    for label, coupling, products in (("full", None, 10),
                                      ("coupled", (np.ones((2, 2)), np.eye(2)), 6)):
        grid = Grid((16, 16), dof=2, boundary="periodic", coupling=coupling)
        state, x = (torch.stack([_field(grid.shape, p), _field(grid.shape, p + 0.5)], -1)
                    for p in (0.0, 1.0))
        vec, out = grid.global_vec(), grid.global_vec()
        grid.owned_view(vec, "w").copy_(state[grid.owned])
        u = grid.exchange(vec).clone()
        grid.owned_view(vec, "w").copy_(x[grid.owned])
        for mode in ("forward", "reverse"):
            assembler = ColouredJacobian.on_grid(grid, mode=mode)
            mat = assembler.assemble(gray_scott_like, u, diag_shift=0.5, factor=-1.0,
                                     out_shape=grid.owned_shape)
            for name, product in (("mult", mat.mult), ("transpose", mat.multTranspose)):
                product(vec, out)
                results[f"jacobian_{label}_{mode}_{name}"] = grid.gather(
                    grid.owned_view(out, "r").clone())
            assert assembler.evaluations == products
            assembler.destroy()
        vec.destroy()
        out.destroy()


def partial_gradients(results):
    """sum_gradients where some ranks have no .grad for a parameter: the first rank's loss uses
    a, the last rank's b, and none uses c (the ranks' buffers were lined up by position, so a's
    and b's gradients were mixed). Totals: dL/da = 6a, dL/db = 10b, on any number of ranks."""
    grid = Grid((8, 8))
    comm = PETSc.COMM_WORLD
    kappa, a, b, c = (torch.tensor(v, dtype=F64, requires_grad=True) for v in (1.3, 0.5, 2.0, 1.0))
    x = solve(lambda u, k: k * _laplacian(grid, u) + u[grid.interior] - 1.0, grid.zeros(), kappa,
              grid=grid, linear=True, options=TIGHT)
    loss = x.square().sum()
    if comm.getRank() == 0:
        loss = loss + 3 * a ** 2
    if comm.getRank() == comm.getSize() - 1:
        loss = loss + 5 * b ** 2
    loss.backward()
    sum_gradients([kappa, a, c, b])
    assert c.grad is None
    results.update(partial_kappa=kappa.grad, partial_a=a.grad, partial_b=b.grad)


def one_rank_fails(results):
    """A NaN in one rank's block of y0 or x0, func NaN only there, a stencil wider than one
    rank's block: the rank concerned raised, and the others waited for it forever. Every rank
    raises now."""
    grid = Grid((8, 8))
    full = torch.ones(8, 8, dtype=F64)
    full[7, 7] = float("nan")  # the last row: the last rank's block
    bad = grid.scatter(full)
    t = torch.tensor([0.0, 0.1], dtype=F64)
    negative = grid.scatter(torch.where(full.isnan(), -1.0, full))  # func = sqrt(u): NaN there
    calls = [(ValueError, "y0 holds nan", lambda: odeint_adjoint(
                 lambda t, u: -_laplacian(grid, u), bad, t, method="cn", step_size=0.05,
                 grid=grid)),
             (ValueError, "x0 holds nan", lambda: solve(
                 lambda u: _laplacian(grid, u) - 1.0, bad, grid=grid)),
             (Exception, r"func\(t, y\) at t = 0 \(y = y0\) holds nan", lambda: odeint_adjoint(
                 lambda t, u: -_laplacian(grid, u) + u[grid.interior].sqrt(), negative, t,
                 method="cn", step_size=0.05, grid=grid))]
    if PETSc.COMM_WORLD.getSize() > 1:  # (3 rows on 2 or 4 ranks: a block of 1 row)
        calls.append((ValueError, r"stencil_width=2 is wider than the smallest block a rank "
                                  r"owns \(1 points", lambda: Grid((3, 3), stencil_width=2)))
    caught = 1 - len(calls)  # (1 when every call raised as expected, on any number of ranks)
    for kind, message, call in calls:
        try:
            call()
        except kind as exc:
            assert re.search(message, str(exc)), str(exc)
            caught += 1
    results.update(one_rank_fails=torch.tensor(float(caught), dtype=F64))


CASES = [periodic_jacobian, poisson, nonlinear, heat_ode, wide_stencil, brusselator, multigrid_ode,
         ddp, partial_gradients, one_rank_fails]

if __name__ == "__main__":
    out = {}
    for case in CASES:
        case(out)
    if PETSc.COMM_WORLD.getRank() == 0:
        np.savez(sys.argv[1], **{k: torch.as_tensor(v).numpy() for k, v in out.items()})
