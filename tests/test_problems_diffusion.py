"""Steady diffusion: PETSc with either multigrid reaches the residual the demo promises, with the
Dirichlet values in force. (The residual is also the operator of tests/test_petsc_solve.py.)"""
import pytest

from bridges.problems import diffusion


@pytest.mark.parametrize("pc", ["mg", "gamg"])
def test_both_multigrid_preconditioners_solve(pc):
    kappa, source, boundary = diffusion.varied_problem(40)
    T, stats = diffusion.solve_petsc(kappa, source, boundary, pc=pc)
    assert stats["pc_type"] == pc
    assert diffusion.residual_norm(T, kappa, source, boundary) <= 1e-10
    # Dirichlet values enter: the solution near the warm left wall is warm
    assert float(T[T.shape[0] // 2, 0]) > 0.5 * float(boundary[T.shape[0] // 2 + 1, 0])
