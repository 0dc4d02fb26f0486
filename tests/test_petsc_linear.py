"""bridges.petsc._linear: pivoted block LU as a real PETSc PC, and the guard on adjoint solves."""
import numpy as np
import pytest
import torch

from bridges import SolverFailure
from bridges.petsc import PETSc, as_vec, vec_as_tensor
from bridges.petsc._jacobian import block_jacobian
from bridges.petsc._linear import IllConditionedError, check_solution, use_block_lu

F64 = torch.float64


def _block_system(blocks):
    """A PETSc AIJ matrix holding `blocks` (count, n, n) on its diagonal, and a preonly KSP whose
    PC is a BlockLU."""
    count, n, _ = blocks.shape
    assembler = block_jacobian((count, n), mode="reverse")
    assembler.set_dense(torch.block_diag(*blocks))
    ksp = PETSc.KSP().create(comm=PETSc.COMM_SELF)
    ksp.setType("preonly")
    ksp.setOperators(assembler.mat)
    context = use_block_lu(ksp, "test")
    return assembler, ksp, context


def _solve(ksp, b, transpose):
    x = torch.zeros_like(b)
    (ksp.solveTranspose if transpose else ksp.solve)(as_vec(b), as_vec(x))
    return x


@pytest.mark.parametrize("count", [1, 5, 12])  # LAPACK per block up to 8, torch batched above
@pytest.mark.parametrize("transpose", [False, True])
def test_block_lu_solves_every_block_like_a_dense_solver(transpose, count):
    g = torch.Generator().manual_seed(0)
    blocks = torch.randn(count, 4, 4, generator=g, dtype=F64) + 4 * torch.eye(4, dtype=F64)
    b = torch.randn(count * 4, generator=g, dtype=F64)
    assembler, ksp, context = _block_system(blocks)
    try:
        x = _solve(ksp, b, transpose)
        dense = torch.block_diag(*blocks)
        expected = torch.linalg.solve(dense.T if transpose else dense, b)
        torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)
        _solve(ksp, b, transpose)
        assert context.factorisations == 1  # factored once for both solves
    finally:
        ksp.destroy()
        assembler.destroy()


def _wilkinson(n):
    """Wilkinson's matrix: partial pivoting does not pivot and the LU factors grow as 2^(n-1)."""
    a = np.eye(n) - np.tril(np.ones((n, n)), -1)
    a[:, -1] = 1.0
    return a


@pytest.mark.parametrize("copies", [1, 9])
@pytest.mark.parametrize("n", [40, 60])
def test_guard_refines_to_the_exact_answer_or_raises(n, copies):
    """An ill-conditioned factorisation (element growth 2^39 and 2^59): the plain LU solve is
    visibly wrong; the guarded transposed solve either refines to the exact answer or raises."""
    a = _wilkinson(n)
    x_true = np.random.default_rng(n).standard_normal(n)
    b = torch.from_numpy((a.T.astype(np.longdouble) @ x_true).astype(np.float64))
    lu, pivots = torch.linalg.lu_factor(torch.from_numpy(a))
    plain = torch.linalg.lu_solve(lu, pivots, b.view(n, 1), adjoint=True).view(n).numpy()
    assert np.abs(plain - x_true).max() > 1e-6  # the case really defeats plain LU
    b, x_true = b.repeat(copies), np.tile(x_true, copies)
    assembler, ksp, context = _block_system(torch.from_numpy(a).expand(copies, n, n))
    try:
        try:
            x = _solve(ksp, b, transpose=True)
        except PETSc.Error as error:  # raised inside the PC: PETSc passes it on as its cause
            assert isinstance(error.__cause__, IllConditionedError)
            assert "backward error" in str(error.__cause__)
            assert isinstance(error.__cause__, SolverFailure)
        else:
            assert context.refinements >= 1
            np.testing.assert_allclose(x.numpy(), x_true, rtol=0, atol=1e-12)
    finally:
        ksp.destroy()
        assembler.destroy()


def test_singular_block_is_named():
    blocks = torch.stack([torch.eye(2, dtype=F64), torch.zeros(2, 2, dtype=F64)])
    assembler, ksp, _ = _block_system(blocks)
    try:
        with pytest.raises(PETSc.Error) as info:
            _solve(ksp, torch.ones(4, dtype=F64), transpose=False)
        assert "sample 1 is singular" in str(info.value.__cause__)
    finally:
        ksp.destroy()
        assembler.destroy()


def test_check_solution_catches_a_solve_that_is_not_one():
    """preonly with PC Jacobi on a non-diagonal matrix claims success; the guard does not."""
    a = np.array([[4.0, 1.0], [2.0, 3.0]])
    mat = PETSc.Mat().createDense([2, 2], array=a.copy(), comm=PETSc.COMM_SELF)
    ksp = PETSc.KSP().create(comm=PETSc.COMM_SELF)
    ksp.setType("preonly")
    ksp.getPC().setType("jacobi")
    ksp.setOperators(mat)
    b, x = as_vec(torch.tensor([1.0, 1.0], dtype=F64)), as_vec(torch.zeros(2, dtype=F64))
    try:
        ksp.solveTranspose(b, x)
        assert ksp.getConvergedReason() > 0
        with pytest.raises(IllConditionedError, match=r"left a residual \|b - A\^T x\|"):
            check_solution(ksp, b, x, "test", "an adjoint solve", transpose=True)
        ksp.setType("gmres")
        ksp.setTolerances(rtol=1e-12)
        ksp.solveTranspose(b, x)
        check_solution(ksp, b, x, "test", "an adjoint solve", transpose=True)  # passes
        np.testing.assert_allclose(vec_as_tensor(x, "r").numpy(), np.linalg.solve(a.T, [1, 1]),
                                   rtol=1e-10)
    finally:
        for obj in (ksp, mat, b, x):
            obj.destroy()

