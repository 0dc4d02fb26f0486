"""Side-by-side timing: variants are interleaved in every round, so machine noise hits all alike."""
from __future__ import annotations

import cProfile
import contextlib
import gc
import pstats
import statistics
import time

import torch


@contextlib.contextmanager
def one_torch_thread():
    """torch on one intra-op thread inside the block: on 2 shared cores, waking a second thread
    for every small tensor op slowed bridges' callbacks several-fold in our runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def compare(variants: dict, *, rounds: int = 7, min_time: float = 0.02) -> dict:
    """Median seconds per call of each variant (a dict name -> zero-argument callable).

    Each round times every variant once, in turn; a variant's batch size is calibrated first so
    one batch lasts at least `min_time` seconds.
    """
    batch = {}
    for name, fn in variants.items():
        fn()  # warm up
        n, t = 1, 0.0
        while True:
            t = _time(fn, n)
            if t >= min_time or n >= 1 << 20:
                break
            n *= 4 if t < min_time / 8 else 2
        batch[name] = n
    samples = {name: [] for name in variants}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, fn in variants.items():
                samples[name].append(_time(fn, batch[name]) / batch[name])
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: statistics.median(s) for name, s in samples.items()}


def _time(fn, n):
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - start


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def profiled(fn):
    """(seconds, pstats' table {(file, line, function): (calls, ..., cumulative seconds, ...)})
    of one call of fn under cProfile."""
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    fn()
    profile.disable()
    return time.perf_counter() - start, pstats.Stats(profile).stats
