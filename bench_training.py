"""benchmark.py's training sections: `model` (forward latency and peak memory of the backbones,
explicit vs fused attention; LoRA's folded vs low-rank path), `step` (time and peak memory of one
training step of each method against the published-style H-Tuning step) and `memory` (every
method's GPU-scale peak, simulated on FakeTensors, and measured on a GPU where there is one).

Each section takes benchmark.py's parsed flags and returns {method: {figure: value}}.
"""
from bench_common import MODEL_NUM_CLASS, MODEL_SAMPLES, log, measure_in_fresh_processes, timed_calls

LORA_RANK = 16


def _model_method_figures(method, device, batch, repeats):
    """One method of the `model` section, measured in this (fresh) process.

    `{config}_{explicit|fused}`: inference forward of an r=0 backbone; peak memory over the first
    forward (later ones reuse freed memory on CPU), time as the median of `repeats` after it.
    `lora_{fold|lowrank}_{linear|conv}_{train|nograd}`: one adapted base-config layer with the
    update folded into the weight (the project's path) versus the low-rank path x@A^T@B^T, as
    forward+backward (FO pass) or as a forward without autograd (the ZO passes).
    """
    import statistics

    import torch
    import torch.nn.functional as F

    from helper_code import PeakMemory
    from model_src_ecg import LoRAConv2d, LoRALinear, build_model

    torch.manual_seed(0)
    if method.startswith("lora_"):
        _, path, kind, mode = method.split("_")
        width = 256  # base config
        if kind == "linear":  # fc1 over batch*96 tokens
            layer = LoRALinear(width, 4 * width, r=LORA_RANK).to(device)
            x = torch.randn(batch, 96, width, device=device, requires_grad=True)
            low_rank = lambda: F.linear(x, layer.weight, layer.bias) + (x @ layer.lora_A.t()) @ layer.lora_B.t()
        else:  # second encoder block's conv2 over its 384 samples
            layer = LoRAConv2d(width, width, (1, 9), r=LORA_RANK, padding=(0, 4)).to(device)
            x = torch.randn(batch, width, 1, 384, device=device, requires_grad=True)
            a = lambda: layer.lora_A.view(LORA_RANK, width, 1, 9)
            b = lambda: layer.lora_B.view(width, LORA_RANK, 1, 1)
            low_rank = lambda: layer.conv(x) + F.conv2d(F.conv2d(x, a(), padding=(0, 4)), b())
        with torch.no_grad():
            layer.lora_B.normal_()
        forward = (lambda: layer(x)) if path == "fold" else low_rank

        def run():
            if mode == "train":
                forward().sum().backward()
            else:
                with torch.no_grad():
                    forward()
    else:
        config, attention = method.rsplit("_", 1)
        net = build_model(config, MODEL_NUM_CLASS).to(device).eval()
        net.fused_attention = attention == "fused"
        x = torch.randn(batch, 12, 1, MODEL_SAMPLES, device=device)

        def run():
            with torch.no_grad():
                net(x)
    with PeakMemory(device) as peak:
        run()
    times, _ = timed_calls(lambda i: run(), repeats, device)
    return {"ms_per_batch": 1000 * statistics.median(times), "peak_mb": peak.peak_mb}


def model_section(args):
    """Forward latency and peak memory, explicit vs fused attention (tinylight, tiny and base, and
    medium on a GPU; --config for one); LoRA fold vs low-rank path.

    Every method runs in its own subprocess so one method's freed memory cannot hide another's peak.
    """
    from helper_code import get_device

    device = get_device(args.device)
    batch = args.batch or 32
    repeats = args.repeats or 3
    if args.method:
        return {args.method: _model_method_figures(args.method, device, batch, repeats)}
    default_configs = ["tinylight", "tiny", "base"] + (["medium"] if device.type == "cuda" else [])
    configs = [args.config] if args.config else default_configs
    methods = [f"{c}_{a}" for c in configs for a in ("explicit", "fused")]
    methods += [f"lora_{p}_{k}_{m}" for m in ("train", "nograd") for k in ("linear", "conv") for p in ("fold", "lowrank")]
    results = measure_in_fresh_processes("model", methods, ["--device", str(device), "--batch", str(batch),
                                                             "--repeats", str(repeats)])
    for config in configs:
        explicit, fused = results[f"{config}_explicit"], results[f"{config}_fused"]
        fused["speedup_vs_explicit"] = explicit["ms_per_batch"] / fused["ms_per_batch"]
    return results



STEP_METHODS = ("htuning", "htuning_naive", "lora_bp", "lora_bp_accum", "ft", "zo", "hizoo", "sparse_mezo", "fzoo",
                "floor")
STEP_NUM_CLASS = 16
STEP_ROUNDS = 2  # every method measured once per round, rounds in opposite orders, fastest time kept
# On CPU each method runs on one intra-op thread: a multi-threaded OpenMP region waits for its
# slowest thread, so on a machine shared with other work timings swing several-fold; one thread
# keeps the ratios between methods (which is what this section reports) reproducible.
STEP_CPU_THREADS = 1


def _naive_htuning_step(model, optimizer, scheduler, x, y, cfg, current, total):
    """H-Tuning the way the published code does it, kept as the baseline of the `step` section:
    per-parameter loops, the global RNG reseeded, z regenerated for every phase, gradients
    deep-copied. The maths is the fused step's (with the same loss on both ZO sides)."""
    import copy

    import torch

    from Half_Trainer import compute_loss, mixing_coefficient
    from zo_estimators import module_modes, zo_parameters

    zo = [p for _, p in zo_parameters(model)]
    seed = int(torch.randint(0, 2**31 - 1, (1,)))

    def perturb(scale):
        torch.manual_seed(seed)
        for p in zo:
            z = torch.normal(mean=0.0, std=1.0, size=p.size(), device=p.device, dtype=p.dtype)
            p.data = p.data + scale * cfg.zo_eps * z

    def loss_on(inputs, labels):
        aux, main = model(inputs)
        return compute_loss(aux, main, labels, cfg.aux_weight)

    with torch.no_grad(), module_modes(model, "zo"):
        perturb(1)
        loss_plus = loss_on(x, y)
        perturb(-2)
        loss_minus = loss_on(x, y)
        perturb(1)
    projected = float((loss_plus - loss_minus) / (2 * cfg.zo_eps))
    optimizer.zero_grad()
    with module_modes(model, "fo"):
        loss_on(x[:cfg.bp_batch], y[:cfg.bp_batch]).backward()
    fo_grads = copy.deepcopy([p.grad for p in zo])
    c = mixing_coefficient(current, total)
    torch.manual_seed(seed)
    for p, g_fo in zip(zo, fo_grads):
        g_zo = projected * torch.normal(mean=0.0, std=1.0, size=p.size(), device=p.device, dtype=p.dtype)
        p.grad = c * g_fo + (1 - c) * torch.norm(g_fo) * g_zo / (torch.norm(g_zo) + 1e-6)
    optimizer.step()
    scheduler.step()


def _step_runner(method, device, config, batch, bp_batch, num_class, samples=MODEL_SAMPLES):
    """step(i) of one method of the `step` and `memory` sections: training step i with the project's
    own step code (main.py's step settings, this section's bp_batch), or one of the references:
    `htuning_naive` (the published-style step) and `floor` (two no-grad forwards on the batch plus
    backprop on bp_batch), both on H-Tuning's model."""
    import torch

    import main
    from Half_Trainer import ESTIMATORS, METHODS, backprop_step
    from simulated_memory import training_setup

    method, _, variant = method.partition(":")   # see MEMORY_STEP_METHODS
    if method not in (*METHODS, "htuning_naive", "floor"):
        raise ValueError(f"unknown step method {method!r}; choose from: {', '.join([*METHODS, 'htuning_naive', 'floor'])}")
    estimator = variant if variant in ESTIMATORS else None
    step_cfg = main.step_config(zo_config=method if method in METHODS else "htuning", bp_batch=bp_batch,
                                zo_estimator=estimator or main.zo_estimator,
                                fusion="normalized" if estimator else main.fusion,   # FZOO's takes no projection
                                recompute=main.recompute and variant != "no_recompute",
                                bn_running_stats="refreshed" if variant == "refreshed" else main.bn_running_stats)
    parts = training_setup(step_cfg, device, config, batch, num_class, LORA_RANK, main.weight_decay, samples)
    model, x, y = parts.model, parts.x, parts.y
    if method == "htuning_naive":
        return lambda i: _naive_htuning_step(model, parts.optimizer, parts.scheduler, x, y, step_cfg, i, 100)
    if method == "floor":
        def floor_step(i):
            with torch.no_grad():
                model(x)
                model(x)
            backprop_step(parts.trainer, x[:bp_batch], y[:bp_batch])
        return floor_step
    return lambda i: parts.trainer.step(x, y, i, 100)


def _step_method_figures(method, device, config, batch, bp_batch, num_class, repeats):
    """One method of the `step` section in this (fresh) process: seconds per step (fastest of
    `repeats` after one warm-up step: other load on a shared machine only ever adds time) and peak
    memory over all steps above the state after the model, optimizer and data are built."""
    import torch

    from helper_code import PeakMemory

    if device.type == "cpu":
        torch.set_num_threads(STEP_CPU_THREADS)
    step = _step_runner(method, device, config, batch, bp_batch, num_class)
    with PeakMemory(device) as peak:
        times, _ = timed_calls(step, repeats + 1, device)
    figures = {"time_s": min(times[1:]), "peak_mb": peak.peak_mb}
    if device.type == "cuda":  # weights and data included, as a whole-GPU figure like the paper's
        figures["total_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return figures


def step_section(args):
    """Time per step and peak memory: fused H-Tuning vs the published-style naive step, LoRA
    backprop, full fine-tuning, the ZO steps of STEP_METHODS, and the floor (two inference
    forwards on the batch plus one training step on bp_batch samples). Every method runs in its
    own process, once per round;
    the rounds go in opposite orders and each method keeps its fastest time and largest peak, so
    a burst of load from elsewhere on a shared machine does not decide a ratio."""
    from helper_code import get_device

    device = get_device(args.device)
    config = args.config or ("medium" if device.type == "cuda" else "tiny")
    batch = args.batch or (128 if device.type == "cuda" else 32)
    bp_batch = args.bp_batch or 8
    num_class = args.num_class or STEP_NUM_CLASS
    repeats = args.repeats or 3
    if args.method:
        return {args.method: _step_method_figures(args.method, device, config, batch, bp_batch, num_class, repeats)}
    log.info("step: %s, batch %d, bp_batch %d, %d timed steps per method on %s", config, batch, bp_batch,
             repeats, device)
    options = ["--device", str(device), "--config", config, "--batch", str(batch), "--bp_batch", str(bp_batch),
               "--num_class", str(num_class), "--repeats", str(repeats)]
    rounds = [measure_in_fresh_processes("step", order, options)
              for order in (STEP_METHODS, STEP_METHODS[::-1])[:STEP_ROUNDS]]
    results = {m: {"time_s": min(r[m]["time_s"] for r in rounds),
                   **{fig: max(r[m][fig] for r in rounds) for fig in ("peak_mb", "total_mb") if fig in rounds[0][m]}}
               for m in STEP_METHODS}
    fused = results["htuning"]
    fused["time_vs_naive"] = fused["time_s"] / results["htuning_naive"]["time_s"]
    fused["time_vs_floor"] = fused["time_s"] / results["floor"]["time_s"]
    fused["mem_vs_lora_bp"] = fused["peak_mb"] / results["lora_bp"]["peak_mb"]
    fused["ft_mem_over_this"] = results["ft"]["peak_mb"] / fused["peak_mb"]
    if "total_mb" in fused:
        fused["ft_total_over_this"] = results["ft"]["total_mb"] / fused["total_mb"]
    return results



# method:variant is the method with one setting changed: H-Tuning with another ZO estimate, a
# backprop without recomputation (no_recompute), accumulation refreshing BatchNorm's statistics
MEMORY_STEP_METHODS = ("ft", "lora_bp", "lora_bp_accum", "htuning", "zo", "zo_sign", "hizoo", "sparse_mezo", "fzoo",
                       "probe", "htuning:hizoo", "htuning:sparse_mezo", "htuning:fzoo", "ft:no_recompute",
                       "lora_bp:no_recompute", "lora_bp_accum:no_recompute", "htuning:no_recompute",
                       "lora_bp_accum:refreshed")
MEMORY_NUM_CLASS = 23
MEMORY_STUDENT = "tinylight"


def _memory_runner(method, device, config, student_config, batch, bp_batch, num_class, samples):
    """step(i) of a `memory` method: a training step (MEMORY_STEP_METHODS) or
    `infer_{teacher|student}_{b1|bB}`, a no-grad forward of an r=0 model (what a merged LoRA
    model costs) on one record or on the whole batch."""
    from simulated_memory import inference_setup

    if method in MEMORY_STEP_METHODS:
        return _step_runner(method, device, config, batch, bp_batch, num_class, samples)
    _, role, size = method.split("_")
    return inference_setup(config if role == "teacher" else student_config, device, 1 if size == "b1" else batch,
                           num_class, samples)


def memory_figures(method, config, student_config, batch, bp_batch, num_class, samples=MODEL_SAMPLES, fake=True):
    """Simulated allocator peak of one steady-state step of `method` (simulated_memory.counted_peak):
    {peak_mb, at_start_mb}. fake=False counts the same over real CPU tensors."""
    import torch

    from simulated_memory import counted_peak

    return counted_peak(lambda: _memory_runner(method, torch.device("cpu"), config, student_config, batch, bp_batch,
                                               num_class, samples), fake)


def _gpu_memory_figures(method, device, config, student_config, batch, bp_batch, num_class):
    """The same step measured on a GPU (in a fresh process): torch.cuda.max_memory_allocated over
    the second step after a reset, everything alive included, as the simulation counts it."""
    import torch

    step = _memory_runner(method, device, config, student_config, batch, bp_batch, num_class, MODEL_SAMPLES)
    step(0)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(1)
    torch.cuda.synchronize(device)
    return {method: {"gpu_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20}}


def memory_section(args):
    """GPU-scale memory without a GPU: the simulated allocator peak of one steady-state step of
    every method in MEMORY_STEP_METHODS (H-Tuning also with each newer ZO estimate and the paper's
    fusion, `htuning:NAME`), and of inference by the teacher (--config) and the student (--student_config) on one record and on the batch. The project's
    own step code runs on FakeTensors under LiveStorageCounter, so nothing is allocated. On a
    GPU, each method is also run for real in its own process, and the measured peak is set
    beside the simulated one."""
    from helper_code import get_device

    device = get_device(args.device)
    config = args.config or "medium"
    (student,) = args.student_config or [MEMORY_STUDENT]
    batch, bp_batch = args.batch or 128, args.bp_batch or 8
    num_class = args.num_class or MEMORY_NUM_CLASS
    if args.method:
        return _gpu_memory_figures(args.method, device, config, student, batch, bp_batch, num_class)
    methods = [*MEMORY_STEP_METHODS, *(f"infer_{role}_{size}" for role in ("teacher", "student") for size in ("b1", "bB"))]
    log.info("memory: %s (student %s), batch %d, bp_batch %d, %d classes, simulated on FakeTensors",
             config, student, batch, bp_batch, num_class)
    results = {m: memory_figures(m, config, student, batch, bp_batch, num_class) for m in methods}
    ft = results["ft"]["peak_mb"]
    for method in (m for m in MEMORY_STEP_METHODS if m != "ft"):
        results[method]["ft_over_this"] = ft / results[method]["peak_mb"]
    for size in ("b1", "bB"):
        results[f"infer_student_{size}"]["teacher_over_this"] = (results[f"infer_teacher_{size}"]["peak_mb"]
                                                                 / results[f"infer_student_{size}"]["peak_mb"])
    if device.type == "cuda":
        measured = measure_in_fresh_processes("memory", methods, [
            "--device", str(device), "--config", config, "--student_config", student, "--batch", str(batch),
            "--bp_batch", str(bp_batch), "--num_class", str(num_class)])
        for method, row in results.items():
            row.update(measured[method])
            row["gpu_over_simulated"] = row["gpu_peak_mb"] / row["peak_mb"]
    return results

