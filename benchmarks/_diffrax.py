"""JAX/diffrax twins of the ODE benchmarks' problems (bridges itself never imports jax).

``load()`` imports jax with 64-bit floats switched on (before any array exists) and diffrax; every
solve is compiled once with ``jax.jit(...).lower(...).compile()`` so the one-off compile time is
measured on its own. Tolerances are traced arguments: one compilation serves them all.
"""
from __future__ import annotations

import time

import numpy as np

INSTALL_HINT = "pip install jax diffrax (or the project's 'bench' extra)"


def missing() -> str | None:
    """Why diffrax cannot run here, or None."""
    try:
        load()
    except ImportError as exc:
        return f"diffrax not installed ({exc.name or exc}); {INSTALL_HINT}"
    return None


def load():
    """(jax, jax.numpy, diffrax), with jax_enable_x64 set first."""
    import jax
    jax.config.update("jax_enable_x64", True)
    import diffrax
    import jax.numpy as jnp
    return jax, jnp, diffrax


def compile_timed(fn, *args):
    """fn jitted and compiled for args: (compiled callable, seconds spent compiling)."""
    jax, _, _ = load()
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def solver(name, linear_solver=None):
    """A diffrax solver by class name; ``linear_solver`` ("gmres") replaces the dense LU that
    Kvaerno's Newton (VeryChord) uses by default with matrix-free GMRES."""
    _, _, diffrax = load()
    cls = getattr(diffrax, name)
    if linear_solver is None:
        return cls()
    import lineax
    if linear_solver != "gmres":
        raise ValueError(f"solver: linear_solver must be None or 'gmres', got {linear_solver!r}")
    chord = diffrax.with_stepsize_controller_tols(diffrax.VeryChord)
    return cls(root_finder=chord(linear_solver=lineax.GMRES(rtol=1e-8, atol=1e-10,
                                                            restart=40, stagnation_iters=40)))


def solve(rhs, method, t, y0, args, rtol, atol, *, max_steps=16_384, linear_solver=None,
          adjoint="reverse"):
    """y at the times t (t[0] the initial time) and the number of steps: diffrax diffeqsolve with
    a PID step-size controller. Gradients are discretise-then-optimise, in reverse mode
    (RecursiveCheckpointAdjoint, diffrax's default, whose checkpoints grow with max_steps) or
    forward mode (ForwardMode, for jax.jacfwd: faster with few parameters)."""
    _, jnp, diffrax = load()
    adjoints = {"reverse": diffrax.RecursiveCheckpointAdjoint, "forward": diffrax.ForwardMode}
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(rhs), solver(method, linear_solver), t[0], t[-1], None, y0, args=args,
        saveat=diffrax.SaveAt(ts=t), stepsize_controller=diffrax.PIDController(rtol=rtol,
                                                                               atol=atol),
        adjoint=adjoints[adjoint](), max_steps=max_steps)
    return sol.ys, sol.stats["num_steps"]


# -- right-hand sides -----------------------------------------------------------------------------
def rober(t, y, k):
    _, jnp, _ = load()
    k1, k2, k3 = k[0], k[1], k[2]
    return jnp.stack([-k1 * y[0] + k3 * y[1] * y[2], k1 * y[0] - k2 * y[1] ** 2 - k3 * y[1] * y[2],
                      k2 * y[1] ** 2])


def bruss2d(t, y, p):
    """The 2-D Brusselator (periodic grid, y of shape (2, n, n)), for
    bench_reaction_diffusion.py."""
    _, jnp, _ = load()
    a, b, alpha = p[0], p[1], p[2]
    n = y.shape[-1]

    def lap(w):
        return (jnp.roll(w, 1, 0) + jnp.roll(w, -1, 0) + jnp.roll(w, 1, 1) + jnp.roll(w, -1, 1)
                - 4 * w) * (n * n)
    u, v = y[0], y[1]
    uuv = u * u * v
    return jnp.stack([a + uuv - (b + 1) * u + alpha * lap(u), b * u - uuv + alpha * lap(v)])


def neural(t, z, args):
    """The Robertson demo's dz/dt = rate * W2 gelu(W1 z) (torch's exact, erf-based GELU)."""
    jax, _, _ = load()
    (w1, w2), rate = args
    return rate * (w2 @ jax.nn.gelu(w1 @ z, approximate=False))


# -- loss + gradient --------------------------------------------------------------------------------
def loss_and_grad(rhs, method, t, y0, loss, *, batched=False, **kwargs):
    """A function (params, rtol, atol) -> (loss, dloss/dparams, steps) of loss(ys). batched: y0
    of shape (B, ...) is solved under jax.vmap, ys of shape (len(t), B, ...) as bridges'."""
    jax, jnp, _ = load()
    t, y0 = jnp.asarray(t), jnp.asarray(y0)

    def value(params, rtol, atol):
        if batched:
            ys, steps = jax.vmap(lambda y: solve(rhs, method, t, y, params, rtol, atol,
                                                 **kwargs))(y0)
            return loss(jnp.swapaxes(ys, 0, 1)), steps
        ys, steps = solve(rhs, method, t, y0, params, rtol, atol, **kwargs)
        return loss(ys), steps

    if kwargs.get("adjoint") == "forward":
        def with_value(params, rtol, atol):
            value_, steps = value(params, rtol, atol)
            return value_, (value_, steps)

        def fn(params, rtol, atol):
            grad, (value_, steps) = jax.jacfwd(with_value, has_aux=True)(params, rtol, atol)
            return value_, grad, steps
    else:
        def fn(params, rtol, atol):
            (value_, steps), grad = jax.value_and_grad(value, has_aux=True)(params, rtol, atol)
            return value_, grad, steps
    return fn


def adamw(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
    """torch.optim.AdamW's update (its defaults), as (init, update) on pytrees of arrays."""
    jax, jnp, _ = load()
    b1, b2 = betas

    def init(params):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return (zeros, zeros, jnp.zeros((), dtype=jnp.int64))

    def update(params, grads, state):
        m, v, step = state
        step = step + 1
        m = jax.tree_util.tree_map(lambda m_, g: b1 * m_ + (1 - b1) * g, m, grads)
        v = jax.tree_util.tree_map(lambda v_, g: b2 * v_ + (1 - b2) * g * g, v, grads)
        c1, c2 = 1 - b1 ** step, 1 - b2 ** step

        def move(p, m_, v_):
            p = p * (1 - lr * weight_decay)
            return p - (lr / c1) * m_ / (jnp.sqrt(v_) / jnp.sqrt(c2) + eps)
        return jax.tree_util.tree_map(move, params, m, v), (m, v, step)
    return init, update


def as_numpy(tree):
    jax, _, _ = load()
    return jax.tree_util.tree_map(np.asarray, tree)
