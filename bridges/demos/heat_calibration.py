"""Calibrate a legacy simulator's physics by gradient descent through the finite-difference bridge.

The simulator is heat1d, a stand-alone C program (bridges/programs/heat1d.c) that is only ever run:
it reads an input file and writes sensor temperatures to an output file. Synthetic measurements
come from hidden "true" values of the rod's conductivity and convective cooling plus sensor noise.
Starting from a wrong guess, Adam fits both parameters through ``fd2pytorch``, which differentiates
the program by central differences (2 extra runs per parameter per step).

    python -m bridges.demos.heat_calibration [--iterations 150] [--workers 2] [--quick] [--out DIR]
"""
from __future__ import annotations

import time

import numpy as np
import torch

from bridges import fd2pytorch
from bridges.plotting import demo_parser, progress, pyplot, report_figures, save_figure
from bridges.programs import heat1d

PARAMETERS = ("conductivity", "convection")
TRUE_VALUES = (1.7, 0.6)
INITIAL_GUESS = (0.6, 2.0)


def calibrate(iterations=150, lr=0.08, noise=0.2, seed=0, workers=2, scheme="central",
              show_progress=True):
    """Fit the parameters to noisy synthetic data; returns a dict of the run's results."""
    program = heat1d(PARAMETERS)
    simulate = fd2pytorch(program, scheme=scheme, workers=workers, name="heat1d")
    rng = np.random.default_rng(seed)
    clean = program(np.array(TRUE_VALUES))
    data = torch.from_numpy(clean + noise * rng.standard_normal(clean.shape))

    log_params = torch.log(torch.tensor(INITIAL_GUESS, dtype=torch.float64)).requires_grad_()
    optimiser = torch.optim.Adam([log_params], lr=lr)
    history = []
    bar = progress(range(iterations), desc="calibrating heat1d", disable=not show_progress)
    for _ in bar:
        optimiser.zero_grad()
        loss = torch.mean((simulate(log_params.exp()) - data) ** 2)
        loss.backward()
        optimiser.step()
        history.append(loss.item())
        if hasattr(bar, "set_postfix"):
            k, h = log_params.exp().tolist()
            bar.set_postfix(loss=f"{loss.item():.3g}", conductivity=f"{k:.3f}", convection=f"{h:.3f}")
    fitted = log_params.detach().exp().numpy()
    return {"fitted": fitted, "history": np.array(history), "data": data.numpy(),
            "model": program(fitted), "initial": program(np.array(INITIAL_GUESS)),
            "evaluations": simulate.evaluations, "noise_runs": simulate.noise_evaluations,
            "noise": noise}


def plot(result, out=None):
    plt = pyplot()
    if plt is None:
        return None
    fig, (ax_loss, ax_fit) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_loss.semilogy(result["history"])
    ax_loss.axhline(result["noise"] ** 2, color="grey", ls=":", label="noise variance")
    ax_loss.set(xlabel="iteration", ylabel="mean squared misfit [K²]", title="training loss")
    ax_loss.legend()
    sensors = 4
    for s in range(sensors):
        colour = f"C{s}"
        ax_fit.plot(result["data"][s::sensors], "o", color=colour, ms=4)
        ax_fit.plot(result["model"][s::sensors], "-", color=colour, label=f"sensor {s + 1}")
        ax_fit.plot(result["initial"][s::sensors], "--", color=colour, alpha=0.4)
    ax_fit.set(xlabel="output time index", ylabel="temperature [°C]",
               title="measured (dots), fitted (lines), initial guess (dashed)")
    ax_fit.legend(fontsize=8)
    return save_figure(fig, out, "heat_calibration.png")


def main(argv=None):
    parser = demo_parser(__doc__, quick="30 iterations (smoke test)")
    parser.add_argument("--iterations", type=int, help="Adam iterations (150, --quick 30)")
    parser.add_argument("--lr", type=float, default=0.08, help="Adam step on log-parameters")
    parser.add_argument("--noise", type=float, default=0.2, help="sensor noise std [K]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="parallel simulator runs")
    parser.add_argument("--scheme", default="central", choices=["forward", "central"])
    args = parser.parse_args(argv)

    start = time.perf_counter()
    iterations = args.iterations or (30 if args.quick else 150)
    result = calibrate(iterations, args.lr, args.noise, args.seed, args.workers, args.scheme)
    elapsed = time.perf_counter() - start
    print(f"\n{'parameter':<14}{'true':>8}{'initial':>9}{'fitted':>9}{'error':>9}")
    for name, true, guess, fit in zip(PARAMETERS, TRUE_VALUES, INITIAL_GUESS, result["fitted"]):
        print(f"{name:<14}{true:>8.3f}{guess:>9.3f}{fit:>9.3f}{abs(fit - true) / true:>9.2%}")
    print(f"final misfit {result['history'][-1]:.4g} K² (noise variance {args.noise ** 2:.4g}); "
          f"{result['evaluations']} simulator runs (+{result['noise_runs']} measuring its noise) "
          f"in {elapsed:.1f} s")
    report_figures(plot(result, args.out))


if __name__ == "__main__":
    main()
