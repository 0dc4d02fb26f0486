"""ngspice, the SPICE3 circuit simulator, as a numpy function of circuit parameters.

Each call writes the netlist with the parameter values filled in, runs ``ngspice -b`` on it, and
reads the probed waveforms at the requested times, which ngspice's ``meas`` commands interpolate
from its adaptive time steps. Like any SPICE, ngspice reports those to 7 significant digits and
its step control reacts to the parameters: its outputs carry noise of about 1e-7 relative, which
``fd2pytorch``'s noise-aware steps take into account.
"""
from __future__ import annotations

import re
import string
from pathlib import Path

import numpy as np

from .._program import ExternalProgram


def ngspice(netlist: str, parameters, *, analysis: str, probes, times, timeout=60,
            **options) -> ExternalProgram:
    """A circuit as a numpy function ``x -> probes at times``.

    Args:
        netlist: the circuit's element and model lines, with ``{name}`` where a parameter's value
            goes (``R1 in out {R}``, or with a format spec that keeps every digit, ``{R:.17g}``);
            no analysis, control block or ``.end``.
        parameters: the names, in the order of x.
        analysis: the ngspice transient analysis, e.g. ``"tran 10u 2m"``.
        probes: vectors to sample, e.g. ``["v(out)", "i(V1)"]``.
        times: the sample times (seconds).
        options: passed to ExternalProgram (workers-friendly: each run has its own directory).

    The result has ``len(probes) * len(times)`` values, probe-major.
    """
    parameters, probes = tuple(parameters), list(probes)
    parsed = [(field, spec) for _, field, spec, _ in string.Formatter().parse(netlist)
              if field is not None]
    fields = {field for field, _ in parsed}
    for field, spec in parsed:  # finite differences perturb the values by 1e-6 relative or less
        if spec and any(abs(float(format(v, spec)) - v) > 1e-12 * abs(v) for v in _DIGITS):
            raise ValueError(f"ngspice: the placeholder {{{field}:{spec}}} rounds the value "
                             f"(1.2345678912345678 prints as {format(_DIGITS[1], spec)}), so "
                             f"finite differences would see steps the circuit never gets and "
                             f"give wrong gradients; write {{{field}}}, or a spec that keeps "
                             f"every digit such as {{{field}:.17g}}")
    if fields != set(parameters):
        raise ValueError(
            f"ngspice: the netlist's placeholders {sorted(fields)} and parameters "
            f"{list(parameters)} must name the same values (a placeholder without a parameter "
            f"has no value; a parameter without a placeholder would get a zero derivative); "
            f"write {{name}} where each parameter's value goes")
    times = [float(t) for t in np.ravel(times)]
    words = analysis.split()
    if not words or words[0].lower() != "tran":  # (ngspice crashed on 'ac ...')
        raise ValueError(f"ngspice: analysis {analysis!r} is not a transient analysis; the "
                         f"probes are sampled at times with 'meas tran', so give one such as "
                         f"'tran 10u 2m' (step, stop time)")
    stop = _spice_number(words[2]) if len(words) >= 3 else None  # (else ngspice says why)
    late = [] if stop is None else [t for t in times if not 0 <= t <= stop]
    if late:
        raise ValueError(f"ngspice: sample times {late} lie outside the analysis "
                         f"'{analysis}', which runs from 0 to {stop:g} s; sample inside it, "
                         f"or lengthen the analysis")
    names = [f"m{i}" for i in range(len(probes) * len(times))]
    measures = [f"meas tran {n} find {probe} at={t!r}"
                for n, (probe, t) in zip(names, ((p, t) for p in probes for t in times))]
    control = "\n".join([analysis, *measures, f"print {' '.join(names)} > output.txt", "quit 0"])

    def write_input(path, x):
        if x.shape != (len(parameters),):
            raise ValueError(f"ngspice: expected {len(parameters)} value(s) for {parameters}, got "
                             f"an array of shape {x.shape}")
        values = {name: float(v) for name, v in zip(parameters, x)}
        with open(path, "w") as file:
            file.write(f"* written by bridges\n{netlist.format(**values)}\n"
                       f".control\n{control}\n.endc\n.end\n")

    def read_output(path):
        found = dict(re.findall(r"^\s*(m\d+)\s*=\s*(\S+)", Path(path).read_text(), re.M))
        missing = [n for n in names if n not in found]
        if missing:
            first = measures[names.index(missing[0])]
            raise ValueError(f"ngspice measured no value for {missing[0]} ({first}): is the time "
                             f"inside the analysis, and the probe a circuit vector?")
        return np.array([float(found[n]) for n in names])

    return ExternalProgram(["ngspice", "-b", "{input}"], write_input=write_input,
                           read_output=read_output, input_name="circuit.cir", timeout=timeout,
                           **{"name": "ngspice", **options})


_SUFFIXES = {"f": 1e-15, "p": 1e-12, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "meg": 1e6,
             "g": 1e9, "t": 1e12}


_DIGITS = (1.2345678912345678e-9, 1.2345678912345678, 1.2345678912345678e9)  # (see ngspice)


def _spice_number(text):
    """A SPICE number with its scale suffix ("2m" = 2e-3, "1meg" = 1e6), or None if unread."""
    match = re.fullmatch(r"([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)(meg|[fpnumkgt])?[a-z]*",
                         text.lower())
    if match is None:
        return None
    return float(match.group(1)) * _SUFFIXES.get(match.group(2), 1.0)
