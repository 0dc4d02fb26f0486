"""Packaging: the Julia side ships inside the package, where juliapkg finds and resolves it.

Builds the wheel (and, as CI installs it, the editable install) from a copy of the project, installs
it into a fresh virtual environment without the source tree on sys.path, and asks juliapkg's own
discovery there which juliapkg.json files it reads and what their "path" entries resolve to. Every
path must be a directory holding a Project.toml: juliapkg runs Pkg.develop on them, with check=True,
while `import juliacall` runs, so a bad one breaks juliacall for every package in the environment.
Nothing is downloaded: pip runs with --no-deps (and --no-build-isolation).
"""
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run in the fresh environment: juliapkg's view of it, as JSON.
PROBE = """
import importlib.util, json, sys
from juliapkg.deps import deps_files, find_requirements
spec = importlib.util.find_spec("bridges")
compat, packages = find_requirements()
print(json.dumps({"bridges": spec.submodule_search_locations[0], "files": deps_files(),
                  "julia": str(compat), "packages": [p.dict() for p in packages]}))
"""


def _run(*cmd, **kw):
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _juliapkg_only(tmp_path):
    """A directory holding only juliapkg and its dependencies, linked from this environment
    (each distribution's top-level files, as its RECORD lists them)."""
    pytest.importorskip("juliapkg", reason="juliapkg (a juliacall dependency, extra 'julia') is "
                                           "not installed")
    folder = tmp_path / "juliapkg-only"
    folder.mkdir()
    requirements = [r for r in importlib.metadata.requires("juliapkg") or [] if "extra" not in r]
    names = ["juliapkg"] + [re.match(r"[A-Za-z0-9_.-]+", r).group() for r in requirements]
    for name in names:
        dist = importlib.metadata.distribution(name)
        for top in {f.parts[0] for f in dist.files
                    if not f.parts[0].endswith(".dist-info") and f.parts[0] != ".."}:
            if not (folder / top).exists():
                (folder / top).symlink_to(dist.locate_file(top))
    return folder


def _install(tmp_path, mode):
    """The project installed into a fresh venv (mode "wheel" or "editable"); returns the venv's
    python and where the source copy was (deleted for a wheel)."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "bridges", source / "bridges",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    if mode == "wheel":
        _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
             "-w", str(dist), str(source))
    else:  # what `pip install -e .` builds (PEP 660), built here so nothing is fetched
        _run(sys.executable, "-c", f"from setuptools import build_meta; "
             f"build_meta.build_editable({str(dist)!r})", cwd=source)
    (wheel,) = dist.glob("bridges-*.whl")
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         str(wheel))
    if mode == "wheel":
        shutil.rmtree(source)  # the installed wheel must stand alone
    return python, source


@pytest.mark.parametrize("mode", ["wheel", "editable"])
def test_every_juliapkg_path_resolves_to_a_julia_package(tmp_path, mode):
    juliapkg_only = _juliapkg_only(tmp_path)
    python, source = _install(tmp_path, mode)
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "JULIA"))}
    env["PYTHONPATH"] = str(juliapkg_only)
    output = _run(str(python), "-s", "-c", PROBE, cwd=run_dir, env=env)
    found = json.loads(output.splitlines()[-1])  # after juliapkg's own log lines

    package = Path(found["bridges"])
    site = python.parents[1] / "lib"
    if mode == "wheel":
        assert site in package.parents, f"bridges imported from {package}, not the venv"
    else:
        assert package == source / "bridges"
    ours = package / "juliapkg.json"
    assert str(ours) in found["files"], f"juliapkg did not find {ours}: {found['files']}"

    for file in map(Path, found["files"]):  # every path, in every juliapkg.json juliapkg reads
        for name, entry in json.loads(file.read_text()).get("packages", {}).items():
            if "path" in entry:
                target = (file.parent / entry["path"]).resolve()
                assert (target / "Project.toml").is_file(), \
                    f"{file}: {name}'s path {entry['path']} -> {target} has no Project.toml"
    bridges_jl = [p for p in found["packages"] if p["name"] == "BridgesJL"]
    assert len(bridges_jl) == 1 and bridges_jl[0]["dev"] is True
    target = Path(bridges_jl[0]["path"])
    assert target == package / "julia" / "BridgesJL"  # as juliapkg will Pkg.develop it
    assert "uuid = \"55540f8c-09ef-4d1f-abb6-6f26d8e563e1\"" in (target / "Project.toml").read_text()
    assert (target / "src" / "BridgesJL.jl").is_file()
    for julia_file in ("Fracture.jl", "FractureDPFEHM.jl"):  # the fracture backends' Julia code
        assert (package / "fracture" / julia_file).is_file()
    assert found["julia"].startswith("^1.10")


def test_the_adapter_points_at_the_shipped_julia_package():
    from bridges.fracture import FRACTURE_DPFEHM_JL, FRACTURE_JL
    from bridges.julia import JULIA_PACKAGE
    package = ROOT / "bridges"
    assert JULIA_PACKAGE == package / "julia" / "BridgesJL"
    assert (JULIA_PACKAGE / "Project.toml").is_file()
    assert FRACTURE_JL.parent == FRACTURE_DPFEHM_JL.parent == package / "fracture"
    assert not (ROOT / "julia" / "juliapkg.json").exists()  # would be read in an editable install
