"""benchmark.py's `inference` section: the fine-tuned teacher against the distilled student(s),
latency per record and peak memory, the student also under ONNX Runtime; or trained students
(merged files) as deployed: eager, float32 and int8 ONNX.

The section takes benchmark.py's parsed flags and returns {method: {figure: value}}.
"""
import argparse
from pathlib import Path

from bench_common import MODEL_NUM_CLASS, MODEL_SAMPLES, log, measure_in_fresh_processes, timed_calls


INFERENCE_REPEATS = 20
ONNX_REPEATS = 200      # the ONNX Runtime row and its eager twin: best of this many


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
        times, _ = timed_calls(lambda i: net(x), repeats, device)
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
    from onnx_export import ONNX_INPUT, export_onnx
    from predict import Model

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
    times, _ = timed_calls(lambda i: runner.run(None, x), repeats)
    return {"ms_per_record": 1000 * statistics.median(times) / batch, "best_ms_per_record": 1000 * min(times) / batch,
            "peak_mb": peak.peak_mb, "parameters": sum(p.numel() for p in net.parameters())}


def _onnx_runtime_rows(student, batch, repeats):
    """The student under ONNX Runtime beside eager PyTorch, both on one CPU thread, each the best of
    `repeats`; {} (with the reason logged) where the ONNX packages are missing."""
    from onnx_export import ONNX_PACKAGES, ONNX_RUNTIME, missing_onnx_packages

    missing = missing_onnx_packages((*ONNX_PACKAGES, ONNX_RUNTIME))
    if missing:
        log.warning("inference: no ONNX Runtime row: %s not installed (pip install -r requirements.txt)",
                    ", ".join(missing))
        return {}
    figures = measure_in_fresh_processes("inference", [student, f"{student}_{ONNX_RUNTIME}"],
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
            seconds, _ = timed_calls(lambda i: runners[key](record), 1)
            if round_:
                times[key] += seconds
    return times


def _deployed_rows(merged_files, repeats):
    """Each trained student (merged file) as deployed: eager PyTorch, and its float32 and int8 ONNX
    files as predict.py --export --int8 writes them (calibrated on its validation split), beside
    `int8_all`, the same quantization with nothing kept float32 (what onnx_export.float_nodes saves).
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
    import onnx_export
    import predict

    models = []
    for merged in merged_files:         # every file checked before any work; benchmark.py reports a flag error
        try:
            models.append(predict.load_model(merged, torch.device("cpu")))
        except ValueError as error:
            message = str(error).replace("argument --model", "argument --student_model")
            raise argparse.ArgumentError(None, message) from error
        if models[-1].split is None:
            raise argparse.ArgumentError(None, f"argument --student_model: {merged} names no validation and test "
                                               f"split: give the merged_*.pt of a stage trained since merged files "
                                               f"name theirs")
    rows, runners = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, (merged, model) in enumerate(zip(merged_files, models)):
            name = model.config if not any(key.startswith(f"{model.config} ") for key in rows) else str(merged)
            float_path = Path(tmp) / f"student{index}.onnx"
            onnx_export.export_onnx(model, float_path, predict.calibration_source(model, None))
            paths = {"eager": Path(merged), "float32": float_path, "int8": onnx_export.int8_path(float_path),
                     "int8_all": Path(tmp) / f"student{index}.all.onnx"}
            onnx_export.quantize_int8(float_path, paths["int8_all"], predict.calibration_source(model, None), kept={})
            memory = measure_in_fresh_processes("inference", [f"deployed:{r}:{p}" for r, p in paths.items()], [])
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
                    "test_challenge": evaluation.challenge_score_or_nan(labels, probs >= model.thresholds,
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
    from onnx_export import ONNX_RUNTIME

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
    by_config = measure_in_fresh_processes("inference", list(dict.fromkeys(configs.values())),
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

