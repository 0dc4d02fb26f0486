"""Exact adjoints: every ROBER sensitivity dy_i(T)/dk_j against scipy's forward sensitivities as
rtol is tightened, and what the pivoted block solves cost against the old explicit inverses.

- Accuracy: the default method (ARKIMEX 4), atol 1e-20, the whole 3 x 3 matrix dy(T)/dk from one
  adjoint sweep (vmap over the backward), error max_ij |(g_ij - ref_ij) k_j| / max_j |ref_ij k_j|.
- Cost: ROBER on [0, 1e5] at rtol 1e-6, loss + gradient with the default linear solves (pivoted
  LU of each block, refined transposed solves) against PETSc's PCPBJACOBI (explicit block
  inverses, the old default), timed side by side.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from bridges.petsc import odeint_adjoint
from bridges.problems import problem

from ._timing import compare, fmt_time, markdown_table

TITLE = "Exact adjoints: per-component ROBER sensitivities, and the cost of pivoted solves"


def _sensitivities(p, t_end, rtol, options=None):
    func, y0, _ = p.tensors()
    start = time.perf_counter()
    ys = odeint_adjoint(func, y0, torch.tensor([0.0, t_end]), rtol=rtol, atol=1e-20,
                        options=options)
    rows = torch.eye(3, dtype=torch.float64)
    grads = torch.func.vmap(lambda v: torch.autograd.grad(ys[-1], func.k, v,
                                                          retain_graph=True)[0])(rows)
    return grads.numpy(), time.perf_counter() - start


def _error(g, ref, k):
    return float(np.max(np.abs((g - ref) * k).max(axis=1) / np.abs(ref * k).max(axis=1)))


def run(quick=False, plot_dir=None):
    torch.set_num_threads(1)
    p = problem("rober")
    k = p.params["k"]
    times = [1e2, 1e6, 1e11]
    rtols = [1e-6, 1e-8] if quick else [1e-6, 1e-8, 1e-10]
    rows = []
    for t_end in times:
        ref = p.sensitivities(np.array([0.0, t_end]))[1]["k"][-1]
        row = [f"{t_end:g}"]
        for rtol in rtols:
            g, seconds = _sensitivities(p, t_end, rtol)
            row.append(f"{_error(g, ref, k):.1e} ({seconds:.1f} s)")
        rows.append(row)
    accuracy = markdown_table(["T"] + [f"rtol {r:g}" for r in rtols], rows)

    func, y0, _ = p.tensors()
    t = torch.tensor([0.0, 1e5])

    def loss_and_gradient(options):
        def call():
            ys = odeint_adjoint(func, y0, t, rtol=1e-6, atol=1e-20, options=options)
            torch.autograd.grad(ys[-1].sum(), func.k)
        return call
    old = {"pc_type": "pbjacobi"}
    try:
        loss_and_gradient(old)()
        old_gradient = "passes the residual guard here"
    except Exception as exc:  # the guard refuses the old path's inaccurate adjoint
        old_gradient = f"refused by the residual guard ({type(exc).__name__})"

    def forward(options):
        def call():
            with torch.no_grad():
                odeint_adjoint(func, y0, t, rtol=1e-6, atol=1e-20, options=options)
        return call
    timed = compare({"pivoted LU": forward(None), "explicit inverse": forward(old)},
                    rounds=3 if quick else 7)
    full = compare({"pivoted LU": loss_and_gradient(None)}, rounds=3 if quick else 5)
    cost = markdown_table(
        ["what", "pivoted LU (default)", "explicit inverse (pbjacobi)", "ratio"],
        [["forward solve, [0, 1e5]", fmt_time(timed["pivoted LU"]),
          fmt_time(timed["explicit inverse"]),
          f"{timed['pivoted LU'] / timed['explicit inverse']:.2f}"],
         ["loss + gradient, [0, 1e5]", fmt_time(full["pivoted LU"]), old_gradient, ""]])
    table = accuracy + "\n\n" + cost
    notes = ("First table: the scaled error of the worst row of dy(T)/dk (scipy Radau forward "
             "sensitivities at rtol 1e-10, atol 1e-20 as the reference) and the time of one "
             "forward solve plus the adjoint sweep for all three rows. The old default applied "
             "explicit inverses of the blocks shift*I - J (PCPBJACOBI), which are not backward "
             "stable: at T = 1e11 (steps ~1e10, condition ~1e13) dy1/dk1 came out 340x too "
             "large. Second table: the forward solves of both paths side by side (the linear "
             "solves are a small part of a step: Python callbacks dominate).")
    return {"title": TITLE, "table": table, "notes": notes, "plots": []}
