"""Structured grids over MPI on PETSc's DMDA, with torch views of each rank's blocks.

A `Grid` splits an n-d array of points (with `dof` values each) across the ranks of a
communicator. Each rank owns a block, and sees it with `stencil_width` layers of neighbours' values
around it (the ghosted block), which PETSc's halo exchange fills. User code is torch on the
ghosted block and returns the owned part; the same code runs on one rank and on many.

Layout: arrays are C-ordered like numpy and torch, ``(ny, nx)`` in 2-D, with a trailing axis of
length ``dof`` when dof > 1 (PETSc interleaves the values of a point). PETSc's own sizes are in
(x, y, z) order; this module is the only place that knows.
"""
from __future__ import annotations

import weakref

import numpy as np
import torch

from ._runtime import PETSc, petsc_errors, scalar_dtype
from ._vec import VecViews, vec_as_tensor

BOUNDARIES = {"ghosted": PETSc.DM.BoundaryType.GHOSTED, "periodic": PETSc.DM.BoundaryType.PERIODIC,
              "none": PETSc.DM.BoundaryType.NONE}
STENCILS = {"star": PETSc.DMDA.StencilType.STAR, "box": PETSc.DMDA.StencilType.BOX}


class Grid:
    """A structured grid of ``shape`` points (1-, 2- or 3-d, C order) over a communicator.

    Args:
        shape: global number of points per axis, e.g. ``(ny, nx)``.
        dof: values per point (a trailing axis of that length when > 1).
        stencil_width: how many layers of neighbours a point's equation reads.
        stencil: ``"star"`` (neighbours along the axes) or ``"box"`` (the full cube).
        boundary: per axis or for all: ``"ghosted"`` (default: a layer of ghost points outside
            the domain, zero unless the user's code sets its own boundary values there),
            ``"periodic"``, or ``"none"`` (no points outside: blocks at the boundary are smaller).
        comm: a PETSc communicator (default PETSc.COMM_WORLD: every rank of mpiexec).

    Attributes:
        dm: the PETSc DMDA. owned: the global index slices of this rank's block.
        owned_shape, ghosted_shape: shapes of this rank's owned and ghosted blocks.
        interior: slices of the owned points within the ghosted block.
    """

    def __init__(self, shape, *, dof=1, stencil_width=1, stencil="star", boundary="ghosted",
                 comm=None):
        shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
        if not 1 <= len(shape) <= 3 or min(shape) < 1:
            raise ValueError(f"Grid: shape must give 1 to 3 positive sizes, got {shape}")
        if not (isinstance(dof, int) and dof >= 1):
            raise ValueError(f"Grid: dof must be a positive int, got {dof!r}")
        if not (isinstance(stencil_width, int) and stencil_width >= 0):
            raise ValueError(f"Grid: stencil_width must be an int >= 0, got {stencil_width!r}")
        if stencil not in STENCILS:
            raise ValueError(f"Grid: unknown stencil {stencil!r}; valid: {', '.join(STENCILS)}")
        boundaries = (boundary,) * len(shape) if isinstance(boundary, str) else tuple(boundary)
        if len(boundaries) != len(shape) or any(b not in BOUNDARIES for b in boundaries):
            raise ValueError(f"Grid: boundary must be one of {', '.join(BOUNDARIES)}, or one per "
                             f"axis ({len(shape)}), got {boundary!r}")
        self.shape, self.dof, self.stencil_width = shape, dof, stencil_width
        self.stencil, self.boundary = stencil, boundaries
        self.comm = comm or PETSc.COMM_WORLD
        with petsc_errors("Grid", f"creating a DMDA of {shape} points"):
            self.dm = PETSc.DMDA().create(
                sizes=shape[::-1], dof=dof, stencil_width=stencil_width,
                stencil_type=STENCILS[stencil],
                boundary_type=tuple(BOUNDARIES[b] for b in boundaries[::-1]), comm=self.comm)
        weakref.finalize(self, self.dm.destroy)
        (start, size), (gstart, gsize) = self.dm.getCorners(), self.dm.getGhostCorners()
        start, size, gstart, gsize = (tuple(v)[::-1] for v in (start, size, gstart, gsize))
        self.owned = tuple(slice(s, s + n) for s, n in zip(start, size))
        point = (dof,) if dof > 1 else ()
        self.owned_shape = tuple(size) + point
        self.ghosted_shape = tuple(gsize) + point
        self.interior = tuple(slice(s - g, s - g + n) for s, g, n in zip(start, gstart, size))
        self._ghost_start = gstart
        # work vectors of halo exchanges, one each way, so that the exterior stays zero
        self._local, self._local_sum = self.dm.createLocalVec(), self.dm.createLocalVec()
        weakref.finalize(self, self._local.destroy)
        weakref.finalize(self, self._local_sum.destroy)
        self._exterior = torch.from_numpy(
            np.flatnonzero(self.dm.getLGMap().getIndices() < 0))

    # -- geometry ------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.comm.getRank()

    @property
    def size(self) -> int:
        return self.comm.getSize()

    def indices(self):
        """Global indices of the ghosted block's points along each axis (may be negative or
        beyond the grid outside it), for boundary masks and coordinates."""
        ranges = [torch.arange(g, g + n) for g, n in zip(self._ghost_start,
                                                         self.ghosted_shape[:len(self.shape)])]
        return torch.meshgrid(*ranges, indexing="ij")

    def zeros(self) -> torch.Tensor:
        """A zero owned block (PETSc's scalar dtype)."""
        return torch.zeros(self.owned_shape, dtype=scalar_dtype())

    def scatter(self, full) -> torch.Tensor:
        """This rank's owned block of a global array given in full on every rank."""
        full = torch.as_tensor(full)
        expected = self.shape + ((self.dof,) if self.dof > 1 else ())
        if tuple(full.shape) != expected:
            raise ValueError(f"Grid.scatter: expected the full array of shape {expected}, got "
                             f"{tuple(full.shape)}")
        return full[self.owned].clone()

    def gather(self, owned: torch.Tensor):
        """The full global array on rank 0 (None on the others) from every rank's owned block:
        for plotting and checks, not for large production runs."""
        self._check_owned(owned, "Grid.gather")
        vec = self.dm.createGlobalVec()
        natural = self.dm.createNaturalVec()
        try:
            vec_as_tensor(vec, "w").copy_(owned.detach().reshape(-1))
            self.dm.globalToNatural(vec, natural)
            scatter, full = PETSc.Scatter.toZero(natural)
            try:
                scatter.scatter(natural, full)
                if self.rank != 0:
                    return None
                expected = self.shape + ((self.dof,) if self.dof > 1 else ())
                return vec_as_tensor(full, "r").clone().view(expected)
            finally:
                scatter.destroy()
                full.destroy()
        finally:
            vec.destroy()
            natural.destroy()

    def _check_owned(self, tensor, who):
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != self.owned_shape:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{who}: expected this rank's owned block of shape "
                             f"{self.owned_shape} (rank {self.rank} of {self.size}), got {got}")

    # -- vectors and halo exchange ---------------------------------------------------------------
    def global_vec(self):
        return self.dm.createGlobalVec()

    def owned_view(self, vec, mode="rw") -> torch.Tensor:
        """A global Vec's local part as the owned block (no copy)."""
        return vec_as_tensor(vec, mode).view(self.owned_shape)

    def exchange(self, vec) -> torch.Tensor:
        """The ghosted block of a global Vec after PETSc's halo exchange, zero outside the domain
        (a view of the grid's work vector: treat it as read-only, copy it to keep it)."""
        self.dm.globalToLocal(vec, self._local)
        local = vec_as_tensor(self._local, "rw")
        if len(self._exterior):
            local[self._exterior] = 0.0  # in case a caller wrote into the view
        return local.view(self.ghosted_shape)

    def release_views(self) -> None:
        """Nothing to release: a Grid, which solves share, keeps no views of their Vecs."""

    def add_ghosted(self, block: torch.Tensor, vec) -> None:
        """vec += the ghosted block's values summed into their owners (reverse halo exchange);
        values outside the domain are dropped."""
        vec_as_tensor(self._local_sum, "w").view(self.ghosted_shape).copy_(block)
        self.dm.localToGlobal(self._local_sum, vec, addv=PETSc.InsertMode.ADD_VALUES)

    def exterior(self) -> torch.Tensor:
        """Mask of the ghosted block's points outside the domain (not unknowns of any rank)."""
        mask = torch.zeros(int(np.prod(self.ghosted_shape)), dtype=torch.bool)
        mask[self._exterior] = True
        return mask.view(self.ghosted_shape)

    # -- colouring ---------------------------------------------------------------------------------
    def stencil_offsets(self) -> np.ndarray:
        """The stencil's neighbour offsets (k x ndim, the point itself included)."""
        w, ndim = self.stencil_width, len(self.shape)
        offsets = np.array(list(np.ndindex(*(2 * w + 1,) * ndim))) - w
        return offsets[(offsets != 0).sum(axis=1) <= 1] if self.stencil == "star" else offsets

    def colours(self):
        """(owned, ghosted) colours of this rank's points, for Jacobians from coloured products.

        Two points of the ghosted block that one stencil reaches both (columns of one Jacobian
        row) differ in colour, and so do two owned points that both reach one ghosted point
        (rows sharing a column). Ghost points are coloured as points of their own (a function on
        the ghosted block sees them apart from their owners), by a colouring of the whole
        lattice read in the ghosted block's coordinates: it needs no communication and holds
        for every size and boundary, periodic wrap-around included. (PETSc's DMCreateColoring
        does not: on periodic axes it needs sizes divisible by its colour count.) Exterior
        points: -1."""
        a, q = lattice_colouring(self.stencil_offsets())
        spatial = self.ghosted_shape[:len(self.shape)]
        points = np.tensordot(a, np.indices(spatial), axes=1).reshape(-1) % q
        ghosted = (points[:, None] * self.dof + np.arange(self.dof)).reshape(-1)
        ghosted[self.exterior().reshape(-1).numpy()] = -1
        owned = ghosted.reshape(self.ghosted_shape)[self.interior].reshape(-1).copy()
        return owned, ghosted

    def __repr__(self):
        return (f"Grid(shape={self.shape}, dof={self.dof}, stencil={self.stencil!r}, "
                f"stencil_width={self.stencil_width}, boundary={self.boundary}, rank "
                f"{self.rank} of {self.size} owns {self.owned})")


def lattice_colouring(offsets):
    """(a, q) such that the colours (a . x) mod q of the points x of the integer lattice differ
    for any two points that one stencil (`offsets`, k x ndim) reaches both: the smallest such q
    below (2w + 1)^ndim (w: the stencil's reach), else that, with a = (1, 2w + 1, (2w + 1)^2...),
    which tells apart every two points of a (4w + 1)-wide cube. E.g. a = (1, 2), q = 5 for the
    5-point star; the 9-point box takes 9 colours."""
    offsets = np.asarray(offsets, dtype=np.int64)
    key = offsets.tobytes(), offsets.shape
    if key not in _LATTICE:
        ndim = offsets.shape[1]
        diffs = (offsets[:, None] - offsets[None]).reshape(-1, ndim)
        diffs = diffs[(diffs != 0).any(axis=1)]
        side = 2 * int(np.abs(offsets).max()) + 1
        _LATTICE[key] = side ** np.arange(ndim), side ** ndim
        for q in range(len(offsets), side ** ndim):
            rest = np.indices((q,) * (ndim - 1), dtype=np.int64).reshape(ndim - 1, -1).T
            coefficients = np.concatenate([np.ones((len(rest), 1), np.int64), rest], axis=1)
            good = ((coefficients @ diffs.T) % q != 0).all(axis=1)
            if good.any():
                _LATTICE[key] = coefficients[np.argmax(good)], q
                break
    return _LATTICE[key]


_LATTICE = {}  # lattice_colouring's answers, by stencil


class SerialLayout:
    """The layout of an array that lives whole on one rank, with no halo: what a solve without a
    grid uses, so that the solvers have one code path (`Grid` has the same methods). It belongs
    to one solve, and keeps the views of the Vecs it is given (see `VecViews`) until
    `release_views`."""

    dm = None
    comm = PETSc.COMM_SELF
    rank, size = 0, 1

    def __init__(self, shape):
        self.owned_shape = self.ghosted_shape = tuple(shape)
        self.n = int(np.prod(self.owned_shape))
        self.views = VecViews(self.owned_shape)

    def global_vec(self):
        return PETSc.Vec().createSeq(self.n, comm=PETSc.COMM_SELF)

    def owned_view(self, vec, mode="rw") -> torch.Tensor:
        return self.views.read(vec) if mode == "r" else self.views.write(vec)

    def exchange(self, vec) -> torch.Tensor:
        return self.views.read(vec)

    def add_ghosted(self, block: torch.Tensor, vec) -> None:
        self.views.write(vec).add_(block.reshape(self.owned_shape))

    def release_views(self) -> None:
        """Drop the cached views, and with them their references to PETSc Vecs."""
        self.views.clear()


def sum_gradients(parameters, comm=None) -> None:
    """Sum each parameter's ``.grad`` over the ranks of `comm` (default PETSc.COMM_WORLD), in
    place, in one reduction.

    A solve on a grid gives each rank a share of the parameter gradient; the shares sum to the
    gradient of the total loss (the sum of the ranks' losses). After this call every rank holds
    that gradient, exactly as for parameters whose gradients came from rank-local work. Under
    torch's DistributedDataParallel do not call it: DDP averages the shares, which is the
    gradient of the mean of the ranks' losses (multiply each rank's loss by the world size for
    the total).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    comm = comm or PETSc.COMM_WORLD
    if not grads or comm.getSize() == 1:
        return
    from mpi4py import MPI
    flat = torch.cat([g.reshape(-1).to(torch.float64) for g in grads])
    buffer = flat.numpy()
    comm.tompi4py().Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view(g.shape))
        offset += g.numel()
