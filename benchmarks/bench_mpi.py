"""The steady-diffusion solve and its gradient distributed over MPI ranks (`Grid`, PETSc DMDA):
strong scaling of the 1025^2-unknown problem on 1, 2 and 4 ranks, weak scaling at a fixed block
per rank, the bytes each rank exchanges, and where each rank's time goes.

The problem is steady diffusion (`bridges.problems.diffusion`, seed 002's kappa =
1, s = 1): CG + geometric multigrid on the DMDA hierarchy to a residual of 1e-11, then the
gradient of L = sum(w T) w.r.t. kappa and s (one adjoint CG + MG solve and one autograd pass), the
ranks' gradient shares summed by `sum_gradients`. Each configuration runs in its own
``mpiexec -n P`` (this module with ``--worker``); every rank times each phase after a barrier, and
the slowest rank's time is reported. PETSc's log gives the time of its events and the bytes of
the messages each rank sends.

    python -m benchmarks.run --only bench_mpi [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._timing import fmt_time, markdown_table

TITLE = "MPI: distributed steady-diffusion solve + gradient (strong and weak scaling)"
EVENTS = ("SNESJacobianEval", "PCSetUp", "KSPSolve", "SNESFunctionEval", "VecScatterBegin")
ROOT = Path(__file__).resolve().parent.parent


# -- one configuration, inside mpiexec ------------------------------------------------------------
def _worker(shape, repeats, out, independent=False):
    import torch
    from bridges.petsc import PETSc
    PETSc.Log.begin()
    from bridges.problems import diffusion
    from bridges.petsc import Grid, solve, sum_gradients
    torch.set_num_threads(1)  # one thread per rank: the ranks take the cores
    world = PETSc.COMM_WORLD
    comm = PETSc.COMM_SELF if independent else world  # independent: every rank solves it all
    mpi = world.tompi4py()

    def timed(fn):
        mpi.Barrier()
        start = time.perf_counter()
        value = fn()
        elapsed = time.perf_counter() - start
        return value, mpi.allreduce(elapsed, op=_max())

    ny, nx = shape
    grid, setup_s = timed(lambda: Grid((ny, nx), comm=comm))
    kappa = torch.ones(ny + 2, nx + 2, dtype=torch.float64, requires_grad=True)
    source = torch.ones(ny, nx, dtype=torch.float64, requires_grad=True)
    weights = torch.linspace(0, 1, ny * nx, dtype=torch.float64).view(ny, nx)[grid.owned]
    residual = diffusion.grid_residual(grid)
    rows = []
    for k in range(repeats + 1):  # the first includes the one-off assembly set-up
        before = {e: PETSc.Log.Event(e).getPerfInfo() for e in EVENTS}
        stats = {}
        options = {**diffusion.SOLVER, **diffusion.PRECONDITIONERS["mg"]}
        T, forward_s = timed(lambda: solve(residual, grid.zeros(), kappa, source, grid=grid,
                                           linear=True, symmetric=True, stats=stats,
                                           options=options))
        loss = (weights * T).sum()
        _, backward_s = timed(lambda: (loss.backward(), sum_gradients([kappa, source], comm)))
        after = {e: PETSc.Log.Event(e).getPerfInfo() for e in EVENTS}
        events = {e: {key: after[e][key] - before[e][key] for key in ("time", "count",
                                                                        "messageLength")}
                  for e in EVENTS}
        rows.append({"forward_s": forward_s, "backward_s": backward_s,
                     "cg": stats["ksp_iterations"], "adjoint_cg": stats["adjoint_ksp_iterations"],
                     "residual": stats["residual_norm"], "events": events,
                     "loss": grid.comm.tompi4py().allreduce(float(loss.detach())),
                     "gradient_norm": float(torch.cat([kappa.grad.reshape(-1),
                                                        source.grad.reshape(-1)]).norm())})
        kappa.grad = source.grad = None
    # halo of one exchange: the ghost points (star stencil: not the corners) other ranks own
    ghost = ~torch.zeros(grid.ghosted_shape, dtype=torch.bool).index_put_(
        (torch.arange(1, grid.ghosted_shape[0] - 1)[:, None],
         torch.arange(1, grid.ghosted_shape[1] - 1)[None, :]), torch.tensor(True))
    rows_ghost = torch.zeros(grid.ghosted_shape, dtype=torch.bool)
    rows_ghost[[0, -1], :] = True
    cols_ghost = torch.zeros(grid.ghosted_shape, dtype=torch.bool)
    cols_ghost[:, [0, -1]] = True
    halo = int((ghost & (rows_ghost ^ cols_ghost) & ~grid.exterior()).sum())
    per_rank = mpi.gather({"owned": list(grid.owned_shape), "halo_points": halo,
                           "events": [r.pop("events") for r in rows]})
    if world.getRank() == 0:
        Path(out).write_text(json.dumps({
            "ranks": world.getSize(), "independent": independent, "shape": [ny, nx],
            "setup_s": setup_s,
            "runs": rows, "per_rank": per_rank}))


def _max():
    from mpi4py import MPI
    return MPI.MAX


# -- the benchmark --------------------------------------------------------------------------------
def _launch(ranks, shape, repeats, independent=False, timeout=1800):
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        raise RuntimeError("mpiexec is not on PATH (install MPICH: bash .ci/setup)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        path = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
        command = [mpiexec, "-n", str(ranks), sys.executable, "-m", "benchmarks.bench_mpi",
                   "--worker", "--shape", *map(str, shape), "--repeats", str(repeats),
                   "--out", str(out)] + (["--independent"] if independent else [])
        run = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": path},
                             capture_output=True, text=True, timeout=timeout)
        if run.returncode != 0:
            raise RuntimeError(f"mpiexec -n {ranks} failed:\n{run.stderr[-2000:]}")
        return json.loads(out.read_text())


def _best(result):
    """Index of the fastest repeat after the first (which sets up the assembly)."""
    runs = result["runs"]
    candidates = range(1, len(runs)) if len(runs) > 1 else range(1)
    return min(candidates, key=lambda k: runs[k]["forward_s"] + runs[k]["backward_s"])


def _best_run(result):
    return result["runs"][_best(result)]


def run(quick=False, plot_dir=None):
    side = 129 if quick else 1025
    weak_side = 65 if quick else 513
    repeats = 1 if quick else 2
    strong = {p: _launch(p, (side, side), repeats) for p in (1, 2, 4)}
    # the machine's own ceiling: two independent one-rank solves at once, no communication
    copies = _best_run(_launch(2, (side, side), repeats, independent=True))
    weak_shapes = {1: (weak_side, weak_side), 2: (2 * weak_side - 1, weak_side),
                   4: (2 * weak_side - 1, 2 * weak_side - 1)}
    weak = {p: _launch(p, shape, repeats) for p, shape in weak_shapes.items()}
    one = _best_run(strong[1])
    t1 = one["forward_s"] + one["backward_s"]
    table, notes = [], []
    for label, results in (("strong", strong), ("weak", weak)):
        base = _best_run(results[1])
        base_total = base["forward_s"] + base["backward_s"]
        for p, result in results.items():
            best = _best_run(result)
            k = _best(result)
            total = best["forward_s"] + best["backward_s"]
            efficiency = base_total / (p * total) if label == "strong" else base_total / total
            halo = max(r["halo_points"] for r in result["per_rank"])
            sent = max(r["events"][k]["KSPSolve"]["messageLength"] for r in result["per_rank"])
            shape = result["shape"]
            table.append([label, p, f"{shape[0]}x{shape[1]} ({shape[0] * shape[1]:,})",
                          fmt_time(result["setup_s"]), fmt_time(best["forward_s"]),
                          fmt_time(best["backward_s"]), f"{best['cg']} + {best['adjoint_cg']}",
                          f"{efficiency:.0%}", f"{halo * 8 / 1024:.1f} KiB",
                          f"{sent / max(best['cg'], 1) / 1024:.0f} KiB"])
    header = ["scaling", "ranks", "grid (unknowns)", "Grid set-up", "forward solve",
              "backward", "CG its (fwd + adj)", "parallel efficiency", "halo per exchange",
              "sent per CG iteration"]
    # per-rank breakdown of the largest strong-scaling run
    breakdown = []
    for p, result in strong.items():
        best, k = _best_run(result), _best(result)
        for rank, r in enumerate(result["per_rank"]):
            ev = r["events"][k]
            accounted = ev["SNESJacobianEval"]["time"] + ev["PCSetUp"]["time"] + \
                ev["KSPSolve"]["time"]
            breakdown.append([p, rank, "x".join(map(str, r["owned"])),
                              fmt_time(ev["SNESJacobianEval"]["time"]),
                              fmt_time(ev["PCSetUp"]["time"]),
                              f"{fmt_time(ev['KSPSolve']['time'])} ({ev['KSPSolve']['count']})",
                              fmt_time(max(best["forward_s"] + best["backward_s"] - accounted,
                                           0.0)),
                              f"{ev['VecScatterBegin']['messageLength'] / 2 ** 20:.1f} MiB"])
    breakdown_header = ["ranks", "rank", "owned block", "Jacobian (torch colours + COO)",
                        "PC set-up (MG, Galerkin)", "KSP solves (count)",
                        "rest (Python, autograd, residuals)", "bytes sent (all scatters)"]
    cores = os.cpu_count()
    two, four = _best_run(strong[2]), _best_run(strong[4])
    notes.append(f"- Strong scaling, {side}x{side} unknowns, forward + gradient: 1 rank "
                 f"{fmt_time(t1)}, 2 ranks {fmt_time(two['forward_s'] + two['backward_s'])}, "
                 f"4 ranks {fmt_time(four['forward_s'] + four['backward_s'])}. This machine has "
                 f"{cores} cores shared with other jobs: 4 ranks are oversubscribed (MPICH "
                 f"busy-polls while waiting), so 4-rank efficiency is bounded by "
                 f"{cores / 4:.0%} here and is not a measure of the code.")
    t_copies = copies["forward_s"] + copies["backward_s"]
    ceiling = t1 / t_copies
    notes.append(f"- The machine's ceiling, measured in the same run: two independent one-rank "
                 f"solves + gradients of the same {side}x{side} problem, started together (no "
                 f"communication at all), took {fmt_time(t_copies)} each against "
                 f"{fmt_time(t1)} for one alone, so no 2-rank run could reach more than "
                 f"{ceiling:.0%} parallel efficiency on this machine at this moment (other "
                 f"jobs share the cores). Against that ceiling the 2-rank run reaches "
                 f"{t1 / (2 * (two['forward_s'] + two['backward_s'])) / ceiling:.0%}.")
    notes.append("- Parallel efficiency: strong T1 / (P TP); weak T1 / TP with the block per "
                 "rank fixed. 'halo per exchange': the ghost points one rank receives in one "
                 "halo exchange of the DMDA (star stencil, width 1) times 8 bytes; 'sent per CG "
                 "iteration': PETSc's log of the bytes the busiest rank sends during the forward "
                 "KSPSolve, divided by its CG iterations (all multigrid levels).")
    notes.append("- Timings are the slowest rank's, after a barrier, best of "
                 f"{repeats} repeats after a first one that sets up the assembly (colouring, "
                 "COO preallocation); 'Grid set-up' is the DMDA with its colouring.")
    notes.append("")
    notes.append("Per-rank cost breakdown (strong scaling, best repeat, PETSc log events; "
                 "'rest' = forward + backward minus the three events):")
    notes.append("")
    notes.append(markdown_table(breakdown_header, breakdown))
    notes += ["", _projection(strong, side)]
    return {"title": TITLE, "table": markdown_table(header, table), "notes": "\n".join(notes),
            "plots": [], "strong": strong, "weak": weak}


def _levels(side, procs):
    """DMDA multigrid levels of a side x side grid on procs x procs ranks (as mg_levels)."""
    levels = 1
    while (side - 1) % 2 == 0 and (side - 1) // 2 + 1 >= max(3, procs):
        side, levels = (side - 1) // 2 + 1, levels + 1
    return levels, side


def _projection(strong, side):
    """What would limit scaling to hundreds of ranks, from the per-rank costs measured here."""
    def costs(p):
        result = strong[p]
        k = _best(result)
        run = result["runs"][k]
        ev = result["per_rank"][0]["events"][k]
        total = run["forward_s"] + run["backward_s"]
        jac, setup, ksp = (ev[e]["time"] for e in ("SNESJacobianEval", "PCSetUp", "KSPSolve"))
        return {"total": total, "jac": jac, "rest": max(total - jac - setup - ksp, 0.0),
                "scatters": ev["VecScatterBegin"]["count"], "cg": run["cg"] + run["adjoint_cg"]}
    one, two = costs(1), costs(2)
    fixed_jac = max(2 * two["jac"] - one["jac"], 0.0)  # a n + b at n = N and N / 2
    fixed = fixed_jac + one["rest"]
    unknowns = side * side
    levels_1, coarse_1 = _levels(side, 1)
    levels_256, coarse_256 = _levels(side, 16)
    block = side // 16
    return (
        "**Projection to hundreds of ranks** (from the per-rank costs above; the 4-rank row is "
        "oversubscription, not scaling). "
        f"(1) *Python per-rank overhead.* Each solve + gradient carries a cost that does not "
        f"shrink with the block: the 'rest' column (Python, torch dispatch, autograd through "
        f"the residual, PETSc object set-up) is {fmt_time(one['rest'])} on one rank and "
        f"{fmt_time(two['rest'])} per rank on two, and the Jacobian's fixed part, fitted as "
        f"a n + b from the 1- and 2-rank assembly times, is b ~ "
        f"{fmt_time(fixed_jac) if fixed_jac > 1e-3 else '0 (within the noise)'}. With "
        f"about {fmt_time(fixed)} per solve that no rank count removes, this {unknowns:,}-unknown "
        f"problem ({fmt_time(one['total'])} on one rank) stops gaining beyond about "
        f"{max(one['total'] / max(fixed, 1e-9), 1):.0f} ranks; hundreds of ranks pay off only "
        f"with >= 10^5-10^6 unknowns per rank (weak scaling), where that overhead stays under "
        f"~10%. "
        f"(2) *Halo volume* is not the limit: a rank of a 16 x 16 process grid on "
        f"{side}^2 unknowns owns a {block}^2 block and sends 4 x {block} x 8 B = "
        f"{4 * block * 8 / 1024:.1f} KiB per exchange (surface/volume {4 / block:.1%}), but the "
        f"2-rank solve + gradient made {two['scatters']} scatters per rank for its "
        f"{two['cg']} CG iterations (~{two['scatters'] / max(two['cg'], 1):.0f} each: every "
        f"multigrid level's smoothing and residuals, plus assembly and set-up), so at ~5-10 "
        f"µs of network latency each, latency (and CG's two global reductions per "
        f"iteration, log P deep) bounds an iteration at tens of µs to a few ms, against "
        f"~{fmt_time(one['total'] / max(one['cg'], 1) / 256)} of work per iteration per rank "
        f"at 256 ranks. "
        f"(3) *Coarse grid.* The DMDA hierarchy coarsens only while every rank keeps a point: "
        f"{levels_1} levels down to {coarse_1}^2 on one rank, {levels_256} levels down to "
        f"{coarse_256}^2 on 16 x 16 ranks; the coarse problem stays small, but it is solved on all "
        f"ranks at once (a few latency-bound messages per V-cycle). Beyond ~10^3 ranks, "
        f"telescoping the coarse levels onto fewer ranks (pc_mg with -mg_coarse_pc_type "
        f"telescope, or GAMG's repartitioning) would be needed.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help="run one configuration (inside "
                                                              "mpiexec)")
    parser.add_argument("--shape", type=int, nargs=2, default=(1025, 1025))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench_mpi.json")
    parser.add_argument("--independent", action="store_true",
                        help="with --worker: every rank solves the whole problem on its own")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(tuple(args.shape), args.repeats, args.out, args.independent)
    else:
        result = run(quick=args.quick)
        print(result["table"])
        print(result["notes"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
