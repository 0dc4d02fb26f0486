"""Fit a diode clipper's model to a measured waveform, by gradient descent through ngspice.

The circuit: a 3 V, 1 kHz sine through 1 kOhm into two antiparallel diodes with a capacitor across
them. The "measured" output voltage is what ngspice (the real SPICE3 descendant, run as a batch
program) produces with hidden true diode parameters IS, N, RS and capacitance C, plus 5 mV of
measurement noise. Starting from a data-sheet guess, L-BFGS fits the log-parameters through
``fd2pytorch``: central differences over parallel ngspice runs, with steps chosen for ngspice's
own output noise (it prints 7 digits).

    python -m bridges.demos.circuit_calibration [--iterations 120] [--quick] [--out DIR]
"""
from __future__ import annotations

import time

import numpy as np
import torch

from bridges import fd2pytorch
from bridges.plotting import demo_parser, progress, pyplot, report_figures, save_figure
from bridges.programs import ngspice

NETLIST = """V1 in 0 SIN(0 3 1k)
R1 in out 1k
D1 out 0 DCLIP
D2 0 out DCLIP
C1 out 0 {C}n
.model DCLIP D(IS={IS} N={N} RS={RS})"""
PARAMETERS = ("IS", "N", "RS", "C")
UNITS = ("A", "", "Ohm", "nF")
TRUE_VALUES = (2e-9, 1.8, 20.0, 47.0)
INITIAL_GUESS = (1e-10, 1.3, 5.0, 20.0)
TIMES = np.linspace(0.05e-3, 2e-3, 80)  # two periods


def circuit():
    return ngspice(NETLIST, PARAMETERS, analysis="tran 2u 2m", probes=["v(out)"], times=TIMES)


def calibrate(iterations=60, noise=5e-3, seed=0, workers=2, show_progress=True):
    """Fit the four parameters to synthetic noisy data; returns a dict of the run's results."""
    program = circuit()
    simulate = fd2pytorch(program, workers=workers, name="ngspice")
    rng = np.random.default_rng(seed)
    clean = program(np.array(TRUE_VALUES))
    data = torch.from_numpy(clean + noise * rng.standard_normal(clean.shape))

    log_params = torch.log(torch.tensor(INITIAL_GUESS, dtype=torch.float64)).requires_grad_()
    # quasi-Newton: IS and N are strongly correlated, which plain gradient steps crawl along
    evaluations = 2 * iterations
    optimiser = torch.optim.LBFGS([log_params], lr=1, max_iter=iterations, max_eval=evaluations,
                                  tolerance_grad=1e-9, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")
    ticks = iter(progress(range(evaluations), desc="calibrating the clipper",
                          disable=not show_progress))
    history = []

    def closure():
        optimiser.zero_grad()
        loss = torch.mean((simulate(log_params.exp()) - data) ** 2) / noise ** 2
        loss.backward()
        history.append(loss.item() * noise ** 2)
        next(ticks, None)
        return loss
    optimiser.step(closure)
    fitted = log_params.detach().exp().numpy()
    model = program(fitted)
    return {"fitted": fitted, "history": np.array(history), "data": data.numpy(), "model": model,
            "clean": clean, "initial": program(np.array(INITIAL_GUESS)), "noise": noise,
            "misfit": float(np.sqrt(np.mean((model - data.numpy()) ** 2))),
            "runs": simulate.evaluations + simulate.noise_evaluations,
            "identifiable": identifiable(simulate, fitted, noise)}


def identifiable(simulate, fitted, noise):
    """Per parameter: its standard error in log space from the Gauss-Newton Fisher information
    J^T J / noise^2 at the fit (the FD Jacobian in log-parameters), i.e. its relative error."""
    jac = simulate.jacobian_at(fitted) * fitted  # d y / d log p
    covariance = np.linalg.pinv(jac.T @ jac / noise ** 2)
    return np.sqrt(np.clip(np.diag(covariance), 0, None))


def plot(result, out=None):
    plt = pyplot()
    if plt is None:
        return None
    fig, (ax_loss, ax_fit) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_loss.semilogy(np.sqrt(result["history"]) * 1e3)
    ax_loss.axhline(result["noise"] * 1e3, color="grey", ls=":", label="measurement noise")
    ax_loss.set(xlabel="iteration", ylabel="rms misfit [mV]", title="training loss")
    ax_loss.legend()
    t = TIMES * 1e3
    ax_fit.plot(t, result["data"], "o", ms=3, color="C0", label="measured (true + noise)")
    ax_fit.plot(t, result["model"], "-", color="C1", label="fitted model")
    ax_fit.plot(t, result["initial"], "--", color="grey", alpha=0.6, label="initial guess")
    ax_fit.set(xlabel="time [ms]", ylabel="v(out) [V]", title="diode clipper output (ngspice)")
    ax_fit.legend(fontsize=8)
    return save_figure(fig, out, "circuit_calibration.png")


def main(argv=None):
    parser = demo_parser(__doc__, quick="a short fit (smoke test)")
    parser.add_argument("--iterations", type=int, help="L-BFGS iterations (60, --quick 25)")
    parser.add_argument("--noise", type=float, default=5e-3, help="measurement noise std [V]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="parallel ngspice runs")
    args = parser.parse_args(argv)
    iterations = args.iterations or (25 if args.quick else 60)

    start = time.perf_counter()
    result = calibrate(iterations, args.noise, args.seed, args.workers)
    elapsed = time.perf_counter() - start
    print(f"\n{'parameter':<10}{'true':>10}{'initial':>10}{'fitted':>10}{'error':>9}"
          f"{'std. error':>12}  identified?")
    for name, unit, true, guess, fit, se in zip(PARAMETERS, UNITS, TRUE_VALUES, INITIAL_GUESS,
                                                result["fitted"], result["identifiable"]):
        print(f"{name + (f' [{unit}]' if unit else ''):<10}{true:>10.3g}{guess:>10.3g}{fit:>10.3g}"
              f"{abs(fit - true) / true:>9.1%}{se:>12.1%}  {'yes' if se < 0.1 else 'no'}")
    print(f"rms misfit {result['misfit'] * 1e3:.2f} mV against measurement noise "
          f"{args.noise * 1e3:.2f} mV (true parameters: "
          f"{np.sqrt(np.mean((result['clean'] - result['data']) ** 2)) * 1e3:.2f} mV); "
          f"{result['runs']} ngspice runs in {elapsed:.1f} s")
    report_figures(plot(result, args.out))


if __name__ == "__main__":
    main()
