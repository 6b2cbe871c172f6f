"""GPU-scale memory without a GPU: the allocator peak of one training step or one inference,
counted by helper_code.LiveStorageCounter over FakeTensors (shapes, no data), with the project's
own model, step and optimizer code.

The model, optimizer, trainer and data are built under the counter, one warm-up step creates the
optimizer state, and the peak of the next step is reported with everything alive at its start
(weights, optimizer state, data) included, as torch.cuda.max_memory_allocated would after a reset.
benchmark.py's `memory` section and main.py's `--zo_config compare` both count this way.
"""
import contextlib
from types import SimpleNamespace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from Half_Trainer import METHODS, HalfTrainer
from helper_code import NUM_LEADS, LiveStorageCounter
from model_src_ecg import build_model, mark_trainable

SAMPLES = 6144


def training_setup(step_cfg, device, config, batch, num_class, r, weight_decay, samples=SAMPLES):
    """What one method trains, built in place on `device`: model (rank r for the LoRA methods),
    AdamW over its trainable parameters, a constant schedule, the trainer, one batch (x, y)."""
    torch.manual_seed(0)
    trains = METHODS[step_cfg.method]
    with device:  # built in place: FakeTensor parameters cannot be moved by Module.to
        model = build_model(config, num_class, r=r if trains == "lora" else 0)
    mark_trainable(model, trains)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                                  weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, NUM_LEADS, 1, samples, generator=g).to(device)
    y = (torch.rand(batch, num_class, generator=g) < 0.2).float().to(device)
    return SimpleNamespace(model=model, optimizer=optimizer, scheduler=scheduler, x=x, y=y,
                           trainer=HalfTrainer(model, optimizer, scheduler, step_cfg))


def inference_setup(config, device, batch, num_class, samples=SAMPLES):
    """infer(i): a no-grad forward of an r=0 model (what a merged LoRA model costs) on `batch` records."""
    with device:
        net = build_model(config, num_class).eval()
    x = torch.randn(batch, NUM_LEADS, 1, samples).to(device)

    def infer(i):
        with torch.no_grad():
            net(x)
    return infer


def counted_peak(build_step, fake=True):
    """{peak_mb, at_start_mb} of the second call of the step that build_step() returns, everything
    alive included. fake=True on FakeTensors (seconds for any size); fake=False on real CPU
    tensors, the same count."""
    with contextlib.ExitStack() as modes:
        if fake:
            modes.enter_context(FakeTensorMode())
        counter = modes.enter_context(LiveStorageCounter())
        step = build_step()
        step(0)
        counter.reset_peak()
        at_start = counter.live_bytes()
        step(1)
        return {"peak_mb": counter.peak_bytes / 2**20, "at_start_mb": at_start / 2**20}


def training_peak_mb(step_cfg, config, batch, num_class, r, weight_decay, samples=SAMPLES):
    """Simulated GPU peak (MiB) of one steady-state training step of step_cfg.method."""
    def build():
        parts = training_setup(step_cfg, torch.device("cpu"), config, batch, num_class, r, weight_decay, samples)
        return lambda i: parts.trainer.step(parts.x, parts.y, i, 100)
    return counted_peak(build)["peak_mb"]
