"""The demos' shared plumbing: output directory, figure files, command line."""
import pytest

from bridges import plotting


def test_save_figure_writes_a_png_into_a_new_directory(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = plotting.save_figure(fig, tmp_path / "new", "line.png")
    assert path == tmp_path / "new" / "line.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)  # closed, so long runs do not pile up figures


def test_output_dir_defaults_to_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BRIDGES_OUT", str(tmp_path / "env"))
    assert plotting.output_dir() == tmp_path / "env" and (tmp_path / "env").is_dir()
    assert plotting.output_dir(tmp_path / "given") == tmp_path / "given"


def test_demo_parser_has_out_and_an_optional_quick():
    args = plotting.demo_parser("doc", quick="short run").parse_args(["--quick", "--out", "d"])
    assert args.quick and args.out == "d"
    with pytest.raises(SystemExit):
        plotting.demo_parser("doc").parse_args(["--quick"])


def test_report_figures_says_how_to_get_a_skipped_figure(capsys):
    plotting.report_figures("a.png", None)
    assert capsys.readouterr().out == ("figure: a.png\n"
                                       "figure skipped: install matplotlib (extra 'demo')\n")
