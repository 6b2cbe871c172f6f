"""One entry point for every measurement: `python benchmark.py SECTION [--json FILE]`.

Each section measures the project's code against a plain reference side by side in one run and
returns {method: {figure: value}}; this file prints it as a table and, with --json, writes
{section: {method: {figure: value}}}. Timings are ratios to read within one run, never absolutes
to compare across machines.
"""
import argparse
import json
from pathlib import Path

import bench_data
import bench_inference
import bench_training
from helper_code import setup_logging

# The measurements, by the name the command line takes (bench_*.py hold them; bench_common.py what
# they share)
SECTIONS = {"model": bench_training.model_section, "data": bench_data.data_section,
            "metrics": bench_data.metrics_section, "inference": bench_inference.inference_section,
            "step": bench_training.step_section, "memory": bench_training.memory_section}


def print_table(name, results):
    figures = sorted({fig for row in results.values() for fig in row})
    width = max([len(m) for m in results] + [8])
    print(f"\n[{name}]")
    print(f"{'method':<{width}}  " + "  ".join(f"{f:>14}" for f in figures))
    for method, row in results.items():
        cells = [f"{row[f]:>14.4g}" if isinstance(row.get(f), (int, float)) else f"{str(row.get(f, '')):>14}"
                 for f in figures]
        print(f"{method:<{width}}  " + "  ".join(cells))


def _existing_file(text):
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    return Path(text)


def build_parser():
    from helper_code import FlagParser, int_at_least
    from model_src_ecg import MODEL_CONFIGS

    parser = FlagParser(prog="benchmark.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=list(SECTIONS), help="which measurement to run")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when present")
    parser.add_argument("--config", default=None, choices=list(MODEL_CONFIGS), help="model config (default: per section)")
    parser.add_argument("--student_config", nargs="+", default=None, choices=list(MODEL_CONFIGS),
                        help="student config(s) to compare (inference and memory sections; default tinylight)")
    parser.add_argument("--student_model", nargs="+", default=None, type=_existing_file,
                        metavar="MERGED.pt", help="trained students' merged files: each as deployed, eager, float32 "
                                                  "and int8 ONNX (inference section)")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="intra-op CPU threads (inference section)")
    parser.add_argument("--batch", type=int_at_least(1), default=None, help="batch size (default: per section)")
    parser.add_argument("--bp_batch", type=int_at_least(1), default=None, help="FO samples per H-Tuning step")
    parser.add_argument("--num_class", type=int_at_least(1), default=None,
                        help="classes of the main head (default: per section)")
    parser.add_argument("--records", type=int_at_least(1), default=None, help="records to convert (data section)")
    parser.add_argument("--repeats", type=int_at_least(1), default=None, help="timed repetitions (default: per section)")
    parser.add_argument("--workers", type=int_at_least(1), default=None, help="converter worker processes (data section)")
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data_dir", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def check_flags(parser, args):
    """What no single flag's type can check."""
    if args.batch is not None and args.bp_batch is not None and args.bp_batch > args.batch:
        parser.error(f"argument --bp_batch: must be at most --batch ({args.batch}), got {args.bp_batch}")
    if args.section == "memory" and args.student_config is not None and len(args.student_config) > 1:
        parser.error("argument --student_config: the memory section compares the teacher with one student")
    if args.student_model is not None and args.section != "inference":
        parser.error("argument --student_model: only for the inference section")
    if args.section == "data" and args.records is not None and args.records < bench_data.DATA_MIN_RECORDS:
        parser.error(f"argument --records: the data section needs at least {bench_data.DATA_MIN_RECORDS} (it also "
                     f"converts a quarter of them), got {args.records}")


def main(argv=None):
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    try:
        results = SECTIONS[args.section](args)
    except argparse.ArgumentError as error:   # a flag's value its section found unusable (inference's files)
        parser.error(str(error))
    print_table(args.section, results)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({args.section: results}, indent=2))
    return results


if __name__ == "__main__":
    main()
