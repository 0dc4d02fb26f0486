"""Jacobians of torch functions as PETSc matrices, from forward- or reverse-mode products
(bridges._linearise), never from double backward, so bridged ops may sit inside the function.

- `TorchJacobian`: a matrix-free PETSc Mat (type python) for A = diag_shift*I + factor*dF/du at a
  point: `mult` is a forward-mode product (or a finite-difference one where some op has no
  forward mode), `multTranspose` a reverse-mode one.
- `ColouredJacobian`: the exact sparse Jacobian as a PETSc AIJ matrix, from one product per
  colour of a known sparsity pattern (columns coloured for forward mode, rows for reverse mode),
  so that real preconditioners (ILU, GAMG, LU) apply.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse
import torch

from .._fd import color_columns
from .._linearise import Linearisation, choose, probe
from ._runtime import PETSc
from ._vec import vec_as_tensor


class TorchJacobian:
    """Context of a python-type PETSc Mat: A = diag_shift*I + factor*dfn/du at u.

    Call `at(fn, u, diag_shift, factor)` to move the linearisation point (e.g. from a Jacobian
    callback); `fn` maps a tensor shaped like u to a tensor with as many elements. `mult` is a
    forward-mode product, or with ``products="fd"`` a finite-difference one (for functions with
    an op that has no forward mode); `multTranspose` is always a reverse-mode product.
    """

    def __init__(self, shape, products="forward"):
        if products not in ("forward", "fd"):
            raise ValueError(f"TorchJacobian: products must be 'forward' or 'fd', got "
                             f"{products!r}")
        self.products = products
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
        if self.fn is None:  # a zeroed operator (e.g. the one TS duplicates for a zero RHS)
            vec_as_tensor(y, "w").copy_(vec_as_tensor(x, "r")).mul_(self.diag_shift)
            return
        if self._lin is None:  # one linearisation serves every product at this point
            self._lin = Linearisation(self.fn, self.u)
        xt = vec_as_tensor(x, "r").view(self.shape)
        if transpose:
            product = self._lin.vjp(xt)
        else:
            product = self._lin.jvp(xt) if self.products == "forward" else self._lin.fd_jvp(xt)
        out = vec_as_tensor(y, "w").view(self.shape)
        torch.mul(product.view(self.shape), self.factor, out=out)
        if self.diag_shift:
            out.add_(xt, alpha=self.diag_shift)

    def mult(self, mat, x, y):
        self._product(x, y, transpose=False)

    def multTranspose(self, mat, x, y):
        self._product(x, y, transpose=True)

    # PETSc duplicates, zeroes, rescales and shifts the operator for some TS types (ARKIMEX)
    def duplicate(self, mat, op):
        return TorchJacobian(self.shape, self.products).mat(mat.getComm())

    def zeroEntries(self, mat):
        self.at(None, None, 0.0, 1.0)

    def scale(self, mat, a):
        self.diag_shift, self.factor = self.diag_shift * a, self.factor * a

    def shift(self, mat, a):
        self.diag_shift += a


def _groups_to_colours(groups, n):
    colour = np.full(n, -1, dtype=np.int64)
    for c, cols in enumerate(groups):
        colour[np.asarray(cols, dtype=np.int64)] = c
    if (colour < 0).any():
        raise ValueError(f"ColouredJacobian: the groups leave column(s) "
                         f"{np.flatnonzero(colour < 0)[:10].tolist()} without a colour")
    return colour


class ColouredJacobian:
    """Assembles A = diag_shift*I + factor*dfn/du into a PETSc AIJ matrix from coloured products.

    Args:
        pattern: N x N sparsity pattern (scipy sparse or boolean array) of dfn/du, N = u.numel().
        groups: column groups that share no row (default: greedy colouring of the pattern).
        block_size: set on the matrix, e.g. for point-block Jacobi.
        mode: ``"forward"`` (one forward-mode product per column colour), ``"reverse"`` (one
            reverse-mode product per row colour: works when some op in the function has only a
            pullback) or ``"auto"``: forward where every op has a forward mode and it measured
            faster (see bridges._linearise), reverse otherwise. Decided at the first assembly.
    """

    def __init__(self, pattern, *, groups=None, block_size=1, comm=None, mode="auto"):
        pattern = scipy.sparse.csr_matrix(pattern, dtype=bool)
        if pattern.shape[0] != pattern.shape[1]:
            raise ValueError(f"ColouredJacobian: the sparsity pattern must be square, got shape "
                             f"{pattern.shape}")
        n = pattern.shape[0]
        self.pattern = (pattern + scipy.sparse.identity(n, dtype=bool, format="csr")).tocsr()
        self.pattern.sort_indices()
        if mode not in ("auto", "forward", "reverse"):
            raise ValueError(f"ColouredJacobian: unknown mode {mode!r}; valid: auto, forward, "
                             f"reverse")
        self.n, self.requested_mode, self.mode = n, mode, None
        self.groups = color_columns(self.pattern) if groups is None else list(groups)
        self.col_colour = _groups_to_colours(self.groups, n)
        self._row_colour = None
        self.rows = np.repeat(np.arange(n), np.diff(self.pattern.indptr))
        self.cols = self.pattern.indices.astype(np.int64)
        self._diagonal = np.flatnonzero(self.rows == self.cols)
        self.mat = PETSc.Mat().create(comm=comm or PETSc.COMM_SELF)
        self.mat.setSizes([n, n])
        self.mat.setType(PETSc.Mat.Type.AIJ)
        if block_size > 1:
            self.mat.setBlockSize(block_size)
        self.mat.setPreallocationCOO(self.rows.astype(PETSc.IntType),
                                     self.cols.astype(PETSc.IntType))
        self.evaluations = 0

    @property
    def row_colour(self):
        """Row colours for reverse mode: rows of one colour share no column. A structurally
        symmetric pattern reuses the column colouring."""
        if self._row_colour is None:
            if (self.pattern != self.pattern.T).nnz == 0:
                self._row_colour = self.col_colour
            else:
                self._row_colour = _groups_to_colours(color_columns(self.pattern.T.tocsr()),
                                                      self.n)
        return self._row_colour

    def _seeds(self, colour, dtype, shape):
        k = int(colour.max()) + 1
        seeds = torch.zeros(k, self.n, dtype=dtype)
        seeds[torch.from_numpy(colour), torch.arange(self.n)] = 1.0
        return seeds.view(k, *shape)

    def values(self, fn, u, mode=None):
        """The pattern's entries of dfn/du at u (in COO order), by coloured products; `mode`
        overrides the one given at construction."""
        mode = mode or self.requested_mode
        if mode == "auto":
            if self.mode is None:  # decided once, at the first assembly
                self.mode = choose("auto", probe(fn, u, "ColouredJacobian"), self.n,
                                   "ColouredJacobian")
            mode = self.mode
        elif mode not in ("forward", "reverse"):
            raise ValueError(f"ColouredJacobian: unknown mode {mode!r}; valid: auto, forward, "
                             f"reverse")
        lin = Linearisation(fn, u)
        if mode == "forward":
            products = lin.jvps(self._seeds(self.col_colour, u.dtype, u.shape)).reshape(-1, self.n)
            take = (torch.from_numpy(self.col_colour[self.cols]), torch.from_numpy(self.rows))
        else:
            products = lin.vjps(self._seeds(self.row_colour, u.dtype, u.shape)).reshape(-1, self.n)
            take = (torch.from_numpy(self.row_colour[self.rows]), torch.from_numpy(self.cols))
        self.evaluations += products.shape[0]
        return products[take]

    def assemble(self, fn, u, diag_shift=0.0, factor=1.0, mode=None):
        """Fill the matrix with diag_shift*I + factor*dfn/du at u; returns the PETSc Mat."""
        values = (self.values(fn, u, mode) * factor).numpy()
        values[self._diagonal] += diag_shift
        self.mat.setValuesCOO(values.astype(PETSc.ScalarType, copy=False))
        self.mat.assemble()
        return self.mat

    def destroy(self):
        self.mat.destroy()


def block_diagonal_pattern(n_blocks: int, block: int):
    """Sparsity of n_blocks independent blocks of size block (e.g. a batch of small systems)."""
    return scipy.sparse.kron(scipy.sparse.identity(n_blocks, dtype=bool),
                             np.ones((block, block), dtype=bool), format="csc")


def block_jacobian(shape, *, mode="auto", comm=None) -> ColouredJacobian:
    """The exact block-diagonal Jacobian of a function acting on independent samples: u has shape
    (..., n) and each length-n row only affects its own output row; n products in all."""
    shape = tuple(shape)
    block = shape[-1] if shape else 1
    count = int(np.prod(shape)) // block
    groups = [np.arange(c, count * block, block) for c in range(block)]
    return ColouredJacobian(block_diagonal_pattern(count, block), groups=groups,
                            block_size=block, comm=comm, mode=mode)

