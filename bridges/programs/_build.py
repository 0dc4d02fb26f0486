"""C sources of the programs compiled once per content into a cache, with the system's compiler."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """Where built programs are kept: $BRIDGES_CACHE, else ~/.cache/bridges."""
    return Path(os.environ.get("BRIDGES_CACHE") or Path.home() / ".cache" / "bridges")


def compiled(source: Path, *, shared=False) -> str:
    """Path of `source` (C) compiled with $CC (default cc) into the cache, built once per content:
    an executable, or a shared library with ``shared=True``."""
    text = source.read_bytes()
    suffix = ".so" if shared else ""
    target = cache_dir() / "bin" / f"{source.stem}-{hashlib.sha1(text).hexdigest()[:12]}{suffix}"
    if target.exists():
        return str(target)
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise FileNotFoundError(f"compiling {source.name}: the C compiler {compiler!r} (from $CC, "
                                f"default 'cc') was not found; install gcc or set CC")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        flags = ["-shared", "-fPIC"] if shared else []
        cmd = [compiler, "-O2", "-std=c99", "-D_GNU_SOURCE", *flags, "-o", str(built), str(source),
               "-lm"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed ({' '.join(cmd)}):\n{run.stderr}")
        os.replace(built, target)  # atomic, so concurrent builders never see half a file
    return str(target)
