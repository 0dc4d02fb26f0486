"""Reproducer, plain petsc4py: PETSc's evaluation times store solutions far from the times asked
for once steps grow large.

    python benchmarks/petsc_evaluation_times.py      # exits 1 and prints the defect where present

It integrates y' = 1, y(0) = 0 (so y(t) = t exactly, for every Runge-Kutta method at every step
size) with adaptive steps and TSSetEvaluationTimes, and compares each stored solution with its
evaluation time. The error estimate is zero, so the steps grow tenfold each time; once they pass
about 1e4 the stored solutions come from steps that end far from the evaluation times.

Cause (PETSc 3.26.1): the closeness tolerance worktol = reltol * h + abstol is an absolute
distance in time, but it is passed as the *relative* tolerance of PetscIsCloseAtTol(a, b, rtol,
atol), which accepts |a - b| <= rtol * max(|a|, |b|). With h ~ 1e6, worktol ~ 1 accepts any step
end within 100 % of the evaluation time. Sites: src/ts/interface/ts.c lines 4162, 4167 and 4296,
src/ts/adapt/interface/tsadapt.c line 1011, src/ts/event/tsevent.c line 616. The fix is to pass
it as the absolute tolerance: PetscIsCloseAtTol(t, t_k, 0, worktol). See
benchmarks/petsc_evaluation_times.md for the report.
"""
import sys

import petsc4py

petsc4py.init([])
from petsc4py import PETSc  # noqa: E402

TIMES = [0.0, 1.0, 1e2, 1e4, 1e6, 1e8]


def stored_solutions():
    """(evaluation time, time of the stored solution, stored y) for each evaluation time."""
    ts = PETSc.TS().create(comm=PETSc.COMM_SELF)
    ts.setType(PETSc.TS.Type.RK)
    ts.setRKType("5dp")
    rhs = PETSc.Vec().createSeq(1)
    ts.setRHSFunction(lambda ts, t, u, f: f.set(1.0), rhs)
    ts.setTimeStep(1e-3)
    ts.setMaxTime(TIMES[-1])
    ts.setMaxSteps(10_000)
    ts.setExactFinalTime(PETSc.TS.ExactFinalTime.MATCHSTEP)
    ts.setEvaluationTimes(TIMES)
    PETSc.Options()["ts_adapt_type"] = "basic"
    ts.setFromOptions()
    del PETSc.Options()["ts_adapt_type"]
    u = PETSc.Vec().createSeq(1)
    u.set(0.0)
    ts.solve(u)
    times, solutions = ts.getEvaluationSolutions()
    rows = [(t_k, t_s, float(v.getArray()[0])) for t_k, t_s, v in zip(TIMES, times, solutions)]
    for obj in (ts, rhs, u):
        obj.destroy()
    return rows


def main() -> int:
    rows = stored_solutions()
    print(f"PETSc {'.'.join(map(str, PETSc.Sys.getVersion()))}: y' = 1, so y(t_k) must be t_k")
    print(f"{'evaluation time':>16} {'stored at t':>14} {'stored y':>14}")
    wrong = 0
    for t_k, t_s, y in rows:
        bad = abs(y - t_k) > 1e-8 * max(1.0, t_k)
        wrong += bad
        print(f"{t_k:16.6g} {t_s:14.6g} {y:14.6g}{'   <- wrong' if bad else ''}")
    if len(rows) < len(TIMES):
        print(f"only {len(rows)} of {len(TIMES)} evaluation times were stored")
        wrong += 1
    if wrong:
        print("DEFECT: TSSetEvaluationTimes stored solutions away from the requested times "
              "(worktol passed as a relative tolerance)")
        return 1
    print("no defect: every stored solution is at its evaluation time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
