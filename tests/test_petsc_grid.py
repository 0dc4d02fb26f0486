"""Grids on PETSc's DMDA: blocks and halos, grid colourings in Jacobians, multigrid levels, and
distributed solves and ODE adjoints that agree with one rank (mpiexec -n 2 and -n 4)."""

import warnings

import numpy as np
import pytest
import torch

from bridges.petsc import (ColouredJacobian, Grid, mg_levels, odeint_adjoint, solve,
                           stencil_sparsity, sum_gradients)
from bridges.petsc import _jacobian
from bridges.petsc._grid import lattice_colouring
from mpi_cases import gray_scott_like

F64 = torch.float64


# -- one rank -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,dof,width", [((7,), 1, 1), ((5, 8), 1, 2), ((4, 5, 6), 3, 1)])
def test_blocks_shapes_and_a_gather_scatter_round_trip(shape, dof, width):
    grid = Grid(shape, dof=dof, stencil_width=width)
    point = (dof,) if dof > 1 else ()
    assert grid.owned_shape == shape + point and grid.size == 1
    assert grid.ghosted_shape == tuple(n + 2 * width for n in shape) + point
    assert all(s == slice(width, width + n) for s, n in zip(grid.interior, shape))
    full = torch.randn(shape + point, dtype=F64)
    owned = grid.scatter(full)
    torch.testing.assert_close(grid.gather(owned), full)
    with pytest.raises(ValueError, match="expected this rank's owned block of shape"):
        grid.gather(owned[:1])


def test_halo_exchange_wraps_periodic_axes_and_zeroes_the_exterior():
    grid = Grid((4, 5), boundary=("periodic", "ghosted"))
    values = torch.arange(20, dtype=F64).view(4, 5)
    vec = grid.global_vec()
    grid.owned_view(vec, "w").copy_(values)
    ghosted = grid.exchange(vec).clone()
    torch.testing.assert_close(ghosted[1:-1, 1:-1], values)
    torch.testing.assert_close(ghosted[0, 1:-1], values[-1])   # periodic in y
    torch.testing.assert_close(ghosted[-1, 1:-1], values[0])
    assert bool((ghosted[:, 0] == 0).all() and (ghosted[:, -1] == 0).all())  # ghosted in x
    assert grid.exterior()[:, 0].all() and not grid.exterior()[1:-1, 1:-1].any()
    grid.exchange(vec)[:, 0] = 7.0  # a careless caller writes into the exterior ...
    assert bool((grid.exchange(vec)[:, 0] == 0).all())  # ... the next exchange restores it
    vec.destroy()


def _stencil_function(grid, u):
    i, w = grid.interior, grid.stencil_width
    c = u[i]
    out = c ** 3 - 4 * c
    for axis in range(len(grid.shape)):
        for shift in range(1, w + 1):
            for sign in (-1, 1):
                index = [slice(w, u.shape[k] - w) for k in range(len(grid.shape))]
                index[axis] = slice(w + sign * shift, u.shape[axis] - w + sign * shift)
                out = out + (1.0 + 0.3 * shift * sign) * u[tuple(index)] * (1 + 0.1 * c)
    if grid.stencil == "box":
        out = out + 0.2 * u[:-2, :-2] * u[2:, 2:]
    if grid.dof > 1:
        out = out + 0.5 * torch.flip(c, dims=[-1]) ** 2
    return out


@pytest.mark.parametrize("direct_from", [0, None], ids=["in-place", "default"])
@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("shape,boundary,dof,stencil,width", [
    ((10, 15), "ghosted", 1, "star", 1), ((10, 15), "periodic", 2, "star", 1),
    ((10, 15), "ghosted", 2, "box", 1), ((10, 15), "periodic", 1, "star", 2),
    ((16, 16), "periodic", 1, "star", 1), ((16, 8), "periodic", 1, "box", 1),
    ((2, 8), "periodic", 2, "star", 1)])  # both neighbours of a point one: COO sums them
def test_grid_jacobian_from_the_grid_colouring_is_exact(shape, boundary, dof, stencil, width, mode,
                                                       direct_from, monkeypatch):
    if direct_from is not None:
        monkeypatch.setattr(_jacobian, "DIRECT_FROM", direct_from)
    grid = Grid(shape, dof=dof, stencil=stencil, stencil_width=width, boundary=boundary)
    u = torch.randn(grid.ghosted_shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    u[grid.exterior()] = 0.0
    assembler = ColouredJacobian.on_grid(grid, mode=mode)

    def fn(v):
        return _stencil_function(grid, v)
    mat = assembler.assemble(fn, u, diag_shift=0.5, factor=2.0, out_shape=grid.owned_shape)
    got = torch.from_numpy(mat.convert("dense").getDenseArray().copy())
    # reference: the Jacobian w.r.t. the ghosted block, ghost columns folded onto their owners
    jac = torch.func.jacrev(fn)(u).reshape(int(np.prod(grid.owned_shape)), -1)
    owner = grid.dm.getLGMap().getIndices()
    expected = 0.5 * torch.eye(jac.shape[0], dtype=F64)
    for j in np.flatnonzero(owner >= 0):
        expected[:, owner[j]] += 2.0 * jac[:, j]
    torch.testing.assert_close(got, expected)
    owned_colours, _ = grid.colours()
    assert assembler.evaluations == owned_colours.max() + 1  # one product per colour


@pytest.mark.parametrize("ndim,width,stencil", [(d, w, s) for d in (1, 2, 3) for w in (1, 2)
                                                 for s in ("star", "box")])
def test_lattice_colouring_tells_apart_what_one_stencil_reaches(ndim, width, stencil):
    offsets = np.array(list(np.ndindex(*(2 * width + 1,) * ndim))) - width
    if stencil == "star":
        offsets = offsets[(offsets != 0).sum(axis=1) <= 1]
    a, b, q = lattice_colouring(offsets)
    assert b.tolist() == [0]
    # the points one stencil reaches, from every centre of a patch around the origin
    centres = np.array(list(np.ndindex(*(8 * width + 5,) * ndim))) - 4 * width - 2
    colours = np.sort(((centres[:, None, :] + offsets[None]) @ a) % q, axis=1)
    assert (np.diff(colours, axis=1) > 0).all()
    assert q == len(offsets) or (ndim, width, stencil) == (2, 2, "star")  # optimal but one
    assert q <= (2 * width + 1) ** ndim


@pytest.mark.parametrize("point,neighbours,colours", [
    (np.ones((2, 2)), np.eye(2), 6),  # Gray-Scott, BRUSS-2D: 6 per row, 6 colours (not 10)
    (np.ones((2, 2)), np.ones((2, 2)), 10),  # full coupling: the points' 5 colours, twice
    (np.eye(3) + np.eye(3, k=-1), np.diag([1, 0, 1]), 6),  # asymmetric: rows != columns
    (np.ones((4, 4)), np.eye(4), 8),
    (np.eye(2), np.array([[0, 1], [1, 0]]), 5)])  # each reads the other's neighbours
def test_lattice_colouring_of_coupled_components_separates_columns_and_rows(point, neighbours,
                                                                           colours):
    """Unknowns (x, j) coloured (a . x + b[j]) mod q: the unknowns one equation reads differ
    (forward mode), and so do the equations that read one unknown (reverse mode)."""
    grid = Grid((6, 6), dof=len(point), coupling=(point, neighbours))
    offsets, couplings = grid.stencil_offsets(), grid.couplings()
    a, b, q = lattice_colouring(offsets, couplings)
    assert q == colours
    dof = len(b)
    centres = np.array(list(np.ndindex(9, 9))) - 4
    for table, sign in ((couplings, 1), (couplings.transpose(1, 0, 2), -1)):
        for reads in table:  # one equation's columns, or one column's equations
            j, s = np.nonzero(reads)
            colour = ((centres[:, None, :] + sign * offsets[s][None]) @ a + b[j]) % q
            colour = np.sort(colour, axis=1)
            assert (np.diff(colour, axis=1) > 0).all()
    assert dof == len(point)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("shape", [(8, 8), (5, 7)])
def test_a_grid_coupling_assembles_the_exact_jacobian_with_fewer_products(shape, mode):
    """A Gray-Scott coupling (the components meet only at their own point): 6 products instead
    of 10, a matrix with 6 entries per row, and the same Jacobian as torch's dense one."""
    grid = Grid(shape, dof=2, boundary="periodic", coupling=(np.ones((2, 2)), np.eye(2)))
    u = torch.randn(grid.ghosted_shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    fn = gray_scott_like
    assembler = ColouredJacobian.on_grid(grid, mode=mode)
    mat = assembler.assemble(fn, u, diag_shift=0.5, factor=-2.0, out_shape=grid.owned_shape)
    assert assembler.evaluations == 6
    assert mat.getInfo()["nz_used"] == 6 * 2 * np.prod(shape)
    got = torch.from_numpy(mat.convert("dense").getDenseArray().copy())
    jac = torch.autograd.functional.jacobian(fn, u).reshape(int(np.prod(grid.owned_shape)), -1)
    owner = grid.dm.getLGMap().getIndices()
    expected = 0.5 * torch.eye(jac.shape[0], dtype=F64)
    for j in range(jac.shape[1]):  # ghost columns folded onto their owners
        expected[:, owner[j]] -= 2.0 * jac[:, j]
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_a_function_that_reads_more_than_the_coupling_says_is_refused(mode):
    grid = Grid((6, 6), dof=2, boundary="periodic", coupling=(np.ones((2, 2)), np.eye(2)))
    u = torch.rand(grid.ghosted_shape, dtype=F64, generator=torch.Generator().manual_seed(4))

    def fn(v):  # u's equation reads v's left neighbour: not declared
        c = v[1:-1, 1:-1]
        return torch.stack([c[..., 0] * c[..., 1] + v[1:-1, :-2, 1], c[..., 1] ** 2], -1)
    assembler = ColouredJacobian.on_grid(grid, mode=mode)
    with pytest.raises(ValueError, match=r"reads unknowns that Grid\(coupling=...\)"):
        assembler.assemble(fn, u, out_shape=grid.owned_shape)
    # the same function with the coupling it has passes
    grid = Grid((6, 6), dof=2, boundary="periodic", coupling=(np.ones((2, 2)), [[1, 1], [0, 1]]))
    ColouredJacobian.on_grid(grid, mode=mode).assemble(fn, u, out_shape=grid.owned_shape)


def test_a_pattern_that_misses_an_entry_is_refused():
    def fn(x):
        return x ** 2 + 0.5 * x.roll(2)
    x = torch.rand(6, dtype=F64) + 0.5
    assembler = ColouredJacobian(np.eye(6, dtype=bool) | np.eye(6, k=1, dtype=bool))
    with pytest.raises(ValueError, match="reads unknowns that the sparsity pattern leaves out"):
        assembler.assemble(fn, x)


@pytest.mark.parametrize("coupling,message", [
    ((np.ones((3, 3)), np.eye(3)), r"point table must be a 2 x 2 array"),
    ((np.ones((2, 2)), np.full((2, 2), 2)), r"neighbours table must be a 2 x 2 array of 0/1"),
    (np.eye(2), r"coupling must be a pair \(point, neighbours\)")])
def test_a_malformed_coupling_says_what_it_needs(coupling, message):
    with pytest.raises(ValueError, match=message):
        Grid((6, 6), dof=2, coupling=coupling)


@pytest.mark.parametrize("shape,boundary,dof,stencil,width", [
    ((8, 8), "periodic", 2, "star", 1), ((7, 6), "periodic", 1, "box", 1),
    ((9, 4), ("periodic", "ghosted"), 3, "star", 2), ((4, 5, 6), "periodic", 1, "star", 1)])
def test_grid_colours_separate_the_columns_of_a_row_and_the_rows_of_a_column(
        shape, boundary, dof, stencil, width):
    """What forward mode needs (the ghosted columns one owned row reads differ in colour, ghost
    points apart from their owners) and reverse mode needs (the owned rows that read one
    ghosted column differ), on any size, periodic wrap-around included."""
    grid = Grid(shape, dof=dof, stencil=stencil, stencil_width=width, boundary=boundary)
    owned, ghosted = grid.colours()
    spatial = grid.ghosted_shape[:len(shape)]
    ghosted_points = ghosted.reshape(*spatial, dof)
    owned_points = owned.reshape(*grid.owned_shape[:len(shape)], dof)
    reads = {}  # ghosted point -> colours of the owned points reading it
    for p in np.ndindex(*grid.owned_shape[:len(shape)]):
        at = np.array(p) + [s.start for s in grid.interior]
        columns = [tuple(at + o) for o in grid.stencil_offsets()]
        colours = [c for q in columns for c in ghosted_points[q] if c >= 0]
        assert len(colours) == len(set(colours)), (p, colours)
        for q in columns:
            reads.setdefault(q, []).extend(owned_points[p])
    assert all(len(c) == len(set(c)) for c in reads.values())
    assert set(owned.tolist()) == set(range(owned.max() + 1))


@pytest.mark.parametrize("n", [8, 16])
@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_power_of_two_periodic_grids_assemble_in_either_mode(n, mode):
    """Power-of-2 periodic sizes (which DMDA's own colouring cannot serve) in forward mode too:
    10 products (5 point colours x 2 components) against torch's dense Jacobian."""
    grid = Grid((n, n), dof=2, boundary="periodic")
    u = torch.randn(grid.ghosted_shape, dtype=F64, generator=torch.Generator().manual_seed(n))
    fn = gray_scott_like
    assembler = ColouredJacobian.on_grid(grid, mode=mode)
    mat = assembler.assemble(fn, u, diag_shift=0.5, factor=-2.0, out_shape=grid.owned_shape)
    got = torch.from_numpy(mat.convert("dense").getDenseArray().copy())
    jac = torch.autograd.functional.jacobian(fn, u).reshape(2 * n * n, -1)
    owner = grid.dm.getLGMap().getIndices()
    expected = 0.5 * torch.eye(2 * n * n, dtype=F64)
    for j in range(jac.shape[1]):  # ghost columns folded onto their owners
        expected[:, owner[j]] -= 2.0 * jac[:, j]
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
    assert assembler.evaluations == 10


def test_auto_mode_takes_forward_on_a_large_periodic_power_of_two_grid():
    grid = Grid((64, 64), dof=2, boundary="periodic")
    u = torch.rand(grid.ghosted_shape, dtype=F64, generator=torch.Generator().manual_seed(0))

    def fn(v):
        c = v[1:-1, 1:-1]
        return v[:-2, 1:-1] * v[2:, 1:-1] + v[1:-1, :-2] - v[1:-1, 2:] * c + c.flip(-1) ** 2
    assembler = ColouredJacobian.on_grid(grid)
    mat = assembler.assemble(fn, u, out_shape=grid.owned_shape)
    assert assembler.mode == "forward" and assembler.evaluations == 10
    # a product with the matrix against torch's forward-mode product
    vec = grid.global_vec()
    grid.owned_view(vec, "w").copy_(torch.rand(grid.owned_shape, dtype=F64,
                                               generator=torch.Generator().manual_seed(1)))
    out = grid.global_vec()
    mat.mult(vec, out)
    _, expected = torch.func.jvp(fn, (u,), (grid.exchange(vec).clone(),))
    torch.testing.assert_close(grid.owned_view(out, "r"), expected, rtol=1e-13, atol=1e-13)


def test_a_matrix_type_without_aij_arrays_takes_coo_insertion(monkeypatch):
    """The values go straight into the AIJ arrays; any other type gets them through PETSc's COO
    insertion, with the same result."""
    # by default, only matrices of DIRECT_FROM entries or more are written in place
    assert ColouredJacobian.on_grid(Grid((4, 4), dof=2))._slots is None
    assert ColouredJacobian.on_grid(Grid((48, 48), dof=2))._slots is not None
    monkeypatch.setattr(_jacobian, "DIRECT_FROM", 0)
    mats = []
    for kind in ("aij", "baij"):
        grid = Grid((6, 8), dof=2, boundary="periodic")
        grid.dm.setMatType(kind)
        u = torch.rand(grid.ghosted_shape, dtype=F64, generator=torch.Generator().manual_seed(2))
        assembler = ColouredJacobian.on_grid(grid, mode="forward")
        assert (assembler._slots is None) == (kind == "baij")
        mat = assembler.assemble(lambda v: v[1:-1, 1:-1] * v[2:, 1:-1] - v[:-2, 1:-1].sin(), u,
                                 diag_shift=1.5, factor=3.0, out_shape=grid.owned_shape)
        mats.append(mat.convert("dense").getDenseArray().copy())
    np.testing.assert_array_equal(mats[0], mats[1])
    assert np.count_nonzero(mats[0]) > 6 * 8 * 2


def test_stencil_sparsity_is_a_dmda_with_pcmg_levels():
    assembler = stencil_sparsity((9, 17))
    assert assembler.grid.dm.getStencil() == ("star", 1) and assembler.n == 9 * 17
    assert mg_levels(assembler.grid) == 3   # 9 x 17 -> 5 x 9 -> 3 x 5
    assert stencil_sparsity((8, 8), offsets=[(1, 1), (-1, -1)]).grid.stencil == "box"
    assert mg_levels(Grid((64, 64), boundary="periodic")) == 5  # down to 4 x 4
    with pytest.raises(ValueError, match="every offset needs 2 entries"):
        stencil_sparsity((4, 4), offsets=[(1,)])


def test_multigrid_on_a_grid_it_cannot_coarsen_is_warned_about():
    """pc_type mg on a grid whose sizes do not halve gets one level (its smoother alone): solve
    and the ODE's Newton solves say so and name sizes that coarsen; a size that does is quiet."""
    kappa = torch.tensor([0.7, 0.3], dtype=F64)

    def calls(n):
        grid = Grid((n, n))
        yield lambda: solve(lambda u: 4 * u[grid.interior] - u[:-2, 1:-1] - u[2:, 1:-1]
                            - u[1:-1, :-2] - u[1:-1, 2:] - 1.0, grid.zeros(), grid=grid,
                            linear=True, options={"ksp_type": "cg", "pc_type": "mg"})
        yield lambda: odeint_adjoint(_heat(grid, kappa), grid.zeros() + 1.0,
                                     torch.tensor([0.0, 0.01], dtype=F64), method="cn",
                                     step_size=0.005, grid=grid, options={"pc_type": "mg"})
    for call in calls(20):
        with pytest.warns(UserWarning, match=r"pc_type mg on a grid of shape \(20, 20\) has 1 "
                                             r"level.*sizes such as \(33, 33\).*'gamg'"):
            call()
    for call in calls(17):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            call()


def test_a_solve_on_a_grid_matches_the_full_array_solve():
    n = 17
    grid = Grid((n, n))
    kappa = torch.tensor(1.4, dtype=F64, requires_grad=True)
    source = torch.rand(n, n, dtype=F64, generator=torch.Generator().manual_seed(3))

    def on_grid(u, kappa):
        i = grid.interior
        lap = 4 * u[i] - u[:-2, 1:-1] - u[2:, 1:-1] - u[1:-1, :-2] - u[1:-1, 2:]
        return kappa * lap + u[i] ** 3 - source

    def full(x, kappa):  # the same equations, zero outside
        return on_grid(torch.nn.functional.pad(x, (1, 1, 1, 1)), kappa)
    xs, grads = [], []
    for fn, kwargs in ((on_grid, {"grid": grid}), (full, {"sparsity": stencil_sparsity((n, n))})):
        x = solve(fn, torch.zeros(n, n, dtype=F64), kappa, **kwargs)
        (grad,) = torch.autograd.grad(x.square().sum(), kappa)
        xs.append(x)
        grads.append(grad)
    torch.testing.assert_close(xs[0], xs[1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=0)


def test_a_linear_solve_keeps_its_gradient_when_an_ode_refills_the_grids_matrix():
    """A linear solve reuses its constant Jacobian at backward, from the matrix every solve on
    the grid shares; an implicit ODE between forward and backward refilled it with shift*I - J,
    and the gradient came out 16x too small (symmetric, so no check saw it)."""
    grid = Grid((9, 9))

    def lap(u):
        i = grid.interior
        return 4 * u[i] - u[:-2, 1:-1] - u[2:, 1:-1] - u[1:-1, :-2] - u[1:-1, 2:]

    def residual(u, kappa):
        return kappa * lap(u) + u[grid.interior] - 1.0

    def loss(kappa, ode_in_between=False):
        x = solve(residual, grid.zeros(), kappa, grid=grid, linear=True)
        if ode_in_between:
            with torch.no_grad():
                odeint_adjoint(lambda t, u: -5.0 * lap(u) - u[grid.interior] ** 3,
                               grid.zeros() + 1, torch.tensor([0.0, 0.1], dtype=F64),
                               method="beuler", step_size=0.05, grid=grid)
        return x.square().sum()

    kappa = torch.tensor(1.3, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(loss(kappa, ode_in_between=True), kappa)
    h = 1e-6
    with torch.no_grad():
        fd = (loss(torch.tensor(1.3 + h, dtype=F64)) - loss(torch.tensor(1.3 - h, dtype=F64))) \
            / (2 * h)
    assert abs(g.item() - fd.item()) < 1e-6 * abs(fd.item())


def test_two_live_ode_solves_on_one_grid_keep_their_own_callbacks():
    """PETSc keeps a TS's callbacks on its DM: solves sharing the grid's DMDA would call each
    other's (or freed) callbacks in their adjoints. Chained solves give the one-solve gradient."""
    grid = Grid((8, 8), boundary="periodic")
    rate = torch.tensor(0.7, dtype=F64, requires_grad=True)

    def rhs(t, u):
        i = grid.interior
        lap = u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:] - 4 * u[i]
        return lap - rate * u[i] ** 3
    y0 = torch.rand(8, 8, dtype=F64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 0.1, 0.2], dtype=F64)
    kwargs = dict(method="cn", step_size=0.025, grid=grid, adjoint_params=(rate,))
    (whole,) = torch.autograd.grad(odeint_adjoint(rhs, y0, t, **kwargs)[-1].sum(), rate)
    middle = odeint_adjoint(rhs, y0, t[:2], **kwargs)[-1]
    end = odeint_adjoint(rhs, middle, t[1:], **kwargs)[-1]  # both alive until backward
    (chained,) = torch.autograd.grad(end.sum(), rate)
    torch.testing.assert_close(chained, whole, rtol=1e-9, atol=0)


def _heat(grid, kappa):
    """Stiff nonlinear diffusion on the grid's ghosted block (zero outside the domain)."""
    def rhs(t, u):
        i = grid.interior
        lap = 4 * u[i] - u[:-2, 1:-1] - u[2:, 1:-1] - u[1:-1, :-2] - u[1:-1, 2:]
        return -40 * kappa[0] * lap - kappa[1] * u[i] ** 3
    return rhs


def test_multigrid_time_stepping_gradient_matches_central_differences(monkeypatch):
    """Above MULTIGRID_FROM unknowns (lowered here) Newton's linear solves on a grid use the
    DMDA's geometric multigrid with Galerkin coarse operators (PETSc's PtAP runs), in the
    forward solve and the adjoint; TSAdjoint's gradient equals central differences of the same
    discrete solve, for the parameters and for y0."""
    from bridges.petsc import PETSc
    from bridges.petsc import _ode_jacobians
    monkeypatch.setattr(_ode_jacobians, "MULTIGRID_FROM", 0)
    PETSc.Log.begin()
    ptap = PETSc.Log.Event("MatPtAPNumeric")
    grid = Grid((33, 33))  # 5 levels: 33, 17, 9, 5, 3 points per axis
    axes = torch.meshgrid(*[torch.linspace(0, 1, 33, dtype=F64)] * 2, indexing="ij")
    y0 = (torch.sin(3 * axes[0] + 1) * torch.cos(2 * axes[1]))[grid.owned]
    weights = torch.cos(5 * axes[0] - axes[1])[grid.owned]
    t = torch.tensor([0.0, 0.02, 0.05], dtype=F64)
    tight = {"snes_rtol": 1e-13, "snes_atol": 1e-50, "ksp_rtol": 1e-13, "ksp_atol": 1e-50}

    def loss(kappa, y0):
        ys = odeint_adjoint(_heat(grid, kappa), y0, t, method="cn", step_size=0.005, grid=grid,
                            adjoint_params=(kappa,), options=tight)
        return (weights * ys[-1]).sum() + ys[1].square().sum()
    kappa = torch.tensor([0.7, 0.3], dtype=F64, requires_grad=True)
    start = ptap.getPerfInfo()["count"]
    y0_leaf = y0.clone().requires_grad_()
    loss(kappa, y0_leaf).backward()
    assert ptap.getPerfInfo()["count"] > start  # Galerkin coarse operators were built
    h = 1e-6
    with torch.no_grad():
        for i in range(2):
            step = torch.zeros(2, dtype=F64)
            step[i] = h
            central = (loss(kappa + step, y0) - loss(kappa - step, y0)) / (2 * h)
            torch.testing.assert_close(kappa.grad[i], central, rtol=1e-6, atol=0)
        direction = weights.flip(0)
        central = (loss(kappa, y0 + h * direction) - loss(kappa, y0 - h * direction)) / (2 * h)
        torch.testing.assert_close((y0_leaf.grad * direction).sum(), central, rtol=1e-6,
                                   atol=0)


def test_live_singular_solves_keep_their_null_space_when_another_is_released():
    """Solves on one grid share its assembled matrix; releasing one (its output dies) must not
    take the constant null space from the others that still await their backward."""
    n = 8
    grid = Grid((n, n), boundary="periodic")

    def poisson(phi, b):
        i = grid.interior
        return b - (phi[:-2, 1:-1] + phi[2:, 1:-1] + phi[1:-1, :-2] + phi[1:-1, 2:] - 4 * phi[i])
    rng = torch.Generator().manual_seed(5)
    fields = [torch.rand(n, n, dtype=F64, generator=rng) for _ in range(3)]
    b = [(f - f.mean()).requires_grad_() for f in fields]
    kwargs = dict(grid=grid, linear=True, symmetric=True, nullspace="constant",
                  options={"ksp_type": "cg", "pc_type": "jacobi", "ksp_rtol": 1e-12})
    kept = solve(poisson, grid.zeros(), b[0], **kwargs)
    solve(poisson, grid.zeros(), b[1], **kwargs)  # released at once: its output is dropped
    weights = torch.rand(n, n, dtype=F64, generator=rng)
    (grad,) = torch.autograd.grad((kept * weights).sum(), b[0])
    # the zero-mean solution's gradient is the zero-mean solution for the zero-mean weights
    expected = solve(poisson, grid.zeros(), weights - weights.mean(), **kwargs).detach()
    torch.testing.assert_close(grad - grad.mean(), expected - expected.mean(), rtol=1e-8,
                               atol=1e-10)


def test_bad_grid_arguments_are_named():
    with pytest.raises(ValueError, match="Grid: shape must give 1 to 3 positive sizes"):
        Grid((2, 2, 2, 2))
    with pytest.raises(ValueError, match="Grid: unknown stencil 'cross'; valid: star, box"):
        Grid((4, 4), stencil="cross")
    with pytest.raises(ValueError, match="boundary must be one of ghosted, periodic, none"):
        Grid((4, 4), boundary="wrap")
    with pytest.raises(ValueError, match="solve: x0: expected this rank's owned block"):
        solve(lambda u: u[1:-1, 1:-1], torch.zeros(3, 3, dtype=F64), grid=Grid((4, 4)))
    with pytest.raises(ValueError, match="give sparsity= or grid=, not both"):
        solve(lambda u: u, torch.zeros(4, 4, dtype=F64), grid=Grid((4, 4)),
              sparsity=stencil_sparsity((4, 4)))


def test_sum_gradients_is_the_identity_on_one_rank():
    p = torch.nn.Parameter(torch.ones(3, dtype=F64))
    p.grad = torch.full((3,), 2.0, dtype=F64)
    sum_gradients([p])
    torch.testing.assert_close(p.grad, torch.full((3,), 2.0, dtype=F64))


# -- many ranks -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def distributed(run_under_mpiexec):
    """Every case of tests/mpi_cases.py on 1, 2 and 4 ranks (4 oversubscribe these 2 cores)."""
    return {ranks: run_under_mpiexec("mpi_cases.py", ranks) for ranks in (1, 2, 4)}


@pytest.mark.parametrize("ranks", [2, 4])
def test_distributed_results_match_one_rank(distributed, ranks):
    one, many = distributed[1], distributed[ranks]
    assert set(one) == set(many)
    for key in sorted(k for k in one if not k.endswith("_central")):  # FD: accurate to ~1e-8
        scale = max(np.abs(one[key]).max(), 1e-300)
        error = np.abs(many[key] - one[key]).max() / scale
        assert error < 1e-10, f"{key}: {ranks} ranks differ from 1 by {error:.2e} (relative)"


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_wide_stencil_halos_and_colouring_reproduce_the_manufactured_solution(distributed,
                                                                               ranks):
    result = distributed[ranks]
    error = np.abs(result["wide_x"] - result["wide_exact"]).max()
    assert error < 1e-10 * np.abs(result["wide_exact"]).max(), error


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_distributed_multigrid_time_stepping_matches_central_differences(distributed, ranks):
    result = distributed[ranks]
    np.testing.assert_allclose(result["mg_kappa"], result["mg_central"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_periodic_power_of_two_jacobian_is_the_same_in_both_modes_and_couplings(distributed,
                                                                              ranks):
    """(test_distributed_results_match_one_rank compares each rank count with one rank.)"""
    result = distributed[ranks]
    for name in ("mult", "transpose"):
        reference = result[f"jacobian_full_forward_{name}"]
        for key in (f"jacobian_{label}_{mode}_{name}" for label in ("full", "coupled")
                    for mode in ("forward", "reverse")):
            np.testing.assert_allclose(result[key], reference, rtol=1e-13, atol=1e-13,
                                       err_msg=key)


def test_ddp_training_through_a_distributed_solve_reduces_the_loss(distributed):
    for ranks in (1, 2, 4):
        losses = distributed[ranks]["ddp_losses"]
        assert losses[-1] < losses[0], losses
