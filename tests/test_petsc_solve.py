"""bridges.petsc.solve: accuracy, implicit gradients, solver modes, options and errors."""
import gc
import math
import re
import warnings

import numpy as np
import pytest
import scipy.sparse
import torch

import bridges
from bridges import ForeignError
from bridges.problems.diffusion import residual
from bridges.petsc import (ColouredJacobian, PETSc, SNESSolver, UnusedOptionsWarning, solve,
                           stencil_sparsity)

LU = {"ksp_type": "preonly", "pc_type": "lu"}


def grid(n):
    x = torch.linspace(0, 1, n, dtype=torch.float64)
    return torch.meshgrid(x, x, indexing="xy")  # X varies along columns


def random_problem(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kappa = 1.0 + torch.rand(n, n, dtype=torch.float64, generator=gen)
    source = torch.randn(n - 2, n - 2, dtype=torch.float64, generator=gen)
    return kappa, source


def zeros(n):
    return torch.zeros(n - 2, n - 2, dtype=torch.float64)


def test_second_order_convergence_to_manufactured_solution():
    # T = sin(pi x) sin(pi y), kappa = 1 + x^2 y: s = -div(kappa grad T) exactly
    errors = []
    for n in (17, 33, 65):
        X, Y = grid(n)
        kappa = 1 + X ** 2 * Y
        T = torch.sin(math.pi * X) * torch.sin(math.pi * Y)
        dTdx = math.pi * torch.cos(math.pi * X) * torch.sin(math.pi * Y)
        dTdy = math.pi * torch.sin(math.pi * X) * torch.cos(math.pi * Y)
        s = kappa * 2 * math.pi ** 2 * T - (2 * X * Y * dTdx + X ** 2 * dTdy)
        solution = solve(residual, zeros(n), kappa, s[1:-1, 1:-1],
                         sparsity=stencil_sparsity((n - 2, n - 2)), linear=True)
        errors.append(float((solution - T[1:-1, 1:-1]).abs().max()))
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert errors[-1] < 1e-3
    assert np.all(np.abs(orders - 2) < 0.15), (errors, orders)


def _loss_fn(n, seed=1, options=LU):
    weights = torch.randn(n - 2, n - 2, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(seed))
    sparsity = stencil_sparsity((n - 2, n - 2))

    def loss(kappa, source):
        T = solve(residual, zeros(n), kappa, source, sparsity=sparsity, options=options)
        return torch.sum(weights * T) + 0.5 * torch.sum(T ** 2) * 1e2
    return loss


def test_gradient_matches_central_differences_on_16x16():
    n = 18  # 16 x 16 unknowns
    kappa, source = random_problem(n)
    loss = _loss_fn(n)
    k, s = kappa.clone().requires_grad_(), source.clone().requires_grad_()
    gk, gs = torch.autograd.grad(loss(k, s), (k, s))
    eps = 1e-6
    rng = np.random.default_rng(0)
    for grad, base, which in ((gk, kappa, 0), (gs, source, 1)):
        for flat in rng.choice(base.numel(), 6, replace=False):
            idx = np.unravel_index(flat, base.shape)
            plus, minus = base.clone(), base.clone()
            plus[idx] += eps
            minus[idx] -= eps
            args_p = (plus, source) if which == 0 else (kappa, plus)
            args_m = (minus, source) if which == 0 else (kappa, minus)
            fd = (float(loss(*args_p)) - float(loss(*args_m))) / (2 * eps)
            assert abs(fd - float(grad[idx])) <= 1e-5 * max(abs(fd), 1e-3), (which, idx, fd)
        # and along a random direction, which involves every entry
        d = torch.randn(base.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        args_p = (kappa + eps * d, source) if which == 0 else (kappa, source + eps * d)
        args_m = (kappa - eps * d, source) if which == 0 else (kappa, source - eps * d)
        fd = (float(loss(*args_p)) - float(loss(*args_m))) / (2 * eps)
        assert abs(fd - float(torch.sum(grad * d))) <= 1e-6 * abs(fd)


def test_gradient_matches_backprop_through_converged_jacobi_iteration():
    n = 8
    kappa, source = random_problem(n, seed=3)
    weights = torch.randn(n - 2, n - 2, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(4))

    def unrolled(kappa, source):
        kx = 0.5 * (kappa[:, 1:] + kappa[:, :-1])
        ky = 0.5 * (kappa[1:, :] + kappa[:-1, :])
        diagonal = kx[1:-1, 1:] + kx[1:-1, :-1] + ky[1:, 1:-1] + ky[:-1, 1:-1]
        T = zeros(n)
        for _ in range(3000):  # Jacobi: T <- T - D^-1 F(T), converged to round-off
            T = T - residual(T, kappa, source) / diagonal
        assert float(residual(T, kappa, source).detach().abs().max()) < 1e-15
        return T

    grads = []
    for fn in (unrolled, lambda k, s: solve(residual, zeros(n), k, s, options=LU,
                                            sparsity=stencil_sparsity((n - 2, n - 2)))):
        k, s = kappa.clone().requires_grad_(), source.clone().requires_grad_()
        grads.append(torch.autograd.grad(torch.sum(weights * fn(k, s)), (k, s)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)


def test_gradcheck_tiny_grid():
    n = 5
    kappa, source = random_problem(n, seed=5)
    sparsity = stencil_sparsity((n - 2, n - 2))
    boundary = torch.rand(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(6))

    def fn(k, s, b):
        return solve(residual, zeros(n), k, s, b, sparsity=sparsity, options=LU)
    assert torch.autograd.gradcheck(fn, (kappa.requires_grad_(), source.requires_grad_(),
                                         boundary.requires_grad_()))


def nonlinear(T, kappa, source):
    """Nonlinear diffusion with a cubic reaction term: a Newton solve needs several steps."""
    n = T.shape[-1] + 2
    return residual(T, kappa, source) + T ** 3 / (n - 1) ** 2


@pytest.mark.parametrize("options", [None, {"ksp_type": "cg", "pc_type": "mg"}, LU])
def test_matrix_free_and_assembled_agree(options):
    symmetric = options is not None and options["pc_type"] == "mg"  # exercises both paths
    n = 35  # 33 unknowns per axis: 5 multigrid levels
    kappa, source = random_problem(n, seed=7)
    source = 30 * source
    results = []
    for mode in ("matrix-free", "assembled"):
        k, s = kappa.clone().requires_grad_(), source.clone().requires_grad_()
        stats = {}
        T = solve(nonlinear, zeros(n), k, s, jacobian=mode, stats=stats,
                  sparsity=stencil_sparsity((n - 2, n - 2)) if mode == "assembled" else None,
                  options=options if mode == "assembled" else None, symmetric=symmetric)
        assert stats["snes_iterations"] >= 2 and stats["residual_norm"] < 1e-12
        results.append((T.detach(), *torch.autograd.grad(T.sin().sum(), (k, s))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_general_sparsity_pattern_and_1d_problem():
    # -u'' + u^3 = 1 on 50 points, pattern given as a scipy matrix (coloured greedily)
    m = 50
    pattern = scipy.sparse.diags([1, 1, 1], [-1, 0, 1], shape=(m, m), dtype=bool)

    def f(u, c):
        padded = torch.nn.functional.pad(u, (1, 1))
        return 2 * u - padded[2:] - padded[:-2] + (u ** 3 - c) / (m + 1) ** 2
    c = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    u = solve(f, torch.zeros(m, dtype=torch.float64), c, sparsity=pattern)
    assert float(f(u.detach(), c.detach()).norm()) < 1e-12
    (g,) = torch.autograd.grad(u.sum(), c)
    eps = 1e-6
    u0 = torch.zeros(m, dtype=torch.float64)
    fd = (solve(f, u0, torch.tensor(5 + eps, dtype=torch.float64)).sum()
          - solve(f, u0, torch.tensor(5 - eps, dtype=torch.float64)).sum()) / (2 * eps)
    assert abs(float(g) - float(fd)) < 1e-6 * abs(float(fd))


def test_gradients_need_no_x0_and_allow_non_tensor_params():
    x0 = torch.ones(3, dtype=torch.float64, requires_grad=True)
    a = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)

    def f(x, a, power):
        return x ** power - a
    x = solve(f, x0, a, 3)
    torch.testing.assert_close(x, a.detach() ** (1 / 3))
    gx0, ga = torch.autograd.grad(x.sum(), (x0, a), allow_unused=True)
    assert gx0 is None
    torch.testing.assert_close(ga, a.detach() ** (-2 / 3) / 3)


@pytest.mark.filterwarnings("ignore:.*does not depend on it through torch ops")  # (it does not)
def test_a_param_the_residual_ignores_gets_a_zero_gradient():
    a = torch.tensor([1.0, 8.0], dtype=torch.float64, requires_grad=True)
    unused = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    x = solve(lambda x, a, b: x ** 3 - a, torch.ones(2, dtype=torch.float64), a, unused)
    ga, gb = torch.autograd.grad(x.sum(), (a, unused))
    torch.testing.assert_close(ga, a.detach() ** (-2 / 3) / 3)
    assert float(gb) == 0.0


def test_a_residual_shaped_unlike_x_but_with_one_entry_per_unknown():
    """x0 of shape (2, 3), residual x.T - b of shape (3, 2) (not contiguous): entries pair up
    in order of their flattening."""
    b = torch.arange(6.0, dtype=torch.float64).reshape(3, 2).requires_grad_()
    x = solve(lambda x, b: x.T - b, torch.zeros(2, 3, dtype=torch.float64), b)
    torch.testing.assert_close(x, b.detach().T)
    (gb,) = torch.autograd.grad((x * torch.arange(6.0, dtype=torch.float64).reshape(2, 3)).sum(),
                                b)
    torch.testing.assert_close(gb, torch.arange(6.0, dtype=torch.float64).reshape(2, 3).T)


def test_a_less_precise_residual_is_warned_about():
    with pytest.warns(UserWarning, match="residual returned torch.float32 for a torch.float64"):
        x = solve(lambda x: (x ** 2 - 2).float(), torch.ones(1, dtype=torch.float64))
    assert abs(float(x) - 2 ** 0.5) < 1e-6


def test_torch_func_over_solve_params_per_sample_and_captured_ones_refused():
    """vmap over grad and grad over vmap of x(c), x^3 = c, against c^(-2/3)/3; a c captured by
    the residual instead of passed is refused (its derivative was silently 0)."""
    c = torch.tensor([2.0, 3.0, 0.5], dtype=torch.float64)
    x0 = torch.ones((), dtype=torch.float64)
    root = lambda c: solve(lambda x, c: x ** 3 - c, x0, c, options={  # noqa: E731
        "snes_rtol": 1e-14, "snes_atol": 1e-14})
    want = c ** (-2 / 3) / 3
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(root))(c), want)
    torch.testing.assert_close(torch.func.grad(lambda c: torch.func.vmap(root)(c).sum())(c),
                               want)
    with pytest.raises(ForeignError, match=r"residual uses a tensor captured from an enclosing "
                                           r"torch.func transform"):
        torch.func.grad(lambda c: solve(lambda x: x ** 3 - c, x0))(c[0])
    # the same through an SNESSolver whose first call ran outside torch.func (its reused run
    # kept that call's flags and skipped the check: derivative 0)
    captured, solver = {"c": c[0]}, SNESSolver()

    def residual(x):
        return x ** 3 - captured["c"]
    solver(residual, x0)

    def through_solver(c):
        captured["c"] = c
        return solver(residual, x0)
    with pytest.raises(ForeignError, match=r"residual uses a tensor captured from an enclosing "
                                           r"torch.func transform"):
        torch.func.grad(through_solver)(c[0])


def test_a_captured_tensor_that_requires_grad_is_refused_not_dropped():
    a = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    x0 = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ForeignError, match=r"residual uses 1 tensor\(s\) that require grad "
                                           r"\(shapes \(3,\)\) without receiving them as "
                                           r"params.*solve\(residual, x0, w, \.\.\.\)"):
        solve(lambda x, scale: scale * x ** 3 - a, x0,
              torch.ones((), dtype=torch.float64, requires_grad=True))
    x = solve(lambda x, a: x ** 3 - a, x0, a)  # passed: differentiated
    torch.testing.assert_close(torch.autograd.grad(x.sum(), a)[0], a.detach() ** (-2 / 3) / 3)
    with pytest.raises(ForeignError, match=r"residual uses 1 tensor\(s\) that require grad"):
        solve(lambda x: x ** 3 - a, x0)  # no input requires grad, but a does
    with torch.no_grad():  # no gradient wanted: nothing to check
        solve(lambda x: x ** 3 - a, x0)
    for packed in ([a], (a,), {"a": a}):
        with pytest.raises(TypeError, match=rf"params\[0\] is a {type(packed).__name__} "
                                            rf"holding tensors that require grad"):
            solve(lambda x, p: x ** 3 - a, x0, packed)
    solve(lambda x, p: x ** 3 - p[0], x0, [a.detach()])  # no gradient wanted: accepted


def test_solves_sharing_a_sparsity_keep_their_own_gradients():
    n = 10
    sparsity = stencil_sparsity((n - 2, n - 2))
    (k1, s), (k2, _) = random_problem(n, 8), random_problem(n, 9)
    k1.requires_grad_(), k2.requires_grad_()
    T1 = solve(residual, zeros(n), k1, s, sparsity=sparsity, linear=True)
    T2 = solve(residual, zeros(n), k2, s, sparsity=sparsity, linear=True)  # refills the matrix
    (g1,) = torch.autograd.grad(T1.sum(), k1)
    T1_alone = solve(residual, zeros(n), k1, s, sparsity=stencil_sparsity((n - 2, n - 2)))
    (g1_alone,) = torch.autograd.grad(T1_alone.sum(), k1)
    torch.testing.assert_close(g1, g1_alone)
    assert T2.requires_grad


def test_options_dict_prefix_and_command_line_pass_through():
    n = 12
    kappa, source = random_problem(n)
    sparsity = stencil_sparsity((n - 2, n - 2))
    stats = {}
    solve(residual, zeros(n), kappa, source, sparsity=sparsity, stats=stats,
          options={"ksp_type": "cg", "pc_type": "jacobi", "snes_type": "ksponly"})
    assert (stats["snes_type"], stats["ksp_type"], stats["pc_type"]) == ("ksponly", "cg", "jacobi")
    db = PETSc.Options()
    db["heat_ksp_type"] = "bcgs"  # as -heat_ksp_type bcgs on the command line
    db["heat_pc_type"] = "ilu"
    try:
        solve(residual, zeros(n), kappa, source, sparsity=sparsity, stats=stats, prefix="heat_")
        assert (stats["ksp_type"], stats["pc_type"]) == ("bcgs", "ilu")
        # the options dict overrides the command line, and is gone after the solve
        solve(residual, zeros(n), kappa, source, sparsity=sparsity, stats=stats, prefix="heat_",
              options={"pc_type": "sor"})
        assert (stats["ksp_type"], stats["pc_type"]) == ("bcgs", "sor")
        assert db.getString("heat_pc_type") == "ilu"
    finally:
        db.delValue("heat_ksp_type")
        db.delValue("heat_pc_type")
    T = solve(residual, zeros(n), kappa, source, sparsity=sparsity, stats=stats)
    assert (stats["ksp_type"], stats["pc_type"]) == ("gmres", "ilu")  # the defaults
    initial = float(residual(zeros(n), kappa, source).norm())
    assert float(residual(T, kappa, source).norm()) < 1e-10 * initial  # snes_rtol 1e-10


def test_nonsymmetric_backward_with_pc_lacking_a_transpose():
    # advection makes J nonsymmetric; PCMG with SOR smoothing has no transpose, so backward
    # solves with the transposed matrix instead; the gradient must match the LU one
    n = 35
    kappa, source = random_problem(n)

    def advection_diffusion(T, kappa, source):
        padded = torch.nn.functional.pad(T, (1, 1, 0, 0))
        return residual(T, kappa, source) + 0.02 * (padded[:, 2:] - padded[:, :-2])
    grads = []
    for options, symmetric in (({"ksp_type": "gmres", "pc_type": "mg"}, False), (LU, False)):
        k = kappa.clone().requires_grad_()
        T = solve(advection_diffusion, zeros(n), k, source, options=options,
                  sparsity=stencil_sparsity((n - 2, n - 2)), symmetric=symmetric)
        grads.append(torch.autograd.grad(T.sin().sum(), k)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-11)


def test_divergence_names_the_reason_and_residual_norm():
    def no_root(x):
        return x ** 2 + 1
    with pytest.raises(ForeignError, match=r"DIVERGED_\w+ after \d+ Newton iterations, "
                                           r"residual norm \d\.\d+e[+-]\d+"):
        solve(no_root, torch.ones(4, dtype=torch.float64))


def test_bad_inputs_raise_clear_errors():
    x0 = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(TypeError, match="residual must be callable"):
        solve("F", x0)
    with pytest.raises(TypeError, match=r"dtype torch.float32.*tensor.to\(torch.float64\)"):
        solve(lambda x: x, x0.float())
    with pytest.raises(TypeError, match="x0 must be a torch.Tensor"):
        solve(lambda x: x, [0.0] * 4)
    with pytest.raises(ValueError, match=r"sparsity has shape \(3, 3\).*4 x 4"):
        solve(lambda x: x, x0, sparsity=scipy.sparse.eye(3))
    with pytest.raises(TypeError, match="sparsity must be"):
        solve(lambda x: x, x0, sparsity=[[1]])
    with pytest.raises(ValueError, match="jacobian='assembled' needs sparsity"):
        solve(lambda x: x, x0, jacobian="assembled")
    with pytest.raises(ValueError, match="unknown jacobian"):
        solve(lambda x: x, x0, jacobian="dense")
    with pytest.raises(TypeError, match="options must be a dict"):
        solve(lambda x: x, x0, options=["ksp_type", "cg"])
    with pytest.raises(ForeignError, match=r"residual returned 2 values \(shape \(2,\)\) for 4 "
                                           r"unknowns \(shape \(4,\)\).*one entry per unknown"):
        solve(lambda x: x[:2], x0)
    with pytest.raises(ValueError, match=r"x0 holds inf at index \(3,\).*initial guess must be "
                                         r"finite"):
        solve(lambda x: x, torch.tensor([0.0, 1.0, 2.0, float("inf")], dtype=torch.float64))
    with pytest.raises(ForeignError, match="ZeroDivisionError"):
        solve(lambda x: x / 0 if (1 / 0) else x, x0)


# -- first-class behaviour: bridged ops in the residual, lifetime, options ------------------------
def _cube_forward(x):
    X = bridges.as_numpy(x).copy()
    return X ** 3, lambda g: 3 * X ** 2 * bridges.as_numpy(g)


CUBE = bridges.foreign_function(_cube_forward, name="cube")  # reverse mode only
N = 12
CHAIN = scipy.sparse.diags([1, 1, 1], [-1, 0, 1], shape=(N, N), dtype=bool)


def chain_residual(x, theta):
    laplacian = 2 * x - torch.cat([x[1:], x.new_zeros(1)]) - torch.cat([x.new_zeros(1), x[:-1]])
    return laplacian + CUBE(theta * x) - 1.0


@pytest.mark.parametrize("jacobian", ["assembled", "matrix-free"])
def test_reverse_only_op_inside_the_residual(jacobian):
    weights = torch.randn(N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kwargs = {"sparsity": CHAIN} if jacobian == "assembled" else {}

    def loss(theta):
        return (weights * solve(chain_residual, torch.zeros(N, dtype=torch.float64), theta,
                                jacobian=jacobian, **kwargs)).sum()
    theta = torch.linspace(0.5, 1.0, N, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss(theta), theta)
    fd = torch.zeros(N, dtype=torch.float64)
    with torch.no_grad():
        for i in range(N):
            step = torch.zeros(N, dtype=torch.float64)
            step[i] = 1e-6
            fd[i] = (loss(theta + step) - loss(theta - step)) / 2e-6
    assert float((grad - fd).norm() / fd.norm()) < 1e-5
    with pytest.raises(ForeignError, match="products='forward' needs a forward-mode rule"):
        solve(chain_residual, torch.zeros(N, dtype=torch.float64), theta, products="forward")


def test_petsc_objects_are_released_and_memory_stays_flat(memory_growth):
    from bridges.petsc._solve import _Solve
    theta = torch.full((N,), 0.7, dtype=torch.float64, requires_grad=True)

    def linear_residual(x, theta):
        return 2 * x - torch.cat([x[1:], x.new_zeros(1)]) + theta

    assembled = {"sparsity": ColouredJacobian(CHAIN), "linear": True}  # reused, as one would

    def call(i):
        kwargs = assembled if i % 3 else {}
        x0 = torch.zeros(N, dtype=torch.float64)
        if i % 2:
            with torch.no_grad():
                solve(linear_residual, x0, theta, **kwargs)
        else:
            solve(linear_residual, x0, theta, **kwargs).sum().backward()
    gc.collect()
    gc.disable()  # nothing may depend on the cyclic garbage collector
    try:
        x = solve(chain_residual, torch.zeros(N, dtype=torch.float64), theta)
        assert sum(type(o) is _Solve for o in gc.get_objects()) == 1
        del x
        assert sum(type(o) is _Solve for o in gc.get_objects()) == 0
    finally:
        gc.enable()
    calls = 2000  # 10 MB per 10,000 calls, scaled
    grown = memory_growth(call, calls)
    assert grown < 10 * 2 ** 20 * calls / 10_000, f"resident memory grew by {grown / 2**20:.2f} MB"


def test_misspelt_option_is_reported_by_name():
    n = 8
    kappa, source = random_problem(n)
    with pytest.warns(UnusedOptionsWarning, match="solve: PETSc never read the option\\(s\\) "
                                                  "ksp_rtoll"):
        solve(residual, zeros(n), kappa, source, sparsity=stencil_sparsity((n - 2, n - 2)),
              options={"ksp_rtoll": 1e-8, "ksp_type": "cg"})


def test_snes_solver_reuses_its_objects_across_calls_with_new_params(monkeypatch):
    """One SNESSolver over calls whose params change: one set of PETSc objects, and each
    solution and gradient equal to a fresh solve's (linear=True: each call reassembles)."""
    from bridges.petsc import SNESSolver, SolveStats
    from bridges.petsc import _solve
    made, original = [0], _solve._Solve.__init__

    def counting(self, *args, **kwargs):
        made[0] += 1
        original(self, *args, **kwargs)
    monkeypatch.setattr(_solve._Solve, "__init__", counting)
    n, sparsity = 12, stencil_sparsity((10, 10))
    solver = SNESSolver(sparsity=sparsity, linear=True, options=LU)
    for seed in range(4):
        kappa, source = random_problem(n, seed)
        kappa.requires_grad_()
        x = solver(residual, zeros(n), kappa, source)
        (x ** 2).sum().backward()
        assert isinstance(solver.stats, SolveStats) and solver.stats.adjoint_ksp_iterations == 1
        reference = kappa.detach().clone().requires_grad_()
        expected = solve(residual, zeros(n), reference, source, sparsity=sparsity, linear=True,
                         options=LU)
        (expected ** 2).sum().backward()
        torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(kappa.grad, reference.grad, rtol=1e-10, atol=1e-14)
    assert made[0] == 1 + 4
    pending = solver(residual, zeros(n), *random_problem(n, 0))  # no gradient: run idle again
    assert pending.grad_fn is None and made[0] == 5


def test_a_preconditioner_a_matrix_free_jacobian_cannot_serve_is_named_and_the_solver_recovers():
    from bridges.petsc import SNESSolver
    solver = SNESSolver(options={"pc_type": "jacobi"})
    x0 = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ForeignError, match="getDiagonal.*matrix-free Jacobian has no entries"):
        solver(lambda x: x - 1.0, x0)
    assert solver._pool.idle == {}  # the failed run was released, not kept for reuse
    x = solve(lambda x: x - 1.0, x0)
    torch.testing.assert_close(x, torch.ones(3, dtype=torch.float64))


def _cubic(x, a):
    return x ** 3 + a * x - 1


def test_broken_promises_about_the_residual_are_named_not_turned_into_wrong_gradients():
    """linear=True, snes_type ksponly, symmetric=True and a sparsity pattern each promise
    something of the residual; a residual that breaks the promise used to give a wrong
    gradient (or a non-root) with no word. The same options on residuals that keep the
    promise still give the exact answer."""
    F64 = torch.float64
    a = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64, requires_grad=True)
    x0 = torch.zeros(4, dtype=F64)
    with pytest.raises(ForeignError, match=r"linear=True, but the residual is not affine in x.*Drop "
                                           r"linear=True"):
        solve(_cubic, x0, a, sparsity=scipy.sparse.identity(4, format="csr"), linear=True)
    with pytest.raises(ForeignError, match=r"linear=True, but the residual is not affine"):
        # (a failed solve named the tolerances and x0, never linear=True)
        chain = scipy.sparse.diags([1, 1, 1], [-1, 0, 1], shape=(8, 8), dtype=bool)
        solve(lambda x, f: 2 * x - torch.nn.functional.pad(x, (1, 1)).unfold(0, 3, 1).sum(1)
              + x + 2 * x ** 3 - f, torch.zeros(8, dtype=F64),
              torch.linspace(1, 2, 8, dtype=F64), sparsity=chain, linear=True)
    with pytest.raises(bridges.SolverFailure, match=r"snes_type ksponly makes one linear solve"
                                                    r".*so x is no root"):
        solve(_cubic, x0, a, options={"snes_type": "ksponly"})
    A = torch.tensor([[4.0, 1.0, 0.0], [0.0, 4.0, 2.0], [1.0, 0.0, 5.0]], dtype=F64)
    b = torch.ones(3, dtype=F64, requires_grad=True)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    for kwargs in ({}, {"sparsity": np.ones((3, 3), bool)}):
        x = solve(lambda x, b: A @ x + 0.1 * x ** 3 - b, torch.zeros(3, dtype=F64), b,
                  symmetric=True, **kwargs)
        with pytest.raises(ForeignError, match=r"symmetric=True, but dF/dx is not symmetric"):
            (w @ x).backward()
    # a coupling x0 -> F1 whose derivative (x0 x1) vanishes at x0 = 0 passes the first check
    c = torch.tensor([1.0, 1.0], dtype=F64, requires_grad=True)
    hidden = lambda x, c: torch.stack([x[0] - c[0], x[1] + 0.5 * x[0] ** 2 * x[1] - c[1]])  # noqa: E731
    x = solve(hidden, torch.zeros(2, dtype=F64), c, sparsity=np.eye(2, dtype=bool))
    with pytest.raises(ForeignError, match=r"the sparsity pattern leaves out"):
        x[1].backward()
    # kept promises: exact
    S = A + A.T
    b.grad = None
    x = solve(lambda x, b: S @ x - b, torch.zeros(3, dtype=F64), b, linear=True, symmetric=True,
              sparsity=np.ones((3, 3), bool))
    (w @ x).backward()
    torch.testing.assert_close(b.grad, torch.linalg.solve(S, w), rtol=1e-10, atol=0)
    x = solve(lambda x, b: S @ x - b, torch.zeros(3, dtype=F64), b.detach(),
              options={"snes_type": "ksponly"})
    torch.testing.assert_close(x, torch.linalg.solve(S, b.detach()), rtol=1e-8, atol=0)


def test_a_non_finite_residual_names_its_source():
    F64 = torch.float64
    with pytest.raises(ForeignError, match=r"solve: params\[0\] holds nan at index \(1,\)"):
        solve(lambda x, a: x ** 3 - a, torch.ones(2, dtype=F64),
              torch.tensor([1.0, float("nan")], dtype=F64))
    with pytest.raises(ForeignError, match=r"solve: the residual F\(x, params\) after 0 Newton "
                                           r"iterations holds nan at index \(0,\)"):
        solve(lambda x: torch.log(x - 2), torch.ones(2, dtype=F64))


def test_a_residual_that_detaches_x_is_named():
    with pytest.raises(ForeignError, match=r"solve: the residual does not depend on x through "
                                           r"torch \(it detaches x"):
        solve(lambda x: x.detach() ** 3 - 2, torch.ones(2, dtype=torch.float64))


def test_loose_forward_linear_tolerances_do_not_reach_the_gradient():
    """An inexact Newton (ksp_rtol 1e-2, or Eisenstat-Walker's snes_ksp_ew) still finds x, but
    its loose KSP tolerance used to carry over to the adjoint solve: dL/dk 99 % off. The
    gradient now equals the dense implicit-function one, lam = J^-T w, dL/df = lam,
    dL/dk = -lam . x^3."""
    F64, n = torch.float64, 60

    def residual(x, k, f):
        padded = torch.nn.functional.pad(x, (1, 1))
        return -(padded[2:] - 2 * x + padded[:-2]) * (n + 1) ** 2 + k * x ** 3 - f
    k0, f0 = torch.tensor(5.0, dtype=F64), torch.linspace(1, 30, n, dtype=F64)
    w = torch.sin(torch.arange(n, dtype=F64))
    for options in ({"ksp_rtol": 1e-2}, {"snes_ksp_ew": True}):
        k, f = k0.clone().requires_grad_(), f0.clone().requires_grad_()
        x = solve(residual, torch.zeros(n, dtype=F64), k, f, options=options)
        (w * x).sum().backward()
        J = torch.autograd.functional.jacobian(lambda x: residual(x, k0, f0), x.detach())
        lam = torch.linalg.solve(J.T, w)
        torch.testing.assert_close(f.grad, lam, rtol=0, atol=1e-7 * float(lam.abs().max()))
        torch.testing.assert_close(k.grad, -(lam * x.detach() ** 3).sum(), rtol=1e-6, atol=0)


def test_a_residual_small_by_its_units_is_solved_not_taken_as_converged_at_x0():
    """A diode in SI units, Is (exp(V / Vt) - 1) - I with currents of 1e-13 A: |F(x0)| was below
    the default snes_atol, so x0 came back as the root with a gradient 3-7x off. A warm start
    at a root still stops at once."""
    F64, Is, Vt = torch.float64, 1e-14, 0.025
    current = torch.tensor([2e-13, 5e-13], dtype=F64, requires_grad=True)

    def diode(v, current):
        return Is * torch.expm1(v / Vt) - current
    solver = SNESSolver()
    v = solver(diode, torch.full((2,), 0.05, dtype=F64), current)
    v.sum().backward()
    torch.testing.assert_close(v.detach(), Vt * torch.log1p(current.detach() / Is))
    torch.testing.assert_close(current.grad, Vt / (Is + current.detach()))
    again = solver(diode, v.detach(), current.detach())
    assert solver.stats.snes_iterations == 0 and torch.equal(again, v.detach())


def test_a_param_read_as_a_number_is_warned_about_not_given_a_silent_zero():
    a = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    x = solve(lambda x, a: x ** 3 + a.item() * x - 1, torch.zeros(1, dtype=torch.float64), a)
    with pytest.warns(UserWarning, match=r"solve: params\[0\] requires grad, but the residual "
                                         r"does not depend on it through torch ops"):
        x.sum().backward()
    assert a.grad == 0.0


def test_a_multiple_root_is_warned_about_and_simple_roots_are_not():
    """At a double root (x^2 = 0) Newton converges linearly and stops ~2e-5 from it, at a
    triple one ((x - 1)^3 = 0) ~1e-3 from it, with |F| within tolerance: a warning names the
    cause and the accuracy (Newton's last step, within a factor of 3 of the error). Simple
    roots, even from far away, stay quiet."""
    F64 = torch.float64
    for residual, root in ((lambda x, p: x ** 2 - p, 0.0), (lambda x, p: (x - p) ** 3, 1.0)):
        p = torch.tensor([root], dtype=F64)
        with pytest.warns(UserWarning, match=r"solve: Newton converged only linearly .*singular "
                                             r"at this root .*accurate only to about Newton's "
                                             r"last step") as caught:
            x = solve(residual, torch.tensor([3.0], dtype=F64), p)
        step = float(re.search(r"last step, (\S+),", str(caught[-1].message)).group(1))
        assert 1e-6 < abs(float(x) - root) < 3 * step
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for residual, x0 in ((lambda x, p: x ** 3 + x - p, [5.0, -3.0]),
                             (lambda x, p: torch.exp(x) - p, [10.0, -4.0])):
            solve(residual, torch.tensor(x0, dtype=F64), torch.tensor([2.0, 1.0], dtype=F64))


def test_a_jacobian_singular_at_the_root_is_named_by_the_failure():
    """Where dF/dx is singular at the solution dx/dparams does not exist: the backward's failed
    transposed solve says so (it pointed at PCs and iteration limits only), and so does a
    forward whose factorisation meets a zero pivot."""
    F64 = torch.float64
    p = torch.tensor(0.5, dtype=F64, requires_grad=True)
    x = solve(lambda x, p: (x - p) ** 3, torch.tensor([0.5], dtype=F64), p)  # x0: the root
    with pytest.raises(ForeignError, match=r"solve \(backward\): .*dF/dx may be singular at "
                                           r"the solution .*dx/dparams does not exist"):
        x.sum().backward()
    line = lambda x, p: torch.stack([x[0] + x[1] - p, 2 * (x[0] + x[1] - p)])  # noqa: E731
    with pytest.raises(ForeignError, match=r"DIVERGED_PCSETUP_FAILED.*zero pivot: is dF/dx "
                                           r"singular there"):
        solve(line, torch.zeros(2, dtype=F64), p.detach(), options={"pc_type": "lu"},
              sparsity=np.ones((2, 2), bool))


def test_a_non_finite_cotangent_is_named_before_petsc_meets_it():
    """A NaN in the gradient reaching solve's or odeint_adjoint's output (from the loss) made
    the adjoint's Krylov solve fail with advice about singular Jacobians or refinement."""
    from bridges.petsc import odeint_adjoint
    F64 = torch.float64
    p = torch.tensor(2.0, dtype=F64, requires_grad=True)
    x = solve(lambda x, p: x ** 3 - p, torch.ones(1, dtype=F64), p)
    ys = odeint_adjoint(lambda t, y: -p * y, torch.ones(1, dtype=F64),
                        torch.tensor([0.0, 1.0], dtype=F64), adjoint_params=(p,))
    for who, out in (("solve", x), ("odeint_adjoint", ys)):
        with pytest.raises(ForeignError, match=rf"{who} \(backward\): the gradient reaching its "
                                               rf"output holds nan at index \(0,?.*the loss's "
                                               rf"derivative is not finite"):
            (out - 5.0).sqrt().sum().backward(retain_graph=True)  # sqrt of a negative: nan


def test_forward_mode_ad_is_refused_by_name():
    """solve's own Jacobian products use forward mode, which torch cannot nest: under jvp,
    jacfwd or a dual level it says so instead of torch's "Nested forward mode AD"."""
    c = torch.tensor([2.0], dtype=torch.float64)
    root = lambda c: solve(lambda x, c: x ** 3 - c, torch.ones(1, dtype=torch.float64), c)  # noqa: E731
    for call in (lambda: torch.func.jvp(root, (c,), (torch.ones_like(c),)),
                 lambda: torch.func.jacfwd(root)(c)):
        with pytest.raises(bridges.MissingDerivativeError,
                           match=r"solve cannot run inside forward-mode AD .*Use reverse mode"):
            call()


@pytest.mark.parametrize("settings", [{}, {"symmetric": True}])
def test_a_backward_that_failed_midway_names_itself_on_a_retry(settings):
    """The residual raising once in backward (matrix-free: inside KSPSolveTranspose, or in the
    symmetry check, which reported PETSc's bare "error code 101"), then a retry on the same
    graph: it met a KSP left in a failed state, with advice about transposes."""
    state = {"fail": False}

    def r(x, c):
        if state["fail"]:
            raise RuntimeError("transient")
        return x ** 3 + x - c
    c = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    x = solve(r, torch.zeros(3, dtype=torch.float64), c, **settings)
    state["fail"] = True
    with pytest.raises(ForeignError, match=r"solve.*raised RuntimeError: transient"):
        torch.autograd.grad(x.sum(), c, retain_graph=True)
    state["fail"] = False
    with pytest.raises(ForeignError, match=r"solve \(backward\): an earlier backward through "
                                           r"these outputs failed midway"):
        torch.autograd.grad(x.sum(), c)
    x = solve(r, torch.zeros(3, dtype=torch.float64), c, **settings)
    (g,) = torch.autograd.grad(x.sum(), c)
    torch.testing.assert_close(g, 1 / (3 * x.detach() ** 2 + 1), rtol=1e-10, atol=0)
