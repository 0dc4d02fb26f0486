"""An existing simulator executable as a numpy function: files and a script in, files out."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading

import numpy as np

from ._errors import ForeignError

TAIL_LINES = 15  # how much of the program's stderr and stdout a failure report quotes


_UNDER_WAY = set()  # process groups of the runs under way (see stop_runs)
_UNDER_WAY_LOCK = threading.Lock()
_STOPS = [0]  # how often stop_runs was called: a run starting meanwhile stops itself


def stop_runs() -> None:
    """Kill every program run under way in this process: after an interrupt, the threads that
    wait for them (fd2pytorch's workers) then end at once, not when the runs would."""
    with _UNDER_WAY_LOCK:
        _STOPS[0] += 1
        groups = list(_UNDER_WAY)
    for group in groups:
        _kill_group(group)


def _kill_group(group) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _end_with_program(pid) -> None:
    """Once the program (pid) exits, kill what it left running in its group: the run is over,
    and a background child holding the output pipes would keep it open until it ends. The
    program is not reaped here (WNOWAIT), so its group id cannot be taken by another."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:  # (already reaped: the run was killed)
        return
    _kill_group(pid)


def _run_group(cmd, workdir, script, timeout, env) -> subprocess.CompletedProcess:
    """subprocess.run(cmd) in a process group of its own, which ends with the program: on a
    timeout (or an interrupt) the whole group is killed, including what a wrapper (sh, mpirun,
    a launcher) started, which killing the wrapper alone would leave running; and when the
    program exits, whatever it left behind."""
    stops = _STOPS[0]
    with subprocess.Popen(cmd, cwd=workdir, env=env, text=True, errors="replace",
                          stdin=subprocess.DEVNULL if script is None else subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          start_new_session=True) as process:
        with _UNDER_WAY_LOCK:
            _UNDER_WAY.add(process.pid)
            stopped = _STOPS[0] != stops  # (stop_runs came between the start and here)
        if stopped:
            _kill_group(process.pid)
        threading.Thread(target=_end_with_program, args=(process.pid,), daemon=True).start()
        try:
            out, err = process.communicate(script, timeout=timeout)
        except BaseException as exc:
            _kill_group(process.pid)
            out, err = process.communicate()
            if isinstance(exc, subprocess.TimeoutExpired):
                exc.stdout, exc.stderr = out, err
            raise
        finally:
            with _UNDER_WAY_LOCK:
                _UNDER_WAY.discard(process.pid)
    return subprocess.CompletedProcess(cmd, process.returncode, out, err)


class ExternalProgram:
    """Run a program as ``x -> y``: write its inputs, run it, read its output files.

    Every call runs in a fresh temporary directory (the program's working directory), so calls
    may run in parallel, e.g. through ``fd2pytorch(..., workers=4)``.

    Args:
        command: the program and its arguments. Each argument is a template (``str.format``):
            ``{input}``, ``{output}`` and ``{workdir}`` become absolute paths (``{output}`` the
            first output file), ``{x}`` the float64 input vector, e.g. ``"--alpha={x[1]:.6f}"``.
            Write literal braces as ``{{`` and ``}}``.
        write_input: ``write_input(path, x)`` writes the input file for the vector x; None if
            the program takes no input file.
        read_output: ``read_output(path, ...)`` returns the results as an array; it receives
            one path per name in ``output_name``.
        input_name: the input file's name inside the working directory.
        output_name: the output file's name, or a list of names (several output files).
        stdin: the script fed to the program's standard input: a template formatted like the
            arguments (``"ALFA {x[0]}\\n..."``) or a callable ``stdin(x) -> str``. None feeds
            an empty stdin (/dev/null).
        template_dir: a directory whose contents are copied into every run's working directory
            (meshes, model libraries, settings files).
        timeout: seconds before a run is killed and reported (None waits forever).
        retries: how many times a failed run is tried again, each in a fresh directory (for
            transient failures: licence servers, flaky file systems).
        keep_failed: keep the working directory of a failed run and name it in the error.
        env: environment variables for the program (default: this process's).
        name: names the program in errors (default: the executable's name).
    """

    def __init__(self, command, *, read_output, write_input=None, input_name="input.txt",
                 output_name="output.txt", stdin=None, template_dir=None, timeout=None,
                 retries=0, keep_failed=False, env=None, name=None):
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
        if not callable(read_output) or not (write_input is None or callable(write_input)):
            raise TypeError("ExternalProgram: read_output must be a callable, and write_input a "
                            "callable or None")
        if not (stdin is None or isinstance(stdin, str) or callable(stdin)):
            raise TypeError(f"ExternalProgram: stdin must be None, a template string or a callable "
                            f"x -> str, got {type(stdin).__name__}")
        if template_dir is not None and not os.path.isdir(template_dir):
            raise FileNotFoundError(f"ExternalProgram: template_dir {os.fspath(template_dir)!r} "
                                    f"is not a directory")
        if not (isinstance(retries, int) and retries >= 0):
            raise ValueError(f"ExternalProgram: retries must be an int >= 0, got {retries!r}")
        self.write_input, self.read_output = write_input, read_output
        self.input_name = input_name
        self.output_names = [output_name] if isinstance(output_name, (str, os.PathLike)) \
            else list(output_name)
        self.stdin, self.template_dir = stdin, template_dir
        self.timeout, self.retries, self.keep_failed, self.env = timeout, retries, keep_failed, env
        self.name = name or os.path.basename(exe)

    @property
    def output_name(self):
        return self.output_names[0]

    def __call__(self, x) -> np.ndarray:
        x = np.asarray(x)
        if np.iscomplexobj(x):
            raise TypeError(f"{self.name}: an external program takes real numbers, so the "
                            f"complex-step scheme cannot be used; use scheme='central' or "
                            f"'forward'")
        x = x.astype(np.float64, copy=False)
        for attempt in range(1, self.retries + 2):
            try:
                return self._run(x)
            except ForeignError as exc:
                if attempt > self.retries:
                    if self.retries:
                        exc.args = (f"{exc.args[0]}\n(failed on all {attempt} attempts)",)
                    raise

    def _run(self, x):
        workdir = tempfile.mkdtemp(prefix="bridges-run-")
        failed, ran = True, False  # (a failure before the run, in write_input, keeps nothing)
        try:
            if self.template_dir is not None:
                shutil.copytree(self.template_dir, workdir, dirs_exist_ok=True)
            fields = {"input": os.path.join(workdir, self.input_name), "workdir": workdir,
                      "output": os.path.join(workdir, self.output_names[0]), "x": x}
            if self.write_input is not None:
                self.write_input(fields["input"], x)
            cmd = [self._format(c, fields, f"command[{i}]") for i, c in enumerate(self.command)]
            script = None if self.stdin is None else \
                self.stdin(x) if callable(self.stdin) else self._format(self.stdin, fields, "stdin")
            kept = f"\nIts working directory is kept: {workdir}" if self.keep_failed else ""
            where = f"Command: {' '.join(cmd)}{kept}"
            ran = True
            try:
                run = _run_group(cmd, workdir, script, self.timeout, self.env)
            except subprocess.TimeoutExpired as exc:
                raise ForeignError(f"{self.name}: no result after {self.timeout} s; the run was "
                                   f"killed, with every process it started. "
                                   f"{where}{_tails(exc.stderr, exc.stdout)}",
                                   foreign_traceback=_text(exc.stderr)) from exc
            code = run.returncode
            if code < 0:
                raise ForeignError(f"{self.name} was killed by {_signal_name(-code)}. "
                                   f"{where}{_tails(run.stderr, run.stdout)}",
                                   foreign_traceback=run.stderr)
            if code != 0:
                raise ForeignError(f"{self.name} exited with code {code}. "
                                   f"{where}{_tails(run.stderr, run.stdout)}",
                                   foreign_traceback=run.stderr)
            paths = [os.path.join(workdir, n) for n in self.output_names]
            missing = [n for n, p in zip(self.output_names, paths) if not os.path.exists(p)]
            if missing:
                raise ForeignError(f"{self.name} exited normally but wrote no output file "
                                   f"{', '.join(map(repr, missing))}. "
                                   f"{where}{_tails(run.stderr, run.stdout)}",
                                   foreign_traceback=run.stderr)
            try:
                result = np.asarray(self.read_output(*paths), dtype=np.float64)
            except Exception as exc:
                raise ForeignError(f"{self.name}: reading its output failed: "
                                   f"{type(exc).__name__}: {exc}{_locate(exc, paths)}. {where}"
                                   f"{_tails(run.stderr, run.stdout)}",
                                   original=exc) from exc
            if result.size == 0:
                raise ForeignError(f"{self.name}: its output file holds no numbers (did the run "
                                   f"fail without an exit code?). {where}"
                                   f"{_tails(run.stderr, run.stdout)}",
                                   foreign_traceback=run.stderr)
            failed = False
            return result
        finally:
            if not (ran and failed and self.keep_failed):
                shutil.rmtree(workdir, ignore_errors=True)

    def _format(self, template, fields, what):
        try:
            return template.format(**fields)
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise ValueError(f"{self.name}: cannot fill the template {what} = {template!r}: "
                             f"{type(exc).__name__}: {exc}. Known fields: input, output, workdir, "
                             f"x (the input vector, e.g. {{x[0]}}); write literal braces as "
                             f"{{{{ and }}}}") from exc


def _signal_name(number) -> str:
    try:
        return f"{signal.Signals(number).name} (signal {number})"
    except ValueError:
        return f"signal {number}"


def _tails(stderr, stdout) -> str:
    """The last lines of the program's stderr and stdout, for a failure report."""
    parts = []
    for label, text in (("stderr", stderr), ("stdout", stdout)):
        lines = _text(text).rstrip().splitlines()[-TAIL_LINES:]
        if lines:
            parts.append(f"\nlast lines of its {label}:\n" + "\n".join(lines))
    return "".join(parts) or "\n(it printed nothing)"


def _locate(exc, paths) -> str:
    """' in FILE, line N: TEXT' for the first line holding the value a parser choked on."""
    match = re.search(r"""string(?: to float:)? ['"](.+?)['"]""", str(exc))
    if not match:
        return f" (output file(s): {', '.join(paths)})"
    token = match.group(1)
    for path in paths:
        try:
            with open(path, errors="replace") as file:
                for number, line in enumerate(file, 1):
                    if token in re.split(r"[\s,;]+", line.strip()):
                        return f" in {path}, line {number}: {line.rstrip()!r}"
        except OSError:
            continue
    return f" (output file(s): {', '.join(paths)})"


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")
