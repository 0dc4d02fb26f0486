"""Checkpointed ODE adjoints on a Grid for tests/test_petsc_checkpoint.py, run as
``mpiexec -n N python mpi_checkpoint_cases.py OUT``.

A reaction-diffusion problem integrated with fixed (cn) and adaptive (dopri5) steps, its gradient
over PETSc's stored trajectory and from a few checkpoint budgets; rank 0 gathers every gradient
(parameter gradients summed over the ranks' shares) into OUT (.npz) as
``{method}_{budget}_{y0|kappa}``.
"""
import sys

import numpy as np
import torch

from bridges.petsc import Grid, PETSc, odeint_adjoint, sum_gradients

F64 = torch.float64
TIGHT = {"ksp_rtol": 1e-13, "ksp_atol": 1e-50, "snes_rtol": 1e-13, "snes_atol": 1e-50}
RUNS = {"cn": ({"step_size": 0.004, "options": TIGHT}, ("all", 2, 5)),
        "dopri5": ({"rtol": 1e-7, "atol": 1e-9}, ("all", 3))}


def _field(shape, phase=0.0):
    axes = [torch.linspace(0, 1, n, dtype=F64) for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return sum(torch.sin((3 + k) * m + phase + k) for k, m in enumerate(mesh))


def gradients(grid, method, checkpoints, kwargs):
    kappa = torch.tensor([0.7, 0.3], dtype=F64, requires_grad=True)
    i = grid.interior

    def rhs(t, u):
        c = u[i]
        lap = 4 * c - u[:-2, 1:-1] - u[2:, 1:-1] - u[1:-1, :-2] - u[1:-1, 2:]
        return -20 * kappa[0] * lap - kappa[1] * c ** 3 + torch.cos(5 * t)
    y0 = (0.5 * _field(grid.shape))[grid.owned].clone().requires_grad_()
    t = torch.tensor([0.0, 0.02, 0.05, 0.08], dtype=F64)
    ys = odeint_adjoint(rhs, y0, t, method=method, grid=grid, adjoint_params=(kappa,),
                        checkpoints=None if checkpoints == "all" else checkpoints, **kwargs)
    weights = _field(grid.shape, 2.0)[grid.owned]
    ((weights * ys[-1]).sum() + (ys[1:-1] ** 2).sum()).backward()
    sum_gradients([kappa])
    return grid.gather(y0.grad), kappa.grad


if __name__ == "__main__":
    grid = Grid((20, 14))
    out = {}
    for method, (kwargs, budgets) in RUNS.items():
        for checkpoints in budgets:
            y0_grad, kappa_grad = gradients(grid, method, checkpoints, kwargs)
            out[f"{method}_{checkpoints}_y0"], out[f"{method}_{checkpoints}_kappa"] = \
                y0_grad, kappa_grad
    if PETSc.COMM_WORLD.getRank() == 0:
        np.savez(sys.argv[1], **{k: torch.as_tensor(v).numpy() for k, v in out.items()})
