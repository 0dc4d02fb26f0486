"""The C anchor: PETSc's own adjoint tutorial for Gray-Scott (ex5adj.c, C with a hand-written
Jacobian) against the same problem with a torch right-hand side through bridges.

ex5adj.c is PETSc's code. It is fetched at run time from the petsc 3.26.1 source distribution
(``pip download --no-deps --no-binary :all: petsc==3.26.1`` into ~/.cache/bridges/petsc-src),
compiled with mpicc against the installed PETSc, run as a separate program, and never stored in
this repository.

Problem (as ex5adj.c sets it up): u' = D1 Lap u - u v^2 + gamma (1 - u),
v' = D2 Lap v + u v^2 - (gamma + kappa) v with D1 = 8e-5, D2 = 4e-5, gamma = 0.024,
kappa = 0.06, on the periodic square [0, 2.5)^2 with M x M points (5-point Laplacian, u and v
interleaved); v(0) = sin^2(4 pi x) sin^2(4 pi y) / 4 on [1, 1.5]^2 and 0 elsewhere,
u(0) = 1 - 2 v(0). Crank-Nicolson, 20 steps of 0.5. Cost: u + v at grid point
(int((M - 1) / 2), int((M - 1) / 2)) at the final time; its gradient w.r.t. the initial state.

Timing: both processes time themselves with PETSc's event log: forward = the TSStep events,
adjoint = the TSAdjointStep events (each with every function and Jacobian evaluation and linear
solve inside it, in C or in Python callbacks). Process start-up and TS set-up are outside them;
bridges' whole call (set-up and the Jacobian's colouring included) is listed apart.
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ._timing import fmt_time, markdown_table

TITLE = "The C anchor: Gray-Scott forward and adjoint, PETSc's ex5adj.c vs a torch RHS in bridges"
VERSION = "3.26.1"
FOLDER = "src/ts/tutorials/advection-diffusion-reaction"
SOURCES = ("ex5adj.c", "reaction_diffusion.c", "reaction_diffusion.h")
CACHE = Path.home() / ".cache" / "bridges" / "petsc-src"
D1, D2, GAMMA, KAPPA, LENGTH = 8e-5, 4e-5, 0.024, 0.06, 2.5
DT, STEPS = 0.5, 20
# the same solver options in both programs: bridges' defaults, spelt out (the preconditioner's
# are added per grid, see `options`)
SOLVER = {"snes_rtol": 1e-10, "snes_atol": 1e-14, "snes_max_it": 50, "ksp_type": "gmres",
          "ksp_rtol": 1e-12, "ksp_atol": 1e-50}
COUPLING = (np.ones((2, 2)), np.eye(2))  # reactions at the point, each species diffuses alone
PROFILE = ("TSFunctionEval", "TSJacobianEval", "KSPSolve", "KSPSolveTranspos", "PCSetUp")


def options(m):
    """SOLVER and the preconditioner bridges chooses by default on an m x m grid."""
    from bridges.petsc import Grid
    from bridges.petsc._ode_jacobians import MULTIGRID_FROM
    from bridges.petsc._solve import multigrid_defaults
    grid = Grid((m, m), dof=2, boundary="periodic")
    return {**SOLVER, **multigrid_defaults(grid, 2 * m * m >= MULTIGRID_FROM)}


# -- the C program ----------------------------------------------------------------------------------
def build_c(cache=CACHE):
    """Path of ex5adj built against the installed PETSc (fetched and compiled once, cached)."""
    import petsc
    exe = cache / f"ex5adj-{VERSION}"
    if exe.exists():
        return exe
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"petsc-{VERSION}.tar.gz"
    if not archive.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", f"petsc=={VERSION}", "-d", str(cache)], check=True,
                       capture_output=True)
    src = cache / "ex5adj-src"
    src.mkdir(exist_ok=True)
    with tarfile.open(archive) as tar:
        for name in SOURCES:
            member = tar.getmember(f"petsc-{VERSION}/{FOLDER}/{name}")
            (src / name).write_bytes(tar.extractfile(member).read())
    mpicc = shutil.which("mpicc")
    if mpicc is None:
        raise RuntimeError("mpicc is not on PATH (apt-get install libmpich-dev)")
    d = petsc.get_petsc_dir()
    subprocess.run([mpicc, "-O2", "-I.", f"-I{d}/include", "ex5adj.c", "reaction_diffusion.c",
                    f"-L{d}/lib", "-lpetsc", "-lm", f"-Wl,-rpath,{d}/lib", "-o", str(exe)],
                   cwd=src, check=True, capture_output=True)
    return exe


def _events(log_text):
    """{event: (count, seconds)} from a -log_view report."""
    out = {}
    for line in log_text.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)\s+[\d.]+\s+([\d.e+-]+)\s", line)
        if m:
            out[m.group(1)] = (int(m.group(2)), float(m.group(3)))
    return out


def _read_binary(path):
    """A Vec from PETSc's binary format (one rank: natural order), as float64."""
    raw = Path(path).read_bytes()
    n = int(np.frombuffer(raw[4:8], ">i4")[0])
    return np.frombuffer(raw[8:8 + 8 * n], ">f8").astype(np.float64)


def run_c(exe, m, options, adjoint):
    """One run of ex5adj on an m x m grid: event times, Newton and linear iterations, and the
    final solution (forward only) or the gradient (with the adjoint)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / ("lambda.bin" if adjoint else "solution.bin")
        args = [str(exe), "-da_grid_x", str(m), "-da_grid_y", str(m), "-ts_type", "cn",
                "-ts_time_step", str(DT), "-ts_max_steps", str(STEPS),
                "-ts_trajectory_type", "memory", "-log_view", f":{tmp}/log.txt",
                "-ts_adjoint_view_solution" if adjoint else "-ts_view_solution",
                f"binary:{out}"] + ([] if adjoint else ["-forwardonly"])
        for key, value in options.items():
            args += [f"-{key}", str(value)]
        start = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True, cwd=tmp)
        wall = time.perf_counter() - start
        events = _events(Path(tmp, "log.txt").read_text())
        return {"forward": events["TSStep"][1], "adjoint": events.get("TSAdjointStep",
                                                                      (0, 0.0))[1],
                "wall": wall, "vector": _read_binary(out),
                "profile": {name: events.get(name, (0, 0.0)) for name in PROFILE}}


# -- the same problem in torch ----------------------------------------------------------------------
class GrayScott(torch.nn.Module):
    """dy/dt of Gray-Scott on a periodic square `grid` (dof 2: u, v): this rank's ghosted block
    to dy/dt on its owned block."""

    def __init__(self, grid):
        super().__init__()
        self.scale = (grid.shape[0] / LENGTH) ** 2  # 1 / h^2

    def forward(self, t, y):
        c = y[1:-1, 1:-1]
        lap = (y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4 * c) * self.scale
        u, v = c[..., 0], c[..., 1]
        uvv = u * v * v
        return torch.stack([D1 * lap[..., 0] - uvv + GAMMA * (1 - u),
                            D2 * lap[..., 1] + uvv - (GAMMA + KAPPA) * v], -1)


def initial_state(m):
    """The full (m, m, 2) initial state of ex5adj.c."""
    x = torch.arange(m, dtype=torch.float64) * (LENGTH / m)
    inside = (x >= 1.0 - 1e-10) & (x <= 1.5 + 1e-10)
    s = torch.where(inside, torch.sin(4 * math.pi * x) ** 2, torch.zeros_like(x))
    v = s[:, None] * s[None, :] / 4
    return torch.stack([1 - 2 * v, v], -1)


def run_bridges(m, options, adjoint):
    """The same solve through bridges.petsc.odeint_adjoint on a Grid, timed by PETSc's events."""
    from bridges.petsc import Grid, PETSc, odeint_adjoint
    grid = Grid((m, m), dof=2, boundary="periodic", coupling=COUPLING)
    func = GrayScott(grid)
    y0 = grid.scatter(initial_state(m)).requires_grad_(adjoint)
    events = [PETSc.Log.Event(name) for name in ("TSStep", "TSAdjointStep") + PROFILE]
    before = [e.getPerfInfo() for e in events]
    start = time.perf_counter()
    with torch.set_grad_enabled(adjoint):
        ys = odeint_adjoint(func, y0, torch.tensor([0.0, DT * STEPS]), method="cn",
                            step_size=DT, grid=grid, options=options)
        if adjoint:
            centre = int(0.5 * (m - 1))
            ys[-1][centre, centre].sum().backward()
    wall = time.perf_counter() - start
    spent = [(e.getPerfInfo()["count"] - b["count"], e.getPerfInfo()["time"] - b["time"])
             for e, b in zip(events, before)]
    vector = (y0.grad if adjoint else ys[-1]).detach().reshape(-1).numpy().copy()
    return {"forward": spent[0][1], "adjoint": spent[1][1], "wall": wall, "vector": vector,
            "profile": dict(zip(PROFILE, spent[2:]))}


def run(quick=False, plot_dir=None):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # stencil-sized ops run best on one thread, as the C program
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)


def _run(quick):
    from bridges.petsc import PETSc
    from bridges.petsc._ode_jacobians import MULTIGRID_FROM
    PETSc.Log.begin()
    exe = build_c()
    sizes = [64, 128] if quick else [128, 256, 512, 1024]
    run_bridges(32, options(32), True)  # warm up torch and PETSc
    rows, table = [], []
    for m in sizes:
        opts = options(m)
        c_fwd, b_fwd = run_c(exe, m, opts, False), run_bridges(m, opts, False)
        c_adj, b_adj = run_c(exe, m, opts, True), run_bridges(m, opts, True)
        sol = np.linalg.norm(b_fwd["vector"] - c_fwd["vector"]) / np.linalg.norm(c_fwd["vector"])
        grad = np.linalg.norm(b_adj["vector"] - c_adj["vector"]) / np.linalg.norm(c_adj["vector"])
        c_total = c_adj["forward"] + c_adj["adjoint"]
        b_total = b_adj["forward"] + b_adj["adjoint"]
        rows.append({"m": m, "c": c_adj, "bridges": b_adj, "options": opts})
        table.append([f"{m}² ({2 * m * m:,})", fmt_time(c_fwd["forward"]),
                      fmt_time(b_fwd["forward"]), f"{b_fwd['forward'] / c_fwd['forward']:.2f}",
                      fmt_time(c_total), fmt_time(b_total), f"{b_total / c_total:.2f}",
                      fmt_time(b_adj["wall"]), f"{sol:.1e} / {grad:.1e}"])
    header = ["grid (unknowns)", "C forward", "bridges forward", "bridges / C",
              "C forward + adjoint", "bridges forward + adjoint", "bridges / C",
              "bridges whole call", "difference: solution / gradient"]
    last = rows[-1]
    profile = [[name, f"{last['c']['profile'][name][0]}", fmt_time(last["c"]["profile"][name][1]),
                f"{last['bridges']['profile'][name][0]}",
                fmt_time(last["bridges"]["profile"][name][1])] for name in PROFILE]
    notes = [
        f"- Both: CN, {STEPS} steps of {DT}, full Newton (`snes_rtol` {SOLVER['snes_rtol']:g}) "
        f"with GMRES (`ksp_rtol` {SOLVER['ksp_rtol']:g}), the same PETSc options on both sides: "
        + ", ".join(f"`{k} {v}`" for k, v in SOLVER.items()) + f", and bridges' default "
        f"preconditioner for the grid, also given to the C program: ILU below "
        f"{MULTIGRID_FROM:,} unknowns, else "
        + ", ".join(f"`{k} {v}`" for k, v in last["options"].items() if k not in SOLVER)
        + f" (at {last['m']}²).",
        "- Times are PETSc's own event totals, TSStep (forward) and TSAdjointStep (adjoint), in "
        "each process; the forward columns come from runs without the adjoint (no trajectory), "
        "the forward + adjoint columns from runs with it. 'bridges whole call' is the wall time "
        "of odeint_adjoint + backward, set-up included.",
        "- 'difference' is the relative 2-norm difference of bridges' final solution and "
        "gradient (dCost/dy0) from the C program's (written by -ts_view_solution and "
        "-ts_adjoint_view_solution).",
        f"- ex5adj.c is fetched from the petsc {VERSION} source distribution and compiled at run "
        f"time (cached in {CACHE}); it is not part of this repository.",
    ]
    notes += ["", f"Where the time goes, forward + adjoint at {last['m']}² (PETSc events, "
              f"inclusive: the callbacks' events hold bridges' Python and torch work):", "",
              markdown_table(["event", "C calls", "C time", "bridges calls", "bridges time"],
                             profile), "", _equalised(last)]
    return {"title": TITLE, "table": markdown_table(header, table), "notes": "\n".join(notes),
            "plots": [], "rows": rows}


def _equalised(row):
    """A reading of the last size: both programs run PETSc's own Krylov solves (the same code),
    so a difference there is the machine's load; the ratio with them set equal."""
    solves = ("KSPSolve", "KSPSolveTranspos")  # (PCSetUp runs inside them)
    c, b = (sum(row[side]["profile"][name][1] for name in solves) for side in ("c", "bridges"))
    c_total = row["c"]["forward"] + row["c"]["adjoint"]
    b_total = row["bridges"]["forward"] + row["bridges"]["adjoint"]
    return (f"PETSc's Krylov solves (KSPSolve + KSPSolveTranspose, the same code on both sides) "
            f"took {fmt_time(c)} in the C run and {fmt_time(b)} in bridges'; with them set "
            f"equal, bridges / C for forward + adjoint at {row['m']}² is "
            f"{(b_total - b + c) / c_total:.2f}.")


if __name__ == "__main__":
    result = run(quick="--quick" in sys.argv)
    print(result["table"])
    print(result["notes"])
