"""bridges.fracture: the PETSc and torch-native TPFA solves against each other, finite differences,
gradcheck and analytic solutions; the Julia solvers (ours and DPFEHM's) where Julia runs, and
DPFEHM's graph of the grid checked here against the operator."""
import gc
import importlib.util

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.autograd import gradcheck

from bridges import ForeignError
from bridges.fracture import (BACKENDS, DPFEHM_INSTALL, boundary_flux, cubic_law,
                              dpfehm_unavailable_reason, grid_edges, linear_profile, pressure,
                              pressure_dpfehm, pressure_petsc, pressure_torch, residual,
                              synthetic_fracture)
from bridges.fracture._grid import assemble
from bridges.julia import JuliaUnavailableError, julia_unavailable_reason

F64 = torch.float64
SOLVERS = {"torch": pressure_torch, "petsc": pressure_petsc}
TIGHT = {"ksp_rtol": 1e-14}  # PETSc at (near) machine precision for cross-checks


def _solve(name, k, **kw):
    return pressure_petsc(k, options=TIGHT, **kw) if name == "petsc" else pressure_torch(k, **kw)


def _relerr(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_petsc_and_torch_agree_on_64x64_in_pressure_and_gradient():
    f = synthetic_fracture(64, seed=3)
    aperture = f.aperture
    theta = (0.3 * torch.randn(64, 64, dtype=F64, generator=torch.Generator().manual_seed(1))
             ).requires_grad_()
    target = pressure_torch(f.k_true).detach()
    results = {}
    for name in SOLVERS:
        p = _solve(name, cubic_law(aperture) * theta.exp())
        loss = ((p - target) ** 2).sum()
        (g,) = torch.autograd.grad(loss, theta)
        results[name] = (p.detach(), g)
    (pt, gt), (pp, gp) = results["torch"], results["petsc"]
    assert _relerr(pp, pt) < 1e-10
    assert _relerr(gp, gt) < 1e-8
    assert gt.abs().max() > 0


def test_default_petsc_settings_are_tight():
    f = synthetic_fracture(64, seed=4)
    stats = []
    p = pressure_petsc(f.k_true, stats=stats)
    assert _relerr(p, pressure_torch(f.k_true)) < 1e-9
    assert len(stats) == 1 and stats[0] > 0


@pytest.mark.parametrize("name", SOLVERS)
def test_gradient_matches_central_differences_16x16(name):
    f = synthetic_fracture(16, seed=5)
    base = cubic_law(f.aperture)
    weights = torch.linspace(-1, 1, 256, dtype=F64).reshape(16, 16)

    def loss(theta):
        return (weights * _solve(name, base * theta.exp()) ** 2).sum()

    theta = torch.zeros(16, 16, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(loss(theta), theta)
    h = 1e-4  # truncation error O(h^2) ~ 1e-9 here; rounding grows below
    fd = torch.zeros(16, 16, dtype=F64)
    with torch.no_grad():
        for idx in np.ndindex(16, 16):
            e = torch.zeros(16, 16, dtype=F64)
            e[idx] = h
            fd[idx] = (loss(e) - loss(-e)) / (2 * h)
    assert (g - fd).abs().max() < 1e-7 * fd.abs().max()


@pytest.mark.parametrize("name", SOLVERS)
def test_gradcheck(name):
    k = torch.exp(0.5 * torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(6)))
    assert gradcheck(lambda k: _solve(name, k), (k.requires_grad_(),), eps=1e-6, atol=1e-8,
                     rtol=1e-6)


@pytest.mark.parametrize("name", SOLVERS)
def test_uniform_aperture_gives_linear_profile(name):
    k = cubic_law(torch.full((12, 20), 0.7, dtype=F64))
    p = _solve(name, k, p_left=2.0, p_right=1.0)
    assert torch.allclose(p, linear_profile(12, 20), rtol=0, atol=1e-12)
    assert residual(p, k).abs().max() < 1e-12
    # lower precisions come back in their own dtype (bfloat16: numpy has none, the torch
    # backend failed in numpy's conversion)
    for dtype in (torch.float32, torch.bfloat16):
        low = _solve(name, k.to(dtype), p_left=2.0, p_right=1.0)
        assert low.dtype == dtype
        assert torch.allclose(low.double(), linear_profile(12, 20), rtol=0,
                              atol=float(torch.finfo(dtype).eps) * 4)
    # numpy scalars are numbers too
    numpy_scalars = _solve(name, k, p_left=np.float32(2.0), p_right=np.int64(1))
    assert torch.allclose(numpy_scalars, p, rtol=0, atol=1e-12)


def _discrete_series_flux(k1, k2, n1, n2, ny, dp):
    """TPFA flux for layers in series: resistances of half cells, faces and the interface face."""
    r = 1 / (2 * k1) + (n1 - 1) / k1 + 1 / np.sqrt(k1 * k2) + (n2 - 1) / k2 + 1 / (2 * k2)
    return ny * dp / r


@pytest.mark.parametrize("name", SOLVERS)
def test_two_layers_in_series_harmonic_mean(name):
    ny, nx, k1, k2 = 6, 40, 3.0, 0.2
    k = torch.full((ny, nx), k1, dtype=F64)
    k[:, nx // 2:] = k2
    p = _solve(name, k)
    q = boundary_flux(p, k).item()
    assert q == pytest.approx(_discrete_series_flux(k1, k2, nx // 2, nx // 2, ny, 1.0), rel=1e-11)
    # continuum: k_eff = harmonic mean over length 1 (plane height ny/nx); TPFA is O(1/nx) off
    harmonic = 2 / (1 / k1 + 1 / k2)
    assert q == pytest.approx(harmonic * ny / nx, rel=2 / nx)


@pytest.mark.parametrize("name", SOLVERS)
def test_two_layers_in_parallel_arithmetic_mean(name):
    ny, nx, k1, k2 = 8, 30, 3.0, 0.2
    k = torch.full((ny, nx), k1, dtype=F64)
    k[ny // 2:, :] = k2
    p = _solve(name, k)
    arithmetic = (k1 + k2) / 2
    assert boundary_flux(p, k).item() == pytest.approx(arithmetic * ny / nx, rel=1e-11)


@pytest.mark.parametrize("name", SOLVERS)
def test_pressure_is_invariant_to_a_global_scale_of_k(name):
    """p(s k) = p(k), so dL/dk at s k is dL/dk at k over s. At s = 1e-160 the torch backend's
    face transmissibility sqrt(k1 k2), a product first, underflowed (pressures 1e-4 off, then a
    singular factorisation), and PETSc's eigenvalue estimates failed ("maximum singular value
    zero") from about 1e-155."""
    k = synthetic_fracture(20, seed=7).k_true
    weights = torch.randn(k.shape, dtype=F64, generator=torch.Generator().manual_seed(3))

    def pressure_and_gradient(k):
        k = k.clone().requires_grad_()
        p = _solve(name, k)
        (grad,) = torch.autograd.grad((weights * p).sum(), k)
        return p.detach(), grad

    p, grad = pressure_and_gradient(k)
    for scale in (3.7, 1e-160):
        p_scaled, grad_scaled = pressure_and_gradient(scale * k)
        assert _relerr(p_scaled, p) < 1e-12
        assert _relerr(grad_scaled * scale, grad) < 1e-10


@pytest.mark.parametrize("name", SOLVERS)
def test_bad_permeability_is_refused_by_name(name):
    bad = torch.ones(4, 4, dtype=F64)
    bad[1, 2] = -1.0
    with pytest.raises(ValueError, match=rf"pressure_{name}: k holds -1 at index \(1, 2\); k "
                                         rf"must be finite and > 0"):
        SOLVERS[name](bad)
    bad[1, 2], bad[3, 0] = 1.0, float("nan")
    with pytest.raises(ValueError, match=rf"pressure_{name}: k holds nan at index \(3, 0\)"):
        SOLVERS[name](bad)
    with pytest.raises(ValueError, match=r"shape \(ny, nx\)"):
        SOLVERS[name](torch.ones(4, dtype=F64))
    for value in (True, float("inf"), "2", torch.tensor(2.0)):
        with pytest.raises(TypeError, match=rf"pressure_{name}: p_left must be a finite real "
                                            rf"number \(a Python or numpy scalar\), got"):
            SOLVERS[name](torch.ones(4, 4, dtype=F64), p_left=value)


@pytest.mark.parametrize("name", SOLVERS)
def test_vmap_over_permeability_fields_matches_a_loop(name):
    """torch.func.vmap over a batch of k (torch's "data-dependent control flow" error from the
    argument check before; the petsc backend's stats list then broke the per-sample split)."""
    k = torch.rand(3, 4, 5, dtype=F64, generator=torch.Generator().manual_seed(0)) + 0.5
    weights = torch.linspace(0.5, 2.0, 5, dtype=F64)

    def loss(kk):
        return (_solve(name, kk) * weights).sum()
    batched = torch.func.vmap(torch.func.grad(loss))(k)
    looped = torch.stack([torch.func.grad(loss)(kk) for kk in k])
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=0)
    bad = k.clone()
    bad[1, 2, 3] = -1.0
    with pytest.raises(Exception, match=rf"pressure_{name}: k holds -1 at index \(2, 3\)"):
        torch.func.vmap(lambda kk: _solve(name, kk))(bad)


def test_a_grid_too_small_for_a_synthetic_fracture_is_refused_by_name():
    with pytest.raises(ValueError, match=r"synthetic_fracture: the grid must be at least 2 x 2 "
                                         r"cells.*n=1, ny=1"):
        synthetic_fracture(1)
    assert synthetic_fracture(2, ny=3).k_true.shape == (3, 2)


def test_unknown_backend_and_bad_options():
    k = torch.ones(3, 3, dtype=F64)
    with pytest.raises(ValueError, match="backend must be one of"):
        pressure(k, backend="fortran")
    with pytest.raises(TypeError, match="options must be a dict"):
        pressure_petsc(k, options="pc_type lu")


def test_petsc_options_pass_through_and_failures_are_reported():
    k = synthetic_fracture(16, seed=8).k_true
    stats = []
    p = pressure_petsc(k, options={"ksp_type": "preonly", "pc_type": "lu"}, stats=stats)
    assert stats == [1]
    assert _relerr(p, pressure_torch(k)) < 1e-12
    with pytest.raises(ForeignError, match="the forward KSP solve failed: DIVERGED_MAX_IT after 1 "
                                           "iterations.*What to try"):
        pressure_petsc(k, options={"ksp_max_it": 1, "pc_type": "none"}, prefix="frac_")


def test_petsc_adjoint_is_one_transposed_solve():
    k = synthetic_fracture(32, seed=9).k_true.clone().requires_grad_()
    stats = []
    pressure_petsc(k, stats=stats).sum().backward()
    assert len(stats) == 2 and k.grad.abs().max() > 0


def test_petsc_one_cell_grid_and_outputs_never_differentiated_are_freed():
    """A 1 x 1 grid: its adjoint through GAMG's transposed solve failed (PETSc error 56) and
    freeing that KSP then aborted the process; the pressure does not depend on k there. An
    output that requires grad but never meets backward is freed at once (the run held the
    output itself, a cycle through its graph that kept every such run alive)."""
    k = torch.ones(1, 1, dtype=F64, requires_grad=True)
    pressure_petsc(k).sum().backward()
    assert k.grad.item() == 0.0
    k = synthetic_fracture(8, seed=2).k_true.clone().requires_grad_()
    gc.collect()
    before = sum(type(o).__name__ == "_PetscSolve" for o in gc.get_objects())
    gc.disable()
    try:
        for _ in range(5):
            pressure_petsc(k)
        alive = sum(type(o).__name__ == "_PetscSolve" for o in gc.get_objects())
    finally:
        gc.enable()
    assert alive == before


# -- Julia (bridges/fracture/Fracture.jl) -----------------------------------------------------------
_julia_missing = julia_unavailable_reason()
needs_julia = pytest.mark.skipif(_julia_missing is not None,
                                 reason=f"Julia is not available: {_julia_missing}")


@needs_julia
@pytest.mark.filterwarnings("ignore:.*torch was imported before juliacall")
def test_julia_agrees_with_torch_in_pressure_and_gradient():
    from bridges.fracture import pressure_julia
    f = synthetic_fracture(24, ny=20, seed=10)
    k1 = f.k_true.clone().requires_grad_()
    k2 = f.k_true.clone().requires_grad_()
    w = torch.randn(20, 24, dtype=F64, generator=torch.Generator().manual_seed(2))
    pj, pt = pressure_julia(k1), pressure_torch(k2)
    (pj * w).sum().backward()
    (pt * w).sum().backward()
    assert _relerr(pj.detach(), pt.detach()) < 1e-10
    assert _relerr(k1.grad, k2.grad) < 1e-8


@needs_julia
@pytest.mark.filterwarnings("ignore:.*torch was imported before juliacall")
def test_julia_gradcheck_and_linear_profile():
    from bridges.fracture import pressure_julia
    k = torch.exp(0.5 * torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(6)))
    assert gradcheck(pressure_julia, (k.requires_grad_(),), eps=1e-6, atol=1e-8, rtol=1e-6)
    p = pressure_julia(torch.full((6, 10), 0.3, dtype=F64))
    assert torch.allclose(p, linear_profile(6, 10), atol=1e-12)


def test_julia_unavailable_error_says_how_to_fix():
    if _julia_missing is None:
        pytest.skip("Julia is available here; this checks the message where it is not")
    from bridges.fracture import pressure_julia
    from bridges.julia import JuliaUnavailableError
    with pytest.raises(JuliaUnavailableError, match="(?s)pressure_julia: .*Install Julia"):
        pressure_julia(torch.ones(3, 3, dtype=F64))


# -- DPFEHM (bridges/fracture/FractureDPFEHM.jl) -----------------------------------------------------
def _dpfehm_system(edges, conductance, n, heads):
    """A and b of the free nodes 1..n as DPFEHM's groundwater equations build them (src/
    groundwater.jl: every edge adds Ks*(h1 - h2)*areasoverlengths to the residual of each free end;
    a Dirichlet end contributes its fixed head; unit storage and volumes, no sources)."""
    A = sp.lil_matrix((n, n))
    b = np.zeros(n)
    for (a, c), t in zip(edges, conductance):
        for node1, node2 in ((a, c), (c, a)):
            if node1 > n:
                continue
            A[node1 - 1, node1 - 1] += t
            if node2 <= n:
                A[node1 - 1, node2 - 1] -= t
            else:
                b[node1 - 1] += t * heads[node2 - n - 1]
    return A.tocsr(), b


def test_dpfehm_graph_of_the_grid_is_the_same_operator():
    ny, nx = 5, 7
    k = synthetic_fracture(7, ny=5, seed=11).k_true.numpy()
    edges = grid_edges(ny, nx)
    assert edges.shape == (ny * (nx - 1) + (ny - 1) * nx + 2 * ny, 2) and edges.dtype == np.int64
    kv = k.ravel(order="F")  # Julia's linear, column-major k[i]
    n = ny * nx
    conductance = [np.sqrt(kv[a - 1] * kv[c - 1]) if c <= n else 2 * kv[a - 1] for a, c in edges]
    heads = np.r_[np.full(ny, 2.0), np.full(ny, 1.0)]  # left ghosts, then right ghosts
    A, b = _dpfehm_system(edges, conductance, n, heads)
    A_ref, b_ref = assemble(k, 2.0, 1.0)  # row-major cells
    order = np.arange(n).reshape(ny, nx, order="F").ravel()  # column-major index of each cell
    P = sp.csr_matrix((np.ones(n), (order, np.arange(n))), shape=(n, n))
    assert abs(A - P @ A_ref @ P.T).max() < 1e-14
    np.testing.assert_allclose(b, P @ b_ref.ravel(), rtol=0, atol=1e-14)


def test_dpfehm_arguments_are_checked_before_julia_is_touched():
    k = torch.ones(3, 4, dtype=F64)
    with pytest.raises(ValueError, match="pressure_dpfehm: reltol must be a float in"):
        pressure_dpfehm(k, reltol=0)
    with pytest.raises(ValueError, match="pressure_dpfehm: maxiter must be an int >= 1"):
        pressure_dpfehm(k, maxiter=0.5)
    with pytest.raises(ValueError, match=r"pressure_dpfehm: k holds -\S+ at index \(0, 0\); k "
                                         r"must be finite and > 0"):
        pressure_dpfehm(-k)
    with pytest.raises(TypeError, match="pressure_dpfehm: p_left must be a finite real number"):
        pressure_dpfehm(k, p_left=float("nan"))
    assert "dpfehm" in BACKENDS


def test_dpfehm_missing_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr("bridges.julia.julia_unavailable_reason", lambda: None)  # Julia runs,
    monkeypatch.setattr("bridges.julia.julia_has_package", lambda name: False)  # without DPFEHM
    with pytest.raises(JuliaUnavailableError) as info:
        pressure(torch.ones(3, 3, dtype=F64), backend="dpfehm")
    message = str(info.value)
    assert message.startswith("pressure_dpfehm: DPFEHM is not available")
    assert DPFEHM_INSTALL in message and "juliapkg.add('DPFEHM', '8c3ed914-" in message
    assert "version='0.1'" in message and "optional" in message


def test_dpfehm_without_julia_says_julia_is_missing():
    if _julia_missing is None:
        pytest.skip("Julia is available here; this checks the message where it is not")
    assert dpfehm_unavailable_reason().startswith("Julia is not available: ")
    with pytest.raises(JuliaUnavailableError, match="(?s)pressure_dpfehm: Julia is not available"):
        pressure_dpfehm(torch.ones(3, 3, dtype=F64))


@pytest.fixture
def dpfehm():
    """Skips, saying what is missing, unless Julia with DPFEHM is available."""
    if _julia_missing is not None:
        pytest.skip(f"Julia is not available: {_julia_missing}")
    reason = dpfehm_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.filterwarnings("ignore:.*torch was imported before juliacall")
def test_dpfehm_agrees_with_petsc_in_pressure_and_gradient(dpfehm):
    if importlib.util.find_spec("petsc4py") is None:
        pytest.skip("PETSc is not available: petsc4py is not installed (pip install "
                    "'bridges[petsc]', see .ci/setup)")
    f = synthetic_fracture(24, ny=20, seed=12)
    w = torch.randn(20, 24, dtype=F64, generator=torch.Generator().manual_seed(3))
    results = []
    for solve in (pressure_dpfehm, lambda k: _solve("petsc", k)):
        k = f.k_true.clone().requires_grad_()
        p = solve(k)
        (p * w).sum().backward()
        results.append((p.detach(), k.grad))
    (pd, gd), (pp, gp) = results
    assert _relerr(pd, pp) < 1e-8
    assert _relerr(gd, gp) < 1e-8
    assert gp.abs().max() > 0


@pytest.mark.filterwarnings("ignore:.*torch was imported before juliacall")
def test_dpfehm_gradcheck_and_linear_profile(dpfehm):
    k = torch.exp(0.5 * torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(6)))
    assert gradcheck(pressure_dpfehm, (k.requires_grad_(),), eps=1e-6, atol=1e-8, rtol=1e-6)
    p = pressure(torch.full((6, 10), 0.3, dtype=F64), backend="dpfehm")
    assert torch.allclose(p, linear_profile(6, 10), atol=1e-10)
    with torch.no_grad():  # the forward without Zygote (DPFEHM's own multigrid solve)
        assert _relerr(pressure_dpfehm(k.detach()), pressure_torch(k.detach())) < 1e-9
