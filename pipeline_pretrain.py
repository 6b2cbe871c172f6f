"""Pretrain a named backbone on CODE-15's six labels, on one device or several.

    python pipeline_pretrain.py --config tiny
    torchrun --nproc_per_node=N pipeline_pretrain.py --config medium

Under torchrun every process trains on its DistributedSampler shard (DDP: NCCL on GPUs, gloo on
CPU; SyncBatchNorm on GPUs). Rank 0 alone validates, decides early stopping (broadcast to the
others) and writes `{pretrain}{config}bias_full_checkpoint.pkl`: a plain state_dict without the
auxiliary head (task-specific) and without adapters (r=0), the layout the published backbones
have, which pipeline_ecg loads through model_src_ecg.load_pretrained.
"""
import argparse
import logging
import os
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from Half_Trainer import compute_loss
from helper_code import (REPO_ROOT, FlagParser, atomic_path, float_in, get_device, int_at_least, seed_everything,
                         setup_logging, state_digest)
from datacollection import ECGH5Dataset
from model_src_ecg import MODEL_CONFIGS, build_model
from pipeline_ecg import CHECKPOINT_DIR, PRETRAIN, WEIGHT_DECAY, mean_average_precision, predict, pretrained_path, \
    warmup_linear_decay

log = logging.getLogger("adagrad_fusion.pipeline_pretrain")

CONFIG = "medium"
PREPROCESSED_DIR = REPO_ROOT / "Preprocessed_dataset"
TRAIN_H5 = "CODE15_train_32.hdf5"
VALID_H5 = "CODE15_valid_32.hdf5"
EPOCHS = 30
BATCH_SIZE = 64                       # per process
LR = 0.001
PATIENCE = 5                          # epochs without a validation mAP gain
SEED = 18
AUX_WEIGHT = 1.0


def backbone_state(net):
    """The backbone file's content: everything but the auxiliary head, as plain CPU tensors."""
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()
            if not k.startswith("auxiliary_classifier.")}


def positive_rate(h5_path):
    with h5py.File(h5_path, "r") as f:
        return float(np.mean(f["label_set"][:]))


def pretrain(train_h5, valid_h5, config=CONFIG, out_path=None, epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR,
             patience=PATIENCE, seed=SEED, device=None, workers=0):
    """Train `config` from scratch on CODE-15; returns {best_valid_map, epochs, path}.

    Runs distributed when torch.distributed is initialised (one shard per process), else alone.
    """
    device = device or get_device()
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    out_path = Path(out_path or pretrained_path(CHECKPOINT_DIR, PRETRAIN, config))
    for path in (train_h5, valid_h5):
        if not Path(path).is_file():
            raise FileNotFoundError(f"CODE-15 HDF5 not found: {path}. Convert CODE-15 "
                                    f"(https://zenodo.org/records/4916206) with `python datacollection.py "
                                    f"--code15 DIR`, or make demo data with `python main.py --demo`")
    seed_everything(seed)
    train_set, valid_set = ECGH5Dataset(train_h5), ECGH5Dataset(valid_h5)
    net = build_model(config, train_set.num_classes, r=0, positive_probably=positive_rate(train_h5)).to(device)
    model = net
    sampler = None
    if distributed:
        if device.type == "cuda":
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
        sampler = torch.utils.data.distributed.DistributedSampler(train_set, num_replicas=world, rank=rank,
                                                                  shuffle=True, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=sampler is None,
                                               sampler=sampler, num_workers=workers, generator=generator)
    valid_loader = torch.utils.data.DataLoader(valid_set, batch_size=batch_size, num_workers=workers)
    total = epochs * len(train_loader)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    scheduler = warmup_linear_decay(optimizer, total)
    log.info("rank %d/%d: pretraining %s on %d records (%d per process per epoch), %d epochs, device %s",
             rank, world, config, len(train_set), len(train_loader.sampler), epochs, device)

    best_map, epochs_without_gain, epoch = -np.inf, 0, 0
    bar = tqdm(total=total, desc=f"pretrain {config}", disable=rank != 0, mininterval=1)
    for epoch in range(1, epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            aux, main = model(x)
            loss = compute_loss(aux, main, y, AUX_WEIGHT)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        stop = torch.zeros(1, device=device)
        if rank == 0:
            valid_map = mean_average_precision(*predict(net, valid_loader, device))
            bar.set_postfix(loss=f"{loss.item():.4f}", val_mAP=f"{valid_map:.2f}", refresh=False)
            if valid_map > best_map:
                best_map, epochs_without_gain = valid_map, 0
                with atomic_path(out_path) as tmp:
                    torch.save(backbone_state(net), tmp)
                log.info("rank %d: epoch %d, validation mAP %.2f, wrote %s", rank, epoch, valid_map, out_path)
            else:
                epochs_without_gain += 1
            stop[0] = float(epochs_without_gain >= patience)
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


def build_parser():
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=CONFIG, choices=list(MODEL_CONFIGS), help="backbone to pretrain")
    parser.add_argument("--train", type=Path, default=PREPROCESSED_DIR / TRAIN_H5, help="CODE-15 training HDF5")
    parser.add_argument("--valid", type=Path, default=PREPROCESSED_DIR / VALID_H5, help="CODE-15 validation HDF5")
    parser.add_argument("--pretrain", default=PRETRAIN, help="checkpoint name prefix")
    parser.add_argument("--checkpoint_dir", type=Path, default=CHECKPOINT_DIR, help="where the checkpoint goes")
    parser.add_argument("--epochs", type=int_at_least(1), default=EPOCHS)
    parser.add_argument("--batch_size", type=int_at_least(1), default=BATCH_SIZE, help="per process")
    parser.add_argument("--lr", type=float_in(0), default=LR)
    parser.add_argument("--patience", type=int_at_least(1), default=PATIENCE)
    parser.add_argument("--seed", type=int_at_least(0), default=SEED)
    parser.add_argument("--workers", type=int_at_least(0), default=0, help="DataLoader worker processes")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when present")
    return parser


def main(argv=None):
    setup_logging()
    args = build_parser().parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = get_device(args.device)
    if distributed:
        local_rank = int(os.environ["LOCAL_RANK"])
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    start = time.perf_counter()
    try:
        out = pretrained_path(args.checkpoint_dir, args.pretrain, args.config)
        pretrain(args.train, args.valid, args.config, out, args.epochs, args.batch_size, args.lr, args.patience,
                 args.seed, device, args.workers)
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}")
    finally:
        if distributed:
            dist.destroy_process_group()
    log.info("pretraining took %.1f s", time.perf_counter() - start)


if __name__ == "__main__":
    main()
