"""The error of one adjoint sensitivity matrix dy(T)/dtheta against scipy's forward sensitivities,
for one configuration of a registry problem (the rtol and method sweeps of issue 17):

    python -m benchmarks.sensitivity_sweep vdpol 2 1e-8 arkimex "{'checkpoints': 100000}"

Arguments: problem, T, rtol, method, and a dict of further ODESolver keywords (atol among them;
default 1e-20 for ROBER, else the problem's atol / 100). Prints the steps, each row's scaled
error max_j |(g_ij - ref_ij) theta_j| / max_j |ref_ij theta_j| and y(T)'s relative error."""
import ast
import sys
import time

import numpy as np
import torch

from bridges.petsc import ODESolver
from bridges.problems import problem


def main(argv):
    torch.set_num_threads(1)
    name, T, rtol, method = argv[1], float(argv[2]), float(argv[3]), argv[4]
    kw = ast.literal_eval(argv[5]) if len(argv) > 5 else {}
    p = problem(name)
    t = np.array([0.0, T])
    names = [n for n, _ in p.func().named_parameters()]
    ref = np.concatenate([p.sensitivities(t)[1][n][-1].reshape(p.y0.size, -1) for n in names], 1)
    theta = np.concatenate([p.params[n].ravel() for n in names])
    func, y0, _ = p.tensors()
    atol = kw.pop("atol", 1e-20 if name == "rober" else p.atol * 1e-2)
    solver = ODESolver(method, rtol=rtol, atol=atol, **kw)
    t0 = time.time()
    ys = solver(func, y0, torch.from_numpy(t))
    steps = solver.stats.steps
    params = tuple(func.parameters())
    rows = torch.eye(ys.shape[-1], dtype=torch.float64)
    gs = torch.func.vmap(lambda v: torch.autograd.grad(ys[-1], params, v, retain_graph=True))(rows)
    g = torch.cat([x.reshape(len(rows), -1) for x in gs], 1).numpy()
    e = np.abs((g - ref) * theta).max(axis=1) / np.abs(ref * theta).max(axis=1)
    yerr = np.abs(ys[-1].detach().numpy() - p.reference(t)[-1]) / np.abs(p.reference(t)[-1])
    print(f"{name} T={T:g} {method} rtol={rtol:g} {kw}: steps {steps}, rows "
          f"{np.array2string(e, precision=2)} max {e.max():.2e}; y rel err {yerr.max():.1e} "
          f"({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv)
