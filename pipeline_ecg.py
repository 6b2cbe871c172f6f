"""Fine-tuning pipeline: one training loop for every teacher and student run.

What varies between runs is only (a) the step, which HalfTrainer.step picks from `trainer`
(H-Tuning, MeZO, ZO-sign, backprop), (b) which parameters train (LoRA set, or everything for
the fully fine-tuned teacher and the student), and (c) whether a frozen teacher supplies soft
targets. The loop around it is shared: CutMix-ed batches, validation every `interval`, early
stopping on 1/mAP, the best state written atomically, reload, merge, thresholds on validation,
test metrics.
"""
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import evaluation
from Half_Trainer import HalfTrainer
from helper_code import REPO_ROOT, PeakMemory, atomic_path, seed_everything
from model_src_ecg import (adapter_state_dict, build_model, cutmix, load_adapter_state, load_pretrained,
                           mark_only_lora_as_trainable, mask_leads)

log = logging.getLogger("adagrad_fusion.pipeline_ecg")

CHECKPOINT_DIR = REPO_ROOT / "pretrained_checkpoint"
PRETRAIN = "CODE_test"                 # checkpoint prefix: {PRETRAIN}{config}bias_full_checkpoint.pkl
STUDENT_CONFIG = "tinylight"
# tuning name -> HalfTrainer's `trainer`; "FT" trains every parameter with plain backprop
TUNINGS = {"H-Tuning": "ho", "zo": "zo_opt", "zo_sign": "zo_sign_opt", "bp": "bp", "FT": "bp"}
LONG_DATASETS = ("WFDB_Ga", "WFDB_ChapmanShaoxing")   # their iteration budget is doubled
WARMUP_FRACTION = 0.01
WEIGHT_DECAY = 0.01
LR_FULL = 0.001                        # FT teacher and student (the published code prints 0.002, uses 0.001)
ALL_LEADS = 12
PUBLISHED_CHECKPOINTS = "the CODE-15 backbone of that name published with the H-Tuning paper's code (ICML 2025)"


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
    coef: float | None = None                 # None: the schedule 0.99 -> 0.9 at 20%
    leads: int = ALL_LEADS
    pretrain: str = PRETRAIN
    pretrained: bool = True
    checkpoint_dir: Path = CHECKPOINT_DIR
    run_name: str = "run"
    workers: int = 0

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


def loaders(data, cfg):
    if len(data.train) == 0 or len(data.valid) == 0:
        raise ValueError(f"empty split: {len(data.train)} training and {len(data.valid)} validation records; "
                         f"raise finetune_label_ratio or use a larger dataset")
    generator = torch.Generator().manual_seed(cfg.seed)
    train = torch.utils.data.DataLoader(data.train, batch_size=cfg.batch_size, shuffle=True,
                                        num_workers=cfg.workers, generator=generator)
    valid, test = (torch.utils.data.DataLoader(split, batch_size=cfg.batch_size, num_workers=cfg.workers)
                   for split in (data.valid, data.test))
    return train, valid, test


def finetune(data, dataset, cfg, device, teacher=None, role="teacher"):
    """Fine-tune one backbone on `data` (an ExperimentData) and score it on its test split.

    teacher: a merged net in inference mode whose sigmoid(main) on the same CutMix-ed batch is
    the soft target (distillation); None trains on the labels alone.
    Returns (result dict: the test metrics of evaluation.evaluate + trainable_num, memory (MiB), time (s/iteration),
    iterations, best_valid_map; the merged net in eval mode).
    """
    seed_everything(cfg.seed)
    train_loader, valid_loader, test_loader = loaders(data, cfg)
    net = build_net(cfg, data.train.num_classes, data.positive_probably).to(device)
    parameters = [p for p in net.parameters() if p.requires_grad]
    trainable_num = sum(p.numel() for p in parameters)
    total = len(train_loader) * cfg.finetune_epoch * (2 if dataset in LONG_DATASETS else 1)
    optimizer = torch.optim.AdamW(parameters, lr=cfg.learning_rate, weight_decay=WEIGHT_DECAY)
    trainer = HalfTrainer(net, optimizer, warmup_linear_decay(optimizer, total), cfg)
    best_path = Path(cfg.checkpoint_dir) / f"best_{cfg.run_name}_{dataset}_{role}.pt"
    snapshot = (lambda: net.state_dict()) if cfg.full_finetune else (lambda: adapter_state_dict(net))
    rng = np.random.default_rng(cfg.seed)
    log.info("%s %s: %s/%s, %d trainable parameters, %d iterations at lr %g%s", dataset, role, cfg.config,
             cfg.tuning, trainable_num, total, cfg.learning_rate, ", distilled" if teacher is not None else "")

    best_map, valid_map, checks_without_gain, current, step_seconds = -np.inf, None, 0, 0, 0.0
    bar = tqdm(total=total, desc=f"{dataset} {role} {cfg.config}/{cfg.tuning}", mininterval=1)
    net.train()
    with PeakMemory(device) as peak:
        while current < total and checks_without_gain < cfg.patience:
            for x, y in train_loader:
                start = time.perf_counter()
                x, y = cutmix(x.to(device), y.to(device), rng)
                soft_targets = None
                if teacher is not None:
                    with torch.no_grad():
                        soft_targets = torch.sigmoid(teacher(x)[1])
                if cfg.leads != ALL_LEADS:
                    x = mask_leads(x, cfg.leads)
                loss = trainer.step(x, y, current, total, soft_targets=soft_targets)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                step_seconds += time.perf_counter() - start
                current += 1
                bar.update()
                bar.set_postfix(loss=f"{loss:.4f}", val_mAP="-" if valid_map is None else f"{valid_map:.2f}",
                                refresh=False)
                if current % cfg.interval == 0 or current == total:
                    valid_map = mean_average_precision(*predict(net, valid_loader, device, cfg.leads))
                    # early stopping on 1/mAP: a lower 1/mAP is a higher mAP
                    if valid_map > best_map:
                        best_map, checks_without_gain = valid_map, 0
                        with atomic_path(best_path) as tmp:
                            torch.save(snapshot(), tmp)
                    else:
                        checks_without_gain += 1
                if current >= total or checks_without_gain >= cfg.patience:
                    break
    bar.close()
    if current < total:
        log.info("%s %s: early stop at iteration %d (no validation gain in %d checks)", dataset, role, current,
                 cfg.patience)

    best = torch.load(best_path, map_location=device, weights_only=True)
    if cfg.full_finetune:
        net.load_state_dict(best)
    else:
        load_adapter_state(net, best)
    net.merge_net()
    net.eval()
    thresholds = evaluation.find_thresholds(*predict(net, valid_loader, device, cfg.leads))
    result = evaluation.evaluate(*predict(net, test_loader, device, cfg.leads), thresholds=thresholds)
    result.update(trainable_num=trainable_num, memory=peak.peak_mb, time=step_seconds / max(current, 1),
                  iterations=current, best_valid_map=best_map, role=role, config=cfg.config,
                  tuning=cfg.tuning, r=0 if cfg.full_finetune else cfg.r, leads=cfg.leads, dataset=dataset,
                  checkpoint=str(best_path))
    log.info("%s %s: test macro AUROC %.4f, F-beta %.4f, mAP %.2f", dataset, role, result["auc_roc_macro"],
             result["F1score_b"], result["Map_value"])
    return result, net


def run_teacher_and_student(data, dataset, teacher_cfg, student_cfg, device, distill=True):
    """The whole method for one dataset: fine-tune the teacher, then train the student (distilled from the
    merged teacher unless distill=False). Returns the student's result, carrying the teacher's."""
    teacher_result, teacher = finetune(data, dataset, teacher_cfg, device, role="teacher")
    teacher.requires_grad_(False)
    student_result, _ = finetune(data, dataset, student_cfg, device, teacher=teacher if distill else None,
                                 role="student")
    student_result["teacher"] = teacher_result
    return student_result
