"""Jacobians of torch functions as PETSc matrices, from forward- or reverse-mode products
(bridges._linearise), never from double backward, so bridged ops may sit inside the function.

- `TorchJacobian`: a matrix-free PETSc Mat (type python) for A = diag_shift*I + factor*dF/du at a
  point: `mult` is a forward-mode product (or a finite-difference one where some op has no
  forward mode), `multTranspose` a reverse-mode one.
- `ColouredJacobian`: the exact sparse Jacobian as a PETSc AIJ matrix, from one product per
  colour of a known sparsity pattern (columns coloured for forward mode, rows for reverse mode),
  checked once against a product in a random direction; real preconditioners (ILU, GAMG, LU) apply.
"""
from __future__ import annotations

import weakref

import numpy as np
import scipy.sparse
import torch

from .._fd import color_columns
from .._linearise import Linearisation, choose, probe
from ._capi import aij_values
from ._grid import SerialLayout
from ._runtime import PETSc
from ._vec import vec_as_tensor


class TorchJacobian:
    """Context of a python-type PETSc Mat: A = diag_shift*I + factor*dfn/du at u.

    Call `at(fn, u, diag_shift, factor)` to move the linearisation point (e.g. from a Jacobian
    callback); `fn` maps a tensor shaped like u to a tensor with as many elements. `mult` is a
    forward-mode product, or with ``products="fd"`` a finite-difference one (for functions with
    an op that has no forward mode); `multTranspose` is always a reverse-mode product.
    """

    def __init__(self, shape, products="forward", layout=None):
        if products not in ("forward", "fd"):
            raise ValueError(f"TorchJacobian: products must be 'forward' or 'fd', got "
                             f"{products!r}")
        self.products = products
        self.shape = tuple(shape)
        # where u lives: one array (SerialLayout), or a Grid's ghosted block, fn giving its
        # owned block; products then exchange halos (mult) or sum them into owners (transpose)
        self.layout = layout or SerialLayout(shape)
        self.fn = self.u = self._lin = None
        self.diag_shift, self.factor, self.params = 0.0, 1.0, ()

    def at(self, fn, u, diag_shift=0.0, factor=1.0, linearisation=None, params=()):
        """Products from now on are at u. `linearisation`: one of fn at u to share (its graph
        serves other products at this point); `params`: tensors whose products (d fn / d p)^T w
        each transposed product also forms, for a `param_vjp` with the same w to take."""
        self.fn, self.u, self.diag_shift, self.factor = fn, u, diag_shift, factor
        self._lin, self.params = linearisation, params

    def mat(self, comm=None):
        """A new PETSc Mat backed by this context."""
        n = int(np.prod(self.layout.owned_shape))
        mat = PETSc.Mat().createPython([(n, None), (n, None)], self,
                                       comm=comm or self.layout.comm)
        mat.setUp()
        return mat

    def _product(self, x, y, transpose):
        layout = self.layout
        owned_x, out = layout.owned_view(x, "r"), layout.owned_view(y, "w")
        if self.fn is None:  # a zeroed operator (e.g. the one TS duplicates for a zero RHS)
            torch.mul(owned_x, self.diag_shift, out=out)
            return
        if self._lin is None:  # one linearisation serves every product at this point
            self._lin = Linearisation(self.fn, self.u)
        if transpose:  # owned cotangent -> ghosted gradient, summed into its owners
            grad = self._lin.vjp(owned_x.clone(), self.params)
            out.zero_()
            del out
            layout.add_ghosted(grad if self.factor == 1.0 else grad * self.factor, y)
            out = layout.owned_view(y, "rw")
        else:  # ghosted tangent (halo exchanged) -> owned product
            v = layout.exchange(x)
            product = self._lin.jvp(v) if self.products == "forward" else self._lin.fd_jvp(v)
            torch.mul(product.reshape(out.shape), self.factor, out=out)
        if self.diag_shift:
            out.add_(owned_x, alpha=self.diag_shift)

    def mult(self, mat, x, y):
        self._product(x, y, transpose=False)

    def multTranspose(self, mat, x, y):
        self._product(x, y, transpose=True)

    # PETSc duplicates, zeroes, rescales and shifts the operator for some TS types (ARKIMEX)
    def duplicate(self, mat, op):
        return TorchJacobian(self.shape, self.products, self.layout).mat(mat.getComm())

    def zeroEntries(self, mat):
        self.at(None, None, 0.0, 1.0)

    def scale(self, mat, a):
        self.diag_shift, self.factor = self.diag_shift * a, self.factor * a

    def shift(self, mat, a):
        self.diag_shift += a


# Coloured products are computed a batch of colours at a time, each batch's tensors at most this
# big: glibc's malloc serves blocks up to its mmap threshold (32 MiB at most on 64-bit Linux)
# from the heap, reused without page faults, and larger ones fresh from the kernel every time.
# Measured on Gray-Scott at 512^2 (42 MB for all 10 colours): 302 ms of CPU in one batch, half
# of it in 92,000 page faults, against 224 ms in batches of 5 (21 MB) without any.
BATCH_BYTES = 24 << 20
# Matrices of at least this many entries are filled straight in PETSc's AIJ arrays (at 256^2 x 2
# half the time of COO insertion); below, the fixed cost of reaching the arrays (~30 us) is more
# than COO insertion's (~6 us for a 3 x 3 block)
DIRECT_FROM = 1 << 12
KEPT_SEEDS = 1 << 16  # seeds of at most this many entries are made once and kept


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
        verify: check the first assembly against one product in a random direction: raise if
            the function reads unknowns the pattern leaves out (a silently wrong matrix).

    `on_grid(grid)` builds one for functions on a `Grid`'s ghosted block, from the DMDA's
    stencil, colouring and matrix: fn maps the ghosted block to the owned block, products are
    local to each rank, and rows/cols are in the rank's ghosted local numbering.
    """

    def __init__(self, pattern, *, groups=None, block_size=1, comm=None, mode="auto",
                 verify=True):
        pattern = scipy.sparse.csr_matrix(pattern, dtype=bool)
        if pattern.shape[0] != pattern.shape[1]:
            raise ValueError(f"ColouredJacobian: the sparsity pattern must be square, got shape "
                             f"{pattern.shape}")
        n = pattern.shape[0]
        pattern = (pattern + scipy.sparse.identity(n, dtype=bool, format="csr")).tocsr()
        pattern.sort_indices()
        self.pattern = pattern
        self.groups = color_columns(pattern) if groups is None else list(groups)
        col_colour = _groups_to_colours(self.groups, n)
        row_colour = col_colour if (pattern != pattern.T).nnz == 0 else None  # else on demand
        mat = PETSc.Mat().create(comm=comm or PETSc.COMM_SELF)
        mat.setSizes([n, n])
        mat.setType(PETSc.Mat.Type.AIJ)
        if block_size > 1:
            mat.setBlockSize(block_size)
        rows = np.repeat(np.arange(n), np.diff(pattern.indptr))
        self._configure(rows, pattern.indices.astype(np.int64), np.arange(n), col_colour,
                        row_colour, mat, mode, local=False, verify=verify)

    @classmethod
    def on_grid(cls, grid, *, mode="auto"):
        """The exact Jacobian of a function from `grid`'s ghosted block to its owned block, for
        the grid's stencil and coupling (see `Grid.jacobian_entries`)."""
        self = cls.__new__(cls)
        self.pattern, self.groups, self.grid = None, None, grid
        owned_colour, ghosted_colour = grid.colours()  # right for both modes, any size
        self._configure(*grid.jacobian_entries(), ghosted_colour, owned_colour,
                        grid.dm.createMat(), mode, local=True, verify=True)
        return self

    def _configure(self, rows, cols, owned_in, col_colour, row_colour, mat, mode, local, verify):
        """rows: output index (0..n_out) of each entry; cols: input index (0..n_in); owned_in:
        the input index of each output's own point (the diagonal); colours per input (forward
        mode, -1 for inputs that are no unknowns) and per output (reverse mode, or None to
        colour the transposed pattern on demand)."""
        if mode not in ("auto", "forward", "reverse"):
            raise ValueError(f"ColouredJacobian: unknown mode {mode!r}; valid: auto, forward, "
                             f"reverse")
        self.requested_mode, self.mode = mode, None
        self.rows, self.cols = rows, cols
        self.n_out, self.n_in = len(owned_in), len(col_colour)
        self.col_colour, self._row_colour = col_colour, row_colour
        self.bridged = True  # until a probe shows otherwise: no batched backward
        self._diagonal = np.flatnonzero(owned_in[rows] == cols)
        self.mat = mat
        coo = (owned_in[rows].astype(PETSc.IntType), cols.astype(PETSc.IntType))
        (mat.setPreallocationCOOLocal if local else mat.setPreallocationCOO)(*coo)
        self._slots = self._find_slots() if len(rows) >= DIRECT_FROM else None
        self._index = {}  # kind of source -> where each matrix value comes from (see _fill)
        self.evaluations = 0
        self._verifies = self._unverified = verify  # until the first products are checked
        self.samples = False  # per-sample blocks (see block_jacobian)
        self._memo = None  # (weak reference to a Linearisation, mode) of the products kept
        self._buffer = None  # the last products (colours x size), reused by the next ones
        self._by_colour = {}  # mode -> seed entries in order of colour, where each colour starts
        self._seed_rows = {}  # (mode, first and last colour, dtype) -> kept seeds (see _seeds)
        self.holder = None  # weakref to whose values it holds (a linear solve reuses them)

    def _find_slots(self):
        """Which COO entry each slot of the matrix's AIJ value arrays holds (one index array
        per array, see aij_values), so that assembly writes them in place; None where PETSc's
        COO insertion must do it (another matrix type, or entries summed into one slot, as on
        a periodic axis of fewer points than the stencil reaches)."""
        n = len(self.rows)
        self.mat.setValuesCOO(np.arange(1, n + 1, dtype=PETSc.ScalarType))
        with aij_values(self.mat) as arrays:
            slots = None if arrays is None else [a.astype(np.int64) - 1 for a in arrays]
        self.mat.zeroEntries()
        if slots is None or sum(len(s) for s in slots) != n or not np.array_equal(
                np.sort(np.concatenate(slots)), np.arange(n)):
            return None
        return slots

    @property
    def n(self):
        return self.n_out

    @property
    def row_colour(self):
        """Row colours for reverse mode: rows of one colour share no column."""
        if self._row_colour is None:
            self._row_colour = _groups_to_colours(color_columns(self.pattern.T.tocsr()), self.n)
        return self._row_colour

    def _products(self, fn, u, mode, out_shape, linearisation):
        """(mode, products): one product per colour, as rows of a (colours, size) tensor, in the
        mode asked for (None: the one given at construction; auto: decided at the first call).
        The products of the last `linearisation` given are kept, and given again for it."""
        mode = mode or self.requested_mode
        if self.mode is None:  # decided once, at the first assembly
            caps = probe(fn, u, "ColouredJacobian")
            self.bridged = caps.bridged
            self.mode = choose("auto", caps, self.n_in, "ColouredJacobian")
        if mode == "auto":
            mode = self.mode
        elif mode not in ("forward", "reverse"):
            raise ValueError(f"ColouredJacobian: unknown mode {mode!r}; valid: auto, forward, "
                             f"reverse")
        memo = self._memo
        if linearisation is not None and memo and memo[0]() is linearisation and memo[1] == mode:
            return mode, self._buffer  # the same point again, e.g. with another shift (CN's)
        self._memo = None  # its products are about to be overwritten
        lin = linearisation or Linearisation(fn, u)
        colour, (n_seed, n_out) = (self.col_colour, (self.n_in, self.n_out)) if \
            mode == "forward" else (self.row_colour, (self.n_out, self.n_in))
        seed_shape = u.shape if mode == "forward" else out_shape or u.shape
        k = int(colour.max()) + 1
        if self._buffer is None or self._buffer.shape != (k, n_out) or \
                self._buffer.dtype != u.dtype:
            self._buffer = torch.empty(k, n_out, dtype=u.dtype)
        if mode not in self._by_colour:  # seed entries sorted by colour, and where each starts
            order = np.argsort(colour, kind="stable")
            self._by_colour[mode] = order, np.searchsorted(colour[order], np.arange(k + 1))
        chunk = max(1, BATCH_BYTES // (n_seed * u.element_size()))
        for c0 in range(0, k, chunk):
            c1 = min(c0 + chunk, k)
            seeds = self._seeds(mode, colour, c0, c1, n_seed, u.dtype).view(c1 - c0, *seed_shape)
            self._buffer[c0:c1] = (lin.jvps(seeds) if mode == "forward" else
                                   lin.vjps(seeds, batched=not self.bridged)).reshape(c1 - c0, -1)
        self.evaluations += k
        if self._unverified:
            self._verify(lin, mode)
        if linearisation is not None:
            self._memo = (weakref.ref(linearisation), mode)
        return mode, self._buffer

    def _seeds(self, mode, colour, c0, c1, n_seed, dtype):
        """The 0/1 seeds of colours c0..c1 (one row each); kept when small, as for a batch of
        small systems, whose every Jacobian would otherwise rebuild them."""
        key = (mode, c0, c1, dtype)
        if key in self._seed_rows:
            return self._seed_rows[key]
        order, starts = self._by_colour[mode]
        seeds = torch.zeros(c1 - c0, n_seed, dtype=dtype)
        entries = order[starts[c0]:starts[c1]]
        seeds[torch.from_numpy(colour[entries] - c0), torch.from_numpy(entries)] = 1.0
        if seeds.numel() <= KEPT_SEEDS:
            self._seed_rows[key] = seeds
        return seeds

    def verify_next(self, always=False):
        """Check the next products against a direct one again (if checks were asked for, or
        `always`): a dependence left out of the pattern whose derivative vanished at the first
        point (a state starting at zero) shows at a later one, such as a solve's root."""
        self._unverified = self._verifies or always

    def _verify(self, lin, mode):
        """Raise unless the products' matrix times a random v equals J v (v^T J in reverse)."""
        values = self._buffer.view(-1)[torch.from_numpy(self._coo_index(mode))].numpy()
        forward = mode == "forward"
        n_seed, n_product = (self.n_in, self.n_out) if forward else (self.n_out, self.n_in)
        seed = torch.randn(n_seed, dtype=self._buffer.dtype,
                           generator=torch.Generator().manual_seed(0))
        if forward:
            seed[torch.from_numpy(self.col_colour < 0)] = 0.0  # exterior: no unknowns
        product = (lin.jvp(seed) if forward else lin.vjp(seed)).reshape(-1).numpy()
        at, seed_at = (self.rows, self.cols) if forward else (self.cols, self.rows)
        terms = values * seed.numpy()[seed_at]
        error = np.abs(np.bincount(at, terms, minlength=n_product) - product)
        scale = np.bincount(at, np.abs(terms), minlength=n_product) + np.abs(product)
        wrong = (error > 1e-8 * scale) & (True if forward else self.col_colour >= 0)
        count, comm = int(wrong.sum()), self.mat.getComm()
        count = comm.tompi4py().allreduce(count) if comm.getSize() > 1 else count
        if count:
            what = ("the function couples the samples (rows) of its input at this state"
                    if self.samples else "ColouredJacobian: the function reads unknowns that "
                    + ("Grid(coupling=...) or the grid's stencil" if getattr(self, "grid", None)
                       else "the sparsity pattern") + " leaves out")
            raise ValueError(
                f"{what}: {count} {'rows' if forward else 'columns'} of its Jacobian from "
                f"coloured products differ from a direct {mode}-mode product (worst by "
                f"{error.max():.3g}). Declare every dependence (a sparsity=, or a wider "
                f"coupling, stencil or pattern), or use jacobian='matrix-free'")
        self._unverified = False

    def _coo_index(self, kind):
        """Where each COO entry is in the flattened source of `kind`: forward- or reverse-mode
        products, a dense Jacobian, or the diagonal blocks of one."""
        if kind == "forward":
            return self.col_colour[self.cols] * self.n_out + self.rows
        if kind == "reverse":
            return self.row_colour[self.rows] * self.n_in + self.cols
        if kind == "blocks":  # (samples, b, b) diagonal blocks of a block-diagonal pattern
            b = max(self.mat.getBlockSize(), 1)
            return (self.rows // b) * b * b + (self.rows % b) * b + self.cols % b
        return self.rows.astype(np.int64) * self.n_in + self.cols

    def values(self, fn, u, mode=None, out_shape=None, linearisation=None):
        """The pattern's entries of dfn/du at u (in COO order), by coloured products; `mode`
        overrides the one given at construction. `out_shape`: fn's output shape (default u's);
        `linearisation`: a `Linearisation` of fn at u to reuse (its products are kept)."""
        mode, products = self._products(fn, u, mode, out_shape, linearisation)
        return products.view(-1)[torch.from_numpy(self._coo_index(mode))]

    def _fill(self, source, kind, diag_shift, factor):
        """The matrix := diag_shift*I + factor*J, J's entries taken from the flat tensor
        `source` (see _coo_index): straight into the AIJ arrays where it can, else by COO."""
        self.holder = None  # (solves and ODEs share the matrix: every fill clears it)
        if kind not in self._index:  # made once per kind of source
            coo = self._coo_index(kind).astype(np.int64)
            if self._slots is None:  # (and whether the entries are the source's first ones)
                self._index[kind] = coo, np.array_equal(coo, np.arange(len(coo)))
            else:
                diagonal = np.zeros(len(coo), dtype=bool)
                diagonal[self._diagonal] = True
                self._index[kind] = ([torch.from_numpy(coo[s]) for s in self._slots],
                                     [torch.from_numpy(np.flatnonzero(diagonal[s]))
                                      for s in self._slots])
        if self._slots is None:  # (numpy: on small matrices torch's per-op cost dominates)
            (index, in_order), source = self._index[kind], source.reshape(-1).numpy()
            values = np.multiply(source[:len(index)] if in_order else np.take(source, index),
                                 factor)
            values[self._diagonal] += diag_shift
            self.mat.setValuesCOO(values.astype(PETSc.ScalarType, copy=False))
        else:
            source = source.reshape(-1).to(torch.float64)
            with aij_values(self.mat) as arrays:
                for out, index, diagonal in zip(arrays, *self._index[kind]):
                    out = torch.index_select(source, 0, index, out=torch.from_numpy(out))
                    if factor != 1.0:
                        out.mul_(factor)
                    if diag_shift:
                        out[diagonal] += diag_shift
        self.mat.assemble()
        return self.mat

    def assemble(self, fn, u, diag_shift=0.0, factor=1.0, mode=None, out_shape=None,
                 linearisation=None):
        """Fill the matrix with diag_shift*I + factor*dfn/du at u; returns the PETSc Mat."""
        mode, products = self._products(fn, u, mode, out_shape, linearisation)
        return self._fill(products, mode, diag_shift, factor)

    def set_blocks(self, blocks, diag_shift=0.0, factor=1.0):
        """Fill a block-diagonal matrix (`block_jacobian`) with diag_shift*I + factor*J for J's
        diagonal blocks computed elsewhere, (samples, b, b); returns the PETSc Mat."""
        return self._fill(blocks.detach(), "blocks", diag_shift, factor)

    def set_dense(self, jacobian, diag_shift=0.0, factor=1.0):
        """Fill the matrix with diag_shift*I + factor*J for a dense J (n_out x n_in) computed
        elsewhere; returns the PETSc Mat."""
        return self._fill(jacobian.detach(), "dense", diag_shift, factor)

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
    blocks = ColouredJacobian(block_diagonal_pattern(count, block), groups=groups,
                              block_size=block, comm=comm, mode=mode, verify=False)
    blocks.samples = count > 1
    return blocks


# Jacobian plans: what a solve assembles, and how it multiplies
JACOBIANS = ("auto", "assembled", "blocks", "matrix-free")
PRODUCTS = ("auto", "forward", "reverse", "fd")


def plan_jacobian(who, jacobian, products, *, assembler, block=None, block_limit=64,
                  independent=True, forward=True):
    """(kind, products) for a solve: kind "assembled" (with an assembler), "blocks" (the
    per-sample blocks of the last dimension, `block` wide) or "matrix-free"; products
    "forward", "reverse", "fd", or "auto" for an assembler to choose. `block` None: no
    per-sample blocks (nonlinear solves). `independent`: func acts on each sample on its own;
    `forward`: every op has a forward-mode rule. Raises for combinations that cannot work."""
    if jacobian == "assembled" and assembler is None:
        raise ValueError(f"{who}: jacobian='assembled' needs sparsity= (the pattern of the "
                         f"Jacobian, e.g. stencil_sparsity(shape)) or grid=; or use "
                         f"jacobian='matrix-free'")
    if products == "forward" and not forward:
        raise ValueError(f"{who}: products='forward' needs a forward-mode rule for every op in "
                         f"the function, but one has none (a bridged op with only a pullback, "
                         f"or an autograd.Function without jvp); use products='auto' or "
                         f"'reverse' (or 'fd' with jacobian='matrix-free')")
    if jacobian == "auto":
        jacobian = "assembled" if assembler is not None else \
            "blocks" if block is not None and block <= block_limit and independent else \
            "matrix-free"
    if jacobian != "matrix-free":
        if products == "fd":
            raise ValueError(f"{who}: products='fd' is a matrix-free action; use it with "
                             f"jacobian='matrix-free', or products 'forward', 'reverse' or "
                             f"'auto'")
        return jacobian, products
    if products == "reverse":
        raise ValueError(f"{who}: a matrix-free Jacobian needs J v, which reverse mode cannot "
                         f"give; use products 'forward', 'fd' or 'auto', or an assembled "
                         f"Jacobian (sparsity= or grid=, or per-sample blocks)")
    return jacobian, "forward" if products != "fd" and forward else "fd"
