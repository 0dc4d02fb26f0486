"""Per-solver PETSc options: precedence, lifetime under the solver's own prefix, values, and the
report of options PETSc never read."""
import warnings

import pytest
import torch

from bridges.petsc import PETSc, UnusedOptionsWarning, set_unused_options
from bridges.petsc._options import SolverOptions, check_options, check_prefix


@pytest.fixture
def db():
    return PETSc.Options()


def test_precedence_dict_over_command_line_over_defaults(db):
    db["heat_ksp_type"] = "bcgs"  # as -heat_ksp_type bcgs on the command line
    db["heat_pc_type"] = "ilu"
    try:
        options = SolverOptions("t", "heat_", {"pc_type": "sor"},
                                {"ksp_type": "cg", "pc_type": "jacobi", "ksp_rtol": 1e-9})
        assert options.prefix.startswith("heat_bridges") and options.prefix.endswith("_")
        assert options["ksp_type"] == "bcgs"   # command line beats the default
        assert options["pc_type"] == "sor"     # the dict beats the command line
        assert options["ksp_rtol"] == "1e-09"  # the default where nothing else is set
        options.close()
        assert options["pc_type"] is None and db.getString("heat_pc_type") == "ilu"
    finally:
        del db["heat_ksp_type"], db["heat_pc_type"]


def test_two_solvers_keep_their_own_options(db):
    first = SolverOptions("t", None, {"ksp_type": "cg"})
    second = SolverOptions("t", None, {"ksp_type": "gmres"})
    assert first.prefix != second.prefix
    assert (first["ksp_type"], second["ksp_type"]) == ("cg", "gmres")
    assert not db.hasName("ksp_type")  # nothing unprefixed was written
    first.close()
    assert second["ksp_type"] == "gmres"  # unaffected by the other's end
    second.close()
    assert not any(key.startswith(second.prefix) for key in db.getAll())


def test_flag_and_viewer_values():
    assert check_options("t", {"ksp_view": True, "snes_monitor": None, "ts_adapt_monitor": True}) \
        == {"ksp_view": "", "snes_monitor": "", "ts_adapt_monitor": ""}
    checked = check_options("t", {"-ksp_initial_guess_nonzero": False, "pc_gamg_threshold": 0.02,
                                  "ts_monitor": False, "ksp_converged_reason": False,
                                  "pc_fieldsplit_0_fields": [0, 2]})
    assert checked["ksp_initial_guess_nonzero"] == "false"  # a boolean switched off
    assert checked["pc_gamg_threshold"] == "0.02" and checked["pc_fieldsplit_0_fields"] == "0,2"
    options = SolverOptions("t", None, {"ts_monitor": False})
    assert options["ts_monitor"] is None  # a viewer switched off is absent, not "false"
    options.close()
    # 0-d tensors and numpy scalars are their numbers (str() gave "tensor(1.0000e-12)")
    import numpy as np
    assert check_options("t", {"snes_rtol": torch.tensor(1e-12, dtype=torch.float64),
                               "ksp_max_it": np.int64(7),
                               "ksp_view": np.bool_(True)}) == \
        {"snes_rtol": "1e-12", "ksp_max_it": "7", "ksp_view": ""}


def test_a_viewer_given_as_true_runs(capfd):
    ksp = PETSc.KSP().create(comm=PETSc.COMM_SELF)
    mat = PETSc.Mat().createAIJ([2, 2], nnz=1, comm=PETSc.COMM_SELF)
    mat.setValue(0, 0, 2.0)
    mat.setValue(1, 1, 4.0)
    mat.assemble()
    options = SolverOptions("t", None, {"ksp_view": True, "ksp_type": "cg"})
    try:
        ksp.setOptionsPrefix(options.prefix)
        ksp.setOperators(mat)
        ksp.setFromOptions()
        b, x = mat.createVecs()
        b.set(1.0)
        ksp.solve(b, x)
        assert "KSP Object: (" + options.prefix + ")" in capfd.readouterr().out
        assert x.getArray().tolist() == [0.5, 0.25]
    finally:
        options.close()
        for obj in (ksp, mat, b, x):
            obj.destroy()


def test_unused_options_warn_by_name_or_raise_in_strict_mode(monkeypatch):
    options = SolverOptions("my_solver", None, {"ksp_typo_option": 3, "ksp_type": "cg",
                                                "ts_adjoint_monitor": True})
    PETSc.Options().getString(options.prefix + "ksp_type")  # as a solver reading it
    with pytest.warns(UnusedOptionsWarning, match="my_solver: PETSc never read the option\\(s\\) "
                                                  "ksp_typo_option: misspelt"):
        options.report_unused()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        options.report_unused()  # each option is reported once
    with pytest.warns(UnusedOptionsWarning, match="ts_adjoint_monitor"):
        options.report_unused(final=True)  # adjoint options only once a backward has run
    options.close()
    try:
        set_unused_options("error")
        strict = SolverOptions("my_solver", None, {"ksp_typo_option": 3})
        with pytest.raises(ValueError, match="never read the option\\(s\\) ksp_typo_option"):
            strict.report_unused()
        strict.close()
        set_unused_options("ignore")
        quiet = SolverOptions("my_solver", None, {"ksp_typo_option": 3})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            quiet.report_unused()
        quiet.close()
    finally:
        set_unused_options("warn")
    with pytest.raises(ValueError, match="action must be one of"):
        set_unused_options("shout")


def test_bad_options_and_prefixes_are_named():
    with pytest.raises(TypeError, match="solve: options must be a dict"):
        check_options("solve", [("ksp_type", "cg")])
    with pytest.raises(TypeError, match="option names must be non-empty strings"):
        check_options("solve", {"ksp type": "cg"})
    with pytest.raises(TypeError, match=r"solve: option 'snes_rtol' must be a string, a number, "
                                        r"a bool, None or a list of them, got Tensor of shape "
                                        r"\(2,\)"):
        check_options("solve", {"snes_rtol": torch.ones(2)})
    with pytest.raises(TypeError, match=r"option 'ksp_type' must be .* got dict"):
        check_options("solve", {"ksp_type": {"cg": 1}})
    with pytest.raises(ValueError, match="solve: prefix must be .* such as 'heat_', got '1x_'"):
        check_prefix("solve", "1x_")
    assert check_prefix("solve", None) == "" and check_prefix("solve", "heat_") == "heat_"
