"""The circuit-calibration demo: a diode clipper fitted through ngspice runs."""
import re

from bridges.demos import circuit_calibration


def test_quick_run_fits_to_the_noise_and_recovers_the_capacitance(tmp_path, capsys):
    circuit_calibration.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    misfit, noise = map(float, re.search(r"rms misfit ([\d.]+) mV against measurement noise "
                                         r"([\d.]+) mV", out).groups())
    assert misfit < 1.2 * noise
    row = re.search(r"^C \[nF\]\s+47\s+20\s+([\d.]+)\s+([\d.]+)%", out, re.M)
    assert abs(float(row.group(1)) - 47) < 0.05 * 47
    assert re.search(r"ngspice runs in [\d.]+ s", out)
    assert (tmp_path / "circuit_calibration.png").stat().st_size > 10_000


def test_help_describes_the_demo(capsys):
    try:
        circuit_calibration.main(["--help"])
    except SystemExit:
        pass
    assert "diode clipper" in capsys.readouterr().out
