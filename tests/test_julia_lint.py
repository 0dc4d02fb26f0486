"""The Julia side checked without Julia: every `.jl` file in the package parsed, linted and
format-checked by fatou, and what fatou cannot see (it does not resolve names) checked from here:

- every Julia function the Python code calls by name (`seval("BridgesJL.pullback")`,
  `include_setup(FRACTURE_JL, "Fracture")` for `Fracture.pressure`) is defined at the top level of
  the module's file;
- every package a `.jl` file loads (`using`/`import`) is declared where Julia will look for it:
  inside a Julia package (a Project.toml above the file), in its [deps]; elsewhere (files included
  into juliacall's environment), in bridges/juliapkg.json, among the optional [weakdeps] of the
  packages it develops (DPFEHM, installed on demand), or in Julia's standard library.

Each check takes the root of a source tree, so that a deliberately broken copy can show that it
fails, naming the file and line. julia/verify.sh and .github/workflows/julia.yml run this file
before anything that needs Julia.
"""
import ast
import json
import os
import re
import shutil
import subprocess
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Julia 1.10's standard libraries (the stdlib/ directory of JuliaLang/julia v1.10 without the _jll
# binary wrappers, and without DelimitedFiles, a package to install since Julia 1.9): loadable
# without being declared, except from inside a package.
STDLIB = {"ArgTools", "Artifacts", "Base64", "CRC32c", "Dates", "Distributed", "Downloads",
          "FileWatching", "Future", "InteractiveUtils", "LazyArtifacts", "LibCURL", "LibGit2",
          "Libdl", "LinearAlgebra", "Logging", "Markdown", "Mmap", "NetworkOptions", "Pkg",
          "Printf", "Profile", "REPL", "Random", "SHA", "Serialization", "SharedArrays", "Sockets",
          "SparseArrays", "Statistics", "SuiteSparse", "TOML", "Tar", "Test", "UUIDs", "Unicode"}
BUILTIN = {"Base", "Core", "Main"}

DOCSTRING = re.compile(r'"""[\s\S]*?"""')
MODULE = re.compile(r"^module (\w+)", re.M)
# top-level definitions: `function f(`, or the short form `f(...) = ` (fatou's layout: no indent)
FUNCTION = re.compile(r"^(?:function (\w+!?)|(\w+!?)\(.*\)(?: where .*)? = )", re.M)
IMPORT = re.compile(r"^\s*(?:using|import) ([^:#\n]+)", re.M)
CALL = re.compile(r"\b(\w+)\.(\w+!?)")


def julia_files(root):
    return sorted((root / "bridges").rglob("*.jl"))


def _code(path):
    """The file's text with docstrings blanked out, lines kept where they were."""
    return DOCSTRING.sub(lambda m: "\n" * m.group().count("\n"), path.read_text())


def _line(text, pos):
    return text.count("\n", 0, pos) + 1


def fatou_findings(root):
    """What `fatou lint` and `fatou format --check` report (built-in settings, Julia version
    from juliapkg.json), one entry per command that fails."""
    fatou = shutil.which("fatou", path=os.pathsep.join([sysconfig.get_path("scripts"),
                                                        os.environ.get("PATH", "")]))
    assert fatou, "fatou (a Julia linter on PyPI) is missing: pip install -e '.[test]'"
    julia = json.loads((root / "bridges" / "juliapkg.json").read_text())["julia"]
    files = [str(p.relative_to(root)) for p in julia_files(root)]
    found = []
    for command in (["lint", "--output", "concise", "--julia-version", julia],
                    ["format", "--check", "--quiet"]):
        done = subprocess.run([fatou, "--no-config", "--color", "never", *command, *files],
                              cwd=root, capture_output=True, text=True)
        if done.returncode != 0:
            found.append(f"fatou {command[0]}:\n{done.stdout}{done.stderr}".strip())
    return found


def julia_calls(root):
    """(python file, line, module, function) for each Julia function the Python code calls by
    name: `Module.function` in a string passed to `seval`, and the function that
    `include_setup(path, module, name=...)` imports from the module."""
    trees = {path: ast.parse(path.read_text()) for path in sorted((root / "bridges").rglob("*.py"))}
    setup = next(node.args for tree in trees.values() for node in ast.walk(tree)
                 if isinstance(node, ast.FunctionDef) and node.name == "include_setup")
    params = [a.arg for a in setup.args]
    defaults = dict(zip(params[len(params) - len(setup.defaults):], setup.defaults))
    calls = []
    for path, tree in trees.items():
        for node in (node for node in ast.walk(tree) if isinstance(node, ast.Call)):
            func = getattr(node.func, "attr", getattr(node.func, "id", None))
            where = (str(path.relative_to(root)), node.lineno)
            if func == "seval" and node.args and isinstance(node.args[0], ast.Constant):
                calls += [(*where, *m) for m in CALL.findall(node.args[0].value)]
            elif func == "include_setup":
                bound = defaults | dict(zip(params, node.args))
                bound |= {k.arg: k.value for k in node.keywords}
                calls.append((*where, bound["module"].value, bound["name"].value))
    return calls


def undefined_calls(root):
    """Julia functions the Python code calls that no top-level definition of their module has."""
    defined = {}
    for path in julia_files(root):
        text = _code(path)
        for module in MODULE.findall(text):
            defined[module] = (path, {a or b for a, b in FUNCTION.findall(text)})
    found = []
    for file, line, module, function in julia_calls(root):
        if module not in defined:
            continue  # Base, Threads, ...: not ours
        path, functions = defined[module]
        if function not in functions:
            found.append(f"{file}:{line}: calls {module}.{function}, which "
                         f"{path.relative_to(root)} does not define")
    return found


def undeclared_imports(root):
    """Packages a .jl file loads that are not declared where Julia looks for them (see above)."""
    juliapkg = root / "bridges" / "juliapkg.json"
    packages = json.loads(juliapkg.read_text())["packages"]
    environment = set(packages) | STDLIB
    for spec in packages.values():  # optional packages: the weak dependencies of ours
        if "path" in spec:
            project = tomllib.loads((juliapkg.parent / spec["path"] / "Project.toml").read_text())
            environment |= set(project.get("weakdeps", {}))
    found = []
    for path in julia_files(root):
        project = next((d / "Project.toml" for d in path.parents
                        if d.is_relative_to(root) and (d / "Project.toml").is_file()), None)
        if project is not None:
            allowed = set(tomllib.loads(project.read_text()).get("deps", {}))
            where = f"in [deps] of {project.relative_to(root)}"
        else:
            allowed = environment
            where = f"in {juliapkg.relative_to(root)} and is no Julia standard library"
        text = _code(path)
        for match in IMPORT.finditer(text):
            for name in match.group(1).split(","):
                package = name.split(" as ")[0].strip().split(".")[0]
                if package and package not in allowed | BUILTIN:  # "" is a relative `.Module`
                    found.append(f"{path.relative_to(root)}:{_line(text, match.start(1))}: "
                                 f"loads {package}, which is not declared {where}")
    return found


CHECKS = [fatou_findings, undefined_calls, undeclared_imports]


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
def test_julia_side_is_clean(check):
    found = check(ROOT)
    assert not found, "\n".join(found)


def test_the_checks_see_the_calls_and_the_files():
    calls = {(module, function) for *_, module, function in julia_calls(ROOT)}
    assert {("BridgesJL", "pullback"), ("BridgesJL", "call"), ("BridgesJL", "label"),
            ("Fracture", "pressure"), ("FractureDPFEHM", "pressure")} <= calls
    assert {"bridges/julia/BridgesJL/src/BridgesJL.jl", "bridges/fracture/Fracture.jl",
            "bridges/fracture/FractureDPFEHM.jl"} <= {
        str(p.relative_to(ROOT)) for p in julia_files(ROOT)}


# the file broken, its text and the replacement; where the finding must point (file, text on
# that line) and what it must say
BREAKS = {
    "dangling operator": ("bridges/fracture/Fracture.jl", "return reshape(A \\ b, size(k))",
                          "return reshape(A \\ b, size(k)) *", None, None, "error[parse-error]"),
    "missing end": ("bridges/julia/BridgesJL/src/BridgesJL.jl", "\nend\n", "\n", None,
                    "module BridgesJL", "error[parse-error] expected `end`"),
    "misspelt call": ("bridges/julia/_runtime.py", '"BridgesJL.call"', '"BridgesJL.cal"', None,
                      None, "calls BridgesJL.cal,"),
    "renamed function": ("bridges/fracture/FractureDPFEHM.jl", "function pressure(",
                         "function groundwater_pressure(", "bridges/fracture/_dpfehm.py",
                         "include_setup(FRACTURE_DPFEHM_JL", "calls FractureDPFEHM.pressure,"),
    "undeclared dependency": ("bridges/julia/BridgesJL/src/BridgesJL.jl", "import Zygote",
                              "import Zygote, LinearAlgebra", None, None, "loads LinearAlgebra,"),
    "unknown package": ("bridges/fracture/Fracture.jl", "using LinearAlgebra, SparseArrays",
                        "using LinearAlgebra, SparseArrays, Optim", None, None, "loads Optim,"),
}


@pytest.mark.parametrize("case", BREAKS)
def test_a_broken_copy_fails_naming_file_and_line(case, tmp_path):
    file, old, new, where, marker, says = BREAKS[case]
    shutil.copytree(ROOT / "bridges", tmp_path / "bridges",
                    ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / file
    text = path.read_text()
    at = text.rindex(old)  # the last one: the module's own `end`
    path.write_text(text[:at] + new + text[at + len(old):])
    where = where or file
    text = (tmp_path / where).read_text()
    line = _line(text, text.index(marker or new))
    found = "\n".join(f for check in CHECKS for f in check(tmp_path))
    assert any(says in f and f"{where}:{line}:" in f for f in found.splitlines()), found
