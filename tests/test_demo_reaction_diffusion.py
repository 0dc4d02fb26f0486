"""The reaction-diffusion demo's command line: its gradient check, fit and figure. (The model,
BRUSS-2D on a Grid, is tested in tests/test_problems_brusselator.py.)"""
import re

from bridges.demos import reaction_diffusion as rd


def test_cli_quick_run_checks_its_gradient_and_writes_the_figure(tmp_path, capsys):
    assert rd.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "reaction_diffusion.png").stat().st_size > 1000
    differences = [float(x) for x in re.findall(r"rel\. difference ([0-9.e+-]+)", out)]
    assert len(differences) == 3 and max(differences) < 1e-6, out
    assert "fit (" in out and "misfit" in out
