"""Robertson's stiff chemical kinetics through PETSc TS/TSAdjoint: rate-constant sensitivities and a
neural ODE trained with an implicit method.

    y1' = -k1 y1 + k3 y2 y3,   y2' = k1 y1 - k3 y2 y3 - k2 y2^2,   y3' = k2 y2^2,   y(0) = (1, 0, 0)

with k = (0.04, 3e7, 1e4). y2 stays near 1e-5 while y1 and y3 change over ten decades of time; the
fast and slow rates differ by up to 1e11, so explicit solvers need millions of steps.

a) Sensitivities. Data are an independent scipy Radau solution (rtol 1e-10, analytic Jacobian) at
   t = 0 and 40 log-spaced times in [1e-5, 1e5]. From perturbed rate constants, the loss
   mean |y - y_data| is computed by ``bridges.petsc.odeint_adjoint`` (Crank-Nicolson, fixed steps,
   a few equal ones per output interval) and dL/dk by TSAdjoint. The gradient is checked against
   central differences of the same discrete loss, and against central differences of the loss
   computed by scipy Radau (the exact, continuous loss: they differ by CN's discretisation error).
b) Neural ODE. The right-hand side is unknown and replaced by a bias-free 3->5->3 GELU network,
   trained with AdamW through implicit Crank-Nicolson on Radau data at 40 log-spaced times in
   [1e-5, t_max] (default t_max = 100, the range where torchdiffeq was seen to fail). Scaling, so
   that one network can serve variables of size 1 and 1e-5 and rates from 1e3 to 1e-3:
   - state: z = y / s with s = max |y_data| per component (s2 is about 3.6e-5);
   - rates: dz/dt = r * net(z), with r_i = the largest |dz_i/dt| between consecutive data points
     (r = (0.04, 1.1e3, 0.1) for t_max = 100), so the network's outputs are of order 1;
   - loss: mean |z - z_data| over all times and components (each component counts alike);
   - initialisation: torch's default for the first layer, the second set to minus its transpose.
     The untrained model is then dissipative (z . dz/dt / r <= 0, since h GELU(h) >= 0), while
     torch's default initialisation grows exponentially and overflows before t = 100 for most
     seeds;
   - robustness: Newton may take up to 200 iterations per CN step, and TS retries a step whose
     Newton solve fails with a smaller one; a training step that still makes the next solve fail
     is undone and the learning rate halved ("rejected steps").

The same training with diffrax and torchdiffeq (which fails on this problem), and the loss +
gradient against diffrax, are in ``benchmarks/bench_ode.py``.

Writes robertson_sensitivity.png and robertson_training.png into --out (default bridges-out).
PETSc options on the command line (e.g. -snes_monitor) reach every solve.
"""
from __future__ import annotations

import argparse
import copy
import math
import textwrap
import time

import numpy as np
import torch
from scipy.integrate import solve_ivp

from bridges.demos._util import figure_path, progress, pyplot

F64 = torch.float64
K_TRUE = (0.04, 3e7, 1e4)
K_START = (0.05, 4e7, 2e4)  # the perturbed rate constants of seed 000
Y0 = (1.0, 0.0, 0.0)
# Newton on a large CN step of a GELU network can need many damped iterations; PETSc's default is
# 50. If it still fails, TS retries the step with a smaller one instead of giving up.
TRAINING_OPTIONS = {"snes_max_it": 200, "ts_max_snes_failures": -1}


# -- the problem and its independent reference -----------------------------------------------------
def log_times(t_max=1e5, n=40, t_min=1e-5):
    """t = 0 followed by n log-spaced times in [t_min, t_max]."""
    return np.concatenate([[0.0], np.logspace(math.log10(t_min), math.log10(t_max), n)])


def reference_solution(t, k=K_TRUE, rtol=1e-10, atol=1e-20):
    """scipy Radau with the analytic Jacobian at the times t (t[0] = 0): array (len(t), 3)."""
    k1, k2, k3 = (float(v) for v in k)

    def rhs(_, y):
        return [-k1 * y[0] + k3 * y[1] * y[2], k1 * y[0] - k3 * y[1] * y[2] - k2 * y[1] ** 2,
                k2 * y[1] ** 2]

    def jac(_, y):
        return [[-k1, k3 * y[2], k3 * y[1]], [k1, -k3 * y[2] - 2 * k2 * y[1], -k3 * y[1]],
                [0.0, 2 * k2 * y[1], 0.0]]
    sol = solve_ivp(rhs, (t[0], t[-1]), Y0, method="Radau", t_eval=t, rtol=rtol, atol=atol, jac=jac)
    if not sol.success:
        raise RuntimeError(f"scipy Radau failed on Robertson with k = {k}: {sol.message}")
    return sol.y.T.copy()


class Robertson(torch.nn.Module):
    """The Robertson right-hand side with the rate constants k as a parameter."""

    def __init__(self, k=K_TRUE):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(k, dtype=F64))

    def forward(self, t, y):
        k1, k2, k3 = self.k
        y1, y2, y3 = y.unbind(-1)
        return torch.stack([-k1 * y1 + k3 * y2 * y3, k1 * y1 - k3 * y2 * y3 - k2 * y2 ** 2,
                            k2 * y2 ** 2], -1)


# -- a) sensitivities ----------------------------------------------------------------------------
def sensitivity(k=K_START, *, t_max=1e5, n_times=40, steps_per_interval=5, fd_rel_step=1e-6,
                reference_fd=True, show_progress=True):
    """dL/dk of L = mean |y(k) - y_data| by TSAdjoint, with central-difference checks.

    Returns a dict: k, loss, grad (adjoint), grad_fd (central differences of the same discrete CN
    loss, relative step fd_rel_step on each k_i), grad_ref (central differences of the loss
    computed by scipy Radau, or None), their relative differences, the times of the forward and
    adjoint solves, and the solutions for plotting.
    """
    from bridges.petsc import odeint_adjoint

    t = log_times(t_max, n_times)
    data = torch.from_numpy(reference_solution(t))
    times, y0 = torch.from_numpy(t), torch.tensor(Y0, dtype=F64)

    def solve(func):
        return odeint_adjoint(func, y0, times, method="cn", steps_per_interval=steps_per_interval)

    def loss_of(values):
        with torch.no_grad():
            return torch.mean(torch.abs(solve(Robertson(values)) - data)).item()

    def loss_ref(values):
        return float(np.mean(np.abs(reference_solution(t, values) - data.numpy())))

    func = Robertson(k)
    start = time.perf_counter()
    ys = solve(func)
    loss = torch.mean(torch.abs(ys - data))
    forward_s = time.perf_counter() - start
    start = time.perf_counter()
    loss.backward()
    adjoint_s = time.perf_counter() - start
    grad = func.k.grad.numpy().copy()

    k0 = np.array(k, dtype=np.float64)
    # Radau's own error (rtol 1e-10) needs a larger step than the smooth discrete CN map
    jobs = [("cn", i) for i in range(3)] + ([("radau", i) for i in range(3)] if reference_fd
                                            else [])
    grads = {"cn": np.zeros(3), "radau": np.zeros(3)}
    for which, i in progress(jobs, desc="central differences", disable=not show_progress):
        fn, rel = (loss_of, fd_rel_step) if which == "cn" else (loss_ref, 1e-4)
        h = rel * abs(k0[i])
        up, down = k0.copy(), k0.copy()
        up[i] += h
        down[i] -= h
        grads[which][i] = (fn(up) - fn(down)) / (2 * h)
    grad_fd, grad_ref = grads["cn"], grads["radau"] if reference_fd else None
    return {"k": k0, "t": t, "data": data.numpy(), "solution": ys.detach().numpy(),
            "loss": loss.item(), "grad": grad, "grad_fd": grad_fd,
            "fd_rel_error": np.abs(grad - grad_fd) / np.abs(grad_fd),
            "grad_ref": grad_ref,
            "ref_rel_error": (None if grad_ref is None
                              else np.abs(grad - grad_ref) / np.abs(grad_ref)),
            "forward_s": forward_s, "adjoint_s": adjoint_s,
            "steps_per_interval": steps_per_interval}


# -- b) neural ODE training ---------------------------------------------------------------------
class NeuralRHS(torch.nn.Module):
    """dz/dt = rate * net(z): seed 000's bias-free 3->5->3 GELU network, in scaled variables."""

    def __init__(self, rate, seed=0):
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 5, bias=False), torch.nn.GELU(),
                                       torch.nn.Linear(5, 3, bias=False)).to(F64)
        torch.random.set_rng_state(generator_state)
        with torch.no_grad():  # dissipative start (see the module docstring)
            self.net[2].weight.copy_(-self.net[0].weight.T)
        self.register_buffer("rate", torch.as_tensor(rate, dtype=F64).clone())

    def forward(self, t, z):
        return self.rate * self.net(z)


def training_data(t_max=100.0, n_times=40):
    """Times, Radau data y, and the scales s (state) and r (rates) of the neural ODE."""
    t = log_times(t_max, n_times)
    y = reference_solution(t)
    scale = np.abs(y).max(axis=0)
    z = y / scale
    rate = (np.abs(np.diff(z, axis=0)) / np.diff(t)[:, None]).max(axis=0)
    return t, y, scale, rate


def train(iterations=400, *, lr=5e-3, seed=0, t_max=100.0, n_times=40, steps_per_interval=2,
          max_rejections=8, show_progress=True):
    """Train the neural ODE on Radau data through bridges.petsc.odeint_adjoint (CN with
    steps_per_interval fixed steps per output interval) and AdamW.

    Returns a dict: label, ok, failure (the reason, or None), history (loss before each completed
    step), iterations_done, initial_loss, final_loss (of the final parameters, or None if their
    solve failed), ratio (initial / final), refined_loss (the final model re-solved with 10x finer
    steps), seconds, rejected, t, data, scale, rate, prediction (physical y at t, or None), model.
    """
    from bridges import ForeignError
    from bridges.petsc import odeint_adjoint

    t, y, scale, rate = training_data(t_max, n_times)
    times, target = torch.from_numpy(t), torch.from_numpy(y / scale)
    z0 = target[0].clone()
    model = NeuralRHS(rate, seed)
    params = tuple(model.parameters())
    result = {"label": f"bridges/PETSc cn, {steps_per_interval} steps per interval", "t": t,
              "data": y, "scale": scale, "rate": rate, "ok": True, "failure": None,
              "prediction": None, "refined_loss": None, "iterations": iterations, "model": model}
    solver_errors = (ForeignError, FloatingPointError)

    def solve(m=steps_per_interval):
        return odeint_adjoint(model, z0, times, method="cn", steps_per_interval=m,
                              options=TRAINING_OPTIONS)

    optimiser = torch.optim.AdamW(params, lr=lr)
    history, rejected, saved = [], 0, None
    start = time.perf_counter()
    bar = progress(range(iterations), desc=result["label"], disable=not show_progress)
    for _ in bar:
        try:
            optimiser.zero_grad()
            loss = torch.mean(torch.abs(solve() - target))
            if not torch.isfinite(loss):
                raise FloatingPointError("the solution became non-finite")
            loss.backward()
            if not all(torch.isfinite(p.grad).all() for p in params):
                raise FloatingPointError("the gradient became non-finite")
        except solver_errors as exc:
            if saved is None or rejected >= max_rejections:
                where = "in the first iteration" if saved is None else \
                    f"after {rejected} rejected steps"
                result.update(ok=False, failure=f"solver failed {where}: "
                                                f"{type(exc).__name__}: {_first_line(exc)}")
                break
            # the last step made the model unsolvable: undo it and halve the learning rate
            model.load_state_dict(saved[0])
            optimiser.load_state_dict(saved[1])
            for group in optimiser.param_groups:
                group["lr"] *= 0.5
            rejected += 1
            continue
        saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimiser.state_dict()))
        optimiser.step()
        history.append(loss.item())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss.item():.4g}")
    seconds = time.perf_counter() - start
    if hasattr(bar, "close"):
        bar.close()

    final_loss = None
    if history:  # the loss of the final parameters, and with 10x finer steps
        try:
            with torch.no_grad():
                z = solve()
                if torch.isfinite(z).all():
                    final_loss = torch.mean(torch.abs(z - target)).item()
                    result["prediction"] = z.numpy() * scale
                fine = solve(10 * steps_per_interval)
            result["refined_loss"] = torch.mean(torch.abs(fine - target)).item()
        except solver_errors as exc:
            result["failure"] = (result["failure"] or "") + \
                f" (final solve failed: {_first_line(exc)})"
    history = np.array(history)
    initial = history[0] if len(history) else None
    result.update(history=history, iterations_done=len(history), initial_loss=initial,
                  final_loss=final_loss, seconds=seconds, rejected=rejected,
                  ratio=initial / final_loss if initial is not None and final_loss else None)
    return result


def _first_line(exc):
    """The first line of an error message, without tensor dumps."""
    text = str(exc).strip().splitlines()
    return text[0].split(": tensor(")[0][:300] if text else type(exc).__name__


def dense_prediction(result, n=200):
    """The trained model on n log-spaced times (for smooth curves): (t, y)."""
    from bridges.petsc import odeint_adjoint
    t = log_times(result["t"][-1], n)
    z0 = torch.from_numpy(result["data"][0] / result["scale"])
    with torch.no_grad():
        z = odeint_adjoint(result["model"], z0, torch.from_numpy(t), method="cn",
                           steps_per_interval=2, options=TRAINING_OPTIONS)
    return t, z.numpy() * result["scale"]


# -- figures -------------------------------------------------------------------------------------
def plot_sensitivity(sens, path):
    plt = pyplot()
    if plt is None:
        return None
    t, data, sol = sens["t"][1:], sens["data"][1:], sens["solution"][1:]
    fig, (ax_y, ax_g) = plt.subplots(1, 2, figsize=(12, 4.4))
    for i, (name, factor) in enumerate([("y1", 1), ("1e4 y2", 1e4), ("y3", 1)]):
        ax_y.semilogx(t, factor * data[:, i], "-", color=f"C{i}", label=f"{name}, k true (Radau)")
        ax_y.semilogx(t, factor * sol[:, i], "--", color=f"C{i}", label=f"{name}, k perturbed (CN)")
    ax_y.set(xlabel="t", ylabel="concentration", title="Robertson: data and perturbed model")
    ax_y.legend(fontsize=7)
    names = [f"k{i + 1}" for i in range(3)]
    x = np.arange(3)
    scaled = {"TSAdjoint": sens["k"] * sens["grad"],
              "central FD, same CN loss": sens["k"] * sens["grad_fd"]}
    if sens["grad_ref"] is not None:
        scaled["central FD, Radau loss"] = sens["k"] * sens["grad_ref"]
    width = 0.8 / len(scaled)
    for j, (label, values) in enumerate(scaled.items()):
        ax_g.bar(x + (j - (len(scaled) - 1) / 2) * width, values, width, label=label)
    ax_g.set_xticks(x, names)
    ax_g.axhline(0, color="grey", lw=0.5)
    ax_g.set(ylabel="k_i dL/dk_i", title="gradient of mean |y - y_data|, scaled by k")
    ax_g.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path



def plot_training(run, path):
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    t, data = run["t"][1:], run["data"][1:]
    curve = None
    if run["iterations_done"]:
        td, yd = dense_prediction(run)
        curve = (td[1:], yd[1:], f"learned, {run['iterations_done']} it.")
    for ax, (cols, factor, ylabel) in zip(axes[:2], [((0, 2), 1.0, "y1, y3"),
                                                     ((1,), 1e4, "1e4 * y2")]):
        for i in cols:
            ax.semilogx(t, factor * data[:, i], "o", color=f"C{i}", ms=4, label=f"y{i + 1} data")
            if curve is not None:
                ax.semilogx(curve[0], factor * curve[1][:, i], "-", color=f"C{i}",
                            label=f"y{i + 1} {curve[2]}")
        ax.set(xlabel="t", ylabel=ylabel, title=f"true (Radau) vs learned: {ylabel}")
        ax.legend(fontsize=7)
    ax = axes[2]
    if len(run["history"]):
        ax.semilogy(np.arange(1, len(run["history"]) + 1), run["history"], label=run["label"])
    ax.set(xlabel="iteration", ylabel="mean |z - z_data| (scaled)", title="training loss")
    ax.legend(fontsize=7, loc="upper right")
    if not run["ok"]:
        ax.text(0.02, 0.02, textwrap.fill(run["failure"], 70), transform=ax.transAxes,
                fontsize=6.5, va="bottom", color="C3")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- command line --------------------------------------------------------------------------------
def _report_run(run):
    if run["iterations_done"] == 0:
        print(f"  {run['label']}: FAILED: {run['failure']}")
        return
    status = "ok" if run["ok"] else f"FAILED: {run['failure']}"
    final = "(not evaluated)" if run["final_loss"] is None else f"{run['final_loss']:.4g}"
    ratio = "" if run["ratio"] is None else f" = {run['ratio']:.1f}-fold"
    print(f"  {run['label']}: {run['iterations_done']} of {run['iterations']} iterations in "
          f"{run['seconds']:.1f} s; loss {run['initial_loss']:.4g} -> {final}{ratio}; "
          f"{run['rejected']} rejected steps; {status}")
    if run["refined_loss"] is not None:
        print(f"    the learned ODE re-solved with 10x finer steps: loss {run['refined_loss']:.4g}")


def main(argv=None):
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("--iterations", type=int, default=400, help="training iterations")
    parser.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the network initialisation")
    parser.add_argument("--steps-per-interval", type=int, default=2,
                        help="fixed CN steps per output interval in training")
    parser.add_argument("--sensitivity-steps", type=int, default=5,
                        help="fixed CN steps per output interval in the sensitivity analysis")
    parser.add_argument("--t-max", type=float, default=100.0, help="training data up to this time")
    parser.add_argument("--skip-sensitivity", action="store_true", help="skip part a)")
    parser.add_argument("--out", default=None,
                        help="directory for the PNGs; None means $BRIDGES_OUT or ./bridges-out")
    args, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("--")]
    if stray:  # single-dash words are PETSc options, read by PETSc itself
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    paths = []
    start = time.perf_counter()

    if not args.skip_sensitivity:
        sens = sensitivity(steps_per_interval=args.sensitivity_steps)
        print(f"\na) sensitivities at k = {list(K_START)} (data from k = {list(K_TRUE)}); "
              f"loss = mean |y - y_data| = {sens['loss']:.6g}, CN with "
              f"{sens['steps_per_interval']} steps per interval; forward {sens['forward_s']:.2f} s,"
              f" adjoint {sens['adjoint_s']:.2f} s")
        print(f"  {'':4}{'dL/dk TSAdjoint':>18}{'central FD (CN)':>18}{'rel. diff':>11}"
              f"{'central FD (Radau)':>20}{'rel. diff':>11}")
        for i in range(3):
            ref = ("" if sens["grad_ref"] is None else
                   f"{sens['grad_ref'][i]:20.8e}{sens['ref_rel_error'][i]:11.1e}")
            print(f"  k{i + 1}: {sens['grad'][i]:18.8e}{sens['grad_fd'][i]:18.8e}"
                  f"{sens['fd_rel_error'][i]:11.1e}{ref}")
        paths.append(plot_sensitivity(sens, figure_path(args.out, "robertson_sensitivity.png")))

    run = train(args.iterations, lr=args.lr, seed=args.seed, t_max=args.t_max,
                steps_per_interval=args.steps_per_interval)
    print(f"\nb) neural ODE (3->5->3 GELU, no biases) on Radau data at {len(run['t']) - 1} "
          f"log-spaced times in [1e-5, {args.t_max:g}]; loss = mean |z - z_data|, z = y / "
          f"{np.array2string(run['scale'], precision=3)}:")
    _report_run(run)
    paths.append(plot_training(run, figure_path(args.out, "robertson_training.png")))
    for p in paths:
        print(f"wrote {p}" if p else "figure skipped: install matplotlib (extra 'demo')")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
