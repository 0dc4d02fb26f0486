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
        coupling: which components each equation reads, as ``(point, neighbours)``: two dof x
            dof arrays of 0/1, ``point[i][j]`` when component i's equation reads component j at
            its own point, ``neighbours[i][j]`` when it reads component j at the stencil's other
            points (PETSc's DMDASetBlockFills). Default None: every component reads every
            component everywhere on the stencil. A sparser coupling takes fewer products to
            assemble a Jacobian, and gives a sparser matrix; the first assembly checks it
            against one product of the function and raises if the function reads more.
        comm: a PETSc communicator (default PETSc.COMM_WORLD: every rank of mpiexec).

    Attributes:
        dm: the PETSc DMDA. owned: the global index slices of this rank's block.
        owned_shape, ghosted_shape: shapes of this rank's owned and ghosted blocks.
        interior: slices of the owned points within the ghosted block.
    """

    def __init__(self, shape, *, dof=1, stencil_width=1, stencil="star", boundary="ghosted",
                 coupling=None, comm=None):
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
        self.coupling = _check_coupling(coupling, dof)
        self.shape, self.dof, self.stencil_width = shape, dof, stencil_width
        self.stencil, self.boundary = stencil, boundaries
        self.comm = comm or PETSc.COMM_WORLD

        def dmda(width):
            with petsc_errors("Grid", f"creating a DMDA of {shape} points"):
                return PETSc.DMDA().create(
                    sizes=shape[::-1], dof=dof, stencil_width=width,
                    stencil_type=STENCILS[stencil],
                    boundary_type=tuple(BOUNDARIES[b] for b in boundaries[::-1]), comm=self.comm)
        if stencil_width > 1 and self.comm.getSize() > 1:  # PETSc refuses a width beyond a
            # rank's block on that rank alone (the others then wait forever): decide together
            from mpi4py import MPI
            blocks = dmda(0)  # (the same split into blocks)
            smallest = self.comm.tompi4py().allreduce(min(blocks.getCorners()[1]), op=MPI.MIN)
            blocks.destroy()
            if smallest < stencil_width:
                raise ValueError(f"Grid: stencil_width={stencil_width} is wider than the "
                                 f"smallest block a rank owns ({smallest} points along an axis "
                                 f"of {shape} on {self.comm.getSize()} ranks); use fewer ranks, "
                                 f"a larger grid or a narrower stencil")
        self.dm = dmda(stencil_width)
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

    def couplings(self) -> np.ndarray:
        """(dof, dof, k) booleans: [i, j, s] when component i's equation reads component j at
        the stencil's s-th offset (see `stencil_offsets`), from `coupling`."""
        offsets = self.stencil_offsets()
        if self.coupling is None:
            return np.ones((self.dof, self.dof, len(offsets)), dtype=bool)
        point, neighbours = self.coupling
        centre = ~offsets.any(axis=1)
        return np.where(centre[None, None, :], point[..., None], neighbours[..., None])

    def jacobian_entries(self):
        """(rows, cols, owned) of a Jacobian from the ghosted block to the owned block, in this
        rank's ghosted local numbering (point-major, then component): one entry per stencil
        offset and coupled pair of components that is no exterior point, and the unknowns of
        the owned points (the diagonal)."""
        ghosted, dof = np.array(self.ghosted_shape[:len(self.shape)]), self.dof
        index = np.arange(int(np.prod(ghosted))).reshape(tuple(ghosted))
        owned_points = index[self.interior].reshape(-1)
        coords = np.stack(np.unravel_index(owned_points, tuple(ghosted)), axis=1)
        exterior = self.exterior().reshape(-1).numpy()[::dof]  # per point
        rows, cols = [], []
        for offset, reads in zip(self.stencil_offsets(), self.couplings().transpose(2, 0, 1)):
            neighbours = coords + offset
            inside = np.flatnonzero(np.all((neighbours >= 0) & (neighbours < ghosted), axis=1))
            col_point = np.ravel_multi_index(tuple(neighbours[inside].T), tuple(ghosted))
            keep = ~exterior[col_point]
            i, j = np.nonzero(reads)  # component i's equation reads component j here
            rows.append((inside[keep, None] * dof + i).reshape(-1))
            cols.append((col_point[keep, None] * dof + j).reshape(-1))
        owned = (owned_points[:, None] * dof + np.arange(dof)).reshape(-1)
        return np.concatenate(rows), np.concatenate(cols), owned

    def colours(self):
        """(owned, ghosted) colours of this rank's unknowns (point-major, then component), for
        Jacobians from coupled products.

        Two unknowns of the ghosted block that one equation reads (columns of one Jacobian
        row) differ in colour, and so do two owned unknowns whose equations read one ghosted
        unknown (rows sharing a column). Ghost points are coloured as points of their own (a
        function on the ghosted block sees them apart from their owners), by a colouring of the
        whole lattice read in the ghosted block's coordinates: it needs no communication and
        holds for every size and boundary, periodic wrap-around included. (PETSc's
        DMCreateColoring does not: on periodic axes it needs sizes divisible by its colour
        count.) Exterior points: -1."""
        a, b, q = lattice_colouring(self.stencil_offsets(), self.couplings())
        spatial = self.ghosted_shape[:len(self.shape)]
        points = np.tensordot(a, np.indices(spatial), axes=1).reshape(-1)
        ghosted = ((points[:, None] + b) % q).reshape(-1)
        ghosted[self.exterior().reshape(-1).numpy()] = -1
        owned = ghosted.reshape(self.ghosted_shape)[self.interior].reshape(-1).copy()
        return owned, ghosted

    def __repr__(self):
        return (f"Grid(shape={self.shape}, dof={self.dof}, stencil={self.stencil!r}, "
                f"stencil_width={self.stencil_width}, boundary={self.boundary}, rank "
                f"{self.rank} of {self.size} owns {self.owned})")


def lattice_colouring(offsets, couplings=None):
    """(a, b, q) such that the colours (a . x + b[j]) mod q of the unknowns (x, j) (point x of
    the integer lattice, component j) differ for any two unknowns that one equation reads, and
    for any two equations that read one unknown. `offsets`: the stencil (k x ndim);
    `couplings`: (dof, dof, k) booleans, [i, j, s] when equation i reads component j at offset
    s (default: one component that reads the whole stencil).

    The search takes the smallest q from the most unknowns an equation reads up; the fallback,
    right for every coupling, colours the points as for full coupling and appends the
    component. E.g. a = (1, 2), b = (0,), q = 5 for the 5-point star and one component; the
    9-point box takes 9 colours; a 5-point star whose two components meet only at the point
    itself takes 6 (not 10)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    couplings = np.ones((1, 1, len(offsets)), dtype=bool) if couplings is None else \
        np.asarray(couplings, dtype=bool)
    key = offsets.tobytes(), offsets.shape, couplings.tobytes(), couplings.shape
    if key not in _LATTICE:
        _LATTICE[key] = _search_colouring(offsets, couplings)
    return _LATTICE[key]


def _search_colouring(offsets, couplings):
    """lattice_colouring's answer: the first (a, b, q) that separates every conflict, else the
    fallback."""
    ndim, dof = offsets.shape[1], couplings.shape[0]
    # conflicts (i, j, d): unknowns (x, i) and (x - d, j) must differ in colour
    conflicts = set()
    # row (z, i) reads columns (z + o_s, j); column (y, j) is read by rows (y - o_s, i)
    for table, sign in ((couplings, 1), (couplings.transpose(1, 0, 2), -1)):
        for reads in table:
            entries = list(zip(*np.nonzero(reads)))
            conflicts.update((i, j, tuple(sign * (offsets[s] - offsets[t])))
                             for i, s in entries for j, t in entries if (i, s) != (j, t))
    by_pair = {}
    for i, j, d in conflicts:
        by_pair.setdefault((i, j), []).append(d)
    by_pair = {pair: np.array(d, dtype=np.int64).reshape(-1, ndim) for pair, d in by_pair.items()}
    # the fallback: points coloured for full coupling (one component), the component appended
    side = 2 * int(np.abs(offsets).max()) + 1
    a, q_points = side ** np.arange(ndim), side ** ndim
    diffs = (offsets[:, None] - offsets[None]).reshape(-1, ndim)
    diffs = diffs[(diffs != 0).any(axis=1)]
    for q in range(len(offsets), q_points):
        candidates = _coefficients(q, ndim)
        good = ((candidates @ diffs.T) % q != 0).all(axis=1)
        if good.any():
            a, q_points = candidates[np.argmax(good)], q
            break
    fallback = dof * a, np.arange(dof), dof * q_points
    widest = max(max(int(table.sum()) for table in couplings),
                 max(int(table.sum()) for table in couplings.transpose(1, 0, 2)))
    for q in range(widest, dof * q_points):
        for a in _coefficients(q, ndim):
            b = _offsets_of_components(by_pair, a, q, dof)
            if b is not None:
                return a, b, q
    return fallback


def _coefficients(q, ndim):
    """Candidate a = (1, a_1, ..., a_ndim-1) with 0 <= a_k < q."""
    rest = np.indices((q,) * (ndim - 1), dtype=np.int64).reshape(ndim - 1, -1).T
    return np.concatenate([np.ones((len(rest), 1), np.int64), rest], axis=1)


def _offsets_of_components(by_pair, a, q, dof):
    """b with (a . d + b[i] - b[j]) mod q != 0 for every conflict (i, j, d), by backtracking;
    None if there is none."""
    forbidden = {pair: set(((d @ a) % q).tolist()) for pair, d in by_pair.items()}
    if any(0 in forbidden.get((i, i), ()) for i in range(dof)):
        return None
    b = [0]

    def extend():
        if len(b) == dof:
            return True
        j = len(b)
        for value in range(q):  # b[j] - b[i] must avoid a . d for conflicts (i, j, d)
            if all((value - b[i]) % q not in forbidden.get((i, j), ()) and
                   (b[i] - value) % q not in forbidden.get((j, i), ()) for i in range(j)):
                b.append(value)
                if extend():
                    return True
                b.pop()
        return False
    return np.array(b, dtype=np.int64) if extend() else None


_LATTICE = {}  # lattice_colouring's answers, by stencil


def _check_coupling(coupling, dof):
    """(point, neighbours) as dof x dof boolean arrays with a true diagonal at the point (a
    Jacobian's shift needs it), or None."""
    if coupling is None:
        return None
    if not isinstance(coupling, (tuple, list)) or len(coupling) != 2:
        raise ValueError(f"Grid: coupling must be a pair (point, neighbours) of {dof} x {dof} "
                         f"arrays of 0/1, got {coupling!r}")
    point, neighbours = (np.asarray(c) for c in coupling)
    for name, c in (("point", point), ("neighbours", neighbours)):
        if c.shape != (dof, dof) or not np.isin(c, (0, 1)).all():
            raise ValueError(f"Grid: coupling's {name} table must be a {dof} x {dof} array of "
                             f"0/1 (dof = {dof}), got {c.tolist()!r}")
    return point.astype(bool) | np.eye(dof, dtype=bool), neighbours.astype(bool)


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
    place, in one reduction. Every rank passes the same parameters, in the same order.

    A solve on a grid gives each rank a share of the parameter gradient; the shares sum to the
    gradient of the total loss (the sum of the ranks' losses). After this call every rank holds
    that gradient, exactly as for parameters whose gradients came from rank-local work. A
    ``.grad`` that is None on a rank (its loss did not use the parameter) counts as zero there,
    and stays None only if it is None on every rank. Under torch's DistributedDataParallel do
    not call it: DDP averages the shares, which is the gradient of the mean of the ranks'
    losses (multiply each rank's loss by the world size for the total).
    """
    parameters = list(parameters)
    comm = comm or PETSc.COMM_WORLD
    if comm.getSize() == 1:
        return
    from mpi4py import MPI
    mpi = comm.tompi4py()
    sizes = [p.numel() for p in parameters]
    total = sum(sizes)
    agreed = np.array([total, -total], dtype=np.int64)
    mpi.Allreduce(MPI.IN_PLACE, agreed, op=MPI.MAX)
    if agreed[0] != -agreed[1]:
        raise ValueError(f"sum_gradients: the ranks passed parameters of different total sizes "
                         f"({-agreed[1]} to {agreed[0]} entries); every rank must pass the same "
                         f"parameters in the same order")
    # the gradients, then one flag per parameter: whether some rank has a gradient for it
    flat = torch.zeros(total + len(parameters), dtype=torch.float64)
    offset = 0
    for k, (p, n) in enumerate(zip(parameters, sizes)):
        if p.grad is not None:
            flat[offset:offset + n] = p.grad.reshape(-1)
            flat[total + k] = 1.0
        offset += n
    mpi.Allreduce(MPI.IN_PLACE, flat.numpy(), op=MPI.SUM)
    offset = 0
    for k, (p, n) in enumerate(zip(parameters, sizes)):
        summed = flat[offset:offset + n].view(p.shape)
        if p.grad is not None:
            p.grad.copy_(summed)
        elif flat[total + k] > 0:
            p.grad = summed.to(p.dtype).clone()
        offset += n
