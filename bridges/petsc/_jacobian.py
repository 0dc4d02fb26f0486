"""Jacobians of torch functions as PETSc matrices.

- `TorchJacobian`: a matrix-free PETSc Mat (type python) for A = diag_shift*I + factor*dF/du at a
  point:
  `mult` is a Jacobian-vector product and `multTranspose` a vector-Jacobian product, both from
  torch autograd on zero-copy views of PETSc's vectors. SNES, KSP and TS can all use it.
- `ColouredJacobian`: the exact sparse Jacobian assembled as a PETSc AIJ matrix from one JVP per
  colour of a known sparsity pattern, so that real preconditioners (ILU, GAMG, LU) apply.
- `BlockJacobian`: the block-diagonal Jacobian of a function acting on independent samples.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse
import torch

from .._fd import color_columns
from ._runtime import PETSc
from ._vec import vec_as_tensor


class _Linearisation:
    """fn at one point u with its autograd graph kept, for many Jacobian products there.

    Reverse mode gives vjp(x) directly; jvp(v) is the derivative of the vjp with respect to its
    cotangent (double backward), which on the CPU costs far less than torch's forward mode."""

    def __init__(self, fn, u):
        with torch.enable_grad():
            self.u = u.detach().requires_grad_()
            self.value = fn(self.u)
        self._cotangent = self._vjp_graph = None

    def vjp(self, x, batched=False):
        (g,) = torch.autograd.grad(self.value, self.u, x, retain_graph=True,
                                   is_grads_batched=batched)
        return g

    def jvp(self, v, batched=False):
        if self._vjp_graph is None:
            with torch.enable_grad():
                self._cotangent = torch.zeros_like(self.value, requires_grad=True)
                (self._vjp_graph,) = torch.autograd.grad(self.value, self.u, self._cotangent,
                                                         create_graph=True)
        (g,) = torch.autograd.grad(self._vjp_graph, self._cotangent, v, retain_graph=True,
                                   is_grads_batched=batched)
        return g


def _jvp(fn, u, v):
    """dfn/du(u) v."""
    return _Linearisation(fn, u).jvp(v)


class TorchJacobian:
    """Context of a python-type PETSc Mat: A = diag_shift*I + factor*dfn/du at u.

    Call `at(fn, u, diag_shift, factor)` to move the linearisation point (e.g. from a Jacobian
    callback); `fn` maps a tensor shaped like u to a tensor with as many elements.
    """

    def __init__(self, shape):
        self.shape = tuple(shape)
        self.fn = self.u = self._lin = None
        self.diag_shift, self.factor = 0.0, 1.0

    def at(self, fn, u, diag_shift=0.0, factor=1.0):
        self.fn, self.u, self.diag_shift, self.factor, self._lin = fn, u, diag_shift, factor, None

    def mat(self, comm=None):
        """A new PETSc Mat backed by this context."""
        n = int(np.prod(self.shape))
        mat = PETSc.Mat().createPython([n, n], self, comm=comm or PETSc.COMM_SELF)
        mat.setUp()
        return mat

    def _product(self, x, y, transpose):
        if self._lin is None:  # one graph serves every product at this point
            self._lin = _Linearisation(self.fn, self.u)
        xt = vec_as_tensor(x, "r").view(self.shape)
        product = self._lin.vjp(xt) if transpose else self._lin.jvp(xt)
        out = vec_as_tensor(y, "w").view(self.shape)
        torch.mul(product.view(self.shape), self.factor, out=out)
        if self.diag_shift:
            out.add_(xt, alpha=self.diag_shift)

    def mult(self, mat, x, y):
        self._product(x, y, transpose=False)

    def multTranspose(self, mat, x, y):
        self._product(x, y, transpose=True)

    # PETSc rescales and shifts the operator in place for some TS types (e.g. ARKIMEX)
    def scale(self, mat, a):
        self.diag_shift, self.factor = self.diag_shift * a, self.factor * a

    def shift(self, mat, a):
        self.diag_shift += a


class ColouredJacobian:
    """Assembles A = diag_shift*I + factor*dfn/du into a PETSc AIJ matrix from coloured JVPs.

    Args:
        pattern: N x N sparsity pattern (scipy sparse or boolean array) of dfn/du, N = u.numel().
        groups: column groups that share no row (default: greedy colouring of the pattern; a
            stencil's closed-form colouring is much faster to get on large grids).
        block_size: set on the matrix, e.g. for point-block Jacobi.
    """

    def __init__(self, pattern, *, groups=None, block_size=1, comm=None):
        pattern = scipy.sparse.csr_matrix(pattern, dtype=bool)
        if pattern.shape[0] != pattern.shape[1]:
            raise ValueError(f"ColouredJacobian: the sparsity pattern must be square, got shape "
                             f"{pattern.shape}")
        n = pattern.shape[0]
        self.pattern = (pattern + scipy.sparse.identity(n, dtype=bool, format="csr")).tocsr()
        self.pattern.sort_indices()
        self.groups = color_columns(self.pattern) if groups is None else list(groups)
        colour = np.empty(n, dtype=np.int64)
        for c, cols in enumerate(self.groups):
            colour[cols] = c
        self._seeds = np.zeros((len(self.groups), n))
        self._seeds[colour, np.arange(n)] = 1.0
        # entry (i, j) of the Jacobian is entry i of the product for column j's colour
        rows = np.repeat(np.arange(n), np.diff(self.pattern.indptr))
        self._take = (torch.from_numpy(colour[self.pattern.indices]), torch.from_numpy(rows))
        self._diagonal = np.flatnonzero(rows == self.pattern.indices)
        self._indptr = self.pattern.indptr.astype(PETSc.IntType)
        self._indices = self.pattern.indices.astype(PETSc.IntType)
        self.mat = PETSc.Mat().createAIJ([n, n], nnz=np.diff(self._indptr),
                                         comm=comm or PETSc.COMM_SELF)
        if block_size > 1:
            self.mat.setBlockSize(block_size)
        self.mat.setOption(PETSc.Mat.Option.NEW_NONZERO_ALLOCATION_ERR, True)
        self.evaluations = 0

    def assemble(self, fn, u, diag_shift=0.0, factor=1.0):
        """Fill the matrix with diag_shift*I + factor*dfn/du at u; returns the PETSc Mat."""
        seeds = torch.from_numpy(self._seeds).to(u.dtype).view(len(self.groups), *u.shape)
        products = _Linearisation(fn, u).jvp(seeds, batched=True).reshape(len(self.groups), -1)
        self.evaluations += len(self.groups)
        values = products[self._take].numpy() * factor
        values[self._diagonal] += diag_shift
        self.mat.zeroEntries()
        self.mat.setValuesCSR(self._indptr, self._indices, values)
        self.mat.assemble()
        return self.mat


def block_diagonal_pattern(n_blocks: int, block: int):
    """Sparsity of n_blocks independent blocks of size block (e.g. a batch of small systems)."""
    return scipy.sparse.kron(scipy.sparse.identity(n_blocks, dtype=bool),
                             np.ones((block, block), dtype=bool), format="csc")


class BlockJacobian:
    """A = diag_shift*I + factor*dfn/du for fn acting on independent samples: u has shape
    (..., n) and each length-n row only affects its own output row. The n x n blocks come from n
    reverse-mode products with one forward pass, into a block-diagonal PETSc AIJ matrix."""

    def __init__(self, shape, *, comm=None):
        self.shape = tuple(shape)
        self.block = self.shape[-1] if self.shape else 1
        n = int(np.prod(self.shape))
        self.count = n // self.block
        pattern = block_diagonal_pattern(self.count, self.block).tocsr()
        pattern.sort_indices()
        self.mat = PETSc.Mat().createAIJ([n, n], nnz=np.full(n, self.block, dtype=PETSc.IntType),
                                         comm=comm or PETSc.COMM_SELF)
        self.mat.setBlockSize(self.block)
        self._indptr = pattern.indptr.astype(PETSc.IntType)
        self._indices = pattern.indices.astype(PETSc.IntType)
        self._eye = torch.eye(self.block, dtype=torch.float64)

    def blocks(self, fn, u):
        """The (count, n, n) Jacobian blocks of fn at u."""
        seeds = self._eye[:, None, :].expand(self.block, self.count, self.block).to(u.dtype)
        rows = _Linearisation(fn, u.reshape(self.count, self.block)).vjp(seeds, batched=True)
        return rows.transpose(0, 1)  # rows[j, b] is row j of block b

    def assemble(self, fn, u, diag_shift=0.0, factor=1.0):
        """Fill the matrix with diag_shift*I + factor*dfn/du at u; returns the PETSc Mat."""
        values = self.blocks(lambda v: fn(v.reshape(self.shape)).reshape(self.count, self.block),
                             u) * factor + diag_shift * self._eye
        self.mat.setValuesCSR(self._indptr, self._indices, values.reshape(-1).numpy())
        self.mat.assemble()
        return self.mat
