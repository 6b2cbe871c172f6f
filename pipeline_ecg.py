"""Fine-tune a teacher, distil a student: the training loop every run shares.

    python pipeline_ecg.py --finetune_dataset WFDB_PTBXL                      # H-Tuning teacher, then distilled student
    python pipeline_ecg.py --finetune_dataset WFDB_PTBXL --stage teacher --zo_config zo_sign
    python pipeline_ecg.py --finetune_dataset WFDB_PTBXL --stage student \\
        --teacher pretrained_checkpoint/merged_htuning_medium_seed18_WFDB_PTBXL_teacher_0_WFDB_PTBXL_teacher.pt
    python pipeline_ecg.py --finetune_dataset WFDB_PTBXL --stage student --no-distill
    python pipeline_ecg.py --demo --stage teacher --zo_config ft               # on the synthetic demo data
    python pipeline_ecg.py ... --resume                                        # continue an interrupted run

The flags, their defaults (the constants at the top of main.py) and the result files are main.py's.

What varies between runs is only (a) the step, which HalfTrainer.step picks by the method
(H-Tuning, the zeroth-order steps, backprop, a linear probe), (b) which parameters train (the LoRA set,
everything, or the heads), and (c) whether a frozen teacher supplies soft targets. The loop around
it is shared: CutMix-ed batches, validation every `interval` samples, early stopping on 1/mAP, the best
state kept, reload, merge, thresholds on validation, test metrics. runs.py names its files and
holds what a resume restores; model_file.py writes and reads the merged file a finished stage leaves.
"""
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import evaluation
from Half_Trainer import METHODS, HalfTrainer, StepConfig
from helper_code import (NUM_LEADS, PUBLISHED_BACKBONES, PeakMemory, backbone_name, seed_everything, state_digest,
                         warmup_linear_decay)
from model_file import merged_state, model_description, model_from_file, result_to_tensors
from model_src_ecg import (adapter_state_dict, belongs_to_heads, build_model, cutmix, draw_heads, heads_state,
                           load_adapter_state, load_pretrained, mark_trainable, mask_leads)
from runs import Progress, Stage, random_states, restore_random_states

log = logging.getLogger("adagrad_fusion.pipeline_ecg")


@dataclass(frozen=True)
class RunConfig:
    """Everything one fine-tuning stage reads. main.run_config() builds it from main.py's constants."""
    config: str                       # backbone
    step: StepConfig                  # the method and its step's knobs
    r: int                            # LoRA rank (methods that train the LoRA set)
    batch_size: int
    lr: float
    weight_decay: float
    warmup_fraction: float            # of the iterations, linear warm-up; then linear decay to 0
    finetune_epoch: int
    doubled_datasets: tuple           # datasets whose iteration budget is doubled
    interval: int                     # samples (or iterations, by interval_unit) between validations
    interval_unit: str                # "samples" or "iterations"
    patience: int                     # validations without a gain before stopping
    seed: int
    leads: int                        # 12, or a reduced-lead student's 3 or 1
    pretrain: str                     # backbone file prefix
    pretrained: bool
    checkpoint_dir: Path
    result_dir: Path
    run_name: str
    workers: int
    resume: bool                      # continue this run name's files instead of starting over

    @property
    def method(self):
        return self.step.method

    @property
    def trains(self):
        """Which parameters train: "lora", "all" or "heads"."""
        return METHODS[self.method]

    @property
    def rank(self):
        """LoRA rank of the built model: r for the LoRA methods, else 0 (plain layers)."""
        return self.r if self.trains == "lora" else 0


def pretrained_path(checkpoint_dir, pretrain, config):
    return Path(checkpoint_dir) / backbone_name(pretrain, config)


def check_pretrained(path, config):
    """Clear error for a missing backbone: which file, where published ones come from, the way out."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"pretrained checkpoint not found: {path}. Put there {PUBLISHED_BACKBONES}, or pretrain "
            f"one on CODE-15 with `python pipeline_pretrain.py --config {config}`, or start from "
            f"random weights with --no-pretrained")


def build_net(cfg, num_class, positive_probably):
    """The run's backbone, its heads drawn from the run's seed (the same for every method), loaded
    from its CODE-15 checkpoint, with requires_grad set for the method."""
    net = build_model(cfg.config, num_class, r=cfg.rank, positive_probably=positive_probably)
    draw_heads(net, cfg.seed)
    if cfg.pretrained:
        path = pretrained_path(cfg.checkpoint_dir, cfg.pretrain, cfg.config)
        check_pretrained(path, cfg.config)
        load_pretrained(net, path)
    mark_trainable(net, cfg.trains)
    return net


def trained_state(net, trains):
    """A snapshot of what the method changes: every tensor, the adapter state, or the heads."""
    if trains == "lora":
        return adapter_state_dict(net)
    return {k: v for k, v in net.state_dict().items() if trains == "all" or belongs_to_heads(k)}


def load_trained_state(net, trains, state):
    if trains == "lora":
        load_adapter_state(net, state)
    else:
        net.load_state_dict(state, strict=trains == "all")


def iterations(cfg, dataset, train_records):
    """The stage's budget: finetune_epoch epochs of the training split, doubled for some datasets."""
    doubled = 2 if dataset in cfg.doubled_datasets else 1
    return math.ceil(train_records / cfg.batch_size) * cfg.finetune_epoch * doubled


# ---------------------------------------------------------------------------------------------
# The training loop, and what it is made of
# ---------------------------------------------------------------------------------------------
@dataclass
class Training:
    """What a stage trains and everything a resume restores besides the weights."""
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    trainer: HalfTrainer
    cutmix_rng: np.random.Generator
    order: torch.Generator                       # the data order
    progress: Progress = field(default_factory=Progress)
    history: list = field(default_factory=list)
    order_epoch_start: torch.Tensor = None       # `order`'s state at the current epoch's start
    initial_heads_digest: str = ""               # the heads it started from: equal for every method of a seed


def start_training(cfg, data, device, total):
    seed_everything(cfg.seed)
    net = build_net(cfg, data.train.num_classes, data.positive_probably).to(device)
    heads_digest = state_digest(heads_state(net))
    parameters = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = warmup_linear_decay(optimizer, total, cfg.warmup_fraction)
    return Training(net, optimizer, scheduler, HalfTrainer(net, optimizer, scheduler, cfg.step, cfg.seed),
                    np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed),
                    initial_heads_digest=heads_digest)


def resumable_state(training, trains):
    return {"model": trained_state(training.net, trains), "optimizer": training.optimizer.state_dict(),
            "scheduler": training.scheduler.state_dict(), "progress": vars(training.progress),
            "history": training.history,
            "random": random_states(training.cutmix_rng, training.order_epoch_start, training.trainer)}


def resume_training(training, saved, trains, device):
    load_trained_state(training.net, trains, {k: v.to(device) for k, v in saved["model"].items()})
    training.optimizer.load_state_dict(saved["optimizer"])
    training.scheduler.load_state_dict(saved["scheduler"])
    training.progress, training.history = Progress(**saved["progress"]), saved["history"]
    restore_random_states(saved["random"], training.cutmix_rng, training.order, training.trainer)


def validation_due(cfg, progress, batch_samples, total):
    """Whether the loop validates after the step just recorded in `progress`, of `batch_samples`
    samples: at the budget's end, and each time the steps done (interval_unit "iterations") or the
    samples seen ("samples", a partial last batch of an epoch counted as what it holds) reach a
    multiple of `interval`. Counting samples gives every batch size validations (and patience) at
    the same points of the data: at batch 8 an interval of 256 samples is 32 steps, at 32 it is 8."""
    if progress.current == total:
        return True
    if cfg.interval_unit == "iterations":
        return progress.current % cfg.interval == 0
    return progress.samples // cfg.interval > (progress.samples - batch_samples) // cfg.interval


def stopped(progress, cfg, total):
    return progress.current >= total or progress.checks_without_gain >= cfg.patience


def batches(train, cfg, training, total):
    """Training batches, epoch after epoch, each epoch in the order of a fresh permutation. A resumed
    run has `order` rewound to its epoch's start and skips the batches it had done; either way the
    state before the permutation is the epoch's start, which a resumable state saves. Ends when the
    budget is spent or patience runs out."""
    progress = training.progress
    while not stopped(progress, cfg, total):
        training.order_epoch_start = training.order.get_state()
        order = torch.randperm(len(train), generator=training.order)[progress.batch_in_epoch * cfg.batch_size:]
        for batch in torch.utils.data.DataLoader(train, batch_size=cfg.batch_size, sampler=order.tolist(),
                                                 num_workers=cfg.workers):
            yield batch
            if stopped(progress, cfg, total):
                return
        progress.batch_in_epoch = 0


def train_step(training, x, y, teacher, cfg, total, device):
    """CutMix, the teacher's soft targets, lead masking, then the method's step; returns the loss."""
    x, y = cutmix(x.to(device), y.to(device), training.cutmix_rng)
    soft_targets = None
    if teacher is not None:
        with torch.no_grad():
            soft_targets = torch.sigmoid(teacher(x)[1])
    if cfg.leads != NUM_LEADS:
        x = mask_leads(x, cfg.leads)
    loss = training.trainer.step(x, y, training.progress.current, total, soft_targets=soft_targets)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return loss


def validate(training, valid_loader, stage, cfg, device, train_records):
    """Validation mAP; a strict gain keeps the state as the best (early stopping on 1/mAP), no gain
    counts towards patience. Appends the history row."""
    progress = training.progress
    valid_map = evaluation.mean_average_precision(*evaluation.predict(training.net, valid_loader, device, cfg.leads))
    if valid_map > progress.best_map:
        progress.best_map, progress.checks_without_gain = valid_map, 0
        stage.save_best(trained_state(training.net, cfg.trains))
    else:
        progress.checks_without_gain += 1
    coef = training.trainer.last_coef
    training.history.append({"iteration": progress.current,
                             "epoch": round(progress.samples / train_records, 4),
                             "train_loss": progress.loss_sum / progress.loss_count,
                             "valid_map": valid_map, "lr": training.scheduler.get_last_lr()[0],
                             "coef": "" if coef is None else coef, "seconds": progress.elapsed})
    progress.loss_sum, progress.loss_count = 0.0, 0
    return valid_map


def finetune(data, dataset, cfg, device, teacher=None, role="teacher"):
    """Fine-tune one backbone on `data` (an ExperimentData) and score it on its test split.

    teacher: a merged net in inference mode whose sigmoid(main) on the same CutMix-ed batch is
    the soft target (distillation); None trains on the labels alone.
    With cfg.resume, a finished stage of this run name is reloaded and an interrupted one continues
    from its last validation, giving exactly the numbers of an uninterrupted run.
    Returns (result dict: the test metrics of evaluation.evaluate + challenge_score, trainable_num,
    memory (MiB), time (s/iteration), iterations, best_valid_map; the merged net in eval mode).
    """
    stage = Stage(cfg, (data.train.indices, data.valid.indices, data.test.indices), dataset, role,
                  None if teacher is None else merged_state(teacher))
    finished = stage.finished() if cfg.resume else None
    if finished is not None:
        log.info("%s %s: finished earlier, reloading %s", dataset, role, stage.merged)
        result, net, _ = model_from_file(finished, device)
        return result, net
    saved = stage.resumable() if cfg.resume else stage.start_over()
    total = iterations(cfg, dataset, len(data.train))
    training = start_training(cfg, data, device, total)
    if saved is not None:
        resume_training(training, saved, cfg.trains, device)
        log.info("%s %s: resuming %s at iteration %d of %d", dataset, role, stage.resume, training.progress.current,
                 total)
    net, progress = training.net, training.progress
    trainable_num = sum(p.numel() for p in net.parameters() if p.requires_grad)
    log.info("%s %s: %s/%s, %d trainable parameters, %d iterations at lr %g%s", dataset, role, cfg.config,
             cfg.method, trainable_num, total, cfg.lr, ", distilled" if teacher is not None else "")

    valid_loader, test_loader = (torch.utils.data.DataLoader(split, batch_size=cfg.batch_size, num_workers=cfg.workers)
                                 for split in (data.valid, data.test))
    started = time.perf_counter() - progress.elapsed
    bar = tqdm(total=total, initial=progress.current, desc=f"{dataset} {role} {cfg.config}/{cfg.method}", mininterval=1)
    with bar, PeakMemory(device) as peak:
        for x, y in batches(data.train, cfg, training, total):
            step_start = time.perf_counter()
            loss = train_step(training, x, y, teacher, cfg, total, device)
            progress.record(loss, time.perf_counter() - step_start, len(x))
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if validation_due(cfg, progress, len(x), total):
                progress.elapsed = time.perf_counter() - started
                valid_map = validate(training, valid_loader, stage, cfg, device, len(data.train))
                bar.set_postfix(loss=f"{loss:.4f}", val_mAP=f"{valid_map:.2f}", refresh=False)
                stage.write_history(training.history)
                stage.save_resumable(**resumable_state(training, cfg.trains))
    if progress.current < total:
        log.info("%s %s: early stop at iteration %d (no validation gain in %d checks)", dataset, role,
                 progress.current, cfg.patience)

    load_trained_state(net, cfg.trains, stage.load_best(device))
    result, thresholds = score(net, valid_loader, test_loader, data.class_codes, cfg.leads, device)
    result.update(trainable_num=trainable_num, memory=peak.peak_mb,
                  time=progress.step_seconds / max(progress.current, 1), iterations=progress.current,
                  best_valid_map=progress.best_map, initial_heads_digest=training.initial_heads_digest, role=role,
                  config=cfg.config, method=cfg.method, r=cfg.rank, leads=cfg.leads, dataset=dataset,
                  checkpoint=str(stage.merged), history=str(stage.history))
    stage.save_merged(result=result_to_tensors(result), model=model_description(net, cfg, data, thresholds))
    log.info("%s %s: test macro AUROC %.4f, F-beta %.4f, mAP %.2f", dataset, role, result["auc_roc_macro"],
             result["F1score_b"], result["Map_value"])
    return result, net


def score(net, valid_loader, test_loader, class_codes, leads, device):
    """Merge the best state, pick per-class thresholds on validation, score the test split with them.
    Returns (every metric of evaluation.evaluate and the Challenge score, the thresholds)."""
    net.merge_net()
    net.eval()
    thresholds = evaluation.find_thresholds(*evaluation.predict(net, valid_loader, device, leads))
    labels, scores = evaluation.predict(net, test_loader, device, leads)
    result = evaluation.evaluate(labels, scores, thresholds=thresholds)
    result["challenge_score"] = evaluation.challenge_score_or_nan(labels, scores >= thresholds, class_codes)
    return result, thresholds


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
    import main  # the flags and their defaults live there
    main.main(prog="pipeline_ecg.py")
