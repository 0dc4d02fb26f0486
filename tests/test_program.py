"""ExternalProgram: a separate executable run through input and output files."""
import os
import shutil
import sys
import tempfile
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from bridges import ExternalProgram, ForeignError, fd2pytorch
from bridges.programs import heat1d, ngspice, xfoil
from bridges.programs.xfoil import naca4


def _python_program(tmp_path, body):
    """A tiny stand-alone program (a Python script run as its own process)."""
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(body))
    return [sys.executable, str(script), "{input}", "{output}"]


def _write(path, x):
    np.savetxt(path, x)


def test_gradcheck_through_the_simulator_subprocess():
    simulate = fd2pytorch(heat1d(("conductivity", "convection"), cells=60, steps=120, outputs=4),
                          scheme="central", workers=2, name="heat1d")
    params = torch.tensor([1.3, 0.4], dtype=torch.float64, requires_grad=True)
    assert gradcheck(simulate, (params,), atol=1e-6, rtol=1e-5)
    assert simulate.evaluations > 0


def test_python_script_as_program(tmp_path):
    command = _python_program(tmp_path, """
        import sys, numpy as np
        x = np.loadtxt(sys.argv[1], ndmin=1)
        np.savetxt(sys.argv[2], [x.sum(), (x ** 2).sum()])
    """)
    run = ExternalProgram(command, write_input=_write, read_output=np.loadtxt)
    np.testing.assert_allclose(run(np.array([1.0, 2.0])), [3.0, 5.0])


def test_non_zero_exit_reports_code_and_stderr(tmp_path):
    command = _python_program(tmp_path, """
        import sys
        sys.stderr.write("mesh file corrupt\\n")
        sys.exit(3)
    """)
    run = ExternalProgram(command, write_input=_write, read_output=np.loadtxt, name="legacy")
    with pytest.raises(ForeignError, match="(?s)legacy exited with code 3.*mesh file corrupt") as info:
        run(np.ones(2))
    assert "mesh file corrupt" in info.value.foreign_traceback


def test_missing_output_file_reports_stderr(tmp_path):
    command = _python_program(tmp_path, """
        import sys
        sys.stderr.write("forgot to write\\n")
    """)
    run = ExternalProgram(command, write_input=_write, read_output=np.loadtxt, name="lazy")
    with pytest.raises(ForeignError, match="(?s)lazy exited normally but wrote no output file "
                                           "'output.txt'.*forgot to write"):
        run(np.ones(2))
    empty = ExternalProgram(_python_program(tmp_path, "open('output.txt', 'w').close()"),
                            write_input=_write, read_output=lambda p: np.loadtxt(p, ndmin=1),
                            name="silent")
    with pytest.raises(ForeignError, match="silent: its output file holds no numbers"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # (numpy's "input contained no data")
            empty(np.ones(2))


def test_heat1d_rejects_bad_physics_with_its_own_message():
    with pytest.raises(ForeignError, match="(?s)heat1d exited with code 2.*conductivity must be > 0"):
        heat1d()(np.array([-1.0, 0.5]))


def test_failure_inside_bridged_op_is_a_foreign_error():
    simulate = fd2pytorch(heat1d(), name="heat1d")
    with pytest.raises(ForeignError, match="conductivity must be > 0"):
        simulate(torch.tensor([-1.0, 0.5], dtype=torch.float64))


def test_timeout_is_reported_and_kills_what_a_wrapper_started(tmp_path):
    command = _python_program(tmp_path, "import time; time.sleep(30)")
    run = ExternalProgram(command, write_input=_write, read_output=np.loadtxt, timeout=0.5,
                          name="slow")
    with pytest.raises(ForeignError, match="slow: no result after 0.5 s"):
        run(np.ones(1))
    # a simulator behind a wrapper (sh, mpirun): killing the wrapper alone left it running
    marker = tmp_path / "child.pid"
    wrapped = ExternalProgram(["sh", "-c", f"sleep 30 & echo $! > {marker}; wait"],
                              read_output=np.loadtxt, timeout=0.5, name="wrapped")
    with pytest.raises(ForeignError, match="wrapped: no result after 0.5 s; the run was "
                                           "killed, with every process it started"):
        wrapped(np.ones(1))
    child = int(marker.read_text())
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.05)  # (the kill is delivered; the process table may lag)
    assert not os.path.exists(f"/proc/{child}") or \
        open(f"/proc/{child}/stat").read().split()[2] == "Z"  # gone, or a zombie being reaped


def test_a_run_ends_with_its_program_and_takes_what_it_left_behind():
    """A program that exits at once but leaves a background child holding its output pipes:
    the run waited for the child (a "timeout" though the result was there, or forever without
    a timeout), and left it running."""
    import subprocess
    left = ExternalProgram(["sh", "-c", "sleep 29.3 & echo 1.5 > {output}; exit 0"],
                           read_output=np.loadtxt, timeout=5, name="leaves")
    assert left(np.zeros(1)) == 1.5
    deadline = time.monotonic() + 5
    while "sleep 29.3" in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                         text=True).stdout:
        assert time.monotonic() < deadline, "the background child was left running"
        time.sleep(0.05)  # (the kill is delivered; the process table may lag)


def test_an_interrupt_stops_the_runs_of_a_worker_pool_at_once(tmp_path):
    """Ctrl-C during a Jacobian with workers=2: the pool waited for the programs under way
    (their own process groups never saw the signal), 30 s here, without limit for
    timeout=None. They are killed now (the old wait outlasts the 20 s allowed), and nothing is
    left behind."""
    import signal
    import subprocess
    script = tmp_path / "interrupted.py"
    script.write_text(textwrap.dedent(f"""
        import signal
        import numpy as np, torch
        from bridges import ExternalProgram, fd2pytorch
        # (in case this process was started with SIGINT ignored)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        program = ExternalProgram(["sh", "-c", 'if [ "{{x[0]}}" = "1.0" ]; then echo 1 > '
                                   '{{output}}; else sleep 29.7; echo 1 > {{output}}; fi'],
                                  read_output=np.loadtxt, timeout=None)
        f = fd2pytorch(program, workers=2, noise=None)
        y = f(torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True))
        print("ready", flush=True)
        y.sum().backward()
    """))
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                             stderr=subprocess.PIPE, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert child.stdout.readline().strip() == "ready"
    time.sleep(1.0)  # (the Jacobian's runs are under way)
    child.send_signal(signal.SIGINT)
    try:
        child.wait(timeout=20)
    finally:
        child.kill()
    assert "KeyboardInterrupt" in child.stderr.read()
    assert not list(tmp_path.glob("bridges-run-*"))
    assert "sleep 29.7" not in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                              text=True).stdout


def test_complex_input_is_rejected():
    with pytest.raises(TypeError, match="heat1d: an external program takes real numbers"):
        heat1d()(np.ones(2, dtype=complex))


def test_bad_construction():
    with pytest.raises(FileNotFoundError, match="'no-such-simulator' \\(command\\[0\\]\\) was not found"):
        ExternalProgram(["no-such-simulator"], write_input=_write, read_output=np.loadtxt)
    with pytest.raises(TypeError, match="command must be a non-empty list"):
        ExternalProgram("sim in out", write_input=_write, read_output=np.loadtxt)


# -- real programs: scripts on stdin, signals, retries, kept directories -------------------------
def test_stdin_script_and_arguments_from_x(tmp_path):
    command = _python_program(tmp_path, """
        import sys
        scale = float(sys.argv[3].split("=")[1])
        values = [float(line.split()[2]) for line in sys.stdin if line.startswith("SET")]
        open("result.txt", "w").write(f"{scale * sum(values)}\\n")
        open("count.txt", "w").write(f"{len(values)}\\n")
    """)[:2] + ["{input}", "{output}", "--scale={x[2]:.3f}"]
    run = ExternalProgram(command, read_output=lambda a, b: [np.loadtxt(a), np.loadtxt(b)],
                          output_name=["result.txt", "count.txt"],
                          stdin="SET a {x[0]}\nSET b {x[1]}\nGO\n")
    np.testing.assert_allclose(run(np.array([1.5, 2.0, 3.0])), [10.5, 2.0])
    scripted = ExternalProgram(command, read_output=lambda a, b: np.loadtxt(a),
                               output_name=["result.txt", "count.txt"],
                               stdin=lambda x: "".join(f"SET v {v}\n" for v in x))
    np.testing.assert_allclose(scripted(np.array([1.0, 2.0, 2.0])), [10.0])
    with pytest.raises(ValueError, match=r"cannot fill the template stdin = 'SET \{y\}'"):
        ExternalProgram(command, read_output=np.loadtxt, stdin="SET {y}")(np.ones(3))


def test_template_directory_is_copied_into_every_run(tmp_path):
    template = tmp_path / "case"
    template.mkdir()
    (template / "mesh.dat").write_text("4\n")
    command = _python_program(tmp_path, """
        import sys, numpy as np
        cells = int(open("mesh.dat").read())
        np.savetxt(sys.argv[2], np.loadtxt(sys.argv[1], ndmin=1) * cells)
    """)
    run = ExternalProgram(command, write_input=_write, read_output=np.loadtxt,
                          template_dir=template)
    np.testing.assert_allclose(run(np.array([1.0, 0.5])), [4.0, 2.0])


def test_crash_names_the_signal_and_the_last_output(tmp_path):
    command = _python_program(tmp_path, """
        import os, signal, sys
        print("iteration 41 residual 3e-2", flush=True)
        sys.stderr.write("dividing the flux by the cell volume\\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGFPE)
    """)
    run = ExternalProgram(command, write_input=_write, read_output=np.loadtxt, name="solver")
    with pytest.raises(ForeignError, match=r"(?s)solver was killed by SIGFPE \(signal 8\).*"
                                           r"stderr:\ndividing the flux.*stdout:\niteration 41"):
        run(np.ones(1))


def test_retry_succeeds_after_a_transient_failure(tmp_path):
    marker = tmp_path / "first-run-done"
    command = _python_program(tmp_path, f"""
        import os, sys, numpy as np
        if not os.path.exists({str(marker)!r}):
            open({str(marker)!r}, "w").close()
            sys.exit("licence server busy")
        np.savetxt(sys.argv[2], np.loadtxt(sys.argv[1], ndmin=1) + 1)
    """)
    strict = ExternalProgram(command, write_input=_write, read_output=np.loadtxt, name="flaky")
    with pytest.raises(ForeignError, match="(?s)flaky exited with code 1.*licence server busy"):
        strict(np.ones(1))
    marker.unlink()
    run = ExternalProgram(command, write_input=_write, read_output=np.loadtxt, retries=1)
    np.testing.assert_allclose(run(np.array([2.0])), [3.0])
    marker.unlink()
    always = _python_program(tmp_path, "import sys; sys.exit('disk full')")
    run = ExternalProgram(always, write_input=_write, read_output=np.loadtxt, retries=2)
    with pytest.raises(ForeignError, match=r"(?s)disk full.*failed on all 3 attempts"):
        run(np.ones(1))


def test_failed_run_directory_is_kept_and_named(tmp_path):
    command = _python_program(tmp_path, "import sys; sys.exit(5)")
    run = ExternalProgram(command, write_input=_write, read_output=np.loadtxt, keep_failed=True)
    with pytest.raises(ForeignError, match="working directory is kept") as info:
        run(np.array([4.0]))
    kept = str(info.value).split("working directory is kept: ")[1].splitlines()[0]
    try:
        np.testing.assert_allclose(np.loadtxt(f"{kept}/input.txt"), 4.0)
    finally:
        shutil.rmtree(kept)
    # a failure before the run (in write_input) kept a directory its error never named
    def refuse(path, x):
        raise ValueError("wrong input")
    before = set(os.listdir(tempfile.gettempdir()))
    with pytest.raises(ValueError, match="wrong input"):
        ExternalProgram(command, write_input=refuse, read_output=np.loadtxt,
                        keep_failed=True)(np.ones(1))
    assert not {d for d in set(os.listdir(tempfile.gettempdir())) - before
                if d.startswith("bridges-run-")}


def test_parse_failure_names_the_file_and_line(tmp_path):
    command = _python_program(tmp_path, """
        import sys
        open(sys.argv[2], "w").write("1.0 2.0\\n3.0 ****\\n")
    """)
    run = ExternalProgram(command, write_input=_write, read_output=np.loadtxt, name="fortran")
    with pytest.raises(ForeignError, match=r"fortran: reading its output failed: ValueError: .*"
                                           r"output.txt, line 2: '3.0 \*\*\*\*'"):
        run(np.ones(1))


# -- ngspice and xfoil, the Debian packages ------------------------------------------------------
RC_TIMES = np.array([0.25e-3, 0.5e-3, 1e-3, 2e-3])


def test_ngspice_rc_gradient_matches_the_closed_form_at_default_settings():
    """v(t) = 1 - exp(-t/RC) after a unit step; x = (R in kOhm, C in uF)."""
    circuit = ngspice("V1 in 0 PULSE(0 1 0 1n)\nR1 in out {R}k\nC1 out 0 {C}u", ["R", "C"],
                      analysis="tran 1u 2m", probes=["v(out)"], times=RC_TIMES)
    simulate = fd2pytorch(circuit, workers=2, name="rc")
    x = torch.tensor([1.5, 0.8], dtype=torch.float64, requires_grad=True)
    tau = 1.5e-3 * 0.8
    t = RC_TIMES - 0.5e-9  # the 1 ns edge delays the step by half its length
    np.testing.assert_allclose(simulate(x).detach().numpy(), 1 - np.exp(-t / tau), atol=2e-6)
    weights = torch.linspace(1, 2, 4, dtype=torch.float64)
    (simulate(x) * weights).sum().backward()
    dv_dtau = -np.exp(-t / tau) * t / tau ** 2 * weights.numpy()
    expected = np.array([dv_dtau.sum() * 0.8e-3, dv_dtau.sum() * 1.5e-3])
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-3)
    assert simulate.noise.found.any() and simulate.noise.level.max() > 1e-9  # printed digits


def test_xfoil_by_stdin_script_against_thin_airfoil_theory():
    lift = fd2pytorch(xfoil(("camber", "alpha")), workers=2, name="xfoil")
    x = torch.tensor([0.02, 3.0], dtype=torch.float64, requires_grad=True)
    cl, cm = lift(x)
    cl.backward()
    dcl_dcamber, dcl_dalpha = x.grad.tolist()
    # thin airfoil theory: dCL/dalpha = 2 pi per radian; dCL/dm = -2 pi d(alpha_L0)/dm, with
    # alpha_L0 = -(1/pi) int_0^pi dz/dx (cos theta - 1) dtheta (p = 0.4); thickness adds ~15 %
    theta = np.linspace(0, np.pi, 20001)
    xc = (1 - np.cos(theta)) / 2
    slope = np.where(xc < 0.4, 2 / 0.16 * (0.4 - xc), 2 / 0.36 * (0.4 - xc))  # per unit m
    alpha_l0 = -np.trapezoid(slope * (np.cos(theta) - 1), theta) / np.pi
    assert 1.0 < dcl_dalpha / (2 * np.pi * np.pi / 180) < 1.2
    assert 1.0 < dcl_dcamber / (-2 * np.pi * alpha_l0) < 1.25
    # and against central differences at a large step, where XFOIL's 4 printed decimals are small
    coarse = fd2pytorch(xfoil(("camber", "alpha")), rel_step=0.1, noise=None).jacobian_at(
        x.detach().numpy())
    np.testing.assert_allclose(x.grad.numpy(), coarse[0], rtol=0.03)
    assert -0.1 < cm.item() < 0


def test_simulator_set_up_mistakes_are_named():
    """A netlist placeholder without a parameter (and a parameter without one, which would get
    a zero derivative); an analysis ngspice refuses (its own message is shown); a cambered
    NACA airfoil whose maximum camber sits on the chord's end; the symmetric NACA 00xx; more
    panels than XFOIL holds."""
    for netlist, names in [("R1 in out {R}\nC1 out 0 {C}u", ["R"]),
                           ("R1 in out {R}\nC1 out 0 1u", ["R", "C"])]:
        with pytest.raises(ValueError, match=r"ngspice: the netlist's placeholders .* and "
                                             r"parameters .* must name the same values"):
            ngspice(netlist, names, analysis="tran 1u 2m", probes=["v(out)"], times=RC_TIMES)
    circuit = ngspice("V1 in 0 1\nR1 in out {R}k\nC1 out 0 1u", ["R"], analysis="tran 1u",
                      probes=["v(out)"], times=RC_TIMES)
    with pytest.raises(ForeignError, match=r"(?s)measured no value.*stderr.*TSTOP is invalid"):
        circuit(np.array([1.0]))
    with pytest.raises(ValueError, match=r"ngspice: sample times \[0.003\] lie outside the "
                                         r"analysis 'tran 1u 2m', which runs from 0 to 0.002 s"):
        # (ngspice's failure was blamed on the first, valid, sample)
        ngspice("V1 in 0 1\nR1 in out {R}k\nC1 out 0 1u", ["R"], analysis="tran 1u 2m",
                probes=["v(out)"], times=[1e-3, 3e-3])
    formatted = ngspice("V1 in 0 PULSE(0 1 0 1n)\nR1 in out {R:.17g}k\nC1 out 0 1u", ["R"],
                        analysis="tran 1u 2m", probes=["v(out)"], times=[1e-3])
    np.testing.assert_allclose(formatted(np.array([1.5])), 1 - np.exp(-1e-3 / 1.5e-3), rtol=1e-4)
    # a spec that rounds: the steps finite differences take never reached the circuit ({R:.4g}:
    # dV/dR 7.8 % off, silently); an analysis other than tran: ngspice crashed (SIGSEGV on 'ac')
    with pytest.raises(ValueError, match=r"ngspice: the placeholder \{R:.4g\} rounds the value "
                                         r"\(1.2345678912345678 prints as 1.235\)"):
        ngspice("V1 in 0 1\nR1 in out {R:.4g}k\nC1 out 0 1u", ["R"], analysis="tran 1u 2m",
                probes=["v(out)"], times=[1e-3])
    with pytest.raises(ValueError, match=r"ngspice: analysis 'ac dec 10 1 1k' is not a transient"):
        ngspice("V1 in 0 1\nR1 in out {R}k\nC1 out 0 1u", ["R"], analysis="ac dec 10 1 1k",
                probes=["v(out)"], times=[1e-3])
    with pytest.raises(ValueError, match=r"naca4: a cambered airfoil .* 0 < position < 1"):
        naca4(0.02, 0.0, 0.12)
    for thickness in (-0.12, 0.0):  # (-0.12 gave 0.12's airfoil, surfaces swapped)
        with pytest.raises(ValueError, match=r"naca4: thickness must be > 0"):
            naca4(0.02, 0.4, thickness)
    symmetric = naca4(0.0, 0.0, 0.12)
    np.testing.assert_allclose(symmetric[:, 1], -symmetric[::-1, 1], atol=1e-15)
    for panels in (500, 100.0, 2):  # above XFOIL's limit it silently used 364
        with pytest.raises(ValueError, match=r"xfoil: panels must be an integer from 8 to 364"):
            xfoil(panels=panels)
