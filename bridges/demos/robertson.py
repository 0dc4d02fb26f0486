"""Robertson's stiff chemical kinetics (ROBER) through PETSc TS/TSAdjoint: rate-constant
sensitivities, and a neural ODE trained with an implicit method.

    y1' = -k1 y1 + k3 y2 y3,   y2' = k1 y1 - k2 y2^2 - k3 y2 y3,   y3' = k2 y2^2,   y(0) = (1, 0, 0)

with k = (0.04, 3e7, 1e4). y2 stays near 1e-5 while y1 and y3 change over ten decades of time; the
fast and slow rates differ by up to 1e11, so explicit solvers need millions of steps. The problem,
its scipy Radau reference and the neural ODE are ``bridges.problems.rober``, ``rober_1e5`` and
``rober_training``.

a) Sensitivities. From perturbed rate constants k = (0.05, 4e7, 2e4), the loss mean |y - y_data|
   against Radau data at 0 and 40 log-spaced times in [1e-5, 1e5] is computed by
   ``bridges.petsc.odeint_adjoint`` (Crank-Nicolson, a few equal steps per output interval) and
   dL/dk by TSAdjoint. The gradient is checked against central differences of the same discrete
   loss, and of the loss computed by scipy Radau (they differ by CN's discretisation error).
b) Neural ODE. The right-hand side is replaced by a bias-free 3->5->3 GELU network in scaled
   variables z = y / s, dz/dt = r * net(z) (s, r: the data's scale and largest rates), trained
   with AdamW through CN on the Radau data in [1e-5, t_max] (default 100, where torchdiffeq
   fails). A training step after which the next solve fails is undone and the learning rate
   halved ("rejected steps").

The same training with diffrax and torchdiffeq, and the loss + gradient against diffrax, are in
``benchmarks/bench_ode_training.py`` and ``benchmarks/bench_ode_stiff.py``.

Writes robertson_sensitivity.png and robertson_training.png into --out (default bridges-out).
PETSc options on the command line (e.g. -snes_monitor) reach every solve.
"""
from __future__ import annotations

import argparse
import copy
import textwrap
import time

import numpy as np
import torch

from bridges.demos._util import figure_path, progress, pyplot
from bridges.problems import ROBER_K_START, log_times, problem, rober_training


def sensitivity(k=ROBER_K_START, *, steps_per_interval=5, fd_rel_step=1e-6, reference_fd=True,
                show_progress=True):
    """dL/dk of L = mean |y(k) - y_data| by TSAdjoint, with central-difference checks: a dict
    with the loss, grad, grad_fd (central differences of the same discrete CN loss), grad_ref
    (of the Radau loss, or None), their relative differences, timings and the solution."""
    from bridges.petsc import odeint_adjoint

    rober = problem("rober_1e5")
    data = torch.from_numpy(rober.reference())
    y0, times = torch.from_numpy(rober.y0), torch.from_numpy(rober.t)

    def loss_cn(values):
        with torch.no_grad():
            return torch.mean(torch.abs(solve(rober.func({"k": values})) - data)).item()

    def loss_radau(values):
        return float(np.mean(np.abs(rober.reference(params={"k": values}) - data.numpy())))

    def solve(func):
        return odeint_adjoint(func, y0, times, method="cn", steps_per_interval=steps_per_interval)

    func = rober.func({"k": k})
    start = time.perf_counter()
    ys = solve(func)
    loss = torch.mean(torch.abs(ys - data))
    forward_s = time.perf_counter() - start
    loss.backward()
    adjoint_s = time.perf_counter() - start - forward_s
    grad = func.k.grad.numpy().copy()

    k0 = np.array(k, dtype=np.float64)
    # Radau's own error (rtol 1e-10) needs a larger step than the smooth discrete CN map
    jobs = [(loss_cn, fd_rel_step, i) for i in range(3)]
    jobs += [(loss_radau, 1e-4, i) for i in range(3)] if reference_fd else []
    fd = {loss_cn: np.zeros(3), loss_radau: np.zeros(3)}
    for fn, rel, i in progress(jobs, desc="central differences", disable=not show_progress):
        h = rel * k0[i]
        fd[fn][i] = (fn(k0 + h * np.eye(3)[i]) - fn(k0 - h * np.eye(3)[i])) / (2 * h)
    grad_ref = fd[loss_radau] if reference_fd else None
    return {"k": k0, "t": rober.t, "data": data.numpy(), "solution": ys.detach().numpy(),
            "loss": loss.item(), "grad": grad, "grad_fd": fd[loss_cn],
            "fd_rel_error": np.abs(grad - fd[loss_cn]) / np.abs(fd[loss_cn]), "grad_ref": grad_ref,
            "ref_rel_error": None if grad_ref is None else np.abs(grad - grad_ref) / np.abs(grad_ref),
            "forward_s": forward_s, "adjoint_s": adjoint_s,
            "steps_per_interval": steps_per_interval}


def train(iterations=400, *, lr=5e-3, seed=0, t_max=100.0, steps_per_interval=2, max_rejections=8,
          show_progress=True):
    """Train the neural ODE through odeint_adjoint (CN, steps_per_interval fixed steps per output
    interval) with AdamW. Returns a dict: label, ok, failure, history (loss before each completed
    step), iterations_done, initial_loss, final_loss, ratio (initial / final), refined_loss (the
    final model re-solved with 10x finer steps), seconds, rejected, the data and the model."""
    from bridges import ForeignError
    from bridges.petsc import odeint_adjoint

    data = rober_training(t_max)
    times, target = torch.from_numpy(data.t), torch.from_numpy(data.target)
    model = data.model(seed)
    result = {"label": f"bridges/PETSc cn, {steps_per_interval} steps per interval", "ok": True,
              "failure": None, "data": data, "prediction": None, "refined_loss": None,
              "iterations": iterations, "model": model}
    solver_errors = (ForeignError, FloatingPointError)

    def solve(m=steps_per_interval, t=times):
        return odeint_adjoint(model, target[0], t, method="cn", steps_per_interval=m,
                              options=data.options)

    optimiser = torch.optim.AdamW(model.parameters(), lr=lr)
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
            if not all(torch.isfinite(p.grad).all() for p in model.parameters()):
                raise FloatingPointError("the gradient became non-finite")
        except solver_errors as exc:
            if saved is None or rejected >= max_rejections:
                where = "in the first iteration" if saved is None else \
                    f"after {rejected} rejected steps"
                result.update(ok=False, failure=f"solver failed {where}: {_first_line(exc)}")
                break
            model.load_state_dict(saved[0])  # undo the last step, halve the learning rate
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

    final = None
    if history:  # the loss of the final parameters, and with 10x finer steps
        try:
            with torch.no_grad():
                z = solve()
                if torch.isfinite(z).all():
                    final = torch.mean(torch.abs(z - target)).item()
                    result["prediction"] = z.numpy() * data.scale
                fine = solve(10 * steps_per_interval)
                result["refined_loss"] = torch.mean(torch.abs(fine - target)).item()
                dense_t = log_times(t_max, 200)
                result["dense"] = (dense_t, solve(t=torch.from_numpy(dense_t)).numpy() * data.scale)
        except solver_errors as exc:
            result["failure"] = (result["failure"] or "") + f" (final solve failed: " \
                                                            f"{_first_line(exc)})"
    initial = history[0] if history else None
    result.update(history=np.array(history), iterations_done=len(history), initial_loss=initial,
                  final_loss=final, seconds=seconds, rejected=rejected,
                  ratio=initial / final if initial is not None and final else None)
    return result


def _first_line(exc):
    """An error's type and the first line of its message, without tensor dumps."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0].split(': tensor(')[0][:300] if text else ''}"


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
    scaled = {"TSAdjoint": sens["grad"], "central FD, same CN loss": sens["grad_fd"]}
    if sens["grad_ref"] is not None:
        scaled["central FD, Radau loss"] = sens["grad_ref"]
    width = 0.8 / len(scaled)
    for j, (label, values) in enumerate(scaled.items()):
        ax_g.bar(np.arange(3) + (j - (len(scaled) - 1) / 2) * width, sens["k"] * values, width,
                 label=label)
    ax_g.set_xticks(np.arange(3), ["k1", "k2", "k3"])
    ax_g.axhline(0, color="grey", lw=0.5)
    ax_g.set(ylabel="k_i dL/dk_i", title="gradient of mean |y - y_data|, scaled by k")
    ax_g.legend(fontsize=8)
    return _save(fig, plt, path)


def plot_training(run, path):
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    t, y = run["data"].t[1:], run["data"].y[1:]
    for ax, (cols, factor, ylabel) in zip(axes, [((0, 2), 1.0, "y1, y3"), ((1,), 1e4, "1e4 y2")]):
        for i in cols:
            ax.semilogx(t, factor * y[:, i], "o", color=f"C{i}", ms=4, label=f"y{i + 1} data")
            if "dense" in run:
                td, yd = run["dense"]
                ax.semilogx(td[1:], factor * yd[1:, i], "-", color=f"C{i}",
                            label=f"y{i + 1} learned, {run['iterations_done']} it.")
        ax.set(xlabel="t", ylabel=ylabel, title=f"true (Radau) vs learned: {ylabel}")
        ax.legend(fontsize=7)
    ax = axes[2]
    if len(run["history"]):
        ax.semilogy(np.arange(1, len(run["history"]) + 1), run["history"], label=run["label"])
        ax.legend(fontsize=7, loc="upper right")
    ax.set(xlabel="iteration", ylabel="mean |z - z_data| (scaled)", title="training loss")
    if not run["ok"]:
        ax.text(0.02, 0.02, textwrap.fill(run["failure"], 70), transform=ax.transAxes,
                fontsize=6.5, va="bottom", color="C3")
    return _save(fig, plt, path)


def _save(fig, plt, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- command line --------------------------------------------------------------------------------
def main(argv=None):
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("--iterations", type=int, default=400, help="training iterations")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 20 iterations, 2 CN steps per interval in a)")
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
    if args.quick:
        args.iterations, args.sensitivity_steps = min(args.iterations, 20), 2
    paths, start = [], time.perf_counter()

    if not args.skip_sensitivity:
        s = sensitivity(steps_per_interval=args.sensitivity_steps)
        print(f"\na) sensitivities at k = {list(ROBER_K_START)} (data from k = (0.04, 3e7, 1e4)); "
              f"loss = mean |y - y_data| = {s['loss']:.6g}, CN with {s['steps_per_interval']} "
              f"steps per interval; forward {s['forward_s']:.2f} s, adjoint {s['adjoint_s']:.2f} s")
        print(f"  {'':4}{'dL/dk TSAdjoint':>18}{'central FD (CN)':>18}{'rel. diff':>11}"
              f"{'central FD (Radau)':>20}{'rel. diff':>11}")
        for i in range(3):
            ref = "" if s["grad_ref"] is None else \
                f"{s['grad_ref'][i]:20.8e}{s['ref_rel_error'][i]:11.1e}"
            print(f"  k{i + 1}: {s['grad'][i]:18.8e}{s['grad_fd'][i]:18.8e}"
                  f"{s['fd_rel_error'][i]:11.1e}{ref}")
        paths.append(plot_sensitivity(s, figure_path(args.out, "robertson_sensitivity.png")))

    run = train(args.iterations, lr=args.lr, seed=args.seed, t_max=args.t_max,
                steps_per_interval=args.steps_per_interval)
    print(f"\nb) neural ODE (3->5->3 GELU, no biases) on Radau data at {len(run['data'].t) - 1} "
          f"log-spaced times in [1e-5, {args.t_max:g}]; loss = mean |z - z_data|, z = y / "
          f"{np.array2string(run['data'].scale, precision=3)}:")
    if run["iterations_done"]:
        final = "(not evaluated)" if run["final_loss"] is None else f"{run['final_loss']:.4g}"
        ratio = "" if run["ratio"] is None else f" = {run['ratio']:.1f}-fold"
        print(f"  {run['label']}: {run['iterations_done']} of {run['iterations']} iterations in "
              f"{run['seconds']:.1f} s; loss {run['initial_loss']:.4g} -> {final}{ratio}; "
              f"{run['rejected']} rejected steps; {'ok' if run['ok'] else 'FAILED: '}"
              f"{run['failure'] or ''}")
        if run["refined_loss"] is not None:
            print(f"    re-solved with 10x finer steps: loss {run['refined_loss']:.4g}")
    else:
        print(f"  {run['label']}: FAILED: {run['failure']}")
    paths.append(plot_training(run, figure_path(args.out, "robertson_training.png")))
    for p in paths:
        print(f"wrote {p}" if p else "figure skipped: install matplotlib (extra 'demo')")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
