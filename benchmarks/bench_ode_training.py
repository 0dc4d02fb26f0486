"""The neural-ODE training iteration of seed 000 (bridges.problems.rober_training: a bias-free
3->5->3 GELU network on ROBER's Radau data, its initialisation and AdamW), bridges/PETSc against
diffrax over the same iterations, trained in interleaved chunks, and the loss ratio each reaches;
torchdiffeq (dopri5) trains under a time budget and fails on this stiff problem.
"""
from __future__ import annotations

import math
import time

import torch

from bridges.problems import rober_training

from . import _diffrax
from ._ode import TORCH_THREADS_NOTE, Bounded, first_line, one_thread, reusable, solver
from ._timing import fmt_time, markdown_table

TITLE = "Neural-ODE training iteration (seed 000): bridges/PETSc vs diffrax and torchdiffeq"
LR, RTOL, ATOL = 5e-3, 1e-6, 1e-8


class TorchTrainer:
    """AdamW steps of the neural ODE through a torch solve(func, z0, times)."""

    def __init__(self, solve, bounded=None):
        data = rober_training()
        self.times, self.target = torch.from_numpy(data.t), torch.from_numpy(data.target)
        self.model = data.model(seed=0)
        self.func = self.model if bounded is None else Bounded(self.model, **bounded)
        self.solve, self.bounded = solve, bounded is not None
        self.optimiser = torch.optim.AdamW(self.model.parameters(), lr=LR)
        self.history = []

    def loss(self):
        return torch.mean(torch.abs(self.solve(self.func, self.target[0], self.times)
                                    - self.target))

    def step(self):
        self.optimiser.zero_grad()
        if self.bounded:
            self.func.new_call("forward solve")
        loss = self.loss()
        if self.bounded:
            self.func.phase = "backward pass"
        loss.backward()
        self.optimiser.step()
        self.history.append(loss.item())

    def warm_up(self):
        """One loss + gradient without an update (what compiles, compiles); its wall time."""
        start = time.perf_counter()
        self.loss().backward()
        self.optimiser.zero_grad()
        return time.perf_counter() - start

    def final_loss(self):
        if self.bounded:
            self.func.new_call("final forward solve")
        with torch.no_grad():
            return self.loss().item()


class DiffraxTrainer:
    """The same AdamW steps with diffrax: one jit-compiled function per step (loss, reverse-mode
    gradient, update)."""

    def __init__(self, method):
        jax, jnp, _ = _diffrax.load()
        data = rober_training()
        target = jnp.asarray(data.target)
        model = data.model(seed=0)  # the very same initial weights
        self.params = tuple(jnp.asarray(layer.weight.detach().numpy()) for layer in model.net[::2])
        rate = jnp.asarray(data.rate)
        init, update = _diffrax.adamw(LR)
        self.state = init(self.params)

        def loss(params):
            ys, _ = _diffrax.solve(_diffrax.neural, method, jnp.asarray(data.t), target[0],
                                   (params, rate), RTOL, ATOL)
            return jnp.mean(jnp.abs(ys - target))

        def step(params, state):
            value, grads = jax.value_and_grad(loss)(params)
            params, state = update(params, grads, state)
            return value, params, state
        self.jax = jax
        self._step, self.compile_s = _diffrax.compile_timed(step, self.params, self.state)
        self._loss, seconds = _diffrax.compile_timed(loss, self.params)
        self.compile_s += seconds
        self.history = []

    def step(self):
        value, self.params, self.state = self._step(self.params, self.state)
        self.history.append(float(self.jax.block_until_ready(value)))

    def final_loss(self):
        return float(self._loss(self.params))


def bridges_trainer(options=None, **kwargs):
    """A TorchTrainer through bridges' solver (one ODESolver reused where bridges has it) with
    the training's PETSc options."""
    trainer = TorchTrainer(solver(options={**rober_training().options, **(options or {})},
                                  **kwargs))
    if kwargs.get("compile_jacobian"):  # compiled before the iterations, as diffrax's step
        trainer.compile_s = trainer.warm_up()
    return trainer


def torchdiffeq_trainer(adjoint, seconds):
    import torchdiffeq

    def solve(func, z0, times):
        kwargs = dict(method="dopri5", rtol=RTOL, atol=ATOL)
        if adjoint:
            return torchdiffeq.odeint_adjoint(func, z0, times,
                                              adjoint_params=tuple(func.parameters()), **kwargs)
        return torchdiffeq.odeint(func, z0, times, **kwargs)
    return TorchTrainer(solve, bounded=dict(seconds=seconds, max_evaluations=200_000))


def training(quick, budget, torchdiffeq_budget):
    """Rows of the table. A variant stops once it has used `budget` seconds (its time per
    iteration still counts); torchdiffeq runs after the others, bounded by torchdiffeq_budget."""
    iterations, chunk = (6, 2) if quick else (40, 5)
    trainers = {"bridges cn, 2 steps/interval (the demo)": bridges_trainer(
        method="cn", steps_per_interval=2)}
    if not quick:
        trainers["bridges cn, 2 steps/interval, compile_jacobian"] = bridges_trainer(
            method="cn", steps_per_interval=2, compile_jacobian=True)
        trainers[f"bridges default, rtol {RTOL:g}"] = bridges_trainer(rtol=RTOL, atol=ATOL)
        trainers[f"bridges default, rtol {RTOL:g}, compile_jacobian"] = bridges_trainer(
            rtol=RTOL, atol=ATOL, compile_jacobian=True)
        trainers[f"bridges arkimex 4, rtol {RTOL:g}"] = bridges_trainer(
            method="arkimex", rtol=RTOL, atol=ATOL, options={"ts_arkimex_type": "4"})
    for method in ("Kvaerno3",) if quick else ("Kvaerno3", "Kvaerno5"):
        print(f"[bench_ode_training] compiling diffrax {method}", flush=True)
        trainers[f"diffrax {method}, rtol {RTOL:g}"] = DiffraxTrainer(method)
    seconds = {v: 0.0 for v in trainers}
    failures, stopped = {}, set()
    for done in range(0, iterations, chunk):  # interleaved chunks: noise hits every variant
        print(f"[bench_ode_training] iterations {done + 1}-{done + chunk}", flush=True)
        for v, trainer in trainers.items():
            if v in failures or v in stopped:
                continue
            if seconds[v] > budget:
                stopped.add(v)
                continue
            start = time.perf_counter()
            try:
                for _ in range(chunk):
                    trainer.step()
            except Exception as exc:  # reported in the table
                failures[v] = f"{type(exc).__name__}: {first_line(exc)}"
            seconds[v] += time.perf_counter() - start
    for adjoint in (True, False):  # bounded: they cannot finish one iteration
        label = f"torchdiffeq dopri5 {'odeint_adjoint' if adjoint else 'odeint (backprop)'}"
        try:
            trainer = trainers[label] = torchdiffeq_trainer(adjoint, torchdiffeq_budget)
        except ImportError:
            failures[label] = "torchdiffeq is not installed (pip install torchdiffeq)"
            trainers[label], seconds[label] = None, 0.0
            continue
        trainer.func.start()
        start = time.perf_counter()
        try:
            for _ in range(iterations):
                trainer.step()
        except Exception as exc:  # reported in the table
            failures[label] = trainer.func.why or f"{type(exc).__name__}: {first_line(exc)}"
        seconds[label] = time.perf_counter() - start

    results = {}
    for v, trainer in trainers.items():
        done = len(trainer.history) if trainer is not None else 0
        r = results[v] = {"done": done, "seconds": seconds[v], "failure": failures.get(v),
                          "compile": getattr(trainer, "compile_s", None)}
        if done and v not in failures:
            r.update(initial=trainer.history[0], final=trainer.final_loss())
            r["ratio"] = r["initial"] / r["final"]
    diffrax_best = min((r["seconds"] / r["done"] for v, r in results.items()
                        if v.startswith("diffrax") and r["done"] and not r["failure"]),
                       default=math.nan)
    rows = []
    for v, r in results.items():
        if r["failure"]:
            rows.append([v, f"{r['done']} of {iterations}", f"failed: {r['failure']}", "", "", "",
                         ""])
            continue
        per = r["seconds"] / r["done"]
        done = f"{r['done']}" if v not in stopped else \
            f"{r['done']} of {iterations} (stopped after {budget:g} s)"
        rows.append([v, done, fmt_time(per), f"{r['initial']:.4g} -> {r['final']:.4g}",
                     f"{r['ratio']:.2f}", fmt_time(r["compile"]) if r["compile"] else "",
                     f"{per / diffrax_best:.2f}x" if v.startswith("bridges") else ""])
    return rows, iterations, chunk, results, stopped


@one_thread
def run(quick=False, plot_dir=None):
    rows, iterations, chunk, results, stopped = training(quick, 30.0 if quick else 100.0,
                                                         5.0 if quick else 25.0)
    ratios = ", ".join(f"{v} {r['ratio']:.2f}" for v, r in results.items()
                       if r.get("ratio") and v not in stopped)
    solver_note = ("one bridges.petsc.ODESolver per variant, made once and reused across "
                   "iterations" if reusable() else "odeint_adjoint in every iteration")
    notes = "\n".join([
        f"Seed 000, {iterations} iterations, interleaved in chunks of {chunk}.", "",
        markdown_table(["method", "iterations", "time / iteration", "loss (first -> final)",
                        "loss ratio", "compile (once)", "bridges / fastest diffrax"], rows), "",
        f"Every variant starts from the same initial weights and runs the same {iterations} "
        f"AdamW steps (lr {LR:g}) on the same data (40 log-spaced times in [1e-5, 100], scaled "
        f"variables); adaptive methods use rtol {RTOL:g}, atol {ATOL:g}. bridges: {solver_note}, "
        f"with the training's PETSc options (snes_max_it 200, unlimited Newton failures per "
        f"step). diffrax runs one jit-compiled step (loss, reverse-mode gradient, AdamW update); "
        f"its compile time is listed apart and not in the time per iteration. Loss ratios "
        f"(first / final) after {iterations} iterations: {ratios}. torchdiffeq runs after the "
        f"others under its own time budget. 'bridges / fastest diffrax': time per iteration over "
        f"the fastest diffrax variant's. {TORCH_THREADS_NOTE}"])
    return {"title": TITLE, "table": "", "notes": notes, "plots": []}
