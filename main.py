"""Run the paper's experiments: fine-tune the teacher, distil the student, write and print results.

    python main.py                                  # evolution: H-Tuning teacher + distilled student, 4 datasets
    python main.py --r 8 --seed 3 --finetune_dataset WFDB_PTBXL
    python main.py --zo_config FT | purebp | zo | zo_sign | search
    python main.py --seed 18 19 20                  # each seed in turn, then mean ± std over the seeds
    python main.py --demo                           # synthetic data, small backbones, minutes on a CPU
    python main.py ... --resume                     # continue the latest unfinished run of these settings

Every constant below is a flag of the same name; pipeline_ecg.py takes the same flags for one
dataset. Results go to `result_dir` as `.npy` (a list, one entry per dataset: the student's test
metrics with the teacher's under "teacher") with a JSON beside it; a run never overwrites an
earlier one, and a search appends after every grid point.
"""
import argparse
import csv
import json
import logging
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from datacollection import DATASETS, find_dataset_h5, load_experiment_datasets, make_demo
from helper_code import (DEMO_DATASET, REPO_ROOT, FlagParser, atomic_path, float_in, get_device, int_at_least,
                         settings_differences, settings_digest, setup_logging, to_jsonable)
import pipeline_ecg
from model_src_ecg import MODEL_CONFIGS
from pipeline_ecg import (NOT_AFFECTING_RESULTS, RunConfig, check_pretrained, finetune, load_merged, pretrained_path,
                          run_teacher_and_student)

log = logging.getLogger("adagrad_fusion.main")

# ---- experiment defaults (those of the reported runs); each is overridable by --NAME ----
zo_config = "evolution"              # evolution | FT | purebp | zo | zo_sign | search
finetune_dataset = list(DATASETS)    # G12EC, PTB-XL, Ningbo, Chapman-Shaoxing
config = "medium"                    # teacher backbone
student_config = "tinylight"
r = 16
batch_size = 128
lr = None                            # None: 0.0025 when batch_size > 64 else 0.001 (LoRA); 0.001 (FT)
student_lr = 0.001
finetune_epoch = 200
finetune_label_ratio = 0.1
interval = 50
patience = 10
seed = [18]                          # several: run each in turn, then summarise mean ± std
zo_eps = 1e-3
q = 1
bp_batch = 8
aux_weight = 1.0
gradient_sparsity = None
leads_for_student = 12               # 12 | 3 (II, V1, V5) | 1 (I)
distill = True                       # --no-distill: the student learns from the labels alone
pretrained = True                    # --no-pretrained: start from random weights
pretrain = "CODE_test"               # checkpoint prefix: {pretrain}{config}bias_full_checkpoint.pkl
preprocessed_dir = REPO_ROOT / "Preprocessed_dataset"
checkpoint_dir = REPO_ROOT / "pretrained_checkpoint"
result_dir = REPO_ROOT / "result"
search_zo_eps = [1e-3, 5e-4, 2e-4, 1e-4]
search_bp_batch = [2, 4, 8]
search_r = [4, 8, 16]
workers = 0                          # DataLoader worker processes
device = None                        # None: cuda when present
demo = False
resume = False
# pipeline_ecg.py only: which stage to run on its one dataset, and the merged teacher to distil from
stage = "both"                       # both | teacher | student
teacher = None

# ---- the demo: synthetic data under demo_dir, backbones pretrained on its CODE-15 part ----
demo_dir = REPO_ROOT / "demo"
DEMO_SETTINGS = dict(config="tiny", finetune_dataset=[DEMO_DATASET], batch_size=32, finetune_epoch=30,
                     finetune_label_ratio=0.1, interval=8, patience=4, lr=0.004, student_lr=0.002)
DEMO_PRETRAIN = dict(epochs=1, batch_size=32, lr=0.002, patience=1)

MODES = {"evolution": "H-Tuning", "FT": "FT", "purebp": "bp", "zo": "zo", "zo_sign": "zo_sign", "search": "H-Tuning"}
STAGES = ("both", "teacher", "student")
TABLE_FIGURES = (("macro AUROC", "auc_roc_macro", "{:.4f}"), ("F-beta", "F1score_b", "{:.4f}"),
                 ("mAP", "Map_value", "{:.2f}"), ("Challenge", "challenge_score", "{:.4f}"),
                 ("trainable", "trainable_num", "{:,}"),
                 ("peak MiB", "memory", "{:.1f}"), ("s/iter", "time", "{:.3f}"))
SUMMARY_FIGURES = ("auc_roc_macro", "F1score_b", "Map_value", "challenge_score", "memory", "time")
CHALLENGE_DATA = "https://physionet.org/content/challenge-2021/1.0.3/training/"
# settings that say where files go, how fast a run goes, or which run to continue: never its numbers
RUN_LOCATION = ("checkpoint_dir", "result_dir", "demo_dir", "workers", "device", "resume")
SEARCH_GRID_FIELDS = ("zo_eps", "bp_batch", "r")


def build_parser(pipeline=False):
    """One flag per constant above, checked as it is parsed; flags not given are absent from the
    namespace. pipeline=True: pipeline_ecg.py's flags (one dataset, one seed, --stage, --teacher)."""
    parser = FlagParser(prog="pipeline_ecg.py" if pipeline else "main.py",
                        description=pipeline_ecg.__doc__ if pipeline else __doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        argument_default=argparse.SUPPRESS)
    add = parser.add_argument
    modes = [m for m in MODES if not (pipeline and m == "search")]
    add("--zo_config", choices=modes, help=f"mode (default {zo_config})")
    datasets = [*DATASETS, DEMO_DATASET]
    if pipeline:
        add("--finetune_dataset", choices=datasets, help="the dataset to run (default WFDB_Ga)")
        add("--seed", type=int_at_least(0), help=f"default {seed[0]}")
        add("--stage", choices=STAGES, help=f"teacher then student, or one of them (default {stage})")
        add("--teacher", type=Path, help="merged_*.pt of a finished teacher to distil from (with --stage student)")
    else:
        add("--finetune_dataset", nargs="+", choices=datasets, help="datasets to run, in order (default: the four)")
        add("--seed", nargs="+", type=int_at_least(0), help=f"one or more seeds, run in turn (default {seed})")
    add("--config", choices=list(MODEL_CONFIGS), help=f"teacher backbone (default {config})")
    add("--student_config", choices=list(MODEL_CONFIGS), help=f"student backbone (default {student_config})")
    for name, low in (("r", 0), ("batch_size", 1), ("finetune_epoch", 1), ("interval", 1), ("patience", 1),
                      ("q", 1), ("bp_batch", 1), ("workers", 0)):
        add(f"--{name}", type=int_at_least(low), help=f"default {globals()[name]}")
    for name, interval_type in (("lr", float_in(0)), ("student_lr", float_in(0)),
                                ("finetune_label_ratio", float_in(0, 1)), ("zo_eps", float_in(0)),
                                ("aux_weight", float_in(0, low_closed=True)),
                                ("gradient_sparsity", float_in(0, 1, low_closed=True))):
        add(f"--{name}", type=interval_type, help=f"default {globals()[name]}")
    add("--leads_for_student", type=int, choices=[12, 3, 1], help=f"default {leads_for_student}")
    add("--distill", action=argparse.BooleanOptionalAction,
        help="distil the student from the teacher (default on)")
    add("--pretrained", action=argparse.BooleanOptionalAction,
        help="start from CODE-15 backbones (default on)")
    add("--pretrain", help=f"checkpoint name prefix (default {pretrain})")
    for name in ("preprocessed_dir", "checkpoint_dir", "result_dir", "demo_dir"):
        add(f"--{name}", type=Path, help=f"default {globals()[name]}")
    if not pipeline:
        add("--search_zo_eps", nargs="+", type=float_in(0), help=f"search grid (default {search_zo_eps})")
        add("--search_bp_batch", nargs="+", type=int_at_least(1), help=f"search grid (default {search_bp_batch})")
        add("--search_r", nargs="+", type=int_at_least(0), help=f"search grid (default {search_r})")
    add("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    add("--demo", action="store_true", help="synthetic demo data, small backbones pretrained on it; minutes on a CPU")
    add("--resume", action="store_true", help="continue the latest unfinished run with the same settings")
    return parser


def settings_from(parser, argv, pipeline=False):
    """The constants, then the demo's (with --demo), then the flags given: later wins. Checks what
    no single flag can: bp_batch within the batch, and the stage/teacher combination."""
    settings = {a.dest: globals()[a.dest] for a in parser._actions if a.dest != "help"}
    given = vars(parser.parse_args(argv))
    if given.get("demo"):
        root = Path(given.get("demo_dir", demo_dir))
        settings.update(DEMO_SETTINGS, preprocessed_dir=root / "Preprocessed_dataset",
                        checkpoint_dir=root / "pretrained_checkpoint", result_dir=root / "result")
    settings.update(given)
    args = argparse.Namespace(**settings)
    if pipeline:
        args.finetune_dataset = [given.get("finetune_dataset", args.finetune_dataset[0])]
        args.seed = [args.seed] if isinstance(args.seed, int) else args.seed
    if args.bp_batch > args.batch_size:
        parser.error(f"argument --bp_batch: must be at most --batch_size ({args.batch_size}), got {args.bp_batch}")
    if not pipeline and args.zo_config == "search" and max(args.search_bp_batch) > args.batch_size:
        parser.error(f"argument --search_bp_batch: every value must be at most --batch_size ({args.batch_size}), "
                     f"got {max(args.search_bp_batch)}")
    if pipeline:
        if args.teacher is not None and (args.stage != "student" or not args.distill):
            parser.error("argument --teacher: only with --stage student and distillation on")
        if args.stage == "student" and args.distill and args.teacher is None:
            parser.error("argument --teacher: --stage student distils from a merged teacher file "
                         "(merged_*_teacher.pt); name one, or pass --no-distill")
        if args.teacher is not None and not Path(args.teacher).is_file():
            parser.error(f"argument --teacher: file not found: {args.teacher}")
    return args


def run_configs(args, run_name, resuming=False):
    teacher_cfg = RunConfig(config=args.config, tuning=MODES[args.zo_config], r=args.r, batch_size=args.batch_size,
                            lr=args.lr, finetune_epoch=args.finetune_epoch, interval=args.interval,
                            patience=args.patience, seed=args.seed, zo_eps=args.zo_eps, q=args.q,
                            bp_batch=args.bp_batch, aux_weight=args.aux_weight,
                            gradient_sparsity=args.gradient_sparsity, pretrain=args.pretrain,
                            pretrained=args.pretrained, checkpoint_dir=Path(args.checkpoint_dir),
                            result_dir=Path(args.result_dir), run_name=run_name, workers=args.workers,
                            resume=resuming)
    student_cfg = replace(teacher_cfg, config=args.student_config, tuning="FT", lr=args.student_lr,
                          leads=args.leads_for_student)
    return teacher_cfg, student_cfg


def locate_datasets(args):
    """HDF5 path per dataset, or one message naming everything missing and how to get it."""
    found, missing = {}, []
    for dataset in args.finetune_dataset:
        try:
            found[dataset] = find_dataset_h5(args.preprocessed_dir, dataset)
        except FileNotFoundError:
            missing.append(dataset)
    if missing:
        raise SystemExit(
            f"error: no converted HDF5 (class_sepe*_dataset_{{DATASET}}_32.hdf5) in {args.preprocessed_dir} for: "
            f"{', '.join(missing)}. Download the PhysioNet/CinC Challenge 2021 training data ({CHALLENGE_DATA}) "
            f"into OriginalData/ (one folder per dataset: {', '.join(DATASETS)}) and convert it with "
            f"`python datacollection.py --data-root OriginalData --out {args.preprocessed_dir}`; "
            f"or try the whole pipeline on synthetic data with `python main.py --demo`")
    return found


def check_checkpoints(args):
    """Every backbone file this run will load, or one message naming each missing one."""
    if not args.pretrained:
        return
    trains_teacher = getattr(args, "stage", "both") != "student"
    trains_student = args.zo_config != "search" and getattr(args, "stage", "both") != "teacher"
    configs = [args.config] * trains_teacher + [args.student_config] * trains_student
    errors = []
    for config_name in dict.fromkeys(configs):
        try:
            check_pretrained(pretrained_path(args.checkpoint_dir, args.pretrain, config_name), config_name)
        except FileNotFoundError as error:
            errors.append(f"error: {error}")
    if errors:
        raise SystemExit("\n".join(errors))


# ---------------------------------------------------------------------------------------------
# Results: one writer, one table, for main.py and pipeline_ecg.py alike
# ---------------------------------------------------------------------------------------------
def save_results(npy_path, results):
    """The whole list as .npy and JSON beside it, each written atomically (never half-written)."""
    with atomic_path(npy_path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.array(results, dtype=object), allow_pickle=True)
    with atomic_path(npy_path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(to_jsonable(results), indent=1))


def load_results_json(json_path):
    """A results list from the JSON a run wrote (never from the pickled .npy, which could run code):
    lists of numbers back to arrays, and null back to NaN."""
    def restore(value):
        if isinstance(value, dict):
            return {k: restore(v) for k, v in value.items()}
        if isinstance(value, list):
            return np.array([np.nan if v is None else v for v in value], dtype=np.float64)
        return np.nan if value is None else value
    return [restore(entry) for entry in json.loads(json_path.read_text())] if json_path.is_file() else []


def new_result_path(result_dir, stem):
    """`result_dir/stem_N.npy` with the first N not taken: a new run never replaces an old one."""
    result_dir = Path(result_dir)
    result_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    while any((result_dir / f"{stem}_{n}{suffix}").exists() for suffix in (".npy", ".json", ".run.json")):
        n += 1
    return result_dir / f"{stem}_{n}.npy"


def format_table(title, rows, figures=TABLE_FIGURES):
    """rows: [(label, result dict)] -> the printed table under `title`."""
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"== {title} ==", f"{'model':<{width}}" + "".join(f"{name:>13}" for name, _, _ in figures)]
    for label, result in rows:
        lines.append(f"{label:<{width}}" + "".join(f"{fmt.format(result.get(key, np.nan)):>13}"
                                                   for _, key, fmt in figures))
    return "\n".join(lines)


def describe(result):
    return f"{result['role']} {result['config']}/{result['tuning']}" + (
        f" r={result['r']}" if result["r"] else "") + (f" {result['leads']} leads" if result["leads"] != 12 else "")


def table_rows(result, distilled):
    """The printed rows of one dataset's result: the teacher's (when there is one), then its own."""
    rows = [(describe(result["teacher"]), result["teacher"])] if "teacher" in result else []
    suffix = " distilled" if distilled and result["role"] == "student" else ""
    return rows + [(describe(result) + suffix, result)]


# ---------------------------------------------------------------------------------------------
# Runs: a manifest per run, so --resume finds the latest unfinished one with the same settings
# ---------------------------------------------------------------------------------------------
def run_settings(args):
    """Every setting that decides a run's numbers, for one seed."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in RUN_LOCATION}


def open_run(args, prefix):
    """(result path, resuming): the latest unfinished run of `prefix` with these settings when
    --resume finds one, else a new numbered run whose manifest is written at once."""
    settings = run_settings(args)
    digest = settings_digest(settings)
    result_dir = Path(args.result_dir)
    if args.resume:
        unfinished = []
        for manifest in result_dir.glob(f"{prefix}_*.run.json"):
            number = manifest.name[len(prefix) + 1:-len(".run.json")]
            content = json.loads(manifest.read_text())
            if number.isdigit() and not content["finished"]:
                unfinished.append((int(number), content))
        unfinished.sort(key=lambda item: item[0])
        same = [number for number, content in unfinished if content["digest"] == digest]
        if same:
            path = result_dir / f"{prefix}_{same[-1]}.npy"
            log.info("resuming %s", path.with_suffix(".run.json"))
            return path, True
        if unfinished:
            number, content = unfinished[-1]
            log.warning("--resume: %s_%d was run with other settings (%s); starting a new run", prefix, number,
                        settings_differences(content["settings"], to_jsonable(settings)))
        else:
            log.info("--resume: no unfinished run %s_* in %s; starting a new run", prefix, result_dir)
    path = new_result_path(result_dir, prefix)
    write_manifest(path, settings, digest, finished=False)
    return path, False


def write_manifest(path, settings, digest, finished):
    with atomic_path(path.with_suffix(".run.json")) as tmp:
        tmp.write_text(json.dumps({"settings": to_jsonable(settings), "digest": digest, "finished": finished},
                                  indent=1))


def finish_run(path, args):
    settings = run_settings(args)
    write_manifest(path, settings, settings_digest(settings), finished=True)


def run_prefix(args, *parts):
    """The file-name stem shared by a run's files: mode, teacher config, then `parts`."""
    return "_".join([f"{'demo_' if args.demo else ''}{args.zo_config}", args.config, *parts])


def run_experiment(args, h5_paths, device):
    """Teacher then student for each dataset; results appended to the run's file after each dataset."""
    path, resuming = open_run(args, run_prefix(args, f"seed{args.seed}"))
    teacher_cfg, student_cfg = run_configs(args, path.stem, resuming)
    results = []
    for dataset, h5_path in h5_paths.items():
        data = load_experiment_datasets(h5_path, args.finetune_label_ratio, args.seed)
        result = run_teacher_and_student(data, dataset, teacher_cfg, student_cfg, device, distill=args.distill)
        results.append(result)
        save_results(path, results)
        print(format_table(dataset, table_rows(result, args.distill)), flush=True)
    finish_run(path, args)
    log.info("results written to %s and %s", path, path.with_suffix(".json"))
    return results


def run_pipeline(args, h5_paths, device):
    """pipeline_ecg.py: one dataset, one stage (or both), results written as main.py writes them."""
    (dataset, h5_path), = h5_paths.items()
    path, resuming = open_run(args, run_prefix(args, f"seed{args.seed}", dataset, args.stage))
    teacher_cfg, student_cfg = run_configs(args, path.stem, resuming)
    data = load_experiment_datasets(h5_path, args.finetune_label_ratio, args.seed)
    if args.stage == "both":
        result = run_teacher_and_student(data, dataset, teacher_cfg, student_cfg, device, distill=args.distill)
    elif args.stage == "teacher":
        result, _ = finetune(data, dataset, teacher_cfg, device, role="teacher")
    else:
        teacher_result, teacher = None, None
        if args.distill:
            teacher_result, teacher, codes = load_merged(args.teacher, device)
            if list(codes) != list(data.class_codes):
                raise SystemExit(f"error: teacher {args.teacher} was trained on classes {codes}, but {dataset} has "
                                 f"{data.class_codes}")
        result, _ = finetune(data, dataset, student_cfg, device, teacher=teacher, role="student")
        if teacher_result is not None:
            result["teacher"] = teacher_result
    save_results(path, [result])
    print(format_table(dataset, table_rows(result, args.distill)), flush=True)
    finish_run(path, args)
    log.info("results written to %s and %s", path, path.with_suffix(".json"))
    return [result]


def search_settings_digest(args):
    """A short hash of every setting that shapes a search point's result except the grid itself, so
    a search resumes only into a file made with the same settings (a quick trial with fewer epochs
    never passes for the real run), while a grown grid resumes into the same file."""
    teacher_cfg, _ = run_configs(args, "search")
    settings = {k: v for k, v in asdict(teacher_cfg).items() if k not in SEARCH_GRID_FIELDS + NOT_AFFECTING_RESULTS}
    settings["finetune_label_ratio"] = args.finetune_label_ratio
    return settings_digest(settings)


def run_search(args, h5_paths, device):
    """The hyper-parameter grid for the H-Tuning teacher; resumes from the JSON it appends to after
    every point."""
    stem = f"search_{args.config}_seed{args.seed}_{'-'.join(h5_paths)}_{search_settings_digest(args)}"
    teacher_cfg, _ = run_configs(args, stem)
    path = Path(args.result_dir) / f"{stem}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    results = load_results_json(path.with_suffix(".json"))
    done = {(e["dataset"], e["zo_eps"], e["bp_batch"], e["r"]) for e in results}
    if done:
        log.info("search: resuming %s, %d points already done", path.with_suffix(".json"), len(done))
    for dataset, h5_path in h5_paths.items():
        data = None   # loaded on the first point not yet done
        for eps in args.search_zo_eps:
            for bp in args.search_bp_batch:
                for rank in args.search_r:
                    if (dataset, eps, bp, rank) in done:
                        continue
                    if data is None:
                        data = load_experiment_datasets(h5_path, args.finetune_label_ratio, args.seed)
                    cfg = replace(teacher_cfg, zo_eps=eps, bp_batch=bp, r=rank)
                    result, _ = finetune(data, dataset, cfg, device)
                    result.update(zo_eps=eps, bp_batch=bp)
                    results.append(result)
                    save_results(path, results)
    for dataset in h5_paths:
        rows = [(f"zo_eps={e['zo_eps']:g} bp_batch={e['bp_batch']} r={e['r']}", e)
                for e in results if e["dataset"] == dataset]
        print(format_table(dataset, rows), flush=True)
    log.info("search results in %s", path)
    return results


def summarise_seeds(args, results_by_seed):
    """Per dataset, teacher and student: mean ± sample standard deviation over the seeds of each of
    SUMMARY_FIGURES; printed, and written as CSV and JSON beside the runs."""
    rows = []
    for index, dataset in enumerate(args.finetune_dataset):
        for role in ("teacher", "student"):
            entries = [results[index] if role == "student" else results[index].get("teacher")
                       for results in results_by_seed.values()]
            entries = [e for e in entries if e is not None]
            if not entries:
                continue
            row = {"dataset": dataset, "model": describe(entries[0]), "seeds": len(entries)}
            for figure in SUMMARY_FIGURES:
                values = np.array([e[figure] for e in entries], dtype=np.float64)
                row[f"{figure}_mean"] = float(values.mean())
                row[f"{figure}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            rows.append(row)
    seeds = "-".join(str(s) for s in results_by_seed)
    path = new_result_path(args.result_dir, run_prefix(args, f"seeds{seeds}", "summary"))
    with atomic_path(path.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({"seeds": list(results_by_seed), "summary": rows}, indent=1))
    width = max(len(row["model"]) for row in rows) + 2
    lines = [f"== mean ± std over seeds {', '.join(str(s) for s in results_by_seed)} =="]
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        lines.append(f"{dataset:<{width}}" + "".join(f"{name:>20}" for name, key, _ in TABLE_FIGURES
                                                     if key in SUMMARY_FIGURES))
        for row in (row for row in rows if row["dataset"] == dataset):
            lines.append(f"{row['model']:<{width}}" + "".join(
                f"{fmt.format(row[key + '_mean']) + ' ± ' + fmt.format(row[key + '_std']):>20}"
                for _, key, fmt in TABLE_FIGURES if key in SUMMARY_FIGURES))
    print("\n".join(lines), flush=True)
    log.info("seed summary written to %s and %s", path.with_suffix(".csv"), path.with_suffix(".json"))
    return rows


def prepare_demo(args, device):
    """Demo data (made if absent) and demo backbones (pretrained if absent), all under demo_dir."""
    from pipeline_pretrain import pretrain as pretrain_backbone

    preprocessed = Path(args.demo_dir) / "Preprocessed_dataset"
    code15_train, code15_valid = preprocessed / "CODE15_train_32.hdf5", preprocessed / "CODE15_valid_32.hdf5"
    if not (code15_train.is_file() and code15_valid.is_file() and list(preprocessed.glob(f"*{DEMO_DATASET}*.hdf5"))):
        log.info("demo: making synthetic data under %s", args.demo_dir)
        made = make_demo(args.demo_dir, seed=0)
        code15_train, code15_valid = made["code15_train"], made["code15_valid"]
    for backbone in dict.fromkeys((args.config, args.student_config)):
        path = pretrained_path(args.checkpoint_dir, args.pretrain, backbone)
        if path.is_file():
            log.info("demo: reusing %s", path)
            continue
        pretrain_backbone(code15_train, code15_valid, backbone, path, seed=args.seed[0], device=device,
                          **DEMO_PRETRAIN)


def resume_command(prog, argv):
    """The command line that continues this run."""
    return shlex.join(["python", prog, *argv, *([] if "--resume" in argv else ["--resume"])])


def replace_seed(args, one_seed):
    return argparse.Namespace(**{**vars(args), "seed": one_seed})


def main(argv=None, pipeline=False):
    """Returns the results list of the run, or {seed: results list} for several seeds."""
    setup_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(pipeline)
    args = settings_from(parser, argv, pipeline)
    device = get_device(args.device)
    start = time.perf_counter()
    try:
        if args.demo:
            prepare_demo(args, device)
        h5_paths = locate_datasets(args)
        check_checkpoints(args)
        run = run_pipeline if pipeline else run_search if args.zo_config == "search" else run_experiment
        results_by_seed = {s: run(replace_seed(args, s), h5_paths, device) for s in args.seed}
    except KeyboardInterrupt:
        log.warning("interrupted: every file written so far is complete. Continue with:\n  %s",
                    resume_command(parser.prog, argv))
        raise SystemExit(130)
    if len(results_by_seed) > 1 and args.zo_config != "search":
        summarise_seeds(args, results_by_seed)
    log.info("done in %.1f s", time.perf_counter() - start)
    results = list(results_by_seed.values())
    return results[0] if len(results) == 1 else results_by_seed


if __name__ == "__main__":
    main()
