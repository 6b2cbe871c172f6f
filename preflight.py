"""Before a run trains anything: will it fit, and are its inputs there.

Will it fit: `--plan` counts each teacher method's GPU peak at the run's settings against
`--memory_budget` and prints what fits; a CUDA run first checks every step it will train against
the GPU's free memory (`--no-memory_guard` skips it). Both count with simulated_memory before any
data is touched, as does the simulated peak `--zo_config compare` reports beside its results.
Are its inputs there: the converted HDF5 of each dataset and each backbone file the run loads, every
missing one named in one message; under --demo, the synthetic data and backbones, made if absent.

main.py calls these with its parsed settings and its own config builders (step_config,
pretrain_config); nothing here imports main.py.
"""
import logging
from pathlib import Path

import report
from ecg_dataset import find_dataset_h5
from helper_code import CHALLENGE_DATA_URL, CODE15_TRAIN_H5, CODE15_VALID_H5, DATASETS, DEMO_DATASET, dataset_classes
from pipeline_ecg import check_pretrained, pretrained_path

log = logging.getLogger("adagrad_fusion.preflight")

RUN_MODES = ("search", "compare")   # --zo_config values that run several methods or settings, teachers only
PAPER_SCALE = dict(config="medium", batch=128, num_class=23)   # the simulated GPU peak of `compare`; bp_batch is the run's


def teacher_methods(args):
    """The methods the run trains its teacher with, and so --plan counts and the flag checks read:
    the run's method, every one of --compare_methods with --zo_config compare, H-Tuning for a search."""
    if args.zo_config == "compare":
        return args.compare_methods
    return ["htuning" if args.zo_config == "search" else args.zo_config]


def trains_student(args):
    """Whether the run distils a student: a search or a comparison trains teachers only."""
    return args.stage != "teacher" and args.zo_config not in RUN_MODES


# ---------------------------------------------------------------------------------------------
# Will it fit: the plan (--plan) and the check at the start of a CUDA run
# ---------------------------------------------------------------------------------------------
def classes_of(datasets):
    """Classes of the largest head the datasets train, from the label facts (no data file read)."""
    return max(len(dataset_classes(dataset)) for dataset in datasets)


def step_plan_of(args, step_config, method, config, budget_mb, search=True, **step_settings):
    """simulated_memory.step_plan of `method` on backbone `config` at the run's batch, bp_batch, rank
    and classes; step_settings override the run's (bp_batch, r). step_config: main.step_config."""
    from simulated_memory import step_plan

    s = {**vars(args), "zo_config": method, **step_settings}
    return step_plan(lambda bp: step_config(**{**s, "bp_batch": bp}), method, config, s["batch_size"],
                     s["bp_batch"], classes_of(s["finetune_dataset"]), s["r"], s["weight_decay"], budget_mb, search)


def memory_plan(args, step_config):
    """--plan: each method's counted peak at the run's settings against --memory_budget, whether it
    fits with the GPU allowance, and the largest bp_batch and batch that fit; printed, nothing trained."""
    from simulated_memory import GPU_OVER_SIMULATED, LARGEST_BATCH_SEARCHED

    plan_by_method = {}
    for method in teacher_methods(args):
        plan_by_method[method] = step_plan_of(args, step_config, method, args.config, args.memory_budget)
        log.info("plan: %s counted", method)
    title = (f"memory plan: {args.memory_budget:g} MiB; {args.config}, batch {args.batch_size}, bp_batch "
             f"{args.bp_batch}, r {args.r}, {classes_of(args.finetune_dataset)} classes")
    notes = [f"counted: one training step's peak, simulated (simulated_memory.py); GPU allowance: measured GPU peak / "
             f"count on one H200 (docs/benchmarks.md) for {', '.join(GPU_OVER_SIMULATED)}, else the largest of those",
             f"largest batch: searched up to {LARGEST_BATCH_SEARCHED} (>= where that still fits); "
             f"lora_bp_accum's batch adds only its data and is not counted"]
    print(report.format_memory_plan(title, plan_by_method, notes), flush=True)
    return plan_by_method


def steps_of_run(args):
    """(method, backbone config, step settings) of every step the run trains, at its largest
    settings: the teacher's (each compared method; the search's largest bp_batch and rank), then
    the student's."""
    steps = []
    if args.stage != "student":
        if args.zo_config == "search":
            steps.append(("htuning", args.config, dict(bp_batch=max(args.search_bp_batch), r=max(args.search_r))))
        else:
            steps += [(method, args.config, {}) for method in teacher_methods(args)]
    if trains_student(args):
        steps.append(("ft", args.student_config, {}))
    return steps


def check_gpu_memory(args, step_config, parser, device):
    """Before anything is made or written: each step of the run, counted with its GPU allowance,
    against the GPU's free memory; one line naming what fits where a step does not (exit 2)."""
    import torch

    free_mb = torch.cuda.mem_get_info(device)[0] / 2**20
    for method, config, step_settings in steps_of_run(args):
        plan = step_plan_of(args, step_config, method, config, free_mb, search=False, **step_settings)
        log.info("memory check: %s on %s needs %.0f MiB of the %.0f MiB free on %s", method, config,
                 plan["need_mb"], free_mb, device)
        if plan["fits"]:
            continue
        fitting = [f"{name} {plan[key]}" for name, key in (("--bp_batch", "largest_bp_batch"),
                                                           ("--batch_size", "largest_batch"))
                   if plan.get(key) is not None]
        parser.error(f"the {method} step on {config} needs {plan['need_mb']:.0f} MiB ({plan['peak_mb']:.0f} MiB "
                     f"counted x{plan['gpu_ratio']:.3f} GPU allowance) but {device} has {free_mb:.0f} MiB free; "
                     + (f"it fits with at most {' or '.join(fitting)}" if fitting else "no bp_batch or batch fits")
                     + "; --no-memory_guard skips this check")


def simulated_peaks(args, step_config):
    """{method: simulated GPU peak in MiB} of one training step at the paper's scale, each method
    with this run's step settings (the comparison's summary reports them)."""
    from simulated_memory import training_peak_mb

    peaks = {}
    for method in args.compare_methods:
        step_cfg = step_config(**{**vars(args), "zo_config": method})
        peaks[method] = training_peak_mb(step_cfg, PAPER_SCALE["config"], PAPER_SCALE["batch"],
                                         PAPER_SCALE["num_class"], args.r, args.weight_decay)
        log.info("compare: %s holds %.0f MiB at the paper's scale (simulated)", method, peaks[method])
    return peaks


# ---------------------------------------------------------------------------------------------
# Are its inputs there: the data and the backbones a run needs
# ---------------------------------------------------------------------------------------------
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
            f"{', '.join(missing)}. Download the PhysioNet/CinC Challenge 2021 training data ({CHALLENGE_DATA_URL}) "
            f"into OriginalData/ (one folder per dataset: {', '.join(DATASETS)}) and convert it with "
            f"`python datacollection.py --data_root OriginalData --preprocessed_dir {args.preprocessed_dir}`; "
            f"or try the whole pipeline on synthetic data with `python main.py --demo`")
    return found


def backbones_needed(args):
    """The backbone configs this run loads."""
    trains_teacher = args.stage != "student"
    return list(dict.fromkeys([args.config] * trains_teacher + [args.student_config] * trains_student(args)))


def check_checkpoints(args):
    """Every backbone file this run will load, or one message naming each missing one."""
    if not args.pretrained:
        return
    errors = []
    for config_name in backbones_needed(args):
        try:
            check_pretrained(pretrained_path(args.checkpoint_dir, args.pretrain, config_name), config_name)
        except FileNotFoundError as error:
            errors.append(f"error: {error}")
    if errors:
        raise SystemExit("\n".join(errors))


def prepare_demo(args, pretrain_config, device):
    """Demo data (made if absent) and demo backbones (pretrained if absent), all under demo_dir.
    pretrain_config: main.pretrain_config."""
    from pipeline_pretrain import pretrain as pretrain_backbone
    from synthetic_ecg import make_demo

    preprocessed = Path(args.demo_dir) / "Preprocessed_dataset"
    code15_train, code15_valid = preprocessed / CODE15_TRAIN_H5, preprocessed / CODE15_VALID_H5
    if not (code15_train.is_file() and code15_valid.is_file() and list(preprocessed.glob(f"*{DEMO_DATASET}*.hdf5"))):
        log.info("demo: making synthetic data under %s", args.demo_dir)
        made = make_demo(args.demo_dir, seed=0)
        code15_train, code15_valid = made["code15_train"], made["code15_valid"]
    for backbone in backbones_needed(args):
        path = pretrained_path(args.checkpoint_dir, args.pretrain, backbone)
        if path.is_file():
            log.info("demo: reusing %s", path)
            continue
        pretrain_backbone(code15_train, code15_valid, path,
                          pretrain_config(**{**vars(args), "config": backbone, "seed": args.seed[0]}), device)

