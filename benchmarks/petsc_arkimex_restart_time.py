"""PETSc 3.26.1: ARKIMEX evaluates the IFunction and IJacobian at a stale time when a step restarts.

A fully implicit ARKIMEX solve of y' = -y on [-3, -1] (plain petsc4py, no bridges code). At a
step restart TSStep_ARKIMEX solves F(t, y_n, ydot) = 0 for the first stage's slope at
ark->stage_time, which it has not set: 0 on the first step, afterwards the last stage time of
the step before. This prints the times PETSc passed to the callbacks, and exits 1 when any lies
outside [-3, -1], i.e. while the defect is present.
"""
import sys

import petsc4py
petsc4py.init([])
from petsc4py import PETSc  # noqa: E402

seen = []


def ifunction(ts, t, u, udot, f):
    seen.append(("IFunction", t))
    f.setArray(udot.getArray(readonly=True) + u.getArray(readonly=True))


def ijacobian(ts, t, u, udot, shift, a, p):
    seen.append(("IJacobian", t))
    p.setValue(0, 0, shift + 1.0)
    p.assemble()


u = PETSc.Vec().createSeq(1)
u.set(1.0)
jac = PETSc.Mat().createDense([1, 1])
jac.setUp()
ts = PETSc.TS().create()
ts.setType("arkimex")
ts.setIFunction(ifunction, u.duplicate())
ts.setIJacobian(ijacobian, jac)
ts.setTime(-3.0)
ts.setMaxTime(-1.5)  # (not -1: TSSetMaxTime reads -1 as PETSC_DETERMINE)
ts.setTimeStep(0.1)
ts.setExactFinalTime(PETSc.TS.ExactFinalTime.MATCHSTEP)
ts.setFromOptions()
ts.setARKIMEXFullyImplicit(True)
ts.solve(u)
outside = [(name, t) for name, t in seen if not -3.0 <= t <= -1.5]
print(f"{len(seen)} callbacks; outside [-3, -1.5]: {outside[:4]}")
sys.exit(1 if outside else 0)
