"""The fracture training demo's command line, with tiny settings."""
import pytest

from bridges.demos import fracture


def test_cli_writes_figure_and_reports(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    fracture.main(["--grid", "12", "--iterations", "3", "--samples", "1", "--backend", "torch",
                   "--lightning", "off", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert (tmp_path / "fracture.png").stat().st_size > 0
    assert "mean pixel-wise relative pressure error" in out
    assert "correlation of learned W" in out


def test_training_reduces_the_error():
    result = fracture.train("petsc", grid=16, iterations=25, samples=1, show_progress=False)
    assert result["history"][-1] < result["history"][0]
    assert result["W"].shape == (16, 16) and (result["W"] > 0).all()


def test_cli_help_and_bad_arguments(capsys):
    for argv, code in ((["--help"], 0), (["--grid", "2"], 2)):
        with pytest.raises(SystemExit) as exc:
            fracture.main(argv)
        assert exc.value.code == code
    assert "--backend" in capsys.readouterr().out


@pytest.mark.parametrize("backend", ["julia", "dpfehm"])
def test_julia_backends_say_why_they_are_unavailable(capsys, backend):
    from bridges.julia import julia_unavailable_reason
    reason = julia_unavailable_reason()
    if reason is None:
        pytest.skip("Julia is available here; this checks the message where it is not")
    with pytest.raises(SystemExit) as exc:
        fracture.main(["--backend", backend, "--grid", "8", "--iterations", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--backend {backend} is unavailable" in err and "Julia >= 1.10" in err


def test_lightning_variant_trains():
    pytest.importorskip("lightning", reason="PyTorch Lightning (extra 'demo') is not installed")
    result = fracture.train_lightning("torch", grid=16, iterations=30, samples=1, lr=0.05, seed=0)
    assert result["W"].shape == (16, 16) and (result["W"] > 0).all()
    assert result["mean_error"] < result["cubic_law_error"]  # held-out fracture, same data
