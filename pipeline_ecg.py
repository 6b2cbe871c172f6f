"""Fine-tune a teacher, distil a student: the training loop every run shares, and its script.

    python pipeline_ecg.py --finetune_dataset WFDB_PTBXL                      # H-Tuning teacher, then distilled student
    python pipeline_ecg.py --finetune_dataset WFDB_PTBXL --stage teacher --zo_config zo_sign
    python pipeline_ecg.py --finetune_dataset WFDB_PTBXL --stage student \\
        --teacher pretrained_checkpoint/merged_evolution_medium_seed18_0_WFDB_PTBXL_teacher.pt
    python pipeline_ecg.py --finetune_dataset WFDB_PTBXL --stage student --no-distill
    python pipeline_ecg.py --demo --stage teacher --zo_config FT               # on the synthetic demo data
    python pipeline_ecg.py ... --resume                                        # continue an interrupted run

The flags, their defaults (the constants at the top of main.py) and the result files are main.py's.

What varies between runs is only (a) the step, which HalfTrainer.step picks from `trainer`
(H-Tuning, MeZO, ZO-sign, backprop), (b) which parameters train (the LoRA set, or everything for
the fully fine-tuned teacher and the student), and (c) whether a frozen teacher supplies soft
targets. The loop around it is shared: CutMix-ed batches, validation every `interval`, early
stopping on 1/mAP, the best state written atomically, reload, merge, thresholds on validation,
test metrics.

Every file a run writes is named by its run name, dataset and role ("teacher" or "student"):
- `best_*.pt` in checkpoint_dir: the best state so far (LoRA: adapters, biases, norm layers, heads);
- `resume_*.pt` in checkpoint_dir: everything needed to continue exactly, rewritten at every
  validation (weights, optimizer, scheduler, counters, every random generator, the history);
- `merged_*.pt` in checkpoint_dir: the finished stage, the merged model and its test result; a
  resumed run reloads it instead of training again, and `--teacher` distils from it;
- `*_history.csv` in result_dir: one row per validation.
"""
import csv
import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import evaluation
from Half_Trainer import HalfTrainer, mixing_coefficient
from helper_code import (REPO_ROOT, PeakMemory, atomic_path, seed_everything, settings_differences, state_digest,
                         to_jsonable)
from model_src_ecg import (adapter_state_dict, build_model, cutmix, load_adapter_state, load_pretrained,
                           mark_only_lora_as_trainable, mask_leads)

log = logging.getLogger("adagrad_fusion.pipeline_ecg")

CHECKPOINT_DIR = REPO_ROOT / "pretrained_checkpoint"
RESULT_DIR = REPO_ROOT / "result"
PRETRAIN = "CODE_test"                 # checkpoint prefix: {PRETRAIN}{config}bias_full_checkpoint.pkl
# tuning name -> HalfTrainer's `trainer`; "FT" trains every parameter with plain backprop
TUNINGS = {"H-Tuning": "ho", "zo": "zo_opt", "zo_sign": "zo_sign_opt", "bp": "bp", "FT": "bp"}
LONG_DATASETS = ("WFDB_Ga", "WFDB_ChapmanShaoxing")   # their iteration budget is doubled
WARMUP_FRACTION = 0.01
WEIGHT_DECAY = 0.01
LR_FULL = 0.001                        # FT teacher and student (the published code prints 0.002, uses 0.001)
ALL_LEADS = 12
PUBLISHED_CHECKPOINTS = "the CODE-15 backbone of that name published with the H-Tuning paper's code (ICML 2025)"
# RunConfig fields that say where a run's files go or how fast it runs, never what it computes
NOT_AFFECTING_RESULTS = ("run_name", "checkpoint_dir", "result_dir", "workers", "resume")
HISTORY_COLUMNS = ("iteration", "train_loss", "valid_map", "lr", "coef", "seconds")


def lora_lr(batch_size):
    """The LoRA teacher's learning rate depends on the batch size."""
    return 0.0025 if batch_size > 64 else 0.001


@dataclass
class RunConfig:
    """Everything one fine-tuning run reads; HalfTrainer reads its step fields from it too."""
    config: str = "medium"
    tuning: str = "H-Tuning"
    r: int = 16
    batch_size: int = 128
    lr: float | None = None                   # None: LR_FULL for FT, lora_lr(batch_size) otherwise
    finetune_epoch: int = 200
    interval: int = 50
    patience: int = 10
    seed: int = 18
    zo_eps: float = 1e-3
    q: int = 1
    bp_batch: int = 8
    aux_weight: float = 1.0
    gradient_sparsity: float | None = None
    perturbation_mode: str = "gaussian"
    coef: float | None = None                 # None: c = 0.99 for the first 20% of iterations, then 0.9
    leads: int = ALL_LEADS
    pretrain: str = PRETRAIN
    pretrained: bool = True
    checkpoint_dir: Path = CHECKPOINT_DIR
    result_dir: Path = RESULT_DIR
    run_name: str = "run"
    workers: int = 0
    resume: bool = False                      # continue from this run name's files instead of starting over

    @property
    def trainer(self):
        return TUNINGS[self.tuning]

    @property
    def full_finetune(self):
        return self.tuning == "FT"

    @property
    def learning_rate(self):
        if self.lr is not None:
            return self.lr
        return LR_FULL if self.full_finetune else lora_lr(self.batch_size)


def pretrained_path(checkpoint_dir, pretrain, config):
    return Path(checkpoint_dir) / f"{pretrain}{config}bias_full_checkpoint.pkl"


def check_pretrained(path, config):
    """Clear error for a missing backbone: which file, where published ones come from, the way out."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"pretrained checkpoint not found: {path}. Put there {PUBLISHED_CHECKPOINTS}, or pretrain "
            f"one on CODE-15 with `python pipeline_pretrain.py --config {config}`, or start from "
            f"random weights with --no-pretrained")


def warmup_linear_decay(optimizer, total, warmup_fraction=WARMUP_FRACTION):
    """Linear warm-up over the first `warmup_fraction` of `total` steps, then linear decay to 0."""
    warmup = max(1, int(warmup_fraction * total))

    def factor(step):
        if step < warmup:
            return step / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def predict(net, loader, device, leads=ALL_LEADS):
    """(labels as float64, sigmoid scores of the main head as float32: the width the net computes
    them in, which the metrics sort fastest) over a loader, as numpy arrays."""
    was_training = net.training
    net.eval()
    labels, scores = [], []
    for x, y in loader:
        x = x.to(device)
        if leads != ALL_LEADS:
            x = mask_leads(x, leads)
        scores.append(torch.sigmoid(net(x)[1]).float().cpu())
        labels.append(y)
    net.train(was_training)
    return torch.cat(labels).double().numpy(), torch.cat(scores).numpy()


def mean_average_precision(labels, scores):
    """Validation criterion: mAP x 100 (0 where no class has a positive, or for a diverged model)."""
    if not np.isfinite(scores).all():
        log.warning("validation scores hold NaN/inf (diverged training?): counted as mAP 0")
        return 0.0
    ap = evaluation.average_precision(labels, scores)
    return float(100 * np.nanmean(ap)) if np.isfinite(ap).any() else 0.0


def build_net(cfg, num_class, positive_probably):
    """The run's backbone, loaded from its CODE-15 checkpoint, with requires_grad set for the run."""
    r = 0 if cfg.full_finetune else cfg.r
    net = build_model(cfg.config, num_class, r=r, positive_probably=positive_probably)
    if cfg.pretrained:
        path = pretrained_path(cfg.checkpoint_dir, cfg.pretrain, cfg.config)
        check_pretrained(path, cfg.config)
        load_pretrained(net, path)
    if cfg.full_finetune:
        net.requires_grad_(True)
    else:
        mark_only_lora_as_trainable(net)
    return net


def eval_loader(split, cfg):
    return torch.utils.data.DataLoader(split, batch_size=cfg.batch_size, num_workers=cfg.workers)


def epoch_loader(train, cfg, order_generator, skip_batches):
    """One epoch in the order of a fresh permutation from `order_generator`, less its first batches:
    a resumed run rewinds the generator to the epoch's start and skips what it had already done."""
    order = torch.randperm(len(train), generator=order_generator)[skip_batches * cfg.batch_size:]
    return torch.utils.data.DataLoader(train, batch_size=cfg.batch_size, sampler=order.tolist(),
                                       num_workers=cfg.workers)


# ---------------------------------------------------------------------------------------------
# A stage's files: settings that must match to reuse them, the finished stage, the resumable state
# ---------------------------------------------------------------------------------------------
class StagePaths(NamedTuple):
    best: Path
    resume: Path
    merged: Path
    history: Path


def stage_paths(cfg, dataset, role):
    key = f"{cfg.run_name}_{dataset}_{role}"
    checkpoints = Path(cfg.checkpoint_dir)
    return StagePaths(checkpoints / f"best_{key}.pt", checkpoints / f"resume_{key}.pt",
                      checkpoints / f"merged_{key}.pt", Path(cfg.result_dir) / f"{key}_history.csv")


def stage_settings(cfg, data, dataset, role, teacher):
    """Everything that decides a stage's numbers: the run's settings, the split, and the teacher."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_AFFECTING_RESULTS}
    split = np.concatenate([data.train.indices, [-1], data.valid.indices, [-1], data.test.indices])
    split_digest = hashlib.sha256(split.astype(np.int64).tobytes()).hexdigest()[:16]
    settings.update(dataset=dataset, role=role, split=split_digest,
                    teacher=None if teacher is None else state_digest(merged_state(teacher)))
    return to_jsonable(settings)


def _usable(path, settings, what):
    """The saved dict at `path` if it exists and was written under `settings`, else None (saying
    why when the file exists but was written under other settings)."""
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved["settings"] != settings:
        log.warning("not using %s %s: written under other settings (%s)", what, path,
                    settings_differences(saved["settings"], settings))
        return None
    return saved


def _result_to_tensors(result):
    return {k: torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v for k, v in result.items()}


def _result_from_tensors(result):
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in result.items()}


def merged_state(net):
    """A merged net's weights without its adapters (folded in, B zeroed): an r=0 model's state dict."""
    return {k: v.detach().cpu() for k, v in net.state_dict().items() if "lora_" not in k}


def save_merged(path, settings, net, config, class_codes, result):
    """The finished stage: the merged model and its test result. The file a later run reloads, and
    that `--teacher` distils from."""
    with atomic_path(path) as tmp:
        torch.save({"settings": settings, "result": _result_to_tensors(result),
                    "model": {"config": config, "num_class": int(net.classifier[1].out_features),
                              "positive_probably": float(net.positive_probably),
                              "class_codes": list(class_codes), "state_dict": merged_state(net)}}, tmp)


def load_merged(path, device):
    """(result, merged net in eval mode, class codes) from a `merged_*.pt` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"merged model not found: {path} (a finished run writes merged_*.pt into its "
                                f"checkpoint_dir)")
    return _from_merged(torch.load(path, map_location="cpu", weights_only=True), device)


def _from_merged(saved, device):
    """(result, merged net in eval mode, class codes) from the dict save_merged wrote."""
    model = saved["model"]
    net = build_model(model["config"], model["num_class"], r=0, positive_probably=model["positive_probably"])
    net.load_state_dict(model["state_dict"])
    net.requires_grad_(False)
    return _result_from_tensors(saved["result"]), net.to(device).eval(), model["class_codes"]


def challenge_score(labels, predictions, class_codes):
    """The Challenge 2021 score of thresholded predictions, or NaN (with the reason logged) where the
    classes are not SNOMED codes of the Challenge table, as in a file converted without them."""
    try:
        return evaluation.challenge_score(labels > 0.5, predictions, class_codes)
    except ValueError as error:
        log.warning("no Challenge 2021 score: %s", error)
        return float("nan")


def write_history(path, rows):
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------
@dataclass
class Progress:
    """The loop's counters; saved with every resumable state."""
    current: int = 0
    best_map: float = -np.inf
    checks_without_gain: int = 0
    step_seconds: float = 0.0           # inside the step only: the reported s/iteration
    elapsed: float = 0.0                # wall seconds of the stage, across resumes
    batch_in_epoch: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0


def _random_states(rng, order_epoch_start, trainer):
    numpy_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cutmix": rng.bit_generator.state, "order": order_epoch_start,
            "trainer": trainer.rng_state(),
            "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]]}


def _restore_random_states(states, rng, order_generator, trainer):
    torch.set_rng_state(states["torch"])
    rng.bit_generator.state = states["cutmix"]
    order_generator.set_state(states["order"])
    trainer.set_rng_state(states["trainer"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def finetune(data, dataset, cfg, device, teacher=None, role="teacher"):
    """Fine-tune one backbone on `data` (an ExperimentData) and score it on its test split.

    teacher: a merged net in inference mode whose sigmoid(main) on the same CutMix-ed batch is
    the soft target (distillation); None trains on the labels alone.
    With cfg.resume, a finished stage of this run name is reloaded and an interrupted one continues
    from its last validation, giving exactly the numbers of an uninterrupted run.
    Returns (result dict: the test metrics of evaluation.evaluate + challenge_score, trainable_num,
    memory (MiB), time (s/iteration), iterations, best_valid_map; the merged net in eval mode).
    """
    paths = stage_paths(cfg, dataset, role)
    settings = stage_settings(cfg, data, dataset, role, teacher)
    if cfg.resume:
        finished = _usable(paths.merged, settings, "finished stage")
        if finished is not None:
            log.info("%s %s: finished earlier, reloading %s", dataset, role, paths.merged)
            result, net, _ = _from_merged(finished, device)
            return result, net
        resumed = _usable(paths.resume, settings, "resumable state")
    else:
        resumed = None
        for stale in (paths.resume, paths.merged):
            stale.unlink(missing_ok=True)

    seed_everything(cfg.seed)
    net = build_net(cfg, data.train.num_classes, data.positive_probably).to(device)
    parameters = [p for p in net.parameters() if p.requires_grad]
    trainable_num = sum(p.numel() for p in parameters)
    total = math.ceil(len(data.train) / cfg.batch_size) * cfg.finetune_epoch * (2 if dataset in LONG_DATASETS else 1)
    optimizer = torch.optim.AdamW(parameters, lr=cfg.learning_rate, weight_decay=WEIGHT_DECAY)
    scheduler = warmup_linear_decay(optimizer, total)
    trainer = HalfTrainer(net, optimizer, scheduler, cfg)
    snapshot = (lambda: net.state_dict()) if cfg.full_finetune else (lambda: adapter_state_dict(net))
    restore = net.load_state_dict if cfg.full_finetune else (lambda state: load_adapter_state(net, state))
    rng = np.random.default_rng(cfg.seed)                       # CutMix
    order_generator = torch.Generator().manual_seed(cfg.seed)   # data order
    progress, history = Progress(), []
    if resumed is not None:
        restore({k: v.to(device) for k, v in resumed["model"].items()})
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        progress, history = Progress(**resumed["progress"]), resumed["history"]
        _restore_random_states(resumed["random"], rng, order_generator, trainer)
        log.info("%s %s: resuming %s at iteration %d of %d", dataset, role, paths.resume, progress.current, total)
    log.info("%s %s: %s/%s, %d trainable parameters, %d iterations at lr %g%s", dataset, role, cfg.config,
             cfg.tuning, trainable_num, total, cfg.learning_rate, ", distilled" if teacher is not None else "")

    valid_loader, test_loader = eval_loader(data.valid, cfg), eval_loader(data.test, cfg)
    order_epoch_start = order_generator.get_state()
    started = time.perf_counter() - progress.elapsed
    bar = tqdm(total=total, initial=progress.current, desc=f"{dataset} {role} {cfg.config}/{cfg.tuning}",
               mininterval=1)
    net.train()
    try:
        with PeakMemory(device) as peak:
            while progress.current < total and progress.checks_without_gain < cfg.patience:
                if progress.batch_in_epoch == 0:
                    order_epoch_start = order_generator.get_state()
                for x, y in epoch_loader(data.train, cfg, order_generator, progress.batch_in_epoch):
                    start = time.perf_counter()
                    x, y = cutmix(x.to(device), y.to(device), rng)
                    soft_targets = None
                    if teacher is not None:
                        with torch.no_grad():
                            soft_targets = torch.sigmoid(teacher(x)[1])
                    if cfg.leads != ALL_LEADS:
                        x = mask_leads(x, cfg.leads)
                    loss = trainer.step(x, y, progress.current, total, soft_targets=soft_targets)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    progress.step_seconds += time.perf_counter() - start
                    progress.current += 1
                    progress.batch_in_epoch += 1
                    progress.loss_sum += loss
                    progress.loss_count += 1
                    bar.update()
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                    if progress.current % cfg.interval == 0 or progress.current == total:
                        valid_map = mean_average_precision(*predict(net, valid_loader, device, cfg.leads))
                        bar.set_postfix(loss=f"{loss:.4f}", val_mAP=f"{valid_map:.2f}", refresh=False)
                        # early stopping on 1/mAP: a lower 1/mAP is a higher mAP
                        if valid_map > progress.best_map:
                            progress.best_map, progress.checks_without_gain = valid_map, 0
                            with atomic_path(paths.best) as tmp:
                                torch.save(snapshot(), tmp)
                        else:
                            progress.checks_without_gain += 1
                        progress.elapsed = time.perf_counter() - started
                        history.append({
                            "iteration": progress.current, "train_loss": progress.loss_sum / progress.loss_count,
                            "valid_map": valid_map, "lr": scheduler.get_last_lr()[0],
                            "coef": (mixing_coefficient(progress.current - 1, total) if cfg.coef is None else cfg.coef)
                            if cfg.trainer == "ho" else "",
                            "seconds": progress.elapsed})
                        progress.loss_sum, progress.loss_count = 0.0, 0
                        write_history(paths.history, history)
                        with atomic_path(paths.resume) as tmp:
                            torch.save({"settings": settings, "model": snapshot(), "optimizer": optimizer.state_dict(),
                                        "scheduler": scheduler.state_dict(), "progress": asdict(progress),
                                        "history": history,
                                        "random": _random_states(rng, order_epoch_start, trainer)}, tmp)
                    if progress.current >= total or progress.checks_without_gain >= cfg.patience:
                        break
                else:
                    progress.batch_in_epoch = 0
    finally:
        bar.close()
    if progress.current < total:
        log.info("%s %s: early stop at iteration %d (no validation gain in %d checks)", dataset, role,
                 progress.current, cfg.patience)

    restore(torch.load(paths.best, map_location=device, weights_only=True))
    net.merge_net()
    net.eval()
    thresholds = evaluation.find_thresholds(*predict(net, valid_loader, device, cfg.leads))
    labels, scores = predict(net, test_loader, device, cfg.leads)
    result = evaluation.evaluate(labels, scores, thresholds=thresholds)
    result["challenge_score"] = challenge_score(labels, scores >= thresholds, data.class_codes)
    result.update(trainable_num=trainable_num, memory=peak.peak_mb,
                  time=progress.step_seconds / max(progress.current, 1), iterations=progress.current,
                  best_valid_map=progress.best_map, role=role, config=cfg.config, tuning=cfg.tuning,
                  r=0 if cfg.full_finetune else cfg.r, leads=cfg.leads, dataset=dataset, checkpoint=str(paths.merged))
    save_merged(paths.merged, settings, net, cfg.config, data.class_codes, result)
    paths.resume.unlink(missing_ok=True)
    log.info("%s %s: test macro AUROC %.4f, F-beta %.4f, mAP %.2f", dataset, role, result["auc_roc_macro"],
             result["F1score_b"], result["Map_value"])
    return result, net


def run_teacher_and_student(data, dataset, teacher_cfg, student_cfg, device, distill=True):
    """The whole method for one dataset: fine-tune the teacher, then train the student (distilled from
    the merged teacher unless distill=False). Returns the student's result, carrying the teacher's."""
    teacher_result, teacher = finetune(data, dataset, teacher_cfg, device, role="teacher")
    teacher.requires_grad_(False)
    student_result, _ = finetune(data, dataset, student_cfg, device, teacher=teacher if distill else None,
                                 role="student")
    student_result["teacher"] = teacher_result
    return student_result


if __name__ == "__main__":
    import main
    main.main(pipeline=True)
