"""Run the paper's experiments: fine-tune the teacher, distil the student, write and print results.

    python main.py                                  # evolution: H-Tuning teacher + distilled student, 4 datasets
    python main.py --r 8 --seed 3 --finetune_dataset WFDB_PTBXL
    python main.py --zo_config FT | purebp | zo | zo_sign | search
    python main.py --demo                           # synthetic data, small backbones, minutes on a CPU

Every constant below is a flag of the same name. Results go to `result_dir` as `.npy` (a list, one
entry per dataset: the student's test metrics with the teacher's under "teacher") with a JSON
beside it; a run never overwrites an earlier one, and a search appends after every grid point.
"""
import argparse
import hashlib
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from datacollection import DATASETS, find_dataset_h5, load_experiment_datasets, make_demo
from helper_code import DEMO_DATASET, REPO_ROOT, atomic_path, get_device, setup_logging
from pipeline_ecg import RunConfig, check_pretrained, finetune, pretrained_path, run_teacher_and_student

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
seed = 18
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

# ---- the demo: synthetic data under demo_dir, backbones pretrained on its CODE-15 part ----
demo_dir = REPO_ROOT / "demo"
DEMO_SETTINGS = dict(config="tiny", finetune_dataset=[DEMO_DATASET], batch_size=32, finetune_epoch=30,
                     finetune_label_ratio=0.1, interval=8, patience=4, lr=0.004, student_lr=0.002)
DEMO_PRETRAIN = dict(epochs=1, batch_size=32, lr=0.002, patience=1)

MODES = {"evolution": "H-Tuning", "FT": "FT", "purebp": "bp", "zo": "zo", "zo_sign": "zo_sign", "search": "H-Tuning"}
TABLE_FIGURES = (("macro AUROC", "auc_roc_macro", "{:.4f}"), ("F-beta", "F1score_b", "{:.4f}"),
                 ("mAP", "Map_value", "{:.2f}"), ("trainable", "trainable_num", "{:,}"),
                 ("peak MiB", "memory", "{:.1f}"), ("s/iter", "time", "{:.3f}"))
CHALLENGE_DATA = "https://physionet.org/content/challenge-2021/1.0.3/training/"


def build_parser():
    """One flag per constant above; flags not given are absent from the parsed namespace."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    add = parser.add_argument
    add("--zo_config", choices=list(MODES), help=f"mode (default {zo_config})")
    add("--finetune_dataset", nargs="+", help="datasets to run, in order (default: the four Challenge sets)")
    add("--config", help=f"teacher backbone (default {config})")
    add("--student_config", help=f"student backbone (default {student_config})")
    for name in ("r", "batch_size", "finetune_epoch", "interval", "patience", "seed", "q", "bp_batch",
                 "workers"):
        add(f"--{name}", type=int, help=f"default {globals()[name]}")
    for name in ("lr", "student_lr", "finetune_label_ratio", "zo_eps", "aux_weight", "gradient_sparsity"):
        add(f"--{name}", type=float, help=f"default {globals()[name]}")
    add("--leads_for_student", type=int, choices=[12, 3, 1], help=f"default {leads_for_student}")
    add("--distill", action=argparse.BooleanOptionalAction, help="distil the student from the teacher (default on)")
    add("--pretrained", action=argparse.BooleanOptionalAction, help="start from CODE-15 backbones (default on)")
    add("--pretrain", help=f"checkpoint name prefix (default {pretrain})")
    for name in ("preprocessed_dir", "checkpoint_dir", "result_dir", "demo_dir"):
        add(f"--{name}", type=Path, help=f"default {globals()[name]}")
    add("--search_zo_eps", nargs="+", type=float, help=f"search grid (default {search_zo_eps})")
    add("--search_bp_batch", nargs="+", type=int, help=f"search grid (default {search_bp_batch})")
    add("--search_r", nargs="+", type=int, help=f"search grid (default {search_r})")
    add("--device", help="cuda or cpu (default: cuda when present)")
    add("--demo", action="store_true", help="synthetic demo data, small backbones pretrained on it; minutes on a CPU")
    return parser


def settings_from(argv):
    """The constants, then the demo's (with --demo), then the flags given: later wins."""
    parser = build_parser()
    settings = {a.dest: globals()[a.dest] for a in parser._actions if a.dest != "help"}
    given = vars(parser.parse_args(argv))
    if given.get("demo"):
        root = Path(given.get("demo_dir", demo_dir))
        settings.update(DEMO_SETTINGS, preprocessed_dir=root / "Preprocessed_dataset",
                        checkpoint_dir=root / "pretrained_checkpoint", result_dir=root / "result")
    settings.update(given)
    return argparse.Namespace(**settings)


def run_configs(args, run_name):
    teacher = RunConfig(config=args.config, tuning=MODES[args.zo_config], r=args.r, batch_size=args.batch_size,
                        lr=args.lr, finetune_epoch=args.finetune_epoch, interval=args.interval,
                        patience=args.patience, seed=args.seed, zo_eps=args.zo_eps, q=args.q,
                        bp_batch=args.bp_batch, aux_weight=args.aux_weight,
                        gradient_sparsity=args.gradient_sparsity, pretrain=args.pretrain,
                        pretrained=args.pretrained, checkpoint_dir=Path(args.checkpoint_dir), run_name=run_name,
                        workers=args.workers)
    student = replace(teacher, config=args.student_config, tuning="FT", lr=args.student_lr,
                      leads=args.leads_for_student)
    return teacher, student


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


def check_checkpoints(args, teacher_cfg, student_cfg, with_student):
    if not args.pretrained:
        return
    errors = []
    for config_name in dict.fromkeys((teacher_cfg.config, student_cfg.config) if with_student else (teacher_cfg.config,)):
        try:
            check_pretrained(pretrained_path(teacher_cfg.checkpoint_dir, teacher_cfg.pretrain, config_name), config_name)
        except FileNotFoundError as error:
            errors.append(f"error: {error}")
    if errors:
        raise SystemExit("\n".join(errors))


def to_jsonable(value):
    """Numbers and arrays as JSON values; NaN (an undefined per-class metric) as null."""
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def save_results(npy_path, results):
    """The whole list as .npy and JSON beside it, each written atomically (never half-written)."""
    with atomic_path(npy_path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.array(results, dtype=object), allow_pickle=True)
    with atomic_path(npy_path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(to_jsonable(results), indent=1))


def load_results(npy_path):
    return list(np.load(npy_path, allow_pickle=True)) if npy_path.is_file() else []


def new_result_path(result_dir, stem):
    """`result_dir/stem_N.npy` with the first N not taken: a new run never replaces an old one."""
    result_dir = Path(result_dir)
    result_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    while (result_dir / f"{stem}_{n}.npy").exists() or (result_dir / f"{stem}_{n}.json").exists():
        n += 1
    return result_dir / f"{stem}_{n}.npy"


def format_table(dataset, rows):
    """rows: [(label, result dict)] -> the printed table of one dataset."""
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"== {dataset} ==", f"{'model':<{width}}" + "".join(f"{name:>13}" for name, _, _ in TABLE_FIGURES)]
    for label, result in rows:
        lines.append(f"{label:<{width}}" + "".join(f"{fmt.format(result[key]):>13}" for _, key, fmt in TABLE_FIGURES))
    return "\n".join(lines)


def describe(result):
    return f"{result['role']} {result['config']}/{result['tuning']}" + (
        f" r={result['r']}" if result["r"] else "") + (f" {result['leads']} leads" if result["leads"] != 12 else "")


def run_experiment(args, h5_paths, device):
    """Teacher then student for each dataset; results appended to a new file after each dataset."""
    path = new_result_path(args.result_dir, f"{'demo_' if args.demo else ''}{args.zo_config}_{args.config}_seed{args.seed}")
    teacher_cfg, student_cfg = run_configs(args, path.stem)
    results = []
    for dataset, h5_path in h5_paths.items():
        data = load_experiment_datasets(h5_path, args.finetune_label_ratio, args.seed)
        result = run_teacher_and_student(data, dataset, teacher_cfg, student_cfg, device, distill=args.distill)
        results.append(result)
        save_results(path, results)
        print(format_table(dataset, [(describe(result["teacher"]), result["teacher"]),
                                     (describe(result) + (" distilled" if args.distill else ""), result)]), flush=True)
    log.info("results written to %s and %s", path, path.with_suffix(".json"))
    return results


SEARCH_GRID_FIELDS = ("zo_eps", "bp_batch", "r")
NOT_AFFECTING_RESULTS = ("run_name", "checkpoint_dir", "workers")


def search_settings_digest(teacher_cfg, finetune_label_ratio):
    """A short hash of every setting that shapes a search point's result except the grid itself, so
    a search resumes only into a file made with the same settings (a quick trial with fewer epochs
    never passes for the real run), while a grown grid resumes into the same file."""
    settings = {k: v for k, v in asdict(teacher_cfg).items() if k not in SEARCH_GRID_FIELDS + NOT_AFFECTING_RESULTS}
    settings["finetune_label_ratio"] = finetune_label_ratio
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_search(args, h5_paths, device):
    """The hyper-parameter grid for the H-Tuning teacher; resumes from its file, appending after every point."""
    teacher_cfg, _ = run_configs(args, "search")
    digest = search_settings_digest(teacher_cfg, args.finetune_label_ratio)
    stem = f"search_{args.config}_seed{args.seed}_{'-'.join(h5_paths)}_{digest}"
    teacher_cfg = replace(teacher_cfg, run_name=stem)
    path = Path(args.result_dir) / f"{stem}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    results = load_results(path)
    done = {(e["dataset"], e["zo_eps"], e["bp_batch"], e["r"]) for e in results}
    if done:
        log.info("search: resuming %s, %d points already done", path, len(done))
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
        pretrain_backbone(code15_train, code15_valid, backbone, path, seed=args.seed, device=device, **DEMO_PRETRAIN)


def main(argv=None):
    setup_logging()
    args = settings_from(argv)
    device = get_device(args.device)
    start = time.perf_counter()
    if args.demo:
        prepare_demo(args, device)
    h5_paths = locate_datasets(args)
    teacher_cfg, student_cfg = run_configs(args, "check")
    check_checkpoints(args, teacher_cfg, student_cfg, with_student=args.zo_config != "search")
    results = (run_search if args.zo_config == "search" else run_experiment)(args, h5_paths, device)
    log.info("done in %.1f s", time.perf_counter() - start)
    return results


if __name__ == "__main__":
    main()
