"""Pretrain a named backbone on CODE-15's six labels, on one device or several.

    python pipeline_pretrain.py --config tiny
    torchrun --nproc_per_node=N pipeline_pretrain.py --config medium

Under torchrun every process trains on its DistributedSampler shard (DDP: NCCL on GPUs, gloo on
CPU; SyncBatchNorm on GPUs). Rank 0 alone validates, decides early stopping (broadcast to the
others) and writes `{pretrain}{config}bias_full_checkpoint.pkl`: a plain state_dict without the
auxiliary head (task-specific) and without adapters (r=0), the layout the published backbones
have, which pipeline_ecg loads through model_src_ecg.load_pretrained.
"""
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import evaluation
from ecg_dataset import ECGH5Dataset
from Half_Trainer import compute_loss
from helper_code import CODE15_DATA_URL, atomic_path, get_device, seed_everything, state_digest, warmup_linear_decay
from model_src_ecg import build_model

log = logging.getLogger("adagrad_fusion.pipeline_pretrain")


@dataclass(frozen=True)
class PretrainConfig:
    """What pretraining reads. main.pretrain_config() builds it from main.py's constants."""
    config: str
    epochs: int
    batch_size: int                   # per process
    lr: float
    patience: int                     # epochs without a validation mAP gain
    seed: int
    weight_decay: float
    warmup_fraction: float
    aux_weight: float
    workers: int


def backbone_state(net):
    """The backbone file's content: everything but the auxiliary head, as plain CPU tensors."""
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()
            if not k.startswith("auxiliary_classifier.")}


def positive_rate(h5_path):
    with h5py.File(h5_path, "r") as f:
        return float(np.mean(f["label_set"][:]))


def pretrain(train_h5, valid_h5, out_path, cfg, device):
    """Train `cfg.config` from scratch on CODE-15 and write its backbone file to `out_path`;
    returns {best_valid_map, epochs, path}.

    Runs distributed when torch.distributed is initialised (one shard per process), else alone.
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    out_path = Path(out_path)
    for path in (train_h5, valid_h5):
        if not Path(path).is_file():
            raise FileNotFoundError(f"CODE-15 HDF5 not found: {path}. Convert CODE-15 ({CODE15_DATA_URL}) with "
                                    f"`python datacollection.py --code15_dir DIR`, or make demo data with "
                                    f"`python main.py --demo`")
    seed_everything(cfg.seed)
    train_set, valid_set = ECGH5Dataset(train_h5), ECGH5Dataset(valid_h5)
    net = build_model(cfg.config, train_set.num_classes, r=0, positive_probably=positive_rate(train_h5)).to(device)
    model = net
    sampler = None
    if distributed:
        if device.type == "cuda":
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
        sampler = torch.utils.data.distributed.DistributedSampler(train_set, num_replicas=world, rank=rank,
                                                                  shuffle=True, seed=cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=sampler is None,
                                               sampler=sampler, num_workers=cfg.workers, generator=generator)
    valid_loader = torch.utils.data.DataLoader(valid_set, batch_size=cfg.batch_size, num_workers=cfg.workers)
    total = cfg.epochs * len(train_loader)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = warmup_linear_decay(optimizer, total, cfg.warmup_fraction)
    log.info("rank %d/%d: pretraining %s on %d records (%d per process per epoch), %d epochs, device %s",
             rank, world, cfg.config, len(train_set), len(train_loader.sampler), cfg.epochs, device)

    best_map, epochs_without_gain, epoch = -np.inf, 0, 0
    bar = tqdm(total=total, desc=f"pretrain {cfg.config}", disable=rank != 0, mininterval=1)
    for epoch in range(1, cfg.epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            aux, main = model(x)
            loss = compute_loss(aux, main, y, cfg.aux_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        stop = torch.zeros(1, device=device)
        if rank == 0:
            valid_map = evaluation.mean_average_precision(*evaluation.predict(net, valid_loader, device))
            bar.set_postfix(loss=f"{loss.item():.4f}", val_mAP=f"{valid_map:.2f}", refresh=False)
            if valid_map > best_map:
                best_map, epochs_without_gain = valid_map, 0
                with atomic_path(out_path) as tmp:
                    torch.save(backbone_state(net), tmp)
                log.info("rank %d: epoch %d, validation mAP %.2f, wrote %s", rank, epoch, valid_map, out_path)
            else:
                epochs_without_gain += 1
            stop[0] = float(epochs_without_gain >= cfg.patience)
        if distributed:
            dist.broadcast(stop, src=0)
        if stop.item():
            log.info("rank %d: early stop after epoch %d", rank, epoch)
            break
    bar.close()
    if distributed:
        # BatchNorm running statistics are per process on CPU; give every process rank 0's
        for buffer in net.buffers():
            dist.broadcast(buffer, src=0)
    log.info("rank %d/%d: final parameters sha256 %s", rank, world, state_digest(net.state_dict()))
    return {"best_valid_map": best_map, "epochs": epoch, "path": out_path}


def pretrain_distributed(train_h5, valid_h5, out_path, cfg, device_name=None):
    """pipeline_pretrain.py's run: alone, or one process of several under torchrun."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = get_device(device_name)
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return pretrain(train_h5, valid_h5, out_path, cfg, device)
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}")
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    import main  # the flags and their defaults live there
    main.main(prog="pipeline_pretrain.py")
