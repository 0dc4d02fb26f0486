"""Overhead of the Julia adapter, forward + backward, against native torch, and what copying the
outputs costs.

Two functions of an n-vector x, timed side by side at each n:
- `A * x` (A an n x n float64 matrix): n outputs for n^2 work, so copying the output is cheap;
- `x * x'` (the outer product): n^2 outputs for n^2 work, the worst case for copying.

Variants:
- bridged: `julia2pytorch(...)` as it comes: Zygote.pullback in forward, outputs and gradients
  copied into torch's memory (the default, so torch can never write into Julia's arrays);
- views: the same with `copy_outputs=False` (zero-copy views of Julia's memory);
- no grad: the bridged forward under torch.no_grad, which skips Zygote (BridgesJL.call), against
  the bridged forward alone with a gradient wanted;
- juliacall only: the same BridgesJL.pullback and back calls made straight through juliacall on
  numpy arrays, without torch or the core: the cost of crossing into Julia by itself;
- native: the same function in torch.
Needs Julia; without it the section says why it could not run.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from bridges.plotting import pyplot, save_figure
from bridges.julia import JuliaUnavailableError, julia2pytorch

from ._timing import compare, fmt_time, markdown_table

TITLE = "Julia adapter overhead: bridged Julia functions against native torch, copies against views"
SIZES = [2, 64, 512, 2048]
SETUP = """
import Random
A = randn(Random.MersenneTwister(0), {n}, {n})
matvec(x) = A * x
outer(x) = x * x'
"""


def run(quick=False, plot_dir=None):
    sizes = SIZES[:2] if quick else SIZES
    try:
        ops = {n: {name: (julia2pytorch(name, SETUP.format(n=n)),
                          julia2pytorch(name, SETUP.format(n=n), copy_outputs=False))
                   for name in ("matvec", "outer")} for n in sizes}
    except JuliaUnavailableError as exc:
        return {"title": TITLE, "table": "", "plots": [],
                "notes": "**could not run**: there is no usable Julia on this machine, so there is "
                         "nothing to time. " + " ".join(str(exc).split())}
    import juliacall  # started by julia2pytorch above
    pullback = juliacall.Main.BridgesJL.pullback
    rows, ratios = [], []
    for n in sizes:
        a = torch.randn(n, n, dtype=torch.float64)
        natives = {"matvec": lambda v: a @ v, "outer": lambda v: torch.outer(v, v)}
        module = juliacall.newmodule("bench_julia")
        module.seval(SETUP.format(n=n))
        for name, (bridged, views) in ops[n].items():
            x = torch.randn(n, dtype=torch.float64, requires_grad=True)
            seed = torch.ones_like(natives[name](x.detach()))
            start = time.perf_counter()
            torch.autograd.backward(bridged(x), seed)  # the first call compiles f and its pullback
            first = time.perf_counter() - start
            f_jl, x_np, seed_np = getattr(module, name), x.detach().numpy(), seed.numpy()

            def juliacall_only():
                y, back = pullback(f_jl, x_np)
                np.array(y)
                np.array(back(seed_np, (True,))[0])

            def no_grad():
                with torch.no_grad():
                    bridged(x)

            def round_trip(op):
                return lambda: torch.autograd.backward(op(x), seed)
            t = compare({"bridged": round_trip(bridged), "views": round_trip(views),
                         "forward": lambda: bridged(x), "no_grad": no_grad,
                         "juliacall": juliacall_only, "native": round_trip(natives[name])},
                        rounds=5 if quick else 9)
            ratios.append((name, n, t["bridged"] / t["native"], t["bridged"] / t["views"]))
            rows.append([name, n, fmt_time(t["native"]), fmt_time(t["bridged"]),
                         fmt_time(t["views"]), fmt_time(t["juliacall"]),
                         f"{t['bridged'] / t['native']:.1f}", f"{t['bridged'] / t['views']:.2f}",
                         f"{t['no_grad'] / t['forward']:.2f}",
                         f"{t['bridged'] / t['juliacall']:.2f}", fmt_time(first)])
    table = markdown_table(["function", "n", "native torch", "bridged (copies)", "views",
                            "juliacall only", "bridged / native", "copies / views",
                            "no-grad forward / forward", "bridged / juliacall only",
                            "first bridged call"], rows)
    worst = max(ratios, key=lambda r: r[3])
    notes = (f"Each variant runs forward and backward, except the no-grad column, which compares "
             f"forwards. copies / views is what copying outputs and gradients into torch's memory "
             f"costs: at most {worst[3]:.2f}x here ({worst[0]}, n = {worst[1]}); the outer "
             f"product's n^2 outputs make the copy as big as the work. The copies buy outputs "
             f"that torch can change in place without corrupting Zygote's pullback or a Julia "
             f"global. bridged / juliacall only "
             f"is the bridge's own cost (core checks, tensor-numpy transfers). x reaches Julia as "
             f"a PyArray view (no copy). The first call of each function includes Julia "
             f"compiling it and its pullback.")
    plots = []
    if plot_dir is not None:
        plots.append(_plot(ratios, plot_dir))
    return {"title": TITLE, "table": table, "notes": notes, "plots": [p for p in plots if p]}


def _plot(ratios, plot_dir):
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, marker in (("matvec", "s"), ("outer", "o")):
        n, vs_native, vs_views = map(np.array, zip(*[r[1:] for r in ratios if r[0] == name]))
        ax.loglog(n, vs_native, marker + "-", label=f"{name}: bridged / native torch")
        ax.loglog(n, vs_views, marker + ":", label=f"{name}: copies / views")
    ax.axhline(1.0, color="grey", ls=":")
    ax.set(xlabel="n (x has n entries)", ylabel="time ratio", title="Julia adapter overhead")
    ax.legend(fontsize=8)
    return save_figure(fig, plot_dir, "julia_overhead.png", dpi=110)
