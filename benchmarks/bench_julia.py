"""Overhead of the Julia adapter: forward + backward of y = A x, A an n x n float64 matrix.

Variants, timed side by side at each n:
- bridged: `julia2pytorch("f", setup)` with Julia's `f(x) = A * x` (Zygote.pullback in forward,
  its pullback in backward); x reaches Julia as a PyArray view, so Julia's generic matvec runs;
- bridged, Array(x): `g(x) = A * Array(x)`, one copy in Julia and then BLAS;
- juliacall only: the same BridgesJL.pullback and back calls made straight through juliacall on
  numpy arrays, without torch or the core: the cost of crossing into Julia by itself;
- native: `A @ x` in torch.
Needs Julia; without it the section says why it could not run.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from bridges.julia import JuliaUnavailableError, julia2pytorch
from bridges.demos._util import pyplot

from ._timing import compare, fmt_time, markdown_table

TITLE = "Julia adapter overhead: bridged Julia f(x) = A*x against native torch"
SIZES = [2, 64, 512, 2048]
SETUP = """
import Random
A = randn(Random.MersenneTwister(0), {n}, {n})
f(x) = A * x
g(x) = A * Array(x)
"""


def run(quick=False, plot_dir=None):
    sizes = SIZES[:2] if quick else SIZES
    try:
        bridged = {n: (julia2pytorch("f", SETUP.format(n=n)), julia2pytorch("g", SETUP.format(n=n)))
                   for n in sizes}
    except JuliaUnavailableError as exc:
        return {"title": TITLE, "table": "", "plots": [],
                "notes": "**could not run**: there is no usable Julia on this machine, so there is "
                         "nothing to time. " + " ".join(str(exc).split())}
    import juliacall  # started by julia2pytorch above
    pullback = juliacall.Main.BridgesJL.pullback
    rows, ratios = [], []
    for n in sizes:
        f, g = bridged[n]
        x = torch.randn(n, dtype=torch.float64, requires_grad=True)
        ones = torch.ones(n, dtype=torch.float64)
        start = time.perf_counter()
        torch.autograd.backward(f(x), ones)  # the first call compiles f and its pullback
        first = time.perf_counter() - start
        a = torch.randn(n, n, dtype=torch.float64)
        module = juliacall.newmodule("bench_julia")
        module.seval(SETUP.format(n=n))
        f_jl, x_np, ones_np = module.f, x.detach().numpy(), ones.numpy()

        def juliacall_only():
            y, back = pullback(f_jl, x_np)
            np.asarray(y)
            np.asarray(back(ones_np, (True,))[0])

        def round_trip(op):
            return lambda: torch.autograd.backward(op(x), ones)
        t = compare({"bridged": round_trip(f), "array": round_trip(g),
                     "juliacall": juliacall_only, "native": round_trip(lambda v: a @ v)},
                    rounds=5 if quick else 9)
        ratios.append((n, t["bridged"] / t["native"], t["bridged"] / t["juliacall"]))
        rows.append([n, fmt_time(t["native"]), fmt_time(t["bridged"]), fmt_time(t["array"]),
                     fmt_time(t["juliacall"]), f"{t['bridged'] / t['native']:.1f}",
                     f"{t['array'] / t['native']:.1f}", f"{t['bridged'] / t['juliacall']:.2f}",
                     fmt_time(first)])
    table = markdown_table(["n", "native torch", "bridged", "bridged, Array(x)", "juliacall only",
                            "bridged / native", "Array(x) / native", "bridged / juliacall only",
                            "first bridged call"], rows)
    notes = (f"Each variant runs forward and backward of y = A x. bridged / juliacall only is the "
             f"bridge's own cost (the core's checks, tensor-numpy views, the lock): "
             f"{ratios[0][2]:.2f}x at n = {ratios[0][0]}, {ratios[-1][2]:.2f}x at n = "
             f"{ratios[-1][0]}. bridged / native adds the cost of entering Julia and running "
             f"Zygote's pullback, which dominates at small n ({ratios[0][1]:.1f}x at n = "
             f"{ratios[0][0]}, {ratios[-1][1]:.1f}x at n = {ratios[-1][0]}). x reaches Julia as "
             f"a PyArray view (no copy), on which `A * x` takes Julia's generic matvec; "
             f"`A * Array(x)` pays one copy for BLAS. The first call of each function includes "
             f"Julia compiling it and its pullback.")
    plots = []
    if plot_dir is not None:
        plots.append(_plot(ratios, plot_dir / "julia_overhead.png"))
    return {"title": TITLE, "table": table, "notes": notes, "plots": [p for p in plots if p]}


def _plot(ratios, path):
    plt = pyplot()
    if plt is None:
        return None
    n, vs_native, vs_juliacall = map(np.array, zip(*ratios))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.loglog(n, vs_native, "s-", label="bridged / native torch")
    ax.loglog(n, vs_juliacall, "o-", label="bridged / juliacall only")
    ax.axhline(1.0, color="grey", ls=":")
    ax.set(xlabel="n (A is n x n)", ylabel="time ratio", title=TITLE)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
