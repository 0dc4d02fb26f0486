"""Robertson's stiff chemical kinetics (ROBER) through PETSc TS/TSAdjoint: rate-constant
sensitivities, and a neural ODE trained with an implicit method.

    y1' = -k1 y1 + k3 y2 y3,   y2' = k1 y1 - k2 y2^2 - k3 y2 y3,   y3' = k2 y2^2,   y(0) = (1, 0, 0)

with k = (0.04, 3e7, 1e4): rates differ by up to 1e11, explicit solvers need millions of steps.
The problem, its scipy Radau reference and the neural ODE come from ``bridges.problems``.

a) Sensitivities. From perturbed rate constants k = (0.05, 4e7, 2e4), the loss mean |y - y_data|
   against Radau data at 0 and 40 log-spaced times in [1e-5, 1e5] is computed by
   ``bridges.petsc.odeint_adjoint`` (Crank-Nicolson, a few equal steps per output interval) and
   dL/dk by TSAdjoint. The gradient is checked against central differences of the same discrete
   loss, and of the loss computed by scipy Radau (they differ by CN's discretisation error).
b) Neural ODE. The right-hand side is replaced by a bias-free 3->5->3 GELU network in scaled
   variables z = y / s, dz/dt = r * net(z) (s, r: the data's scale and largest rates), trained
   with AdamW through CN on the Radau data in [1e-5, t_max] (torchdiffeq fails there). A step
   after which the next solve fails is undone and the learning rate halved ("rejected steps").

Against diffrax and torchdiffeq: benchmarks/bench_ode_training.py and bench_ode_stiff.py.
Writes robertson_sensitivity.png and robertson_training.png into --out. PETSc options on the
command line (e.g. -snes_monitor) reach every solve.
"""
from __future__ import annotations

import copy
import textwrap
import time

import numpy as np
import torch

from bridges.plotting import demo_parser, progress, pyplot, report_figures, save_figure
from bridges.problems import ROBER_K_START, log_times, problem, rober_training


def sensitivity(k=ROBER_K_START, *, steps_per_interval=5, fd_rel_step=1e-6, show_progress=True):
    """dL/dk of L = mean |y(k) - y_data| by TSAdjoint, with central-difference checks: a dict
    with the loss, grad, grad_fd (central differences of the same discrete CN loss), grad_ref
    (of the Radau loss), their relative differences, timings and the solution."""
    from bridges.petsc import odeint_adjoint

    rober = problem("rober_1e5")
    data = torch.tensor(rober.reference())
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
    fd = {loss_cn: np.zeros(3), loss_radau: np.zeros(3)}
    jobs = [(fn, i) for fn in fd for i in range(3)]
    for fn, i in progress(jobs, desc="central differences", disable=not show_progress):
        h = (fd_rel_step if fn is loss_cn else 1e-4) * np.eye(3)[i] * k0
        fd[fn][i] = (fn(k0 + h) - fn(k0 - h)) / (2 * h[i])
    grad_fd, grad_ref = fd[loss_cn], fd[loss_radau]
    return {"k": k0, "t": rober.t, "data": data.numpy(), "solution": ys.detach().numpy(),
            "loss": loss.item(), "grad": grad, "grad_fd": grad_fd, "grad_ref": grad_ref,
            "fd_rel_error": np.abs(grad - grad_fd) / np.abs(grad_fd),
            "ref_rel_error": np.abs(grad - grad_ref) / np.abs(grad_ref), "forward_s": forward_s,
            "adjoint_s": adjoint_s, "steps_per_interval": steps_per_interval}


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
    history, rejected, saved, start = [], 0, None, time.perf_counter()
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
                where = "first iteration" if saved is None else f"{rejected} rejected steps"
                result.update(ok=False, failure=f"solver failed ({where}): {exc!r:.300}")
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
                td = log_times(t_max, 200)
                result["dense"] = (td, solve(t=torch.from_numpy(td)).numpy() * data.scale)
        except solver_errors as exc:
            result["failure"] = f"{result['failure'] or ''} (final solve: {exc!r:.300})"
    initial = history[0] if history else None
    result.update(history=np.array(history), iterations_done=len(history), initial_loss=initial,
                  final_loss=final, seconds=seconds, rejected=rejected,
                  ratio=initial / final if initial is not None and final else None)
    return result


# -- figures -------------------------------------------------------------------------------------
def plot_sensitivity(sens, out=None):
    if (plt := pyplot()) is None:
        return None
    fig, (ax_y, ax_g) = plt.subplots(1, 2, figsize=(12, 4.4))
    t, data, sol = sens["t"][1:], sens["data"][1:], sens["solution"][1:]
    for i, (name, factor) in enumerate([("y1", 1), ("1e4 y2", 1e4), ("y3", 1)]):
        ax_y.semilogx(t, factor * data[:, i], "-", color=f"C{i}", label=f"{name}, k true (Radau)")
        ax_y.semilogx(t, factor * sol[:, i], "--", color=f"C{i}", label=f"{name}, k perturbed (CN)")
    ax_y.set(xlabel="t", ylabel="concentration", title="Robertson: data and perturbed model")
    ax_y.legend(fontsize=7)
    scaled = {"TSAdjoint": sens["grad"], "central FD, same CN loss": sens["grad_fd"],
              "central FD, Radau loss": sens["grad_ref"]}
    width = 0.8 / len(scaled)
    for j, (label, values) in enumerate(scaled.items()):
        ax_g.bar(np.arange(3) + (j - (len(scaled) - 1) / 2) * width, sens["k"] * values, width,
                 label=label)
    ax_g.set_xticks(np.arange(3), ["k1", "k2", "k3"])
    ax_g.axhline(0, color="grey", lw=0.5)
    ax_g.set(ylabel="k_i dL/dk_i", title="gradient of mean |y - y_data|, scaled by k")
    ax_g.legend(fontsize=8)
    return save_figure(fig, out, "robertson_sensitivity.png")


def plot_training(run, out=None):
    if (plt := pyplot()) is None:
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
    return save_figure(fig, out, "robertson_training.png")


# -- command line --------------------------------------------------------------------------------
def main(argv=None):
    parser = demo_parser(__doc__, quick="a smoke run: 20 iterations, 2 CN steps per interval")
    parser.add_argument("--iterations", type=int, default=400, help="training iterations (400)")
    parser.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate (5e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the network's weights (0)")
    parser.add_argument("--steps-per-interval", type=int, default=2,
                        help="fixed CN steps per output interval in training (2)")
    parser.add_argument("--sensitivity-steps", type=int, default=5,
                        help="fixed CN steps per output interval in a) (5)")
    parser.add_argument("--t-max", type=float, default=100.0, help="data up to t_max (100)")
    parser.add_argument("--skip-sensitivity", action="store_true", help="skip part a)")
    args, rest = parser.parse_known_args(argv)
    if stray := [a for a in rest if a.startswith("--")]:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    from bridges.petsc import init
    init(rest)  # single-dash words are PETSc options
    if args.quick:
        args.iterations, args.sensitivity_steps = min(args.iterations, 20), 2
    paths, start = [], time.perf_counter()

    if not args.skip_sensitivity:
        s = sensitivity(steps_per_interval=args.sensitivity_steps)
        print(f"\na) dL/dk at k = {list(ROBER_K_START)}, loss mean |y - y_data| = {s['loss']:.6g} "
              f"(CN, {s['steps_per_interval']} steps per interval; forward {s['forward_s']:.2f} "
              f"s, adjoint {s['adjoint_s']:.2f} s). Rows k1, k2, k3; columns: TSAdjoint, central "
              f"FD of the CN loss, rel. diff., central FD of the Radau loss, rel. diff.")
        columns = ("grad", "grad_fd", "fd_rel_error", "grad_ref", "ref_rel_error")
        for i, row in enumerate(np.column_stack([s[c] for c in columns])):
            print(f"  k{i + 1}: " + "  ".join(f"{v:15.8e}" for v in row))
        paths.append(plot_sensitivity(s, args.out))

    run = train(args.iterations, lr=args.lr, seed=args.seed, t_max=args.t_max,
                steps_per_interval=args.steps_per_interval)
    print(f"\nb) neural ODE (3->5->3 GELU, no biases) on Radau data at {len(run['data'].t) - 1} "
          f"log-spaced times in [1e-5, {args.t_max:g}]; loss = mean |z - z_data|, z = y / "
          f"{np.array2string(run['data'].scale, precision=3)}:")
    loss = {k: "-" if run[k] is None else f"{run[k]:.4g}"
            for k in ("initial_loss", "final_loss", "refined_loss")}
    print(f"  {run['label']}: {run['iterations_done']} of {run['iterations']} iterations in "
          f"{run['seconds']:.1f} s; loss {loss['initial_loss']} -> {loss['final_loss']} (10x finer "
          f"steps: {loss['refined_loss']}); {run['rejected']} rejected steps; "
          f"{'ok' if run['ok'] else 'FAILED: ' + run['failure']}")
    report_figures(*paths, plot_training(run, args.out))
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
