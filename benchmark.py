"""One entry point for every measurement: `python benchmark.py SECTION [--json FILE]`.

Each section measures the project's code against a plain reference side by side in one run and
returns {method: {figure: value}}; this file prints it as a table and, with --json, writes
{section: {method: {figure: value}}}. Timings are ratios to read within one run, never absolutes
to compare across machines.
"""
import argparse
import json
import logging
from pathlib import Path

from helper_code import setup_logging

log = logging.getLogger("benchmark")

SECTIONS = {}


def section(name):
    """Register a benchmark section under `name`."""
    def register(fn):
        SECTIONS[name] = fn
        return fn
    return register


def print_table(name, results):
    figures = sorted({fig for row in results.values() for fig in row})
    width = max([len(m) for m in results] + [8])
    print(f"\n[{name}]")
    print(f"{'method':<{width}}  " + "  ".join(f"{f:>14}" for f in figures))
    for method, row in results.items():
        cells = [f"{row[f]:>14.4g}" if isinstance(row.get(f), (int, float)) else f"{str(row.get(f, '')):>14}"
                 for f in figures]
        print(f"{method:<{width}}  " + "  ".join(cells))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", help="which measurement to run")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--config", default=None, help="model config (default: per section)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: per section)")
    parser.add_argument("--bp-batch", type=int, default=None, help="FO samples per H-Tuning step")
    parser.add_argument("--records", type=int, default=None, help="records to convert (data section)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (default: per section)")
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    setup_logging()
    args = build_parser().parse_args(argv)
    if args.section not in SECTIONS:
        raise SystemExit(f"unknown section {args.section!r}; choose from: {', '.join(sorted(SECTIONS))}")
    results = SECTIONS[args.section](args)
    print_table(args.section, results)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({args.section: results}, indent=2))
    return results


if __name__ == "__main__":
    main()
