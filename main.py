"""Run the paper's experiments: fine-tune the teacher, distil the student, write and print results.

    python main.py                                  # H-Tuning teacher + distilled student on the 4 datasets
    python main.py --r 8 --seed 3 --finetune_dataset WFDB_PTBXL
    python main.py --zo_config lora_bp_accum        # or any method: htuning (the default), ft, lora_bp,
                                                    # lora_bp_accum, zo, zo_sign, hizoo, sparse_mezo, fzoo, probe;
                                                    # search (a grid) or compare (several methods, seeds)
    python main.py --seed 18 19 20                  # each seed in turn, then mean ± std over the seeds
    python main.py --demo                           # synthetic data, small backbones, minutes on a CPU
    python main.py ... --resume                     # continue the latest unfinished run of these settings
    python main.py --plan --memory_budget 8GiB      # what fits 8 GiB of GPU, counted per method; no training

The constants below are every default of the experiments, and each is a flag of the same name.
pipeline_ecg.py (one dataset, one stage), pipeline_pretrain.py and datacollection.py take their
flags from here too, so editing a constant changes every script that uses it. Results go to
`result_dir` as `.npy` (a list, one entry per dataset: the student's test metrics with the
teacher's under "teacher") with a JSON beside it; a run never overwrites an earlier one.
"""
import argparse
import importlib
import logging
import re
import shlex
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import report
from ecg_dataset import load_experiment_datasets
from Half_Trainer import ALIASES, BN_RUNNING_STATS, ESTIMATORS, FUSIONS, HEAD_RULES, METHODS, PERTURBATIONS, StepConfig
from helper_code import (CODE15_TRAIN_H5, CODE15_VALID_H5, DATASETS, DEMO_DATASET, REPO_ROOT, FlagParser, float_in,
                         get_device, int_at_least, memory_size, setup_logging)
from model_file import load_merged
from model_src_ecg import KEPT_LEADS, MODEL_CONFIGS
from pipeline_ecg import RunConfig, finetune, pretrained_path, run_teacher_and_student
from pipeline_pretrain import PretrainConfig
from preflight import (PAPER_SCALE, RUN_MODES, check_checkpoints, check_gpu_memory, locate_datasets, memory_plan,
                       prepare_demo, simulated_peaks, teacher_methods, trains_student)
from runs import load_results, open_run, save_results, write_manifest

log = logging.getLogger("adagrad_fusion.main")

# ---- the experiment (defaults of the reported runs) ----
zo_config = "htuning"                # a method (Half_Trainer.METHODS), or search | compare
finetune_dataset = list(DATASETS)    # G12EC, PTB-XL, Ningbo, Chapman-Shaoxing
config = "medium"                    # teacher backbone (pipeline_pretrain.py: the backbone it pretrains)
student_config = "tinylight"
seed = [18]                          # main.py: several run in turn, then mean ± std; other scripts take one
# ---- the step ----
r = 16                               # LoRA rank
bp_batch = 8                         # samples of H-Tuning's first-order pass
zo_eps = 1e-3
q = 1                                # ZO directions per step
aux_weight = 1.0
coef = None                          # H-Tuning's c; None: 0.99 for the first 20% of iterations, then 0.9
head_rule = "whole_batch"            # H-Tuning's heads learn from the whole batch on frozen features, or from bp_batch
fusion = "projection"                # H-Tuning's fusion of FO and ZO: projection (chosen on validation), normalized (paper's), agreement
perturbation_mode = "gaussian"       # z ~ N(0, 1), or rademacher (±1)
gradient_sparsity = None             # fraction of z zeroed (a seeded mask, the same in every use of z)
zo_estimator = "two_point"           # H-Tuning's ZO estimate: two_point, or that of hizoo, sparse_mezo or fzoo
hizoo_smoothing = 1e-6               # HiZOO: weight of each step's Hessian estimate in its moving average
sparse_mezo_sparsity = 0.75          # Sparse MeZO: fraction of each ZO tensor, its largest |w|, left unperturbed
sparse_mezo_interval = 1             # Sparse MeZO: steps between recomputing the magnitude mask
fzoo_directions = 8                  # FZOO: one-sided Rademacher estimates per step (their spread sets the step)
recompute = True                     # every backprop (ft, lora_bp, lora_bp_accum, htuning's FO) recomputes blocks in backward
bn_running_stats = "frozen"          # lora_bp_accum's BatchNorm statistics: frozen (the backbone's) or refreshed (each batch's)
# ---- the schedule ----
batch_size = 128
lr = None                            # teacher; None: ft_lr for ft, else 0.0025 when batch_size > 64, else 0.001
ft_lr = 0.001                        # the fully fine-tuned teacher (the published code prints 0.002, uses 0.001)
student_lr = 0.001
weight_decay = 0.01                  # AdamW
warmup_fraction = 0.01               # linear warm-up over this fraction of the iterations, then linear decay
finetune_epoch = 200
doubled_datasets = ["WFDB_Ga", "WFDB_ChapmanShaoxing"]   # their iteration budget is doubled
interval = 6400                      # training samples between validations (the published 50 iterations of batch 128)
interval_unit = "samples"            # samples: any batch size validates as often; iterations: the published count
patience = 10                        # validations without a gain in mAP before stopping
finetune_label_ratio = 0.1           # the labelled pool; the rest is the test set
# ---- the student ----
leads_for_student = 12               # 12 | 3 (II, V1, V5) | 1 (I)
distill = True                       # --no-distill: the student learns from the labels alone
# ---- backbones, and pretraining them on CODE-15 (pipeline_pretrain.py; the demo) ----
pretrained = True                    # --no-pretrained: start from random weights
pretrain = "CODE_test"               # backbone file prefix: {pretrain}{config}bias_full_checkpoint.pkl
pretrain_epochs = 30
pretrain_batch_size = 64             # per process
pretrain_lr = 0.001
pretrain_patience = 5                # epochs without a validation mAP gain
# ---- search and compare ----
search_zo_eps = [1e-3, 5e-4, 2e-4, 1e-4]
search_bp_batch = [2, 4, 8]
search_r = [4, 8, 16]
compare_methods = ["ft", "lora_bp", "lora_bp_accum", "htuning", "zo", "zo_sign", "hizoo", "sparse_mezo", "fzoo", "probe"]
# ---- will it fit: the memory plan, and the check at the start of a CUDA run ----
plan = False                         # count each method's GPU peak against memory_budget, print what fits; no training
memory_budget = None                 # the plan's GPU memory, in MiB or GiB (8GiB, 7500MiB)
memory_guard = True                  # a CUDA run first checks that its step's simulated peak fits the GPU's free memory
# ---- where files are, and how a run goes ----
data_root = REPO_ROOT / "OriginalData"          # one sub-folder per Challenge dataset
code15_dir = None                               # CODE-15 as downloaded (exams.csv + exams_part*.hdf5)
code15_valid_fraction = 0.1                     # CODE-15 patients held out for validation
preprocessed_dir = REPO_ROOT / "Preprocessed_dataset"
code15_train = None                             # None: preprocessed_dir / CODE15_train_32.hdf5
code15_valid = None                             # None: preprocessed_dir / CODE15_valid_32.hdf5
checkpoint_dir = REPO_ROOT / "pretrained_checkpoint"
result_dir = REPO_ROOT / "result"
demo_dir = REPO_ROOT / "demo"
workers = 0                          # DataLoader worker processes
convert_workers = 8                  # datacollection.py's worker processes (at most the CPU count)
device = None                        # None: cuda when present
demo = False
resume = False
stage = "both"                       # both | teacher | student
teacher = None                       # a finished teacher (merged_*_teacher.pt) to distil from, with --stage student

# ---- the demo: synthetic data under demo_dir, small backbones pretrained on its CODE-15 part ----
# Label ratio 0.2 of the 1,600 demo records: about 256 to train on, 64 to validate, 1,280 to test.
# Validation once per epoch (256 samples), patience the published 10 validations: a third of the budget.
DEMO_SETTINGS = dict(config="tiny", finetune_dataset=[DEMO_DATASET], batch_size=32, finetune_epoch=30,
                     finetune_label_ratio=0.2, interval=256, patience=10, lr=0.004, student_lr=0.002,
                     pretrain_epochs=1, pretrain_batch_size=32, pretrain_lr=0.002, pretrain_patience=1)

# each constant's comment above, shown by --help
CONSTANT_COMMENTS = dict(re.findall(r"^(\w+) = [^#\n]*# (.*)$", Path(__file__).read_text(), re.MULTILINE))
STAGES = ("both", "teacher", "student")
INTERVAL_UNITS = ("samples", "iterations")


# ---------------------------------------------------------------------------------------------
# Flags: one per constant above; each script takes the ones it uses
# ---------------------------------------------------------------------------------------------
EXPERIMENT_FLAGS = (
    "zo_config", "finetune_dataset", "config", "student_config", "seed", "r", "bp_batch", "zo_eps", "q",
    "aux_weight", "coef", "head_rule", "fusion", "perturbation_mode", "gradient_sparsity", "zo_estimator",
    "hizoo_smoothing", "sparse_mezo_sparsity", "sparse_mezo_interval", "fzoo_directions", "recompute",
    "bn_running_stats", "batch_size", "lr", "ft_lr", "student_lr",
    "weight_decay", "warmup_fraction", "finetune_epoch", "doubled_datasets", "interval", "interval_unit", "patience",
    "finetune_label_ratio", "leads_for_student", "distill", "pretrained", "pretrain", "pretrain_epochs",
    "pretrain_batch_size", "pretrain_lr", "pretrain_patience", "preprocessed_dir", "checkpoint_dir", "result_dir",
    "demo_dir", "workers", "device", "demo", "resume", "stage", "teacher")
MEMORY_FLAGS = ("plan", "memory_budget", "memory_guard")
SCRIPT_FLAGS = {
    "main.py": EXPERIMENT_FLAGS + ("search_zo_eps", "search_bp_batch", "search_r", "compare_methods") + MEMORY_FLAGS,
    "pipeline_ecg.py": EXPERIMENT_FLAGS + MEMORY_FLAGS,
    "pipeline_pretrain.py": ("config", "seed", "pretrain_epochs", "pretrain_batch_size", "pretrain_lr",
                             "pretrain_patience", "weight_decay", "warmup_fraction", "aux_weight", "code15_train",
                             "code15_valid", "preprocessed_dir", "pretrain", "checkpoint_dir", "workers", "device"),
    "datacollection.py": ("data_root", "preprocessed_dir", "finetune_dataset", "convert_workers", "code15_dir",
                          "code15_valid_fraction", "seed", "demo", "demo_dir"),
}
# flags that take one value in these scripts (several elsewhere)
ONE_VALUE = {"pipeline_ecg.py": ("finetune_dataset", "seed"), "pipeline_pretrain.py": ("seed",)}
# earlier spellings, still accepted (either way spelled) but not shown
OLD_SPELLINGS = {
    "pipeline_pretrain.py": {"pretrain_epochs": "--epochs", "pretrain_batch_size": "--batch_size",
                             "pretrain_lr": "--lr", "pretrain_patience": "--patience", "code15_train": "--train",
                             "code15_valid": "--valid"},
    "datacollection.py": {"preprocessed_dir": "--out", "finetune_dataset": "--datasets", "convert_workers": "--workers",
                          "code15_dir": "--code15", "code15_valid_fraction": "--valid-fraction"},   # --data-root needs no entry: hyphens read as underscores
}


def method_name(text):
    """argparse type of --zo_config: a method, search or compare; the published spellings are aliases."""
    name = ALIASES.get(text, text)
    if name not in METHODS and name not in RUN_MODES:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from "
                                         f"{', '.join([*METHODS, *RUN_MODES])}; also {', '.join(ALIASES)})")
    return name


def flag_spec(name):
    """argparse keywords of the flag `--name`: type, the values it accepts, and its help."""
    datasets = [*DATASETS, DEMO_DATASET]
    at_least = {"r": 0, "bp_batch": 1, "q": 1, "batch_size": 1, "finetune_epoch": 1, "interval": 1, "patience": 1,
                "pretrain_epochs": 1, "pretrain_batch_size": 1, "pretrain_patience": 1, "workers": 0,
                "convert_workers": 1, "sparse_mezo_interval": 1, "fzoo_directions": 2}
    number_in = {"zo_eps": float_in(0), "aux_weight": float_in(0, low_closed=True),
                 "coef": float_in(0, 1, low_closed=True, high_closed=True),
                 "gradient_sparsity": float_in(0, 1, low_closed=True),
                 "hizoo_smoothing": float_in(0, 1, low_closed=True, high_closed=True),
                 "sparse_mezo_sparsity": float_in(0, 1, low_closed=True), "lr": float_in(0), "ft_lr": float_in(0),
                 "student_lr": float_in(0), "weight_decay": float_in(0, low_closed=True),
                 "warmup_fraction": float_in(0, 1, low_closed=True), "finetune_label_ratio": float_in(0, 1),
                 "pretrain_lr": float_in(0), "code15_valid_fraction": float_in(0, 1)}
    special = {
        "zo_config": dict(type=method_name, metavar="METHOD"),
        "finetune_dataset": dict(nargs="+", choices=datasets),
        "doubled_datasets": dict(nargs="*", choices=datasets),
        "config": dict(choices=list(MODEL_CONFIGS)),
        "student_config": dict(choices=list(MODEL_CONFIGS)),
        "seed": dict(nargs="+", type=int_at_least(0)),
        "perturbation_mode": dict(choices=PERTURBATIONS),
        "head_rule": dict(choices=HEAD_RULES),
        "fusion": dict(choices=FUSIONS),
        "interval_unit": dict(choices=INTERVAL_UNITS),
        "zo_estimator": dict(choices=ESTIMATORS),
        "recompute": dict(action=argparse.BooleanOptionalAction),
        "bn_running_stats": dict(choices=BN_RUNNING_STATS),
        "leads_for_student": dict(type=int, choices=sorted(KEPT_LEADS, reverse=True)),
        "distill": dict(action=argparse.BooleanOptionalAction),
        "pretrained": dict(action=argparse.BooleanOptionalAction),
        "search_zo_eps": dict(nargs="+", type=float_in(0)),
        "search_bp_batch": dict(nargs="+", type=int_at_least(1)),
        "search_r": dict(nargs="+", type=int_at_least(0)),
        "compare_methods": dict(nargs="+", type=method_name, metavar="METHOD"),
        "device": dict(choices=["cpu", "cuda"]),
        "demo": dict(action="store_true"),
        "resume": dict(action="store_true"),
        "stage": dict(choices=STAGES),
        "teacher": dict(type=Path),
        "pretrain": dict(),
        "plan": dict(action="store_true"),
        "memory_budget": dict(type=memory_size, metavar="SIZE"),
        "memory_guard": dict(action=argparse.BooleanOptionalAction),
    }
    if name in at_least:
        spec = dict(type=int_at_least(at_least[name]))
    elif name in number_in:
        spec = dict(type=number_in[name])
    elif name in special:
        spec = dict(special[name])
    else:
        spec = dict(type=Path)
    explained = f"{CONSTANT_COMMENTS.get(name, '')} (default: {globals()[name]})".lstrip()
    return {**spec, "help": explained.replace("%", "%%")}


def build_parser(prog="main.py"):
    """The flags of `prog` (a script's file name); flags not given stay absent from the namespace."""
    parser = FlagParser(prog=prog, description=importlib.import_module(Path(prog).stem).__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS,
                        old_spellings={old: f"--{name}" for name, old in OLD_SPELLINGS.get(prog, {}).items()})
    for name in SCRIPT_FLAGS[prog]:
        spec = flag_spec(name)
        if name in ONE_VALUE.get(prog, ()):
            spec.pop("nargs")
        if name == "zo_config" and prog == "pipeline_ecg.py":
            spec["type"] = one_method
        parser.add_argument(f"--{name}", dest=name, **spec)
    return parser


def one_method(text):
    """argparse type of pipeline_ecg.py's --zo_config: a method (search and compare run from main.py)."""
    name = method_name(text)
    if name in RUN_MODES:
        raise argparse.ArgumentTypeError(f"{name} runs from main.py; here choose a method: {', '.join(METHODS)}")
    return name


def defaults():
    """Every constant above that is a flag, by name."""
    return {name: globals()[name] for names in SCRIPT_FLAGS.values() for name in names}


def settings_from(parser, argv):
    """The constants, then the demo's (with --demo), then the flags given: later wins. Checks what
    no single flag can: bp_batch within the batch, and the stage/teacher combination."""
    given = vars(parser.parse_args(argv))
    settings = {name: globals()[name] for name in SCRIPT_FLAGS[parser.prog]}
    if given.get("demo") and parser.prog != "datacollection.py":
        root = Path(given.get("demo_dir", demo_dir))
        settings.update({k: v for k, v in DEMO_SETTINGS.items() if k in settings},
                        preprocessed_dir=root / "Preprocessed_dataset", checkpoint_dir=root / "pretrained_checkpoint",
                        result_dir=root / "result")
    settings.update(given)
    args = argparse.Namespace(**settings)
    for name in ONE_VALUE.get(parser.prog, ()):  # given: one value; not given: the first default
        setattr(args, name, [given[name]] if name in given else getattr(args, name)[:1])
    if "bp_batch" in settings and args.bp_batch > args.batch_size:
        parser.error(f"argument --bp_batch: must be at most --batch_size ({args.batch_size}), got {args.bp_batch}")
    if "search_bp_batch" in settings and args.zo_config == "search" and max(args.search_bp_batch) > args.batch_size:
        parser.error(f"argument --search_bp_batch: every value must be at most --batch_size ({args.batch_size}), "
                     f"got {max(args.search_bp_batch)}")
    if "teacher" in settings:
        check_stage_flags(parser, args)
    if "zo_estimator" in settings:
        check_step_flags(parser, args, given)
    if "plan" in settings:
        check_memory_flags(parser, args)
    return args


def check_step_flags(parser, args, given):
    """The step's settings together, as StepConfig checks them, but up front and in one line; and
    no flag given that no trained method reads (--coef under fusion projection, --bp_batch for
    lora_bp, --r for ft, a searched setting in a search, ...)."""
    step_cfgs = []
    for method in teacher_methods(args):
        try:
            step_cfgs.append(step_config(**{**vars(args), "zo_config": method}))
        except ValueError as error:
            parser.error(f"argument --zo_config {method}: {error}")
    if args.stage == "student":   # the teacher comes from --teacher or is not used: no step of its runs
        return
    read = set().union(*(cfg.fields_read() for cfg in step_cfgs))
    if any(METHODS[cfg.method] == "lora" for cfg in step_cfgs):
        read.add("r")
    searched = {grid.removeprefix("search_") for grid in SEARCH_GRID} if args.zo_config == "search" else set()
    for name in [*(f.name for f in fields(StepConfig)), "r"]:
        if name in given and (name not in read or name in searched):
            ignoring = (f"a search (--search_{name} sets it)" if name in searched else
                        ", ".join(f"htuning (fusion {cfg.fusion}, zo_estimator {cfg.zo_estimator})"
                                  if cfg.method == "htuning" else cfg.method for cfg in step_cfgs))
            parser.error(f"argument --{name}: has no effect on {ignoring}; leave it out")


def check_memory_flags(parser, args):
    """--plan needs a budget, and a budget is only the plan's (check_step_flags has checked the
    planned methods' steps already)."""
    if args.plan and args.memory_budget is None:
        parser.error("argument --plan: needs --memory_budget, the GPU memory to plan for (8GiB, 7500MiB)")
    if args.memory_budget is not None and not args.plan:
        parser.error("argument --memory_budget: only with --plan (a CUDA run checks against its free memory)")


def check_stage_flags(parser, args):
    if args.teacher is not None and (args.stage != "student" or not args.distill):
        parser.error("argument --teacher: only with --stage student and distillation on")
    if args.stage == "student" and args.distill and args.teacher is None:
        parser.error("argument --teacher: --stage student distils from a merged teacher file "
                     "(merged_*_teacher.pt); name one, or pass --no-distill")
    if args.teacher is not None and (len(args.finetune_dataset) > 1 or len(args.seed) > 1):
        parser.error("argument --teacher: a teacher file belongs to one dataset and seed; give one of each")
    if args.teacher is not None and not Path(args.teacher).is_file():
        parser.error(f"argument --teacher: file not found: {args.teacher}")
    if args.stage != "both" and args.zo_config in RUN_MODES:
        parser.error(f"argument --stage: {args.zo_config} runs both stages")


# ---------------------------------------------------------------------------------------------
# Settings -> the typed configs the libraries read
# ---------------------------------------------------------------------------------------------
def teacher_lr(method, batch_size, lr, ft_lr):
    """lr when given; else ft_lr for full fine-tuning, and the paper's LoRA rule otherwise."""
    if lr is not None:
        return lr
    if method == "ft":
        return ft_lr
    return 0.0025 if batch_size > 64 else 0.001


def step_config(**overrides):
    """The step's settings: the constants above, with overrides (zo_config names the method)."""
    settings = {**defaults(), **overrides}
    return StepConfig(method=ALIASES.get(settings["zo_config"], settings["zo_config"]),
                      **{f.name: settings[f.name] for f in fields(StepConfig) if f.name != "method"})


def first_seed(value):
    return value[0] if isinstance(value, list) else value


def run_config(run_name="run", **overrides):
    """The teacher's RunConfig: the constants above with overrides (the first seed, when several)."""
    s = {**defaults(), **overrides}
    step = step_config(**s)
    return RunConfig(config=s["config"], step=step, r=s["r"], batch_size=s["batch_size"],
                     lr=teacher_lr(step.method, s["batch_size"], s["lr"], s["ft_lr"]),
                     weight_decay=s["weight_decay"], warmup_fraction=s["warmup_fraction"],
                     finetune_epoch=s["finetune_epoch"], doubled_datasets=tuple(s["doubled_datasets"]),
                     interval=s["interval"], interval_unit=s["interval_unit"], patience=s["patience"],
                     seed=first_seed(s["seed"]), leads=12,
                     pretrain=s["pretrain"], pretrained=s["pretrained"], checkpoint_dir=Path(s["checkpoint_dir"]),
                     result_dir=Path(s["result_dir"]), run_name=run_name, workers=s["workers"], resume=s["resume"])


def student_config_of(teacher_cfg, **overrides):
    """The student's RunConfig: the teacher's, fully fine-tuned, with the student's backbone, lr and leads."""
    s = {**defaults(), **overrides}
    return replace(teacher_cfg, config=s["student_config"], step=replace(teacher_cfg.step, method="ft"),
                   lr=s["student_lr"], leads=s["leads_for_student"])


def pretrain_config(**overrides):
    """Pretraining's settings: the constants above, with overrides (the first seed, when several)."""
    s = {**defaults(), **overrides}
    return PretrainConfig(config=s["config"], epochs=s["pretrain_epochs"], batch_size=s["pretrain_batch_size"],
                          lr=s["pretrain_lr"], patience=s["pretrain_patience"], seed=first_seed(s["seed"]),
                          weight_decay=s["weight_decay"], warmup_fraction=s["warmup_fraction"],
                          aux_weight=s["aux_weight"], workers=s["workers"])


def configs_of(args, run_name, resuming=False, method=None):
    """(teacher's, student's RunConfig) of a run; `method` overrides the teacher's (search, compare)."""
    teacher_cfg = run_config(run_name, **{**vars(args), "resume": resuming, "zo_config": method or args.zo_config})
    return teacher_cfg, student_config_of(teacher_cfg, **vars(args))


# ---------------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------------
def run_prefix(args, *parts):
    """The file-name stem shared by a run's files: the teacher's method and backbone, the student's
    backbone (each where the run trains it), then `parts`."""
    teacher = [args.zo_config, args.config] if args.stage != "student" else []
    student = [args.student_config] if trains_student(args) else []
    return "_".join(["demo"] * args.demo + teacher + student + list(parts))


def run_experiment(args, h5_paths, device):
    """Teacher then student (or one stage) for each dataset; results saved after each dataset."""
    stage_parts = [*args.finetune_dataset, args.stage] if args.stage != "both" else []
    path, resuming = open_run(args.result_dir, run_prefix(args, f"seed{args.seed}", *stage_parts), vars(args),
                              args.resume, also_in=[args.checkpoint_dir])
    teacher_cfg, student_cfg = configs_of(args, path.stem, resuming)
    results = []
    for dataset, h5_path in h5_paths.items():
        data = load_experiment_datasets(h5_path, args.finetune_label_ratio, args.seed)
        result = run_stages(args, data, dataset, teacher_cfg, student_cfg, device)
        results.append(result)
        save_results(path, results)
        print(report.format_table(dataset, report.table_rows(result, args.distill)), flush=True)
    write_manifest(path, vars(args), finished=True)
    log.info("results written to %s and %s", path, path.with_suffix(".json"))
    return results


def run_stages(args, data, dataset, teacher_cfg, student_cfg, device):
    """The stages --stage names: both (the teacher, then the student), the teacher alone, or the
    student alone (distilled from --teacher, or from the labels)."""
    if args.stage == "both":
        return run_teacher_and_student(data, dataset, teacher_cfg, student_cfg, device, distill=args.distill)
    if args.stage == "teacher":
        return finetune(data, dataset, teacher_cfg, device, role="teacher")[0]
    teacher_result, teacher_net = None, None
    if args.distill:
        teacher_result, teacher_net, model = load_merged(args.teacher, device)
        if list(model["class_codes"]) != list(data.class_codes):
            raise SystemExit(f"error: teacher {args.teacher} was trained on classes {model['class_codes']}, but "
                             f"{dataset} has {data.class_codes}")
    result, _ = finetune(data, dataset, student_cfg, device, teacher=teacher_net, role="student")
    if teacher_result is not None:
        result["teacher"] = teacher_result
    return result


SEARCH_GRID = ("search_zo_eps", "search_bp_batch", "search_r")


def run_search(args, h5_paths, device):
    """The hyper-parameter grid for the H-Tuning teacher. It continues the search of the same other
    settings (a grown grid included) from the JSON it saves after every point."""
    settings = {k: v for k, v in vars(args).items() if k not in SEARCH_GRID}
    path, _ = open_run(args.result_dir, run_prefix(args, f"seed{args.seed}"), settings, resume=True,
                       also_in=[args.checkpoint_dir])
    teacher_cfg, _ = configs_of(args, path.stem, method="htuning")
    results = load_results(path)
    done = {(e["dataset"], e["zo_eps"], e["bp_batch"], e["r"]) for e in results}
    if done:
        log.info("search: continuing %s, %d points already done", path.with_suffix(".json"), len(done))
    for dataset, h5_path in h5_paths.items():
        data = None   # loaded on the first point not yet done
        for point in ((e, b, rank) for e in args.search_zo_eps for b in args.search_bp_batch for rank in args.search_r):
            if (dataset, *point) in done:
                continue
            if data is None:
                data = load_experiment_datasets(h5_path, args.finetune_label_ratio, args.seed)
            eps, bp, rank = point
            cfg = replace(teacher_cfg, step=replace(teacher_cfg.step, zo_eps=eps, bp_batch=bp), r=rank)
            result, _ = finetune(data, dataset, cfg, device)
            result.update(zo_eps=eps, bp_batch=bp)
            results.append(result)
            save_results(path, results)
    write_manifest(path, settings, finished=True)
    for dataset in h5_paths:
        rows = [(f"zo_eps={e['zo_eps']:g} bp_batch={e['bp_batch']} r={e['r']}", e)
                for e in results if e["dataset"] == dataset]
        print(report.format_table(dataset, rows), flush=True)
    log.info("search results in %s", path)
    return results


def run_compare(args, h5_paths, device):
    """Fine-tune the teacher with every method of compare_methods on the same split, with the same
    budget, early stopping and evaluation; results saved after each method. Finished methods are
    reloaded on --resume."""
    path, resuming = open_run(args.result_dir, run_prefix(args, f"seed{args.seed}"), vars(args), args.resume,
                              also_in=[args.checkpoint_dir])
    results = []
    for dataset, h5_path in h5_paths.items():
        data = load_experiment_datasets(h5_path, args.finetune_label_ratio, args.seed)
        for method in args.compare_methods:
            teacher_cfg, _ = configs_of(args, f"{path.stem}_{method}", resuming, method=method)
            result, _ = finetune(data, dataset, teacher_cfg, device)
            results.append(result)
            save_results(path, results)
        print(report.format_table(dataset, [(report.describe(e), e) for e in results if e["dataset"] == dataset]),
              flush=True)
    write_manifest(path, vars(args), finished=True)
    log.info("results written to %s and %s", path, path.with_suffix(".json"))
    return results


def resume_command(prog, argv):
    """The command line that continues this run."""
    return shlex.join(["python", prog, *argv, *([] if "--resume" in argv else ["--resume"])])


def one_seed(args, seed_value):
    return argparse.Namespace(**{**vars(args), "seed": seed_value})


def run_main(args, parser, argv):
    """main.py and pipeline_ecg.py: the runs the flags ask for, seed by seed."""
    if args.plan:
        return memory_plan(args, step_config)
    device = get_device(args.device)
    if device.type == "cuda" and args.memory_guard:
        check_gpu_memory(args, step_config, parser, device)
    if args.demo:
        prepare_demo(args, pretrain_config, device)
    h5_paths = locate_datasets(args)
    check_checkpoints(args)
    run = {"search": run_search, "compare": run_compare}.get(args.zo_config, run_experiment)
    try:
        results_by_seed = {s: run(one_seed(args, s), h5_paths, device) for s in args.seed}
    except KeyboardInterrupt:
        log.warning("interrupted: every file written so far is complete. Continue with:\n  %s",
                    resume_command(parser.prog, argv))
        raise SystemExit(130)
    seeds_prefix = run_prefix(args, f"seeds{'-'.join(map(str, args.seed))}")
    if args.zo_config == "compare":
        report.summarise_comparison(args, results_by_seed, simulated_peaks(args, step_config), PAPER_SCALE,
                                    seeds_prefix)
    elif len(results_by_seed) > 1 and args.zo_config != "search":
        report.summarise_seeds(args, results_by_seed, seeds_prefix)
    results = list(results_by_seed.values())
    return results[0] if len(results) == 1 else results_by_seed


def run_pretrain(args, parser):
    """pipeline_pretrain.py: one backbone on CODE-15."""
    from pipeline_pretrain import pretrain_distributed

    if len(args.seed) > 1:
        parser.error("argument --seed: pretraining takes one seed")
    train = args.code15_train or Path(args.preprocessed_dir) / CODE15_TRAIN_H5
    valid = args.code15_valid or Path(args.preprocessed_dir) / CODE15_VALID_H5
    cfg = pretrain_config(**{**vars(args), "seed": args.seed[0]})
    return pretrain_distributed(train, valid, pretrained_path(args.checkpoint_dir, args.pretrain, args.config), cfg,
                                args.device)


def run_convert(args):
    """datacollection.py: Challenge folders, CODE-15, or the synthetic demo data, to HDF5."""
    import os

    import datacollection
    from synthetic_ecg import make_demo

    workers = min(args.convert_workers, os.cpu_count() or 1)
    try:
        if args.demo:
            return make_demo(args.demo_dir, workers=workers)
        if args.code15_dir is not None:
            return datacollection.convert_code15(args.code15_dir, args.preprocessed_dir, args.code15_valid_fraction,
                                                 args.seed[0], workers)
        return datacollection.convert_challenge_folders(Path(args.data_root), args.finetune_dataset,
                                                        args.preprocessed_dir, workers)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}")


def main(argv=None, prog="main.py"):
    """The command line of `prog`: main.py and pipeline_ecg.py return the results list of the run,
    or {seed: results list} for several seeds."""
    setup_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(prog)
    args = settings_from(parser, argv)
    start = time.perf_counter()
    if prog == "pipeline_pretrain.py":
        outcome = run_pretrain(args, parser)
    elif prog == "datacollection.py":
        outcome = run_convert(args)
    else:
        outcome = run_main(args, parser, argv)
    log.info("done in %.1f s", time.perf_counter() - start)
    return outcome


if __name__ == "__main__":
    main()
