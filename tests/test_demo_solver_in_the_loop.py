"""The solver-in-the-loop demo: training, the variants, and the command line. (The unrolled
hybrid solver's gradient and memory: tests/test_problems_turbulence.py.)"""
import pytest
import torch

from bridges.demos import solver_in_the_loop as demo
from bridges.problems import turbulence

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def quick():
    cfg = dict(turbulence.SETTINGS["quick"])
    return cfg, turbulence.load_data(cfg), turbulence.coarse_flow("petsc")


def _fixed_windows(data, cfg):
    steps = data["train"].shape[1] - 1
    return [(i, t) for i in range(data["train"].shape[0])
            for t in range(0, steps - cfg["unroll"] + 1, cfg["unroll"])]


def test_quick_training_lowers_the_unrolled_loss(quick):
    cfg, data, flow = quick
    windows = _fixed_windows(data, cfg)
    with torch.no_grad():
        # zero output: the coarse solver
        untrained = turbulence.Correction(flow.h, width=cfg["width"])
        before = float(turbulence.unrolled_loss(untrained, flow, data["train"], windows,
                                          cfg["unroll"]))
    for variant in ("option 2", "option 1"):
        net, losses, _ = demo.train(variant, data, cfg, flow)
        assert len(losses) == cfg["iterations"]
        with torch.no_grad():
            after = float(turbulence.unrolled_loss(net, flow, data["train"], windows,
                                                   cfg["unroll"]))
        assert after < 0.9 * before, (variant, before, after)


def test_the_variants_are_what_they_claim(quick):
    cfg, data, _ = quick
    flow = turbulence.coarse_flow("fft")
    torch.manual_seed(1)
    net = turbulence.Correction(flow.h, width=4)
    torch.nn.init.normal_(net.body[-1].weight, std=0.1)
    nets = {v: net for v in ("option 1", "option 2", "residual")}
    results = demo.evaluate(nets, data, flow)
    start, steps = data["test"][:, 0], data["test"].shape[1] - 1
    with torch.no_grad():
        plain = flow.rollout(start, steps)
        hybrid = flow.rollout(start, steps, correction=net)
    torch.testing.assert_close(results["none"]["states"], plain)
    torch.testing.assert_close(results["option 2"]["states"], hybrid)  # fed back every step
    torch.testing.assert_close(results["residual"]["states"], plain + net(plain))  # afterwards
    error = results["none"]["error"]
    assert error.shape == (data["test"].shape[0], steps)
    # the coarse solver drifts from the reference: the correction has something to learn
    assert 0 < error[:, 0].mean() < error[:, -1].mean()
    with pytest.raises(ValueError, match="unknown variant 'option 3'; valid: option 1"):
        demo.train("option 3", data, cfg, flow)


def test_cli_quick_run_writes_figures_and_table(tmp_path, capsys):
    assert demo.main(["--quick", "--iterations", "2", "--pressure", "fft", "--out",
                      str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("solver_in_the_loop_error.png", "solver_in_the_loop_vorticity.png",
                 "solver_in_the_loop_training.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
        assert name in out
    for variant in demo.VARIANTS:
        assert f"{variant:>10}" in out
    assert "step 4" in out and "step 20" in out
    assert list(tmp_path.glob("solver_in_the_loop_data_*.pt"))  # the cached reference


def test_cli_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--help"])
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        demo.main(["--iterations", "0"])
    assert exc.value.code == 2
    assert "--iterations and --unroll must be positive" in capsys.readouterr().err
    without_dash = "expects KEY=VALUE without the dash"
    for bad, message in ((["--petsc-option=-pc_type=gamg"], without_dash),
                         (["--petsc-option", "pc_type"], without_dash),
                         (["--pressure", "fft", "--petsc-option", "pc_type=gamg"],
                          "--petsc-option needs --pressure petsc")):
        with pytest.raises(SystemExit) as exc:
            demo.main(bad)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
