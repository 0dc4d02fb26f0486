"""Solver-in-the-loop (seed 001; Um et al., NeurIPS 2020): a CNN corrects a coarse 2-D
Navier-Stokes solver after every step, trained through the unrolled solver whose pressure solves
are PETSc's (`bridges.petsc.solve`, CG + multigrid; gradients by adjoint solves).

The problem (`bridges.problems.turbulence`): decaying 2-D turbulence on the coarse 32^2 solver,
the reference the same solver at 128^2 face-averaged back; the test flows are not in the training
set. Four variants, one network (same initialisation, data, Adam settings and iterations):

    none      the coarse solver alone
    option 1  hybrid step trained on one-step pairs: coarse step from a reference state ->
              the next reference state (no gradient through the solver)
    option 2  hybrid solver unrolled over `--unroll` steps from a reference state, matched to
              the reference trajectory (gradients through every PETSc solve)
    residual  the seed's residual modelling: the network corrects the states of a pure coarse
              rollout afterwards (never fed back into the solver)

Errors are relative L2 velocity errors against the reference on held-out flows, rolled out to
10x the unroll length (5x with --quick). Writes the error-over-time plot, vorticity snapshots and
training curves.

    python -m bridges.demos.solver_in_the_loop [--quick] [--iterations N] [--unroll T]
        [--pressure petsc|fft] [--petsc-option KEY=VALUE ...] [--out DIR]
"""
from __future__ import annotations

import time

import numpy as np
import torch

from bridges.flow import vorticity
from bridges.plotting import demo_parser, progress, pyplot, report_figures, save_figure
from bridges.problems.turbulence import (PHYSICS, SETTINGS, Correction, coarse_flow, load_data,
                                         relative_mse, relative_squared_error,
                                         unrolled_loss)

VARIANTS = ("none", "option 1", "option 2", "residual")


# -- training --------------------------------------------------------------------------------------
def train(variant, data, cfg, flow, *, seed=0, show_progress=False):
    """Train a fresh network (initialised from `seed`, the same for every variant) for one
    variant; returns (net, losses, seconds per iteration). Option 2 draws `batch` windows of
    `unroll` steps per iteration, the one-step variants batch x unroll pairs (the same number of
    target states), from the same training trajectories and times."""
    torch.manual_seed(seed)
    net = Correction(flow.h, width=cfg["width"])
    ref = data["train"]
    flows, steps = ref.shape[0], ref.shape[1] - 1
    unroll = cfg["unroll"]
    with torch.no_grad():  # the one-step variants' inputs: pure coarse rollouts
        if variant == "option 1":  # the coarse step from every reference state, once
            inputs = flow.rollout(ref[:, :-1].reshape(-1, *ref.shape[2:]), 1)
            inputs = inputs.reshape(flows, steps, *ref.shape[2:])
        elif variant == "residual":  # the pure coarse rollout from each initial state
            inputs = flow.rollout(ref[:, 0], steps)
    if variant not in ("option 1", "option 2", "residual"):
        raise ValueError(f"train: unknown variant {variant!r}; valid: option 1, option 2, "
                         f"residual")
    optimiser = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, cfg["iterations"])
    gen = torch.Generator().manual_seed(seed + 1)
    losses, start = [], time.perf_counter()
    bar = progress(range(cfg["iterations"]), desc=f"training {variant}", leave=False,
                   disable=not show_progress)
    for _ in bar:
        optimiser.zero_grad()
        if variant == "option 2":
            which = torch.randint(flows, (cfg["batch"],), generator=gen).tolist()
            t0 = torch.randint(steps - unroll + 1, (cfg["batch"],), generator=gen).tolist()
            loss = 0.0
            for window in zip(which, t0):  # one window at a time: fewer solves alive at once
                part = unrolled_loss(net, flow, ref, [window], unroll) / cfg["batch"]
                part.backward()
                loss += part.detach()
        else:  # as many one-step pairs as option 2 has target states
            which = torch.randint(flows, (cfg["batch"] * unroll,), generator=gen)
            t0 = torch.randint(steps, (cfg["batch"] * unroll,), generator=gen)
            x = inputs[which, t0]
            loss = relative_mse(x + net(x), ref[which, t0 + 1])
            loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.3g}")
    return net, np.array(losses), (time.perf_counter() - start) / cfg["iterations"]


# -- evaluation ------------------------------------------------------------------------------------
def evaluate(nets, data, flow, show_progress=False):
    """Roll every variant out from the test flows' initial states over the data's horizon.
    Returns {variant: {"error": (flows, steps) relative errors, "states": ...}}."""
    ref, out = data["test"], {}
    steps = ref.shape[1] - 1
    with torch.no_grad():
        for variant in progress(VARIANTS, desc="evaluating", leave=False,
                                disable=not show_progress):
            if variant == "none":
                states = flow.rollout(ref[:, 0], steps)
            elif variant == "residual":
                plain = out["none"]["states"]  # "none" comes first
                states = plain + nets[variant](plain)
            else:
                states = flow.rollout(ref[:, 0], steps, correction=nets[variant])
            error = relative_squared_error(states, ref[:, 1:]).sqrt()
            out[variant] = {"states": states, "error": error.numpy()}
    return out


# -- figures ---------------------------------------------------------------------------------------
COLOURS = {"none": "k", "option 1": "tab:orange", "option 2": "tab:blue", "residual": "tab:green"}


def plot_errors(results, unroll, out=None):
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.3))
    for variant, res in results.items():
        err = res["error"]
        t = np.arange(1, err.shape[1] + 1)
        ax.plot(t, 100 * err.mean(0), color=COLOURS[variant], label=variant)
        ax.fill_between(t, 100 * err.min(0), 100 * err.max(0), color=COLOURS[variant], alpha=0.15)
    ax.axvline(unroll, color="gray", ls=":", label=f"training unroll ({unroll} steps)")
    ax.set(xlabel="coarse step", ylabel="relative velocity error [%]",
           title="held-out flows: error against the 128² reference (mean, min-max)")
    ax.legend(fontsize=8)
    return save_figure(fig, out, "solver_in_the_loop_error.png", dpi=110)


def plot_snapshots(results, data, unroll, h, out=None):
    plt = pyplot()
    if plt is None:
        return None
    steps = data["test"].shape[1] - 1
    times = sorted({min(unroll, steps), min(5 * unroll, steps), steps})
    rows = [("reference", data["test"][0, 1:])] + [(v, r["states"][0]) for v, r in
                                                     results.items()]
    fig, axes = plt.subplots(len(times), len(rows), figsize=(2.6 * len(rows), 2.6 * len(times)),
                             squeeze=False)
    for r, t in enumerate(times):
        lim = float(vorticity(data["test"][0, t], h).abs().max())
        for c, (name, states) in enumerate(rows):
            w = vorticity(states[t - 1], h)
            axes[r, c].imshow(w.numpy(), origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
            err = "" if name == "reference" else \
                f" ({100 * results[name]['error'][0, t - 1]:.0f}%)"
            axes[r, c].set_title(f"{name}{err}", fontsize=9)
        axes[r, 0].set_ylabel(f"step {t}")
    fig.suptitle("vorticity of held-out flow 0 (velocity error in brackets)", fontsize=10)
    return save_figure(fig, out, "solver_in_the_loop_vorticity.png", dpi=100)


def plot_training(histories, out=None):
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, losses in histories.items():
        ax.semilogy(losses, color=COLOURS[variant], label=variant, alpha=0.8)
    ax.set(xlabel="Adam iteration", ylabel="training loss (relative MSE)",
           title="training losses (each variant's own objective)")
    ax.legend(fontsize=8)
    return save_figure(fig, out, "solver_in_the_loop_training.png", dpi=110)


# -- command line ----------------------------------------------------------------------------------
def run(cfg, *, pressure="petsc", options=None, seed=0, out=None, show_progress=True,
        cache=True):
    """The whole comparison; returns a dict with the table rows, timings and figure paths."""
    start = time.perf_counter()
    flow = coarse_flow(pressure, options)
    data = load_data(cfg, out if cache else None, show_progress)
    data_s = time.perf_counter() - start
    nets, histories, per_iteration = {}, {}, {}
    for variant in ("option 1", "option 2", "residual"):
        nets[variant], histories[variant], per_iteration[variant] = train(
            variant, data, cfg, flow, seed=seed, show_progress=show_progress)
    results = evaluate(nets, data, flow, show_progress)
    steps = data["test"].shape[1] - 1
    marks = [t for t in (cfg["unroll"], 5 * cfg["unroll"], 10 * cfg["unroll"]) if t <= steps]
    table = {v: [float(r["error"][:, t - 1].mean()) for t in marks] for v, r in results.items()}
    paths = [plot_errors(results, cfg["unroll"], out),
             plot_snapshots(results, data, cfg["unroll"], flow.h, out),
             plot_training(histories, out)]
    return {"marks": marks, "table": table, "results": results, "histories": histories,
            "per_iteration": per_iteration, "data_s": data_s, "paths": paths,
            "seconds": time.perf_counter() - start}


def main(argv=None):
    parser = demo_parser(__doc__, quick="small settings (under a minute): 4 training flows, "
                                        "unroll 4")
    parser.add_argument("--iterations", type=int, help="Adam iterations of every variant")
    parser.add_argument("--unroll", type=int, help="option 2's steps (horizon 10x, quick 5x)")
    parser.add_argument("--lr", type=float, help="Adam learning rate")
    parser.add_argument("--pressure", default="petsc", choices=["petsc", "fft"],
                        help="the coarse flow's pressure solve: PETSc CG + multigrid or torch FFT")
    parser.add_argument("--petsc-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a PETSc option of the coarse pressure solves, without the dash, "
                             "e.g. pc_type=gamg or ksp_rtol=1e-8 (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the network initialisation")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 is fastest for these small grids)")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the reference data instead of reading the cached copy")
    args = parser.parse_args(argv)
    cfg = dict(SETTINGS["quick" if args.quick else "full"])
    cfg.update({key: getattr(args, key) for key in ("iterations", "unroll", "lr")
                if getattr(args, key) is not None})
    if cfg["iterations"] < 1 or cfg["unroll"] < 1:
        parser.error("--iterations and --unroll must be positive")
    for item in args.petsc_option:
        if "=" not in item or item.startswith(("-", "=")):
            parser.error(f"--petsc-option expects KEY=VALUE without the dash, e.g. "
                         f"pc_type=gamg; got {item!r}")
    options = dict(item.split("=", 1) for item in args.petsc_option)
    if options and args.pressure != "petsc":
        parser.error("--petsc-option needs --pressure petsc")
    cfg["horizon"] = cfg["unroll"] * (5 if args.quick else 10)
    torch.set_num_threads(args.threads)
    res = run(cfg, pressure=args.pressure, options=options or None, seed=args.seed, out=args.out,
              cache=not args.no_cache)

    print(f"coarse {PHYSICS['n']}^2 vs reference {PHYSICS['n'] * PHYSICS['factor']}^2, "
          f"nu {PHYSICS['viscosity']}, dt {PHYSICS['dt']}; {cfg['train_flows']} training and "
          f"{cfg['test_flows']} held-out flows; {cfg['iterations']} Adam iterations of batch "
          f"{cfg['batch']} each; option 2 unrolls {cfg['unroll']} steps ({args.pressure} "
          f"pressure solves)")
    head = "".join(f"{f'step {t}':>12}" for t in res["marks"])
    print(f"relative velocity error on held-out flows (mean):\n{'variant':>10}{head}"
          f"{'s/iteration':>13}")
    for variant, row in res["table"].items():
        cost = res["per_iteration"].get(variant)
        print(f"{variant:>10}" + "".join(f"{100 * e:11.2f}%" for e in row)
              + (f"{cost:13.3f}" if cost is not None else f"{'':>13}"))
    one, two = res["table"]["option 1"], res["table"]["option 2"]
    print("option 2 / option 1 error: " + ", ".join(
        f"{b / a:.2f} at step {t}" for t, a, b in zip(res["marks"], one, two)))
    report_figures(*res["paths"])
    print(f"total {res['seconds']:.0f} s (reference data {res['data_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
