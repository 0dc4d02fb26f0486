"""Solver-in-the-loop (the demo's option 2, on `bridges.problems.turbulence`): one training
iteration of the hybrid solver unrolled through PETSc pressure solves (`bridges.petsc.solve`: CG +
geometric multigrid, adjoint CG in backward) against the same iteration with the pure-torch FFT
pressure solve, interleaved; the pressure solve alone (forward + backward) both ways; how a solve's
cost grows with the number of solves alive at once (an unroll keeps every step's solve until
backward); and where the time of a PETSc iteration goes (cProfile and PETSc's event log).

The coarse grid is the demo's (32 x 32, periodic, two pressure solves per step); torch runs with
one intra-op thread (the demo's default).
"""
from __future__ import annotations

import time

import torch

from bridges.problems import turbulence
from bridges.flow import FFTPoisson, PetscPoisson

from ._timing import compare, fmt_time, markdown_table, profiled

TITLE = "Solver in the loop: unrolled training through PETSc pressure solves vs a torch FFT solve"


def _iteration(flow, net, data, starts, unroll):
    """One option-2 iteration (as the demo trains): unrolled loss per window, backward, Adam
    step."""
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-6)

    def step():
        optimiser.zero_grad()
        for start in starts:
            loss = turbulence.unrolled_loss(net, flow, data["train"], [start], unroll)
            (loss / len(starts)).backward()
        optimiser.step()
    return step


def _poisson(solver, b, w):
    def step():
        phi = solver(b)
        torch.autograd.grad((w * phi).sum(), b)
    return step


def _alive_cost(n_alive, repeats):
    """Median seconds of one more forward PETSc solve while n_alive solves await backward."""
    n = turbulence.PHYSICS["n"]
    solver = PetscPoisson(n, 1.0)
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(n, n, dtype=torch.float64, generator=gen).requires_grad_()
    held = [solver(b) for _ in range(n_alive)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        held.append(solver(b))
        times.append(time.perf_counter() - start)
    del held
    return sorted(times)[len(times) // 2]


PROFILED = {  # (file suffix, function) -> label, for the cProfile breakdown
    ("petsc/_solve.py", "_forward"): "forward solves (set-up, assembly, PC set-up, CG)",
    ("petsc/_solve.py", "pullback"): "adjoint solves (re-assembly, PC set-up, CG)",
    ("petsc/_options.py", "__init__"): "of these, options set-up",
    ("petsc/_jacobian.py", "assemble"): "of these, Jacobian assembly from torch products",
    ("petsc/_solve.py", "release"): "destroying the solves' PETSc objects",
}


def _profile(step):
    total, stats = profiled(step)
    found = {label: 0.0 for label in PROFILED.values()}
    for (path, _, name), (_, _, _, cumulative, _) in stats.items():
        for (suffix, fn), label in PROFILED.items():
            if path.endswith(suffix) and name == fn:
                found[label] += cumulative
    found["everything else (CNN, stencils, autograd)"] = (
        total - found[PROFILED["petsc/_solve.py", "_forward"]]
        - found[PROFILED["petsc/_solve.py", "pullback"]]
        - found[PROFILED["petsc/_solve.py", "release"]])
    return total, found


def _petsc_events(step):
    from bridges.petsc import PETSc
    names = ("SNESSolve", "SNESJacobianEval", "PCSetUp", "KSPSolve")
    PETSc.Log.begin()
    before = {n: PETSc.Log.Event(n).getPerfInfo() for n in names}
    start = time.perf_counter()
    step()
    total = time.perf_counter() - start
    after = {n: PETSc.Log.Event(n).getPerfInfo() for n in names}
    return total, {n: (after[n]["time"] - before[n]["time"], after[n]["count"] - before[n]["count"])
                   for n in names}


def run(quick=False, plot_dir=None):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)


def _run(quick):
    cfg = dict(turbulence.SETTINGS["full"])
    if quick:
        cfg.update(batch=2, unroll=4)
    cfg.update(horizon=2 * cfg["unroll"], train_flows=cfg["batch"], test_flows=1)
    data = turbulence.load_data(cfg)
    starts = [(i, i % cfg["unroll"]) for i in range(cfg["batch"])]
    n = turbulence.PHYSICS["n"]
    flows = {p: turbulence.coarse_flow(p) for p in ("petsc", "fft")}
    torch.manual_seed(0)
    net = turbulence.Correction(flows["fft"].h, width=cfg["width"])
    torch.nn.init.normal_(net.body[-1].weight, std=0.1)  # a non-zero correction
    iterations = {f"option-2 iteration, {p} pressure": _iteration(flows[p], net, data, starts,
                                                                 cfg["unroll"])
                  for p in ("petsc", "fft")}
    rounds = 3 if quick else 5
    it_times = compare(iterations, rounds=rounds, min_time=0.05)

    gen = torch.Generator().manual_seed(1)
    b = torch.randn(n, n, dtype=torch.float64, generator=gen)
    b = (b - b.mean()).requires_grad_()
    w = torch.randn(n, n, dtype=torch.float64, generator=gen)
    h = flows["fft"].h
    solves = {"Poisson solve + backward, PETSc CG + MG": _poisson(PetscPoisson(n, h), b, w),
              "Poisson solve + backward, torch FFT": _poisson(FFTPoisson(n, h), b, w)}
    solve_times = compare(solves, rounds=rounds)

    per_window = 2 * cfg["unroll"]
    solves_per_it = cfg["batch"] * per_window
    petsc_it, fft_it = it_times.values()
    petsc_solve, fft_solve = solve_times.values()
    rows = [[name, fmt_time(t), f"{t / fft_it:.1f}x"] for name, t in it_times.items()]
    rows += [[name, fmt_time(t), f"{t / fft_solve:.0f}x"] for name, t in solve_times.items()]
    table = markdown_table(["what (32 x 32 coarse grid)", "median time", "vs FFT"], rows)

    alive = [0, 16, 64] if quick else [0, 16, 64, 256]
    alive_times = {k: _alive_cost(k, 5 if quick else 9) for k in alive}
    profiled_total, found = _profile(iterations["option-2 iteration, petsc pressure"])
    events_total, events = _petsc_events(iterations["option-2 iteration, petsc pressure"])

    notes = [
        f"- One iteration: {cfg['batch']} windows x {cfg['unroll']} steps x 2 pressure solves = "
        f"{solves_per_it} forward solves (and as many adjoint solves, bar the first step's, "
        f"which no parameter reaches) on a 32^2 grid, plus the CNN (width {cfg['width']}, "
        f"float32) and the torch stencils. The PETSc iteration costs {petsc_it / fft_it:.1f}x "
        f"the FFT one: {fmt_time((petsc_it - fft_it) / solves_per_it)} more per forward+adjoint "
        f"solve pair, while a PETSc solve + backward alone costs {fmt_time(petsc_solve)} against "
        f"the FFT's {fmt_time(fft_solve)}.",
        "- A forward PETSc solve while k others await their backward (the unroll holds them "
        "all): " + ", ".join(f"k = {k}: {fmt_time(t)}" for k, t in alive_times.items())
        + ". Each solve's options set-up reads the whole options database, which holds every "
        "live solve's entries, so an unroll of m solves costs O(m^2) in it.",
        f"- Where a PETSc iteration's {fmt_time(profiled_total)} go (under cProfile, "
        f"cumulative): " + "; ".join(f"{label} {fmt_time(t)}" for label, t in found.items())
        + ".",
        f"- PETSc's own events in one iteration ({fmt_time(events_total)} wall): "
        + "; ".join(f"{name} {fmt_time(t)} ({c} calls)" for name, (t, c) in events.items())
        + ". SNESSolve covers the forward solves; the adjoint's re-assembly runs outside "
        "SNESJacobianEval, its PC set-up and CG inside PCSetUp and KSPSolve.",
        "- The FFT solve is exact (the stencil's eigen-decomposition) and batched over fields; "
        "the PETSc solve is one field per call, to ksp_rtol 1e-10 on the true residual. "
        "2 CPU cores shared with other jobs: expect up to ~2x variation between runs.",
    ]
    return {"title": TITLE, "table": table, "notes": "\n".join(notes), "plots": []}
