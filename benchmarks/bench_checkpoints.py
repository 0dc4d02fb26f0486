"""Bounded-memory adjoints: peak memory and time of one loss + gradient of a long ODE solve on a
grid, storing every step against budgets of 100, 20 and 5 checkpoints (`odeint_adjoint(...,
checkpoints=k)`).

The problem: Allen-Cahn reaction-diffusion, u' = D lap(u) + r u (1 - u^2), on a 320 x 320 `Grid`
(102,400 unknowns), 5,000 fixed RK4 steps, a loss on five output times, gradients with respect to
u0, D and r. Storing every step is PETSc's trajectory with ``ts_trajectory_solution_only`` (one
state a step; with its four stages a step, it would need 16 GB); the budgets follow
checkpoint_schedules' binomial schedule. Each budget runs in a fresh process (this module with
``--worker``), which reports its own peak resident memory (getrusage ru_maxrss) and the TS steps
PETSc's log counts in the forward and in the backward pass.

    python -m benchmarks.run --only bench_checkpoints [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ._timing import markdown_table

TITLE = "Bounded-memory adjoints: peak memory and time against the checkpoint budget"
ROOT = Path(__file__).resolve().parent.parent
BUDGETS = ("all", 100, 20, 5)


# -- one budget, in its own process ----------------------------------------------------------------
def _worker(side, steps, budget, out):
    import torch
    from bridges.petsc import Grid, PETSc, odeint_adjoint
    torch.set_num_threads(1)
    PETSc.Log.begin()
    grid = Grid((side, side), boundary="periodic")
    h = 1.0 / side
    dt = 2e-5
    t = torch.linspace(0, steps * dt, 6, dtype=torch.float64)
    log_d = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)  # D = e^-3
    rate = torch.tensor(50.0, dtype=torch.float64, requires_grad=True)
    i = grid.interior

    def func(_, u):
        c = u[i]
        lap = u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:] - 4 * c
        return log_d.exp() / h ** 2 * lap + rate * c * (1 - c * c)

    axes = torch.meshgrid(*(torch.arange(side, dtype=torch.float64) * h,) * 2, indexing="ij")
    full = 0.5 * torch.sin(2 * np.pi * axes[0]) * torch.cos(4 * np.pi * axes[1]) + \
        0.3 * torch.cos(2 * np.pi * (axes[0] + 2 * axes[1]))
    u0 = full[grid.owned].clone().requires_grad_()
    weights = torch.cos(3 * np.pi * axes[0] + axes[1])[grid.owned]
    kwargs = {"options": {"ts_trajectory_solution_only": True}} if budget == "all" else \
        {"checkpoints": int(budget)}

    def counted(fn):
        event = PETSc.Log.Event("TSStep")
        before, start = event.getPerfInfo()["count"], time.perf_counter()
        cpu = time.process_time()  # (the load of a shared machine hardly moves it)
        value = fn()
        return value, time.perf_counter() - start, time.process_time() - cpu, \
            event.getPerfInfo()["count"] - before

    ys, forward_s, forward_cpu_s, forward_steps = counted(lambda: odeint_adjoint(
        func, u0, t, method="rk4", steps_per_interval=steps // (len(t) - 1), grid=grid,
        adjoint_params=(log_d, rate), **kwargs))
    loss = (weights * ys[1:]).sum() + (ys[-1] ** 2).sum()
    _, backward_s, backward_cpu_s, backward_steps = counted(loss.backward)
    gradient = np.concatenate([u0.grad.reshape(-1).numpy(), [log_d.grad.item(),
                                                             rate.grad.item()]])
    np.save(out + ".npy", gradient)
    Path(out).write_text(json.dumps({
        "forward_s": forward_s, "backward_s": backward_s, "forward_steps": forward_steps,
        "backward_steps": backward_steps, "loss": loss.item(), "forward_cpu_s": forward_cpu_s,
        "backward_cpu_s": backward_cpu_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _launch(side, steps, budget, timeout=3600):
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        path = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
        run = subprocess.run([sys.executable, "-m", "benchmarks.bench_checkpoints", "--worker",
                              "--side", str(side), "--steps", str(steps), "--budget",
                              str(budget), "--out", out], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": path}, capture_output=True,
                             text=True, timeout=timeout)
        if run.returncode != 0:
            raise RuntimeError(f"budget {budget} failed:\n{run.stderr[-2000:]}")
        result = json.loads(Path(out).read_text())
        result["gradient"] = np.load(out + ".npy")
        return result


# -- the benchmark --------------------------------------------------------------------------------
def run(quick=False, plot_dir=None):
    side, steps = (64, 500) if quick else (320, 5000)
    return report({budget: _launch(side, steps, budget) for budget in BUDGETS}, side)


def report(results, side):
    """The RESULTS.md section from the workers' results (budget -> result)."""
    from bridges.petsc._checkpoint import predicted_steps
    reference = results["all"]
    state_mb = side * side * 8 / 2 ** 20
    # the schedule's time model: a backward pass recomputes its steps at the cost of a step of
    # its own row's forward pass (the load on a shared machine changes from row to row), and
    # runs n adjoint steps at the every-step row's cost besides the steps they recompute
    # (on CPU time, which the load of a shared machine hardly moves)
    def cpu(r, part):
        return r[f"{part}_cpu_s"]

    n = reference["forward_steps"]
    t_a = (cpu(reference, "backward") - (n - 1) * cpu(reference, "forward") / n) / n
    reference_total = cpu(reference, "forward") + cpu(reference, "backward")
    rows = []
    for budget, r in results.items():
        n = r["forward_steps"]
        predicted = n - 1 if budget == "all" else predicted_steps(n, budget)
        error = np.abs(r["gradient"] - reference["gradient"]).max() / \
            np.abs(reference["gradient"]).max()
        rows.append([
            "every step" if budget == "all" else f"{budget}",
            f"{r['peak_rss_mb']:.0f}", f"{r['forward_s']:.1f}", f"{r['backward_s']:.1f}",
            f"{cpu(r, 'forward'):.1f}", f"{cpu(r, 'backward'):.1f}",
            f"{predicted * cpu(r, 'forward') / n + n * t_a:.1f}",
            f"{(cpu(r, 'forward') + cpu(r, 'backward')) / reference_total:.2f}",
            f"{r['backward_steps']}", f"{predicted}",
            "reference" if budget == "all" else f"{error:.1e}"])
    table = markdown_table(
        ["states stored", "peak RSS (MB)", "forward (s)", "loss + gradient backward (s)",
         "forward CPU (s)", "backward CPU (s)", "backward CPU, schedule's model (s)",
         "CPU time / every step", "steps recomputed", "schedule's prediction",
         "gradient vs every step (max rel.)"], rows)
    notes = (f"{side} x {side} = {side * side:,} unknowns ({state_mb:.2f} MB a state), "
             f"{reference['forward_steps']:,} RK4 steps, one process per row (1 thread), on a "
             f"2-core machine shared with other jobs (times are indicative). 'Every step' "
             f"stores a state per step in PETSc's trajectory (`ts_trajectory_solution_only`) "
             f"and recomputes the stages of every step but the last; a budget of k stores at "
             f"most k states and recomputes on checkpoint_schedules' binomial schedule. "
             f"'Steps recomputed' are TS steps PETSc's log counts in the backward pass; the "
             f"prediction is the sum of the schedule's forward advances (Griewank and "
             f"Walther's optimum: tests/test_petsc_checkpoint.py checks it against "
             f"`optimal_steps_binomial`). Forward and backward are wall times; CPU times are "
             f"the process's own. 'Schedule's model' is the predicted steps at the CPU cost of "
             f"a step of the row's own forward pass, plus {reference['forward_steps']:,} "
             f"adjoint steps at the every-step row's CPU cost besides the step each recomputes "
             f"({t_a * 1e3:.1f} ms). Peak RSS includes the "
             f"interpreter, torch and PETSc, and the six outputs the solve returns.")
    return {"title": TITLE, "table": table, "notes": notes, "plots": []}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--side", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--budget")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        _worker(args.side, args.steps, args.budget, args.out)
