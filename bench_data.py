"""benchmark.py's data sections: `data` (Challenge-format records to HDF5, the project's converter
against a plain sequential one) and `metrics` (every metric with the threshold search, vectorised
against plain Python loops).

Each section takes benchmark.py's parsed flags and returns {method: {figure: value}}.
"""
import json
import os
from pathlib import Path

from bench_common import BENCHMARK_SCRIPT, log, timed_calls


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
                subprocess.run([sys.executable, str(BENCHMARK_SCRIPT), "data", "--method", f"{method}:{measure}",
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
        times, values = timed_calls(lambda i: metrics(), METRICS_REPEATS)
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

