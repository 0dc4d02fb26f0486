"""The shipped heat1d simulator against independent analytic solutions."""
import subprocess

import numpy as np
import pytest

from bridges.programs import heat1d, heat1d_executable


def test_late_time_matches_analytic_steady_fin_profile():
    # steady state of rho_c T_t = k T_xx - h (T - T_amb), T(0) = T_left, T_x(L) = 0:
    # T = T_amb + (T_left - T_amb) cosh(m (L - x)) / cosh(m L), m = sqrt(h / k)
    k, h, sensors = 0.8, 3.0, np.array([0.1, 0.4, 0.7, 0.95])
    run = heat1d(("conductivity", "convection"), t_end=20.0, steps=2000, outputs=1, cells=400,
                 sensors=",".join(map(str, sensors)))
    got = run(np.array([k, h]))
    m = np.sqrt(h / k)
    expected = 20.0 + 80.0 * np.cosh(m * (1 - sensors)) / np.cosh(m)
    np.testing.assert_allclose(got, expected, rtol=2e-5)


def test_output_shape_is_times_by_sensors():
    assert heat1d(outputs=5, steps=50, sensors="0.2,0.6")(np.array([1.0, 0.5])).shape == (10,)


def test_command_line_help_and_usage_errors(tmp_path):
    exe = heat1d_executable()
    assert "usage: heat1d INPUT OUTPUT" in subprocess.run([exe, "--help"], capture_output=True,
                                                          text=True, check=True).stdout
    bad = subprocess.run([exe], capture_output=True, text=True)
    assert bad.returncode == 1 and "usage" in bad.stderr
    (tmp_path / "in.txt").write_text("cells 10\nfoo 1\n")
    bad = subprocess.run([exe, str(tmp_path / "in.txt"), str(tmp_path / "out.txt")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown key 'foo'" in bad.stderr


def test_wrong_parameter_count():
    with pytest.raises(ValueError, match=r"heat1d: expected 2 value\(s\)"):
        heat1d(("conductivity", "convection"))(np.ones(3))
