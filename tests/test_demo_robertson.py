"""The Robertson demo: TSAdjoint sensitivities against finite differences, neural-ODE training
through PETSc, and the command line."""
import numpy as np
import pytest

pytest.importorskip("petsc4py", reason="the Robertson demo needs petsc4py (bash .ci/setup)")

from bridges.demos import robertson  # noqa: E402


def test_sensitivity_matches_central_differences_of_the_same_loss_and_of_radau():
    sens = robertson.sensitivity(steps_per_interval=2, show_progress=False)
    assert sens["loss"] > 0 and np.all(sens["grad"] != 0)
    # fixed steps make the discrete loss a smooth function of k: adjoint == its central FD
    assert sens["fd_rel_error"].max() < 1e-4, sens["fd_rel_error"]
    # and close to the gradient of the exact loss (scipy Radau), up to CN's discretisation error
    assert sens["ref_rel_error"].max() < 2e-3, sens["ref_rel_error"]


def test_short_petsc_training_reduces_the_loss():
    run = robertson.train(12, show_progress=False)
    assert run["ok"] and run["failure"] is None
    assert run["iterations_done"] == 12 and len(run["history"]) == 12
    assert run["final_loss"] < 0.8 * run["initial_loss"]
    assert run["ratio"] == pytest.approx(run["initial_loss"] / run["final_loss"])
    assert run["prediction"].shape == run["data"].y.shape == (41, 3)
    # the learned ODE, re-solved with 10x finer steps, fits about as well: not a step artefact
    assert run["refined_loss"] == pytest.approx(run["final_loss"], rel=0.2)


def test_command_line_writes_both_figures(tmp_path, capsys):
    robertson.main(["--iterations", "2", "--sensitivity-steps", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "TSAdjoint" in out and "bridges/PETSc cn" in out and "2 of 2 iterations" in out
    for name in ("robertson_sensitivity.png", "robertson_training.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_command_line_rejects_unknown_long_options():
    with pytest.raises(SystemExit):
        robertson.main(["--no-such-option"])


def test_quick_run_trains_20_iterations_and_writes_the_training_figure(tmp_path, capsys):
    robertson.main(["--quick", "--skip-sensitivity", "--out", str(tmp_path)])
    assert "20 of 20 iterations" in capsys.readouterr().out
    assert (tmp_path / "robertson_training.png").stat().st_size > 10_000
