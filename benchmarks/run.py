"""Run every benchmark in benchmarks/ (modules named bench_*.py) and write RESULTS.md.

    python -m benchmarks.run [--quick] [--only NAME ...]

Each module defines TITLE and run(quick, plot_dir) -> {"title", "table", "notes", "plots"} (None
in "plots" for a figure not drawn, e.g. without matplotlib).
Numbers are ratios of variants timed side by side in one run: this machine is shared and noisy.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover():
    return sorted(p.stem for p in HERE.glob("bench_*.py"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"subset of {discover()}")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args(argv)
    names = args.only or discover()
    unknown = set(names) - set(discover())
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; available: {discover()}")
    plot_dir = Path(args.output).parent / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)

    import torch
    sections = []
    for name in names:
        print(f"[bench] {name} ...", flush=True)
        start = time.perf_counter()
        module = importlib.import_module(f"benchmarks.{name}")
        try:
            result = module.run(quick=args.quick, plot_dir=plot_dir)
        except Exception as exc:  # one failing benchmark must not hide the others
            result = {"title": getattr(module, "TITLE", name), "table": "",
                      "notes": f"**could not run**: {type(exc).__name__}: {exc}", "plots": []}
        result["seconds"] = time.perf_counter() - start
        result["name"] = name
        sections.append(result)
        print(f"[bench] {name} done in {result['seconds']:.0f} s", flush=True)

    command = f"python -m benchmarks.run{' --quick' if args.quick else ''}"
    header = ["# Benchmark results", "",
              f"Written by `{command}` on {datetime.date.today()} ({platform.machine()}, "
              f"{os.cpu_count()} cores, Python {platform.python_version()}, torch "
              f"{torch.__version__}). Every ratio compares variants timed side by side in the "
              f"same run.", ""]
    texts = {}
    for s in sections:
        origin = f" (run {datetime.date.today()}: `{command} --only {s['name']}`)" \
            if args.only else ""
        lines = [f"## {s['title']}", "",
                 f"`benchmarks/{s['name']}.py`, {s['seconds']:.0f} s{origin}.",
                 "", s["table"], "", s["notes"], ""]
        lines += [f"![{Path(p).stem}](plots/{Path(p).name})" for p in s["plots"] if p] + [""]
        texts[s["name"]] = "\n".join(lines)
    output = Path(args.output)
    if args.only and output.exists():  # keep the other benchmarks' sections as they are
        header, texts = merge(output.read_text(), texts)
    output.write_text("\n".join(header) + "\n" + "\n".join(texts.values()))
    print(f"[bench] wrote {args.output}")


def merge(old: str, new: dict) -> tuple[list, dict]:
    """The old file's header and sections, with the sections in `new` replaced (same place) or
    appended; a section belongs to the benchmark its first line names (`benchmarks/NAME.py`),
    and goes when that file is gone."""
    header, *chunks = re.split(r"^(?=## )", old, flags=re.M)
    sections = {}
    for chunk in chunks:
        found = re.search(r"`benchmarks/(\w+)\.py`", chunk)
        if found and found.group(1) not in discover():
            continue
        sections[found.group(1) if found else chunk[:80]] = chunk.rstrip("\n") + "\n"
    sections.update(new)
    return header.rstrip("\n").split("\n") + [""], sections


if __name__ == "__main__":
    sys.exit(main())
