"""One entry point for every measurement: `python benchmark.py SECTION [--json FILE]`.

Each section measures the project's code against a plain reference side by side in one run and
returns {method: {figure: value}}; this file prints it as a table and, with --json, writes
{section: {method: {figure: value}}}. Timings are ratios to read within one run, never absolutes
to compare across machines.
"""
import argparse
import json
import logging
import os
from pathlib import Path

from helper_code import setup_logging

log = logging.getLogger("benchmark")

SECTIONS = {}


def section(name):
    """Register a benchmark section under `name`."""
    def register(fn):
        SECTIONS[name] = fn
        return fn
    return register


def print_table(name, results):
    figures = sorted({fig for row in results.values() for fig in row})
    width = max([len(m) for m in results] + [8])
    print(f"\n[{name}]")
    print(f"{'method':<{width}}  " + "  ".join(f"{f:>14}" for f in figures))
    for method, row in results.items():
        cells = [f"{row[f]:>14.4g}" if isinstance(row.get(f), (int, float)) else f"{str(row.get(f, '')):>14}"
                 for f in figures]
        print(f"{method:<{width}}  " + "  ".join(cells))


def _measure_in_fresh_processes(section_name, methods, options):
    """Run `benchmark.py SECTION --method M` for each method in its own process; merge the rows.

    A fresh process per method keeps one method's freed memory from hiding another's peak.
    """
    import subprocess
    import sys
    import tempfile

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, method in enumerate(methods):
            out = Path(tmp) / f"method{index}.json"     # a method may name a file path
            log.info("%s: measuring %s", section_name, method)
            subprocess.run([sys.executable, str(Path(__file__).resolve()), section_name, "--method", method,
                            *options, "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
            results.update(json.loads(out.read_text())[section_name])
    return results


def _timed_calls(run, calls, device=None):
    """Seconds of each of `calls` calls of run(i) (i = 0, 1, ...), waiting for queued CUDA work
    before and after each so a GPU call is timed whole; also the last call's return value."""
    import time

    import torch

    def sync():
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    times, value = [], None
    for i in range(calls):
        sync()
        start = time.perf_counter()
        value = run(i)
        sync()
        times.append(time.perf_counter() - start)
    return times, value


MODEL_SAMPLES = 6144
MODEL_NUM_CLASS = 16
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
    times, _ = _timed_calls(lambda i: run(), repeats, device)
    return {"ms_per_batch": 1000 * statistics.median(times), "peak_mb": peak.peak_mb}


@section("model")
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
    results = _measure_in_fresh_processes("model", methods, ["--device", str(device), "--batch", str(batch),
                                                             "--repeats", str(repeats)])
    for config in configs:
        explicit, fused = results[f"{config}_explicit"], results[f"{config}_fused"]
        fused["speedup_vs_explicit"] = explicit["ms_per_batch"] / fused["ms_per_batch"]
    return results


DATA_RECORDS = 400
DATA_MIN_RECORDS = 4
DATA_WORKERS = 2


def _process_tree_pss_mb():
    """Proportional set size of this process and all its descendants, in MiB (Linux).

    PSS splits pages shared after fork among the processes sharing them, so the sum over the
    tree counts each page once: the honest total for a parent plus forked workers.
    """
    pids, total_kb = [os.getpid()], 0
    while pids:
        pid = pids.pop()
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total_kb += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    pids += [int(child) for child in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total_kb / 1024


def _reference_convert(dataset_dir, out_path, dataset):
    """The plain way: one record at a time, per-lead filtfilt and StandardScaler, all kept in a list."""
    import h5py
    import numpy as np
    import wfdb
    from scipy.signal import butter, filtfilt
    from sklearn.preprocessing import StandardScaler

    from helper_code import dataset_classes

    classes = dataset_classes(dataset)
    b, a = butter(3, [1, 47], btype="bandpass", fs=500)
    records, labels = [], []
    for header in sorted(Path(dataset_dir).rglob("*.hea")):
        record = wfdb.rdrecord(str(header.with_suffix("")))
        codes = next(c.split(":", 1)[1] for c in record.comments if c.startswith("Dx:")).strip().split(",")
        label = [float(code in codes) for code in classes]
        if not any(label):
            continue
        out = np.zeros((12, 1, 6144), dtype=np.float32)
        for lead in range(12):
            filtered = filtfilt(b, a, record.p_signal[:, lead])
            scaled = StandardScaler().fit_transform(filtered[:, None])[:, 0]
            out[lead, 0, :min(6144, len(scaled))] = scaled[:6144]
        records.append(out)
        labels.append(label)
    with h5py.File(out_path, "w") as f:
        f.create_dataset("record_set", data=np.stack(records))
        f.create_dataset("label_set", data=np.array(labels, dtype=np.float32))
    return len(records)


def _data_method_figures(method, measure, dataset_dir, workers):
    """One method of the `data` section in this (fresh) process.

    measure "time": records per second, nothing else running. measure "memory": peak PSS of this
    process and its workers above the start, sampled every 10 ms by a thread (which costs time,
    hence the separate run).
    """
    import tempfile
    import threading
    import time

    import h5py

    import datacollection
    from helper_code import DEMO_DATASET

    with tempfile.TemporaryDirectory() as out_dir:
        baseline, peak, done = _process_tree_pss_mb(), [0.0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], _process_tree_pss_mb())
                done.wait(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        if measure == "memory":
            sampler.start()
        start = time.perf_counter()
        if method == "project":
            path = datacollection.convert_challenge(dataset_dir, out_dir, DEMO_DATASET, workers=workers)
        else:
            path = Path(out_dir) / "reference.hdf5"
            _reference_convert(dataset_dir, path, DEMO_DATASET)
        seconds = time.perf_counter() - start
        done.set()
        if measure == "memory":
            sampler.join()
        with h5py.File(path) as f:
            written = len(f["label_set"])
    if measure == "memory":
        return {"peak_mb": max(peak[0] - baseline, 0.0)}
    return {"records_per_s": written / seconds}


@section("data")
def data_section(args):
    """Challenge-format records to HDF5: the project's converter vs a plain sequential reference.

    Both convert the same synthetic Challenge-format records (the demo generator) with the same
    reader (wfdb), each run in its own subprocess: one timed run, one run for peak memory (PSS of
    the process and its workers above its start), and one memory run on a quarter of the records
    to show whether the peak grows with the number of records.
    """
    import subprocess
    import sys
    import tempfile

    import numpy as np

    from helper_code import DEMO_DATASET
    from synthetic_ecg import write_demo_challenge

    workers = args.workers or DATA_WORKERS
    if args.method:
        method, measure = args.method.split(":")
        return {method: _data_method_figures(method, measure, args.data_dir, workers)}
    n_records = args.records or DATA_RECORDS
    runs = [("time", n_records, "records_per_s"), ("memory", n_records, "peak_mb"),
            ("memory", n_records // 4, "peak_mb_quarter")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for n in (n_records // 4, n_records):
            folders[n] = Path(tmp) / f"records{n}" / DEMO_DATASET
            write_demo_challenge(folders[n], n, np.random.default_rng(0))
        for method in ("project", "reference"):
            results[method] = {}
            for measure, n, figure in runs:
                out = Path(tmp) / f"{method}_{measure}_{n}.json"
                log.info("data: %s, %s run on %d records", method, measure, n)
                subprocess.run([sys.executable, str(Path(__file__).resolve()), "data", "--method", f"{method}:{measure}",
                                "--data_dir", str(folders[n]), "--workers", str(workers), "--json", str(out)],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                results[method][figure] = next(iter(json.loads(out.read_text())["data"][method].values()))
    results["project"]["speedup"] = results["project"]["records_per_s"] / results["reference"]["records_per_s"]
    return results


METRICS_SAMPLES = 30000
METRICS_CLASSES = 23
METRICS_REPEATS = 3


def _reference_metrics(labels, scores, beta):
    """The plain way: per class and per sample Python loops over sorted lists (the benchmark's yardstick)."""
    import math

    n, c = len(labels), len(labels[0])
    out = {"auc": [], "ap": [], "thresholds": [], "fbeta": [], "gbeta": [], "f1": []}
    for k in range(c):
        column = sorted(((scores[i][k], labels[i][k]) for i in range(n)), key=lambda t: -t[0])
        positives = sum(y for _, y in column)
        negatives = n - positives
        # tie groups, best first: (score, count, positives in group)
        groups = []
        for s, y in column:
            if groups and groups[-1][0] == s:
                groups[-1][1] += 1
                groups[-1][2] += y
            else:
                groups.append([s, 1, y])
        rank_sum, ap, seen, seen_pos = 0.0, 0.0, 0, 0
        best_f, best_threshold = -1.0, None
        for s, count, pos in groups:
            low_rank = n - seen - count + 1           # ascending ranks of this group: low_rank .. low_rank+count-1
            rank_sum += pos * (low_rank + (count - 1) / 2)
            seen += count
            seen_pos += pos
            ap += pos * seen_pos / seen
            fp, fn = seen - seen_pos, positives - seen_pos
            f = (1 + beta ** 2) * seen_pos / ((1 + beta ** 2) * seen_pos + fp + beta ** 2 * fn)
            if f > best_f:
                best_f, best_threshold = f, s
        out["auc"].append((rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
                          if positives and negatives else math.nan)
        out["ap"].append(ap / positives if positives else math.nan)
        out["thresholds"].append(best_threshold if positives else math.nextafter(column[0][0], math.inf))
    thresholds = out["thresholds"]
    wrong_total, coverage_total, hamming, exact = 0.0, 0, 0, 0
    counts = [[0, 0, 0] for _ in range(c)]  # tp, fp, fn
    for i in range(n):
        y, s = labels[i], scores[i]
        pos = [k for k in range(c) if y[k]]
        neg = [k for k in range(c) if not y[k]]
        if pos and neg:
            wrong_total += sum(1 for p in pos for q in neg if s[q] >= s[p]) / (len(pos) * len(neg))
        if pos:
            lowest = min(s[k] for k in pos)
            coverage_total += sum(1 for k in range(c) if s[k] >= lowest)
        mistakes = 0
        for k in range(c):
            predicted = s[k] >= thresholds[k]
            mistakes += predicted != bool(y[k])
            counts[k][0] += predicted and y[k]
            counts[k][1] += predicted and not y[k]
            counts[k][2] += (not predicted) and y[k]
        hamming += mistakes
        exact += mistakes == 0

    def beta_score(tp, fp, fn, b):
        f_den, g_den = (1 + b ** 2) * tp + fp + b ** 2 * fn, tp + fp + b * fn
        return ((1 + b ** 2) * tp / f_den if f_den else 1.0), (tp / g_den if g_den else 1.0)

    for tp, fp, fn in counts:
        f, g = beta_score(tp, fp, fn, beta)
        out["fbeta"].append(f)
        out["gbeta"].append(g)
        out["f1"].append(beta_score(tp, fp, fn, 1)[0])
    finite = lambda values: [v for v in values if not math.isnan(v)]
    return {
        "auc_roc_macro": sum(finite(out["auc"])) / len(finite(out["auc"])),
        "Map_value": 100 * sum(finite(out["ap"])) / len(finite(out["ap"])),
        "F1score_b": sum(out["fbeta"]) / c,
        "Gbeta_score": sum(out["gbeta"]) / c,
        "F1score": sum(out["f1"]) / c,
        "ranking_loss": wrong_total / n,
        "coverage_error": coverage_total / n,
        "hamming_loss": hamming / (n * c),
        "subset_accuracy": exact / n,
        "thresholds": thresholds,
    }


@section("metrics")
def metrics_section(args):
    """All metrics with the threshold search on 30,000 x 23 predictions: vectorised vs plain loops.

    Both pick thresholds on the same predictions and score them; every value must agree to 1e-9.
    Scores are float32, the width the models output, rounded to 3 decimals so tie handling is
    exercised; one class has no positives.
    Each time is the best of METRICS_REPEATS calls, as timeit reports.
    """
    import numpy as np

    import evaluation

    n, c = args.records or METRICS_SAMPLES, METRICS_CLASSES
    rng = np.random.default_rng(0)
    prevalence = rng.uniform(0.01, 0.3, size=c)
    prevalence[-1] = 0.0
    labels = (rng.random((n, c)) < prevalence).astype(np.float64)
    scores = np.round(1 / (1 + np.exp(-(rng.normal(size=(n, c)) + 2.0 * labels - 1.5))), 3).astype(np.float32)

    def project_metrics():
        return evaluation.evaluate(labels, scores, evaluation.find_thresholds(labels, scores))

    def reference_metrics():
        return _reference_metrics(labels.astype(int).tolist(), scores.tolist(), evaluation.BETA)

    def best_time(metrics):
        times, values = _timed_calls(lambda i: metrics(), METRICS_REPEATS)
        return values, min(times)

    project, project_s = best_time(project_metrics)
    reference, reference_s = best_time(reference_metrics)

    max_diff = max(float(np.max(np.abs(np.asarray(project[k], dtype=float) - np.asarray(v, dtype=float))))
                   for k, v in reference.items())
    if not max_diff <= 1e-9:
        raise AssertionError(f"project and reference metrics differ by {max_diff:.3g}")
    log.info("metrics: %d x %d predictions, largest difference %.3g", n, c, max_diff)
    return {"project": {"time_s": project_s, "speedup": reference_s / project_s, "max_abs_diff": max_diff},
            "reference": {"time_s": reference_s}}


INFERENCE_REPEATS = 20
ONNX_REPEATS = 200      # the ONNX Runtime row and its eager twin: best of this many
ONNX_RUNTIME = "onnxruntime"


def _inference_figures(config, device, batch, repeats, threads):
    """Deployed-model inference in this (fresh) process: a merged LoRA model costs what an r=0 one does.

    Peak memory covers building the model and the first forward (weights + activations, what a
    deployment needs); latency per record is the median, and the best, of `repeats` forwards after
    it (the best is what the model costs when nothing else competes for the cores). `threads`:
    intra-op threads on CPU (None: torch's default).
    """
    import statistics

    import torch

    from helper_code import PeakMemory
    from model_src_ecg import build_model

    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    with PeakMemory(device) as peak, torch.no_grad():
        net = build_model(config, MODEL_NUM_CLASS).to(device).eval()
        x = torch.randn(batch, 12, 1, MODEL_SAMPLES, device=device)
        net(x)
    with torch.no_grad():
        times, _ = _timed_calls(lambda i: net(x), repeats, device)
    return {"ms_per_record": 1000 * statistics.median(times) / batch, "best_ms_per_record": 1000 * min(times) / batch,
            "peak_mb": peak.peak_mb, "parameters": sum(p.numel() for p in net.parameters())}


def _onnx_runtime_figures(config, batch, repeats):
    """The same model as predict.py exports it (probabilities and labels), run by ONNX Runtime on one
    CPU thread. Peak memory covers loading the file and the first run; latency as _inference_figures'."""
    import statistics
    import tempfile

    import numpy as np
    import onnxruntime
    import torch

    from helper_code import LEADS, PeakMemory
    from model_src_ecg import build_model
    from predict import ONNX_INPUT, Model, export_onnx

    torch.manual_seed(0)
    net = build_model(config, MODEL_NUM_CLASS).eval()
    classes = [str(i) for i in range(MODEL_NUM_CLASS)]
    model = Model(net, config, classes, classes, np.full(MODEL_NUM_CLASS, 0.5), LEADS, None)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / f"{config}.onnx")
        x = {ONNX_INPUT: np.random.default_rng(0).standard_normal((batch, 12, 1, MODEL_SAMPLES), dtype=np.float32)}
        with PeakMemory("cpu") as peak:
            runner = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            runner.run(None, x)
    times, _ = _timed_calls(lambda i: runner.run(None, x), repeats)
    return {"ms_per_record": 1000 * statistics.median(times) / batch, "best_ms_per_record": 1000 * min(times) / batch,
            "peak_mb": peak.peak_mb, "parameters": sum(p.numel() for p in net.parameters())}


def _onnx_runtime_rows(student, batch, repeats):
    """The student under ONNX Runtime beside eager PyTorch, both on one CPU thread, each the best of
    `repeats`; {} (with the reason logged) where the ONNX packages are missing."""
    from predict import ONNX_PACKAGES, missing_onnx_packages

    missing = missing_onnx_packages((*ONNX_PACKAGES, ONNX_RUNTIME))
    if missing:
        log.warning("inference: no ONNX Runtime row: %s not installed (pip install -r requirements.txt)",
                    ", ".join(missing))
        return {}
    figures = _measure_in_fresh_processes("inference", [student, f"{student}_{ONNX_RUNTIME}"],
                                          ["--device", "cpu", "--batch", str(batch), "--repeats", str(repeats),
                                           "--threads", "1"])
    eager, runtime = figures[student], figures[f"{student}_{ONNX_RUNTIME}"]
    runtime["speedup_vs_eager"] = eager["best_ms_per_record"] / runtime["best_ms_per_record"]
    return {"student eager, 1 thread": eager, "student ONNX Runtime, 1 thread": runtime}


DEPLOYED_REPEATS = 300      # deployed students: every runtime's best of this many, the runtimes interleaved
DEPLOYED_RUNTIMES = ("eager", "float32", "int8", "int8_all")    # int8_all: nothing kept float32 (the ablation)
DEPLOYED_BATCH = 64         # test records scored together for the accuracy figures


def _deployed_runner(runtime, path):
    """run(inputs) -> probabilities of a trained student as deployed: its merged file under eager
    PyTorch (predict.py's own scoring), or its ONNX file under ONNX Runtime on one CPU thread."""
    import onnxruntime
    import torch

    import predict

    if runtime == "eager":
        model = predict.load_model(path, torch.device("cpu"))
        return lambda inputs: predict.probabilities(model, inputs, torch.device("cpu"))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda inputs: session.run([predict.ONNX_OUTPUTS[0]], {predict.ONNX_INPUT: inputs})[0]


def _deployed_memory(runtime, path):
    """Peak memory of loading a deployed student and scoring one record, in this (fresh) process
    (the libraries imported before: they are not the model's)."""
    import numpy as np
    import onnxruntime

    import predict
    from helper_code import PeakMemory

    record = np.zeros((1, 12, 1, MODEL_SAMPLES), np.float32)
    with PeakMemory("cpu") as peak:
        _deployed_runner(runtime, path)(record)
    return {"peak_mb": peak.peak_mb}


def _test_batches(split, batch_size):
    """(inputs, labels) of a merged model's test split, batch by batch, from the HDF5 its run split
    (checked to be that file: its row count and its validation records' names)."""
    import h5py
    import numpy as np

    from ecg_dataset import record_names

    path, test = Path(split["h5"]), np.sort(split["test"].numpy())
    names = record_names(path, split["validation"].numpy()) if path.is_file() else None
    if names is None or names != split["validation_names"]:
        raise ValueError(f"{path} is not the HDF5 the model's run split (missing, or other records)")
    with h5py.File(path, "r") as f:
        if len(f["label_set"]) != split["rows"]:
            raise ValueError(f"{path} has {len(f['label_set'])} records; the model's run split {split['rows']}")
        for start in range(0, len(test), batch_size):
            rows = test[start:start + batch_size]
            yield f["record_set"][rows], f["label_set"][rows]


def _interleaved_times(runners, record, repeats):
    """{key: seconds of each of `repeats` calls of runners[key](record)}, after one warm-up round; the
    runners take turns, round after round in alternating order, so load from elsewhere falls on all."""
    times = {key: [] for key in runners}
    for round_ in range(repeats + 1):
        for key in (list(runners) if round_ % 2 else list(runners)[::-1]):
            seconds, _ = _timed_calls(lambda i: runners[key](record), 1)
            if round_:
                times[key] += seconds
    return times


def _deployed_rows(merged_files, repeats):
    """Each trained student (merged file) as deployed: eager PyTorch, and its float32 and int8 ONNX
    files as predict.py --export --int8 writes them (calibrated on its validation split), beside
    `int8_all`, the same quantization with nothing kept float32 (what predict.float_nodes saves).
    Latency on one CPU thread at batch 1, all runtimes of all students interleaved in this process,
    best (and median) of `repeats`; then again with denormal floats flushed to zero on that thread
    (`best_ms_flushed`): exponentials of masked attention scores are denormal, and x86 computes with
    them many times slower. Peak memory of loading and one record, each in a fresh process; test
    macro AUROC and Challenge score on the same test records, and how many distinct probabilities
    a class gets there (median over classes)."""
    import statistics
    import tempfile

    import numpy as np
    import torch

    import evaluation
    import pipeline_ecg
    import predict

    models = []
    for merged in merged_files:         # every file checked before any work
        try:
            models.append(predict.load_model(merged, torch.device("cpu")))
        except ValueError as error:
            build_parser().error(str(error).replace("argument --model", "argument --student_model"))
        if models[-1].split is None:
            build_parser().error(f"argument --student_model: {merged} names no validation and test split: give the "
                                 f"merged_*.pt of a stage trained since merged files name theirs")
    rows, runners = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, (merged, model) in enumerate(zip(merged_files, models)):
            name = model.config if not any(key.startswith(f"{model.config} ") for key in rows) else str(merged)
            float_path = Path(tmp) / f"student{index}.onnx"
            predict.export_onnx(model, float_path, predict.calibration_source(model, None))
            paths = {"eager": Path(merged), "float32": float_path, "int8": predict.int8_path(float_path),
                     "int8_all": Path(tmp) / f"student{index}.all.onnx"}
            predict.quantize_int8(float_path, paths["int8_all"], predict.calibration_source(model, None), kept={})
            memory = _measure_in_fresh_processes("inference", [f"deployed:{r}:{p}" for r, p in paths.items()], [])
            scores = {runtime: [] for runtime in paths}
            labels = []
            run = {runtime: _deployed_runner(runtime, p) for runtime, p in paths.items()}
            for inputs, batch_labels in _test_batches(model.split, DEPLOYED_BATCH):
                labels.append(batch_labels)
                for runtime in paths:
                    scores[runtime].append(run[runtime](inputs))
            labels = np.concatenate(labels).astype(np.float64)
            for runtime, p in paths.items():
                probs = np.concatenate(scores[runtime])
                row = rows[f"{name} {runtime}"] = {
                    "peak_mb": memory[f"deployed:{runtime}:{p}"]["peak_mb"],
                    "test_auroc": evaluation.evaluate(labels, probs, thresholds=model.thresholds)["auc_roc_macro"],
                    "test_challenge": pipeline_ecg.challenge_score(labels, probs >= model.thresholds,
                                                                   model.class_codes)}
                # median over classes of the distinct probabilities: int8 probabilities come in 256 steps
                row["distinct_probabilities"] = float(np.median([len(np.unique(column)) for column in probs.T]))
                if runtime != "eager":
                    row["file_kb"] = p.stat().st_size / 1024
                runners[f"{name} {runtime}"] = run[runtime]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        record = np.random.default_rng(0).standard_normal((1, 12, 1, MODEL_SAMPLES), dtype=np.float32)
        times = _interleaved_times(runners, record, repeats)
        torch.set_flush_denormal(True)
        flushed = _interleaved_times(runners, record, repeats)
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    for key, row in rows.items():
        row.update(best_ms_per_record=1000 * min(times[key]), ms_per_record=1000 * statistics.median(times[key]),
                   best_ms_flushed=1000 * min(flushed[key]))
    for name in dict.fromkeys(key.rsplit(" ", 1)[0] for key in rows):
        eager, float32 = rows[f"{name} eager"], rows[f"{name} float32"]
        float32["speedup_vs_eager"] = eager["best_ms_per_record"] / float32["best_ms_per_record"]
        for int8 in (rows[f"{name} int8"], rows[f"{name} int8_all"]):
            int8["latency_vs_float32"] = int8["best_ms_per_record"] / float32["best_ms_per_record"]
            int8["flushed_vs_float32"] = int8["best_ms_flushed"] / float32["best_ms_flushed"]
            int8["size_vs_float32"] = int8["file_kb"] / float32["file_kb"]
            int8["auroc_vs_float32"] = int8["test_auroc"] - float32["test_auroc"]
            int8["challenge_vs_float32"] = int8["test_challenge"] - float32["test_challenge"]
    return rows


@section("inference")
def inference_section(args):
    """Fine-tuned teacher vs distilled student(s) at inference: latency per record and peak memory.

    Teacher: medium on a GPU, base on a CPU (--config to change); students: tinylight, or the
    configs named by --student_config (several compare side by side; each later one is also
    timed against the first, `best_vs_first_student`). Each model runs in its own subprocess so
    one's freed memory cannot hide another's peak. Default batch 1 (one record at a time, as
    deployed); --threads 1 times one CPU thread. Then the first student as predict.py exports it,
    under ONNX Runtime, beside eager PyTorch: on the CPU, one thread each, the best of ONNX_REPEATS
    (--repeats to change), `speedup_vs_eager` comparing the best times.
    With --student_model (trained students' merged files) instead: each as deployed, eager, float32
    ONNX and int8 ONNX (_deployed_rows), the best of DEPLOYED_REPEATS (--repeats to change).
    """
    from helper_code import get_device

    device = get_device(args.device)
    batch, repeats = args.batch or 1, args.repeats or INFERENCE_REPEATS
    if args.method and args.method.startswith("deployed:"):
        _, runtime, path = args.method.split(":", 2)
        return {args.method: _deployed_memory(runtime, path)}
    if args.method:
        config, _, runtime = args.method.partition("_")
        if runtime == ONNX_RUNTIME:
            return {args.method: _onnx_runtime_figures(config, batch, repeats)}
        return {args.method: _inference_figures(args.method, device, batch, repeats, args.threads)}
    if args.student_model:
        return _deployed_rows(args.student_model, args.repeats or DEPLOYED_REPEATS)
    students = args.student_config or ["tinylight"]
    configs = {"teacher": args.config or ("medium" if device.type == "cuda" else "base")}
    configs.update({"student" if len(students) == 1 else f"student {name}": name for name in students})
    log.info("inference: teacher %s vs student(s) %s on %s, batch %d", configs["teacher"], ", ".join(students),
             device, batch)
    options = ["--device", str(device), "--batch", str(batch), "--repeats", str(repeats)]
    by_config = _measure_in_fresh_processes("inference", list(dict.fromkeys(configs.values())),
                                            options + (["--threads", str(args.threads)] if args.threads else []))
    results = {role: dict(by_config[config]) for role, config in configs.items()}
    teacher, first = results["teacher"], by_config[students[0]]
    for role in list(results)[1:]:
        student = results[role]
        student["latency_ratio"] = teacher["ms_per_record"] / student["ms_per_record"]
        student["memory_ratio"] = teacher["peak_mb"] / student["peak_mb"] if student["peak_mb"] > 0 else float("nan")
        student["best_vs_first_student"] = student["best_ms_per_record"] / first["best_ms_per_record"]
    results.update(_onnx_runtime_rows(students[0], batch, args.repeats or ONNX_REPEATS))
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
        times, _ = _timed_calls(step, repeats + 1, device)
    figures = {"time_s": min(times[1:]), "peak_mb": peak.peak_mb}
    if device.type == "cuda":  # weights and data included, as a whole-GPU figure like the paper's
        figures["total_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return figures


@section("step")
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
    rounds = [_measure_in_fresh_processes("step", order, options)
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


@section("memory")
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
        measured = _measure_in_fresh_processes("memory", methods, [
            "--device", str(device), "--config", config, "--student_config", student, "--batch", str(batch),
            "--bp_batch", str(bp_batch), "--num_class", str(num_class)])
        for method, row in results.items():
            row.update(measured[method])
            row["gpu_over_simulated"] = row["gpu_peak_mb"] / row["peak_mb"]
    return results


def _existing_file(text):
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    return Path(text)


def build_parser():
    from helper_code import FlagParser, int_at_least
    from model_src_ecg import MODEL_CONFIGS

    parser = FlagParser(prog="benchmark.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=list(SECTIONS), help="which measurement to run")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when present")
    parser.add_argument("--config", default=None, choices=list(MODEL_CONFIGS), help="model config (default: per section)")
    parser.add_argument("--student_config", nargs="+", default=None, choices=list(MODEL_CONFIGS),
                        help="student config(s) to compare (inference and memory sections; default tinylight)")
    parser.add_argument("--student_model", nargs="+", default=None, type=_existing_file,
                        metavar="MERGED.pt", help="trained students' merged files: each as deployed, eager, float32 "
                                                  "and int8 ONNX (inference section)")
    parser.add_argument("--threads", type=int_at_least(1), default=None, help="intra-op CPU threads (inference section)")
    parser.add_argument("--batch", type=int_at_least(1), default=None, help="batch size (default: per section)")
    parser.add_argument("--bp_batch", type=int_at_least(1), default=None, help="FO samples per H-Tuning step")
    parser.add_argument("--num_class", type=int_at_least(1), default=None,
                        help="classes of the main head (default: per section)")
    parser.add_argument("--records", type=int_at_least(1), default=None, help="records to convert (data section)")
    parser.add_argument("--repeats", type=int_at_least(1), default=None, help="timed repetitions (default: per section)")
    parser.add_argument("--workers", type=int_at_least(1), default=None, help="converter worker processes (data section)")
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data_dir", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def check_flags(parser, args):
    """What no single flag's type can check."""
    if args.batch is not None and args.bp_batch is not None and args.bp_batch > args.batch:
        parser.error(f"argument --bp_batch: must be at most --batch ({args.batch}), got {args.bp_batch}")
    if args.section == "memory" and args.student_config is not None and len(args.student_config) > 1:
        parser.error("argument --student_config: the memory section compares the teacher with one student")
    if args.student_model is not None and args.section != "inference":
        parser.error("argument --student_model: only for the inference section")
    if args.section == "data" and args.records is not None and args.records < DATA_MIN_RECORDS:
        parser.error(f"argument --records: the data section needs at least {DATA_MIN_RECORDS} (it also converts a "
                     f"quarter of them), got {args.records}")


def main(argv=None):
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    results = SECTIONS[args.section](args)
    print_table(args.section, results)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({args.section: results}, indent=2))
    return results


if __name__ == "__main__":
    main()
