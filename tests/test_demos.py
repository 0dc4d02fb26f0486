"""The demos run end to end and reach their stated results."""
import numpy as np

from bridges.demos import heat_calibration


def test_heat_calibration_recovers_both_parameters(tmp_path, capsys):
    result = heat_calibration.calibrate(iterations=80, show_progress=False)
    true = np.array(heat_calibration.TRUE_VALUES)
    assert np.all(np.abs(result["fitted"] - true) / true < 0.05)
    assert result["history"][-1] < result["history"][0] / 1000
    assert result["evaluations"] == 80 * (1 + 2 * 2)  # forward + central differences of 2 params


def test_heat_calibration_command_line_writes_figure(tmp_path, capsys):
    heat_calibration.main(["--iterations", "5", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "conductivity" in out and "simulator runs" in out
    assert (tmp_path / "heat_calibration.png").stat().st_size > 10_000
