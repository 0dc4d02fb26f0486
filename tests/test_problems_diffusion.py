"""Steady diffusion: PETSc with either multigrid reaches the residual the demo promises, with the
Dirichlet values in force; geometric multigrid keeps its iterations flat as the grid grows, and
grid sizes it cannot coarsen are warned about or (by default) sent to GAMG. (The residual is also
the operator of tests/test_petsc_solve.py.)"""
import warnings

import pytest

from bridges.problems import diffusion


@pytest.mark.parametrize("pc", ["mg", "gamg"])
def test_both_multigrid_preconditioners_solve(pc):
    kappa, source, boundary = diffusion.varied_problem(35)
    T, stats = diffusion.solve_petsc(kappa, source, boundary, pc=pc)
    assert stats["pc_type"] == pc
    assert diffusion.residual_norm(T, kappa, source, boundary) <= 1e-10
    # Dirichlet values enter: the solution near the warm left wall is warm
    assert float(T[T.shape[0] // 2, 0]) > 0.5 * float(boundary[T.shape[0] // 2 + 1, 0])


def test_geometric_multigrid_iterations_do_not_grow_with_the_grid():
    # 33^2 -> 257^2 unknowns: 64x the unknowns; CG alone (or multigrid of one level) would need
    # about 8x the iterations
    its = {}
    for n in (35, 259):
        kappa, source = diffusion.seed_problem(n)
        T, stats = diffusion.solve_petsc(kappa, source, pc="mg")
        assert diffusion.residual_norm(T, kappa, source) <= 1e-10
        its[n] = stats["ksp_iterations"]
    assert its[259] <= its[35] + 3 and its[259] <= 15, its


def test_sizes_multigrid_cannot_coarsen_warn_or_take_gamg():
    kappa, source = diffusion.seed_problem(40)  # 38 unknowns per axis: 37 is odd
    with pytest.warns(UserWarning, match=r"pc_type mg on a grid of shape \(38, 38\) has 1 level.*"
                                         r"such as \(65, 65\).*gamg"):
        T, stats = diffusion.solve_petsc(kappa, source, pc="mg")
    assert diffusion.residual_norm(T, kappa, source) <= 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        T, stats = diffusion.solve_petsc(kappa, source)  # the default: GAMG for this size
    assert stats["pc_type"] == "gamg" and diffusion.residual_norm(T, kappa, source) <= 1e-10
