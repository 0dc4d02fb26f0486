"""Torch Jacobians as PETSc matrices: products, assembly, and KSP/SNES solves with them."""
import numpy as np
import pytest
import scipy.sparse
import torch

from bridges.petsc import PETSc, as_vec, vec_as_tensor
from bridges.petsc._jacobian import ColouredJacobian, TorchJacobian, block_jacobian

A = torch.tensor([[4.0, 1.0, 0.5], [0.2, 3.0, -1.0], [0.0, 0.7, 5.0]], dtype=torch.float64)


def cubic(u):
    """F(u) = A u + u^3 (elementwise), Jacobian A + diag(3u^2)."""
    return A @ u + u ** 3


def cubic_jacobian(u):
    return A + torch.diag(3 * u ** 2)


def tridiagonal(u):
    return 2 * u - torch.cat([u[1:], u.new_zeros(1)]) - torch.cat([u.new_zeros(1), u[:-1]]) \
        + 0.1 * u ** 3


def tridiagonal_jacobian(u):
    n = u.numel()
    return (torch.diag(2 + 0.3 * u ** 2) - torch.diag(torch.ones(n - 1), 1)
            - torch.diag(torch.ones(n - 1), -1)).double()


def _dense(mat, n, transpose=False):
    """The matrix of a PETSc Mat, column by column through mult/multTranspose."""
    x, y = PETSc.Vec().createSeq(n), PETSc.Vec().createSeq(n)
    cols = []
    for j in range(n):
        x.zeroEntries()
        x.setValue(j, 1.0)
        x.assemble()
        (mat.multTranspose if transpose else mat.mult)(x, y)
        cols.append(vec_as_tensor(y).clone())
    return torch.stack(cols, dim=1)


def test_matrix_free_products_match_analytic_jacobian():
    u = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)
    jac = TorchJacobian((3,))
    mat = jac.mat()
    jac.at(cubic, u, diag_shift=2.0, factor=-1.5)
    expected = 2.0 * torch.eye(3, dtype=torch.float64) - 1.5 * cubic_jacobian(u)
    torch.testing.assert_close(_dense(mat, 3), expected)
    torch.testing.assert_close(_dense(mat, 3, transpose=True), expected.T)


def test_ksp_solves_with_the_matrix_free_operator():
    u = torch.tensor([0.5, 0.1, -0.4], dtype=torch.float64)
    jac = TorchJacobian((3,))
    jac.at(cubic, u)
    ksp = PETSc.KSP().create(comm=PETSc.COMM_SELF)
    ksp.setOperators(jac.mat())
    ksp.setType("gmres")
    ksp.getPC().setType("none")
    ksp.setTolerances(rtol=1e-13)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    x = torch.zeros(3, dtype=torch.float64)
    ksp.solve(as_vec(b), as_vec(x))
    torch.testing.assert_close(x, torch.linalg.solve(cubic_jacobian(u), b), rtol=1e-10, atol=0)
    xt = torch.zeros(3, dtype=torch.float64)
    ksp.solveTranspose(as_vec(b), as_vec(xt))
    torch.testing.assert_close(xt, torch.linalg.solve(cubic_jacobian(u).T, b), rtol=1e-10,
                               atol=0)


def test_snes_solves_nonlinear_system_with_torch_jacobian():
    rhs = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
    jac = TorchJacobian((3,))

    def residual(snes, X, F):
        vec_as_tensor(F, "w").copy_(cubic(vec_as_tensor(X, "r")) - rhs)

    def jacobian(snes, X, J, P):
        jac.at(cubic, vec_as_tensor(X, "r").clone())

    snes = PETSc.SNES().create(comm=PETSc.COMM_SELF)
    F = PETSc.Vec().createSeq(3)
    snes.setFunction(residual, F)
    mat = jac.mat()
    snes.setJacobian(jacobian, mat, mat)
    snes.getKSP().getPC().setType("none")
    snes.setTolerances(rtol=1e-14, atol=1e-14)
    x = torch.zeros(3, dtype=torch.float64)
    snes.solve(None, as_vec(x))
    assert snes.getConvergedReason() > 0
    torch.testing.assert_close(cubic(x), rhs, rtol=0, atol=1e-12)
    assert snes.getIterationNumber() <= 8  # Newton with the exact Jacobian


def test_coloured_assembly_is_exact_with_few_products():
    n = 40
    pattern = scipy.sparse.diags([1, 1, 1], [-1, 0, 1], shape=(n, n), dtype=bool)
    coloured = ColouredJacobian(pattern)
    u = torch.linspace(-1, 1, n, dtype=torch.float64)
    mat = coloured.assemble(tridiagonal, u, diag_shift=0.5, factor=2.0)
    assert coloured.evaluations == 3 and len(coloured.groups) == 3
    dense = torch.from_numpy(mat.convert("dense").getDenseArray().copy())
    torch.testing.assert_close(dense, 0.5 * torch.eye(n, dtype=torch.float64)
                               + 2.0 * tridiagonal_jacobian(u))


@pytest.mark.parametrize("pc", ["ilu", "lu", "gamg"])
def test_assembled_jacobian_takes_real_preconditioners(pc):
    n = 60
    pattern = scipy.sparse.diags([1, 1, 1], [-1, 0, 1], shape=(n, n), dtype=bool)
    coloured = ColouredJacobian(pattern)
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    mat = coloured.assemble(tridiagonal, u)
    ksp = PETSc.KSP().create(comm=PETSc.COMM_SELF)
    ksp.setOperators(mat)
    ksp.setType("cg" if pc != "lu" else "preonly")
    ksp.getPC().setType(pc)
    ksp.setTolerances(rtol=1e-12)
    b = torch.ones(n, dtype=torch.float64)
    x = torch.zeros(n, dtype=torch.float64)
    ksp.solve(as_vec(b), as_vec(x))
    torch.testing.assert_close(tridiagonal_jacobian(u) @ x, b, rtol=0, atol=1e-9)


def test_non_square_pattern_is_refused():
    with pytest.raises(ValueError, match="must be square, got shape \\(3, 4\\)"):
        ColouredJacobian(np.ones((3, 4), dtype=bool))


def test_block_jacobian_of_a_batch():
    def batched(y):  # each row of y is one independent sample
        return torch.stack([y[:, 0] * y[:, 1], torch.sin(y[:, 0]) + y[:, 1] ** 2], dim=1)
    y = torch.tensor([[0.5, 2.0], [-1.0, 0.3], [2.0, -0.7]], dtype=torch.float64)
    blocks = block_jacobian(y.shape)
    mat = blocks.assemble(batched, y, diag_shift=1.0, factor=-1.0)
    dense = torch.from_numpy(mat.convert("dense").getDenseArray().copy())
    expected = torch.block_diag(*[torch.eye(2, dtype=torch.float64) - torch.tensor(
        [[b, a], [np.cos(a), 2 * b]], dtype=torch.float64) for a, b in y.tolist()])
    torch.testing.assert_close(dense, expected)
