"""Test-session settings.

BRIDGES_REQUIRE_JULIA=1 (set by the Julia CI workflow and julia/verify.sh) turns every skip for a
missing Julia or DPFEHM into a failure, so that a machine meant to run the real-Julia tests cannot
pass them by skipping.
"""
import gc
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REQUIRED = ("Julia is not available", "DPFEHM is not available")


def _fail_if_required(report):
    if report.skipped and os.environ.get("BRIDGES_REQUIRE_JULIA") == "1":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if any(marker in reason for marker in REQUIRED):
            report.outcome = "failed"
            report.longrepr = f"BRIDGES_REQUIRE_JULIA=1, but this test was skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_if_required(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_if_required(outcome.get_result())  # a module-level skip (tests/test_julia.py)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch with one intra-op thread, as the demos run: a second thread slows small ops down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def run_under_mpiexec(tmp_path_factory):
    """run_under_mpiexec(script, ranks) runs tests/<script> under `mpiexec -n ranks` with an
    output path as its argument and returns the arrays it saved (a dict); skips without mpiexec."""
    mpiexec = shutil.which("mpiexec")

    def run(script, ranks):
        if mpiexec is None:
            pytest.skip("mpiexec is not on PATH: install MPICH (bash .ci/setup does) to run the "
                        "distributed tests")
        out = tmp_path_factory.mktemp("mpi") / f"ranks{ranks}.npz"
        done = subprocess.run([mpiexec, "-n", str(ranks), sys.executable,
                               str(Path(__file__).resolve().parent / script), str(out)],
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"mpiexec -n {ranks} failed:\n{done.stdout}\n{done.stderr}"
        return dict(np.load(out))
    return run


def _resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.fixture
def memory_growth():
    """memory_growth(call, calls, warm_up=200): resident memory gained (bytes) over `calls`
    calls of call(i), after `warm_up` calls to settle the allocator and caches."""
    def measure(call, calls, warm_up=200):
        for i in range(warm_up):
            call(i)
        gc.collect()
        before = _resident_bytes()
        for i in range(calls):
            call(i)
        gc.collect()
        return _resident_bytes() - before
    return measure
