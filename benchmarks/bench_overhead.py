"""Overhead of the core bridge: forward+backward of one elementwise op, at sizes 2 to 1e6.

Three variants do the same numpy work (y = 2x, grad = 2g):
- bridge: `bridges.foreign_function` (forward returns outputs + pullback);
- bare: a hand-written torch.autograd.Function doing the same numpy calls;
- native: plain torch (`2 * x`), the floor.
"""
from __future__ import annotations

import numpy as np
import torch

from bridges import as_numpy, foreign_function
from bridges.plotting import pyplot

from ._timing import compare, fmt_time, markdown_table

TITLE = "Core bridge overhead (forward + backward)"
SIZES = [2, 100, 10_000, 1_000_000]


def _bridged():
    def forward(x):
        a = as_numpy(x)
        return a * 2.0, lambda g: as_numpy(g) * 2.0
    return foreign_function(forward, name="scale2")


class Bare(torch.autograd.Function):
    """Classic form: forward(ctx, ...)."""

    @staticmethod
    def forward(ctx, x):
        return torch.from_numpy(x.detach().numpy() * 2.0)

    @staticmethod
    def backward(ctx, g):
        return torch.from_numpy(g.numpy() * 2.0)


class BareModern(torch.autograd.Function):
    """Modern form (forward without ctx + setup_context), the form the bridge uses so that
    torch.func works."""

    @staticmethod
    def forward(x):
        return torch.from_numpy(x.detach().numpy() * 2.0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return torch.from_numpy(g.numpy() * 2.0)


def run(quick=False, plot_dir=None):
    op = _bridged()
    rows, ratios = [], []
    for n in SIZES[:3] if quick else SIZES:
        x = torch.randn(n, dtype=torch.float64, requires_grad=True)
        g = torch.ones(n, dtype=torch.float64)

        def round_trip(f):
            return lambda: torch.autograd.backward(f(x), g)
        t = compare({"bridge": round_trip(op.apply), "bare": round_trip(Bare.apply),
                     "modern": round_trip(BareModern.apply),
                     "native": round_trip(lambda v: 2.0 * v)}, rounds=5 if quick else 9)
        ratios.append((n, t["bridge"] / t["bare"], t["bridge"] / t["modern"],
                       t["bridge"] / t["native"]))
        rows.append([f"{n:.0e}" if n >= 1e4 else n, fmt_time(t["bridge"]), fmt_time(t["bare"]),
                     fmt_time(t["modern"]), fmt_time(t["native"]),
                     f"{t['bridge'] / t['bare']:.2f}", f"{t['bridge'] / t['modern']:.2f}",
                     f"{t['bridge'] / t['native']:.2f}"])
    table = markdown_table(["size", "bridge", "bare Function (classic)", "bare Function (modern)",
                            "native torch", "bridge / classic", "bridge / modern",
                            "bridge / native"], rows)
    classic, modern = ratios[0][1], ratios[0][2]
    notes = (f"Goal (issue 18): within 1.2x of a bare classic-form autograd.Function round trip "
             f"at small sizes. At size 2 the bridge costs **{classic:.2f}x** a classic-form "
             f"Function ({'met' if classic <= 1.2 else 'not met'}) and **{modern:.2f}x** a "
             f"modern-form one. torch.func needs the modern form (forward without ctx + "
             f"setup_context), whose Function.apply binds arguments with inspect.signature on "
             f"every call; outside torch.func transforms the bridge runs a classic-form twin of "
             f"its Function through the C++ apply directly, and skips torch.compile's guard "
             f"unless compiling. The rest of the gap to the classic form is the bridge's Python "
             f"around the same work: output conversion and promotion, the gradients' shape, "
             f"dtype and device checks, inputs and outputs saved for in-place detection. At "
             f"large sizes the numpy work dominates and every ratio tends to 1.")
    plots = []
    if plot_dir is not None:
        plots.append(_plot(ratios, plot_dir / "overhead.png"))
    return {"title": TITLE, "table": table, "notes": notes, "plots": [p for p in plots if p]}


def _plot(ratios, path):
    plt = pyplot()
    if plt is None:
        return None
    n, vs_bare, vs_modern, vs_native = map(np.array, zip(*ratios))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.semilogx(n, vs_bare, "o-", label="bridge / bare Function (classic form)")
    ax.semilogx(n, vs_modern, "^-", label="bridge / bare Function (modern form)")
    ax.semilogx(n, vs_native, "s-", label="bridge / native torch")
    ax.axhline(1.2, color="grey", ls=":", label="1.2x goal")
    ax.set(xlabel="elements", ylabel="time ratio", title=TITLE)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
