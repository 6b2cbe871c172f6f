"""GPU-scale memory without a GPU: the allocator peak of one training step or one inference,
counted by helper_code.LiveStorageCounter over FakeTensors (shapes, no data), with the project's
own model, step and optimizer code.

The model, optimizer, trainer and data are built under the counter, one warm-up step creates the
optimizer state, and the peak of the next step is reported with everything alive at its start
(weights, optimizer state, data) included, as torch.cuda.max_memory_allocated would after a reset.
benchmark.py's `memory` section and main.py's `--zo_config compare` both count this way.

main.py's `--plan` and the guard at the start of a CUDA run (both in preflight.py) ask it what fits
a memory budget: step_plan counts a step at the run's settings and searches the largest bp_batch
and batch within the budget, with the GPU allowance of GPU_OVER_SIMULATED on top of the count.
"""
import contextlib
import gc
from types import SimpleNamespace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from Half_Trainer import METHODS, REGISTRY, HalfTrainer
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
    x, y = step_batch(device, batch, num_class, samples)
    return SimpleNamespace(model=model, optimizer=optimizer, scheduler=scheduler, x=x, y=y,
                           trainer=HalfTrainer(model, optimizer, scheduler, step_cfg))


def step_batch(device, batch, num_class, samples=SAMPLES):
    """One batch (x, y) of a counted step."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, NUM_LEADS, 1, samples, generator=g).to(device)
    y = (torch.rand(batch, num_class, generator=g) < 0.2).float().to(device)
    return x, y


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


@contextlib.contextmanager
def step_counter(step_config_at, config, batch, bp_batch, num_class, r, weight_decay, samples=SAMPLES):
    """peak_mb(batch, bp_batch): training_peak_mb of step_config_at(bp_batch) at that batch, for one
    method at several sizes. The model, AdamW's state and FakeTensor's caches are built once, by a
    warm-up step at (batch, bp_batch); each count then frees the last batch and trainer, makes
    those of its sizes and counts one step, everything else alive included: the count of a fresh
    build, at the cost of one step."""
    with FakeTensorMode(), LiveStorageCounter() as counter:
        parts = training_setup(step_config_at(bp_batch), torch.device("cpu"), config, batch, num_class, r,
                               weight_decay, samples)
        parts.trainer.step(parts.x, parts.y, 0, 100)

        def peak_mb(batch_size, micro_batch):
            parts.trainer = parts.x = parts.y = None
            gc.collect()   # a trainer holds itself through its table of steps
            parts.x, parts.y = step_batch(torch.device("cpu"), batch_size, num_class, samples)
            parts.trainer = HalfTrainer(parts.model, parts.optimizer, parts.scheduler, step_config_at(micro_batch))
            counter.reset_peak()
            parts.trainer.step(parts.x, parts.y, 1, 100)
            return counter.peak_bytes / 2**20
        yield peak_mb


def training_peak_mb(step_cfg, config, batch, num_class, r, weight_decay, samples=SAMPLES):
    """Simulated GPU peak (MiB) of one steady-state training step of step_cfg.method."""
    def build():
        parts = training_setup(step_cfg, torch.device("cpu"), config, batch, num_class, r, weight_decay, samples)
        return lambda i: parts.trainer.step(parts.x, parts.y, i, 100)
    return counted_peak(build)["peak_mb"]


# What a real GPU held above the count: torch.cuda.max_memory_allocated / the simulated peak, per
# method, from `python benchmark.py memory --device cuda` on one NVIDIA H200 on 2026-12-01 with the
# benchmark code of commit bb228d5 (docs/benchmarks.md, "Measured on a GPU"). Scratch memory taken
# inside an op (cuBLAS and cuDNN workspaces) is the likely gap. Replace with new measurements.
GPU_OVER_SIMULATED = {"ft": 1.014, "lora_bp": 1.015, "htuning": 1.244, "zo": 1.246, "zo_sign": 1.246}
# methods that take bp_batch (H-Tuning's FO pass, accumulation's micro-batch), as the registry says
MICRO_BATCH_METHODS = tuple(name for name, method in REGISTRY.items() if "bp_batch" in method.reads)
# the plan searches batches up to this; a step that still fits there fits at least this batch
LARGEST_BATCH_SEARCHED = 4096


def gpu_allowance(method):
    """(GPU peak / counted peak, where the ratio comes from): measured on the H200 for the methods
    measured there, else the largest measured ratio, so an unmeasured method is not assumed leaner."""
    if method in GPU_OVER_SIMULATED:
        return GPU_OVER_SIMULATED[method], "H200"
    return max(GPU_OVER_SIMULATED.values()), "assumed"


def largest_fitting(peak_mb_at, budget_mb, low, high, counted=None):
    """The largest n in [low, high] with peak_mb_at(n) <= budget_mb, or None when low does not fit;
    peak_mb_at must not fall as n grows. `counted` ({n: peak}, counts already made) gains every new
    count. Peaks are close to affine in a batch size, so each guess is where the line through the
    two nearest counts meets the budget, then counted; bisection when a guess halves nothing."""
    counted = {} if counted is None else counted

    def fits(n):
        if n not in counted:
            counted[n] = peak_mb_at(n)
        return counted[n] <= budget_mb

    below = max((n for n, peak in counted.items() if low <= n <= high and peak <= budget_mb), default=None)
    if below is None and not fits(low):
        return None
    below = low if below is None else below
    above = min((n for n, peak in counted.items() if below < n <= high and peak > budget_mb), default=None)
    stride, width_before, stepped = 1, None, False
    while below < high and (above is None or above - below > 1):
        if above is None:   # not bracketed yet: along the line (or doubling), by a stride that doubles
            aimed = _line_guess(counted, below, budget_mb) or 2 * below
            guess = min(high, max(aimed, below + stride))
            stride *= 2 if aimed <= below + stride else 1
        else:
            guess = _line_guess(counted, below, budget_mb, above)
            halved = width_before is None or above - below <= width_before / 2
            beside = guess == below + 1 and not stepped   # the line's crossing was just counted: its neighbour decides
            if guess is None or not below < guess < above or not (halved or beside):
                guess = (below + above) // 2
            width_before, stepped = above - below, guess == below + 1
        if fits(guess):
            below = guess
        else:
            above = guess
    return below


def _line_guess(counted, below, budget_mb, above=None):
    """Where the line through the counts at `below` and at `above` (else the nearest count under
    `below`) reaches the budget, at least below + 1; None where there is no rising line."""
    other = above if above is not None else max((n for n in counted if n < below), default=None)
    if other is None or counted[other] == counted[below]:
        return None
    slope = (counted[other] - counted[below]) / (other - below)
    return below + max(1, int((budget_mb - counted[below]) / slope)) if slope > 0 else None


def step_plan(step_config_at, method, config, batch, bp_batch, num_class, r, weight_decay, budget_mb,
              search=True, samples=SAMPLES):
    """What one method's step needs and what fits budget_mb (MiB of a GPU): {peak_mb (counted at batch
    and bp_batch), gpu_ratio, ratio_source, need_mb (the peak with the GPU allowance), fits}, and,
    with `search` or where it does not fit, largest_bp_batch (at batch; MICRO_BATCH_METHODS only)
    and largest_batch (at bp_batch, up to batch_limit); None where even the smallest does not fit.
    step_config_at(bp_batch) is the step's StepConfig (main.step_config). Accumulation's batch is
    not searched: it counts every micro-batch, so a count takes minutes at thousands of samples,
    and the batch adds only its data to the peak."""
    ratio, source = gpu_allowance(method)
    count_budget = budget_mb / ratio
    with step_counter(step_config_at, config, batch, bp_batch, num_class, r, weight_decay, samples) as peak_at:
        peak = peak_at(batch, bp_batch)
        plan = {"peak_mb": peak, "gpu_ratio": ratio, "ratio_source": source, "need_mb": peak * ratio,
                "fits": peak <= count_budget}
        if search or not plan["fits"]:
            plan.update(_largest_sizes(peak_at, method, batch, bp_batch, peak, count_budget))
    return plan


def _largest_sizes(peak_at, method, batch, bp_batch, peak, count_budget):
    """step_plan's search: largest_bp_batch and largest_batch (with its batch_limit) where they apply."""
    plan, micro = {}, method in MICRO_BATCH_METHODS
    if micro:
        plan["largest_bp_batch"] = largest_fitting(lambda b: peak_at(batch, b), count_budget, 1, batch,
                                                   {bp_batch: peak})
    if method != "lora_bp_accum":
        plan["batch_limit"] = max(batch, LARGEST_BATCH_SEARCHED)
        plan["largest_batch"] = largest_fitting(lambda n: peak_at(n, bp_batch), count_budget,
                                                bp_batch if micro else 1, plan["batch_limit"], {batch: peak})
    return plan
