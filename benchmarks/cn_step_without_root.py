"""Why Crank-Nicolson with 2 steps per output interval fails on ROBER over [0, 1e11]
(bench_ode_stiff's 'bridges cn, 2 steps/interval' row): the method's own step equation stops
having a solution, so no Newton iteration, bridges' or anyone's, can find one.

    python -m benchmarks.cn_step_without_root     # exits 1 if a step has no root

Independent of PETSc and of bridges' solver: the same steps as bench_ode_stiff (ROBER at its
perturbed rate constants, 40 log-spaced outputs in [1e-5, 1e11], 2 equal steps per interval),
each CN step equation z - y - h/2 (f(z) + f(y)) = 0 solved by scipy's hybrid Powell method from
the last state. Where that fails, MINPACK's Levenberg-Marquardt and Powell minimise the residual
from many random starts around the last state; a residual that stays far from zero means the
step equation has no root near the solution's scale. (CN is A-stable but not L-stable: at steps
where h |lambda| >> 1 the stiff component rings, y2 turns negative two steps before, and then
the quadratic kinetics leave the step equation without a real solution.)
"""
import sys

import numpy as np
import scipy.optimize

from bridges.problems import ROBER_K_START, problem

STARTS = 300


def main():
    rober = problem("rober", t_end=1e11, n_times=40)
    k = {"k": np.array(ROBER_K_START)}
    y, step = rober.y0.copy(), 0
    for a, b in zip(rober.t[:-1], rober.t[1:]):
        h = (b - a) / 2
        for _ in range(2):
            step += 1
            f0 = rober.rhs(0, y, k)

            def residual(z):
                return z - y - 0.5 * h * (rober.rhs(0, z, k) + f0)

            def jacobian(z):
                return np.eye(3) - 0.5 * h * rober.jac(0, z, k)

            def small(z):
                return np.abs(residual(z)).max() <= 1e-12 * max(1.0, np.abs(z).max())

            z = scipy.optimize.root(residual, y, jac=jacobian, method="hybr").x
            if not small(z):  # many starts around the last state, two methods
                rng = np.random.default_rng(0)
                z = min((scipy.optimize.root(residual, y * np.exp(s), jac=jacobian, method=m).x
                         for s in rng.normal(0.0, 1.0, (STARTS, 3)) for m in ("hybr", "lm")),
                        key=lambda z: np.abs(residual(z)).max())
            if small(z):
                y = z
                continue
            print(f"CN step {step} from t = {a + (step - 1) % 2 * h:.4g} with h = {h:.4g}: no "
                  f"root; the smallest max |residual| from {2 * STARTS + 1} starts is "
                  f"{np.abs(residual(z)).max():.2e} at z = {z} (the previous state: y = {y})")
            return 1
    print("every CN step equation has a root")
    return 0


if __name__ == "__main__":
    sys.exit(main())
