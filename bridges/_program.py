"""Wrapping an existing simulator executable as a numpy function: input file in, output file out."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import numpy as np

from ._errors import ForeignError


class ExternalProgram:
    """Run a program as ``x -> y``: write its input file, run it, read its output file.

    Every call runs in a fresh temporary directory (the program's working directory), so calls
    may run in parallel, e.g. through ``fd2pytorch(..., workers=4)``.

    Args:
        command: the program and its arguments. ``{input}`` and ``{output}`` in any argument are
            replaced by the absolute paths of the input and output files.
        write_input: ``write_input(path, x)`` writes the input file for the float64 vector x.
        read_output: ``read_output(path)`` returns the results as an array.
        input_name, output_name: file names inside the working directory.
        timeout: seconds before a run is killed and reported (None waits forever).
        env: environment variables for the program (default: this process's).
        name: names the program in errors (default: the executable's name).
    """

    def __init__(self, command, *, write_input, read_output, input_name="input.txt",
                 output_name="output.txt", timeout=None, env=None, name=None):
        if isinstance(command, str) or not command:
            raise TypeError(f"ExternalProgram: command must be a non-empty list of strings such as "
                            f"['./sim', '{{input}}', '{{output}}'], got {command!r}")
        self.command = [os.fspath(c) for c in command]
        exe = self.command[0]
        resolved = shutil.which(exe)
        if resolved is None:
            raise FileNotFoundError(f"ExternalProgram: the executable {exe!r} (command[0]) was not "
                                    f"found or is not executable; give its path or put it on PATH")
        self.command[0] = os.path.abspath(resolved)
        if not callable(write_input) or not callable(read_output):
            raise TypeError("ExternalProgram: write_input and read_output must be callables")
        self.write_input, self.read_output = write_input, read_output
        self.input_name, self.output_name = input_name, output_name
        self.timeout, self.env = timeout, env
        self.name = name or os.path.basename(exe)

    def __call__(self, x) -> np.ndarray:
        x = np.asarray(x)
        if np.iscomplexobj(x):
            raise TypeError(f"{self.name}: an external program takes real numbers, so the "
                            f"complex-step scheme cannot be used; use scheme='central' or "
                            f"'forward'")
        with tempfile.TemporaryDirectory(prefix="bridges-run-") as workdir:
            inp = os.path.join(workdir, self.input_name)
            out = os.path.join(workdir, self.output_name)
            self.write_input(inp, x.astype(np.float64, copy=False))
            cmd = [c.replace("{input}", inp).replace("{output}", out) for c in self.command]
            try:
                run = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True,
                                     timeout=self.timeout, env=self.env, stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired as exc:
                raise ForeignError(f"{self.name}: no result after {self.timeout} s; the run was "
                                   f"killed. Command: {' '.join(cmd)}",
                                   foreign_traceback=_text(exc.stderr)) from exc
            if run.returncode != 0:
                raise ForeignError(f"{self.name} exited with code {run.returncode}. Command: "
                                   f"{' '.join(cmd)}\nits stderr:\n{run.stderr.strip()}",
                                   foreign_traceback=run.stderr)
            if not os.path.exists(out):
                raise ForeignError(f"{self.name} exited normally but wrote no output file "
                                   f"{self.output_name!r}. Command: {' '.join(cmd)}\nits stderr:\n"
                                   f"{run.stderr.strip()}", foreign_traceback=run.stderr)
            return np.asarray(self.read_output(out), dtype=np.float64)


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")
