"""The steady-diffusion demo: its CLI at tiny sizes, and its pieces."""
import torch

from bridges.demos import steady_diffusion as demo


def test_quick_run_writes_the_figures(tmp_path, capsys):
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("steady_diffusion_T.png", "steady_diffusion_timing.png",
                 "steady_diffusion_inverse.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
        assert name in out
    assert "inverse problem: misfit" in out


def test_petsc_reaches_1e_10_where_lbfgs_does_not():
    rows = demo.compare([35], {35}, lbfgs_time=2.0, show_progress=False)
    (row,) = rows
    assert row["petsc_residual"] <= 1e-10
    assert row["lbfgs_residual"] > row["petsc_residual"]
    assert row["lbfgs_steps"] >= 1


def test_inverse_problem_reduces_the_misfit():
    result = demo.recover_kappa(n=18, coarse=4, iterations=8, lr=0.1, show_progress=False)
    assert result["history"][-1] < 0.5 * result["history"][0]
    assert torch.isfinite(result["kappa_fit"]).all()
