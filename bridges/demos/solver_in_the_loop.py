"""Solver-in-the-loop (seed 001; Um et al., NeurIPS 2020): a CNN corrects a coarse 2-D
Navier-Stokes solver after every step, trained through the unrolled solver whose pressure solves
are PETSc's (`bridges.petsc.solve`, CG + multigrid; gradients by adjoint solves).

The coarse solver (bridges.flow: periodic MAC grid, Heun steps, two pressure solves each) runs at
32^2; the reference is the same solver at 128^2 with 4 steps per coarse step, its velocity
face-averaged onto the coarse grid. Random smooth initial flows (decaying 2-D turbulence) are
seeded; the test flows are not in the training set. Four variants, one network (same
initialisation, data, Adam settings and iterations):

    none      the coarse solver alone
    option 1  hybrid step trained on one-step pairs: coarse step from a reference state ->
              the next reference state (no gradient through the solver)
    option 2  hybrid solver unrolled over `--unroll` steps from a reference state, matched to
              the reference trajectory (gradients through every PETSc solve)
    residual  the seed's residual modelling: the network corrects the states of a pure coarse
              rollout afterwards (never fed back into the solver)

Errors are relative L2 velocity errors against the reference on held-out flows, rolled out to
10x the unroll length (5x with --quick). Writes the error-over-time plot, vorticity snapshots and training curves.

    python -m bridges.demos.solver_in_the_loop [--quick] [--iterations N] [--unroll T]
        [--pressure petsc|fft] [--petsc-option KEY=VALUE ...] [--out DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time

import numpy as np
import torch

from bridges.demos._util import figure_path, progress, pyplot
from bridges.flow import Flow, curl, random_flow, restrict, vorticity

VARIANTS = ("none", "option 1", "option 2", "residual")
# the physics: decaying turbulence, RMS velocity 1, energy peak at wavenumber 3, in a 2 pi box
PHYSICS = {"n": 32, "factor": 4, "viscosity": 2e-3, "dt": 0.03, "peak": 3.0}
SETTINGS = {
    "full": {"unroll": 8, "horizon": 80, "train_flows": 16, "test_flows": 4, "iterations": 400,
             "batch": 4, "lr": 1e-3, "width": 16},
    "quick": {"unroll": 4, "horizon": 20, "train_flows": 4, "test_flows": 2, "iterations": 40,
              "batch": 2, "lr": 3e-3, "width": 8},
}


class Correction(torch.nn.Module):
    """A small CNN with periodic (circular) padding from the face velocity (u, v) to a corner
    stream function psi; the correction is the discrete curl of psi, so it keeps the velocity
    divergence-free. The last layer starts at zero: the hybrid solver starts as the coarse one.
    It computes in `dtype` (float32: 5x faster than float64 here) and returns the input's."""

    def __init__(self, h, width=16, scale=0.01, dtype=torch.float32):
        super().__init__()

        def conv(i, o, k):
            return torch.nn.Conv2d(i, o, k, padding=k // 2, padding_mode="circular", dtype=dtype)
        self.body = torch.nn.Sequential(conv(2, width, 5), torch.nn.GELU(),
                                        conv(width, width, 3), torch.nn.GELU(),
                                        conv(width, width, 3), torch.nn.GELU(),
                                        conv(width, 1, 3))
        torch.nn.init.zeros_(self.body[-1].weight)
        torch.nn.init.zeros_(self.body[-1].bias)
        self.h, self.scale = h, scale

    def forward(self, vel):
        n = vel.shape[-1]
        x = vel.reshape(-1, 2, n, n).to(self.body[0].weight.dtype)
        psi = self.body(x).reshape(*vel.shape[:-3], n, n).to(vel.dtype)
        return curl(self.scale * self.h * psi, self.h)


def coarse_flow(pressure="petsc", options=None):
    return Flow(PHYSICS["n"], viscosity=PHYSICS["viscosity"], dt=PHYSICS["dt"],
                pressure=pressure, options=options)


# -- data ------------------------------------------------------------------------------------------
def reference(count, steps, seed, show_progress=False):
    """Restricted reference trajectories (count, steps + 1, 2, n, n) from seeded random flows:
    the flow solver at factor x the resolution and factor x the steps (FFT pressure solves: the
    same discrete equations, solved exactly), face-averaged to the coarse grid."""
    f = PHYSICS["factor"]
    fine = Flow(PHYSICS["n"] * f, viscosity=PHYSICS["viscosity"], dt=PHYSICS["dt"] / f,
                pressure="fft")
    vel = random_flow(PHYSICS["n"] * f, count, seed=seed, peak=PHYSICS["peak"])
    states = [restrict(vel, f)]
    with torch.no_grad():
        for _ in progress(range(steps), desc=f"reference {fine.n}^2", leave=False,
                          disable=not show_progress):
            for _ in range(f):
                vel = fine.step(vel)
            states.append(restrict(vel, f))
    return torch.stack(states, dim=1)


def load_data(cfg, cache_dir=None, show_progress=False):
    """Training and test trajectories, cached under cache_dir (when given) by their settings."""
    spec = {**PHYSICS, "horizon": cfg["horizon"], "train": cfg["train_flows"],
            "test": cfg["test_flows"], "version": 1}
    path = None
    if cache_dir is not None:
        key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        path = figure_path(cache_dir, f"solver_in_the_loop_data_{key}.pt")
        if path.exists():
            return torch.load(path)
    data = {"train": reference(cfg["train_flows"], cfg["horizon"], seed=0,
                               show_progress=show_progress),
            "test": reference(cfg["test_flows"], cfg["horizon"], seed=1,
                              show_progress=show_progress)}
    if path is not None:
        torch.save(data, path)
    return data


# -- training --------------------------------------------------------------------------------------
def relative_mse(pred, target):
    """Mean over samples (and steps) of |pred - target|^2 / |target|^2 per state."""
    dims = (-3, -2, -1)
    return ((pred - target).pow(2).sum(dims) / target.pow(2).sum(dims)).mean()


def unrolled_loss(net, flow, ref, starts, unroll):
    """Option 2's objective: the hybrid solver unrolled `unroll` steps from ref[i, t] for each
    (i, t) in starts, against ref[i, t + 1 : t + 1 + unroll]."""
    which = torch.tensor([i for i, _ in starts])
    t0 = torch.tensor([t for _, t in starts])
    window = torch.stack([ref[i, t + 1:t + 1 + unroll] for i, t in starts])
    return relative_mse(flow.rollout(ref[which, t0], unroll, correction=net), window)


def _pure_coarse(flow, starts, steps):
    """Coarse rollouts (no gradient) from starts (N, 2, n, n): (N, steps, 2, n, n)."""
    with torch.no_grad():
        return flow.rollout(starts, steps)


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
    if variant == "option 1":  # the coarse step from every reference state, once
        inputs = _pure_coarse(flow, ref[:, :-1].reshape(-1, *ref.shape[2:]), 1)
        inputs = inputs.reshape(flows, steps, *ref.shape[2:])
    elif variant == "residual":  # the pure coarse rollout from each initial state
        inputs = _pure_coarse(flow, ref[:, 0], steps)
    elif variant != "option 2":
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
def relative_error(pred, target):
    dims = (-3, -2, -1)
    return ((pred - target).pow(2).sum(dims) / target.pow(2).sum(dims)).sqrt()


def evaluate(nets, data, flow, show_progress=False):
    """Roll every variant out from the test flows' initial states over the data's horizon.
    Returns {variant: {"error": (flows, steps) relative errors, "states": ...}}."""
    ref = data["test"]
    steps = ref.shape[1] - 1
    target = ref[:, 1:]
    out = {}
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
            out[variant] = {"states": states, "error": relative_error(states, target).numpy()}
    return out


# -- figures ---------------------------------------------------------------------------------------
COLOURS = {"none": "k", "option 1": "tab:orange", "option 2": "tab:blue", "residual": "tab:green"}


def plot_errors(results, unroll, path):
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
    ax.set_xlabel("coarse step")
    ax.set_ylabel("relative velocity error [%]")
    ax.set_title("held-out flows: error against the 128² reference (mean, min-max)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_snapshots(results, data, unroll, h, path):
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
        w_ref = vorticity(data["test"][0, t], h)
        lim = float(w_ref.abs().max())
        for c, (name, states) in enumerate(rows):
            w = vorticity(states[t - 1], h)
            axes[r, c].imshow(w.numpy(), origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
            err = "" if name == "reference" else \
                f" ({100 * results[name]['error'][0, t - 1]:.0f}%)"
            axes[r, c].set_title(f"{name}{err}", fontsize=9)
        axes[r, 0].set_ylabel(f"step {t}")
    fig.suptitle("vorticity of held-out flow 0 (velocity error in brackets)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_training(histories, path):
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, losses in histories.items():
        ax.semilogy(losses, color=COLOURS[variant], label=variant, alpha=0.8)
    ax.set_xlabel("Adam iteration")
    ax.set_ylabel("training loss (relative MSE)")
    ax.set_title("training losses (each variant's own objective)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    paths = [plot_errors(results, cfg["unroll"], figure_path(out, "solver_in_the_loop_error.png")),
             plot_snapshots(results, data, cfg["unroll"], flow.h,
                            figure_path(out, "solver_in_the_loop_vorticity.png")),
             plot_training(histories, figure_path(out, "solver_in_the_loop_training.png"))]
    return {"marks": marks, "table": table, "results": results, "histories": histories,
            "per_iteration": per_iteration, "data_s": data_s, "paths": paths,
            "seconds": time.perf_counter() - start}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small settings (under a minute): 4 training flows, unroll 4")
    parser.add_argument("--iterations", type=int, help="Adam iterations of every variant")
    parser.add_argument("--unroll", type=int, help="option 2's unrolled steps (the horizon is "
                                                   "10x, or 5x in quick mode)")
    parser.add_argument("--lr", type=float, help="Adam learning rate")
    parser.add_argument("--pressure", default="petsc", choices=["petsc", "fft"],
                        help="pressure solver of the coarse flow: PETSc CG + multigrid, or the "
                             "pure-torch FFT solve")
    parser.add_argument("--petsc-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a PETSc option of the coarse pressure solves, without the dash, "
                             "e.g. pc_type=gamg or ksp_rtol=1e-8 (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the network initialisation")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 is fastest for these small grids)")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the reference data instead of reading the cached copy")
    parser.add_argument("--out", default=None,
                        help="directory for the PNGs and the data cache (default bridges-out)")
    args = parser.parse_args(argv)
    cfg = dict(SETTINGS["quick" if args.quick else "full"])
    for key in ("iterations", "unroll", "lr"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if cfg["iterations"] < 1 or cfg["unroll"] < 1:
        parser.error("--iterations and --unroll must be positive")
    options = {}
    for item in args.petsc_option:
        key, sep, value = item.partition("=")
        if not sep or not key or key.startswith("-"):
            parser.error(f"--petsc-option expects KEY=VALUE without the dash, e.g. "
                         f"pc_type=gamg; got {item!r}")
        options[key] = value
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
    for p in res["paths"]:
        print(f"wrote {p}" if p else "figure skipped: install matplotlib (extra 'demo')")
    print(f"total {res['seconds']:.0f} s (reference data {res['data_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
