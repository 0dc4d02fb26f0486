"""DLPack (zero-copy) transfers against copying conversions, at sizes 10 to 1e8 float64s."""
from __future__ import annotations

import numpy as np
import torch

from bridges import as_numpy, as_tensor
from bridges.plotting import pyplot, save_figure

from ._timing import compare, fmt_time, markdown_table

TITLE = "Zero-copy transfers vs copying conversions"
SIZES = [10, 1_000, 100_000, 10_000_000, 100_000_000]


def _pairs(n):
    """(direction, zero-copy callable, copying callable) for one size."""
    t = torch.rand(n, dtype=torch.float64)
    a = t.numpy()
    pairs = [("torch → numpy", lambda: as_numpy(t), lambda: t.numpy().copy()),
             ("numpy → torch", lambda: as_tensor(a), lambda: torch.tensor(a))]
    try:
        from bridges.petsc import PETSc, as_vec, vec_as_tensor
    except ImportError:
        return pairs
    vec = as_vec(t)
    pairs += [("torch → PETSc Vec", lambda: as_vec(t),
               lambda: PETSc.Vec().createWithArray(t.numpy().copy(), comm=PETSc.COMM_SELF)),
              ("PETSc Vec → torch", lambda: vec_as_tensor(vec),
               lambda: torch.tensor(vec.getArray(readonly=True)))]
    return pairs


def run(quick=False, plot_dir=None):
    sizes = SIZES[:3] if quick else SIZES
    results = {}  # direction -> list of (n, zero-copy time, copy time)
    for n in sizes:
        for direction, zero_copy, copying in _pairs(n):
            t = compare({"zero": zero_copy, "copy": copying}, rounds=3 if n >= 1e7 else 7)
            results.setdefault(direction, []).append((n, t["zero"], t["copy"]))
    rows = []
    for direction, series in results.items():
        for n, zero, copy in series:
            rows.append([direction, f"{n:.0e}", fmt_time(zero), fmt_time(copy),
                         f"{copy / zero:.3g}"])
    table = markdown_table(["direction", "elements", "zero-copy", "copying", "copy / zero-copy"],
                           rows)
    flat = {d: s[-1][1] / s[0][1] for d, s in results.items()}
    notes = ("Target: zero-copy time flat in size. Zero-copy time at the largest size divided by "
             "that at 10 elements: " + ", ".join(f"{d}: **{r:.2f}x**" for d, r in flat.items())
             + f" (size ratio {sizes[-1] // sizes[0]:.0e}).")
    plots = [_plot(results, plot_dir)] if plot_dir is not None else []
    return {"title": TITLE, "table": table, "notes": notes, "plots": [p for p in plots if p]}


def _plot(results, plot_dir):
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k, (direction, series) in enumerate(results.items()):
        n, zero, copy = map(np.array, zip(*series))
        ax.loglog(n, zero * 1e6, "o-", color=f"C{k}", label=f"{direction} (zero-copy)")
        ax.loglog(n, copy * 1e6, "x--", color=f"C{k}", alpha=0.6, label=f"{direction} (copy)")
    ax.set(xlabel="float64 elements", ylabel="time per transfer [µs]", title=TITLE)
    ax.legend(fontsize=7)
    return save_figure(fig, plot_dir, "dlpack.png", dpi=110)
