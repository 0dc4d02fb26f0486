"""ExternalProgram: a separate executable run through input and output files."""
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from bridges import ExternalProgram, ForeignError, fd2pytorch
from bridges.programs import heat1d


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


def test_heat1d_rejects_bad_physics_with_its_own_message():
    with pytest.raises(ForeignError, match="(?s)heat1d exited with code 2.*conductivity must be > 0"):
        heat1d()(np.array([-1.0, 0.5]))


def test_failure_inside_bridged_op_is_a_foreign_error():
    simulate = fd2pytorch(heat1d(), name="heat1d")
    with pytest.raises(ForeignError, match="conductivity must be > 0"):
        simulate(torch.tensor([-1.0, 0.5], dtype=torch.float64))


def test_timeout_is_reported(tmp_path):
    command = _python_program(tmp_path, "import time; time.sleep(30)")
    run = ExternalProgram(command, write_input=_write, read_output=np.loadtxt, timeout=0.5,
                          name="slow")
    with pytest.raises(ForeignError, match="slow: no result after 0.5 s"):
        run(np.ones(1))


def test_complex_input_is_rejected():
    with pytest.raises(TypeError, match="heat1d: an external program takes real numbers"):
        heat1d()(np.ones(2, dtype=complex))


def test_bad_construction():
    with pytest.raises(FileNotFoundError, match="'no-such-simulator' \\(command\\[0\\]\\) was not found"):
        ExternalProgram(["no-such-simulator"], write_input=_write, read_output=np.loadtxt)
    with pytest.raises(TypeError, match="command must be a non-empty list"):
        ExternalProgram("sim in out", write_input=_write, read_output=np.loadtxt)
