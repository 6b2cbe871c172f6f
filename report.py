"""What a run prints and the summaries it writes beside its results: one table format for every run."""
import csv
import json
import logging

import numpy as np

from helper_code import atomic_path
from runs import claim

log = logging.getLogger("adagrad_fusion.report")

TABLE_FIGURES = (("macro AUROC", "auc_roc_macro", "{:.4f}"), ("F-beta", "F1score_b", "{:.4f}"),
                 ("mAP", "Map_value", "{:.2f}"), ("Challenge", "challenge_score", "{:.4f}"),
                 ("trainable", "trainable_num", "{:,}"),
                 ("peak MiB", "memory", "{:.1f}"), ("s/iter", "time", "{:.3f}"))
SUMMARY_FIGURES = ("auc_roc_macro", "F1score_b", "Map_value", "challenge_score", "memory", "time")


def format_table(title, rows, figures=TABLE_FIGURES):
    """rows: [(label, result dict)] -> the printed table under `title`."""
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"== {title} ==", f"{'model':<{width}}" + "".join(f"{name:>13}" for name, _, _ in figures)]
    for label, result in rows:
        lines.append(f"{label:<{width}}" + "".join(f"{fmt.format(result.get(key, np.nan)):>13}"
                                                   for _, key, fmt in figures))
    return "\n".join(lines)


def describe(result):
    return f"{result['role']} {result['config']}/{result['method']}" + (
        f" r={result['r']}" if result["r"] else "") + (f" {result['leads']} leads" if result["leads"] != 12 else "")


def table_rows(result, distilled):
    """The printed rows of one dataset's result: the teacher's (when there is one), then its own."""
    rows = [(describe(result["teacher"]), result["teacher"])] if "teacher" in result else []
    suffix = " distilled" if distilled and result["role"] == "student" and "teacher" in result else ""
    return rows + [(describe(result) + suffix, result)]


def mean_and_std(entries, figures=SUMMARY_FIGURES):
    """{figure_mean, figure_std} over result dicts (sample standard deviation; 0 for one entry)."""
    row = {}
    for figure in figures:
        values = np.array([e[figure] for e in entries], dtype=np.float64)
        row[f"{figure}_mean"] = float(values.mean())
        row[f"{figure}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return row


def write_summary(result_dir, prefix, rows, extra):
    """rows as `{prefix}_{n}.csv` and, with `extra`, `.json`; n claimed like a run's number."""
    stem = claim(result_dir, prefix, ".csv")
    with atomic_path(stem.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(stem.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({**extra, "summary": rows}, indent=1))
    return stem


def format_summary(title, rows, label_key, group_key):
    """Per group, one line per row: mean ± std of every printed figure that is summarised."""
    figures = [(name, key, fmt) for name, key, fmt in TABLE_FIGURES if key in SUMMARY_FIGURES]
    width = max(len(row[label_key]) for row in rows) + 2
    lines = [f"== {title} =="]
    for group in dict.fromkeys(row[group_key] for row in rows):
        lines.append(f"{group:<{width}}" + "".join(f"{name:>20}" for name, _, _ in figures))
        for row in (row for row in rows if row[group_key] == group):
            lines.append(f"{row[label_key]:<{width}}" + "".join(
                f"{fmt.format(row[key + '_mean']) + ' ± ' + fmt.format(row[key + '_std']):>20}"
                for _, key, fmt in figures))
    return "\n".join(lines)


def summarise_seeds(args, results_by_seed, prefix):
    """Per dataset, teacher and student: mean ± sample standard deviation over the seeds of each of
    SUMMARY_FIGURES; printed, and written as `{prefix}_summary_{n}.csv` and `.json`."""
    rows = []
    for index, dataset in enumerate(args.finetune_dataset):
        for role in ("teacher", "student"):
            entries = [results[index] if results[index]["role"] == role else results[index].get("teacher")
                       for results in results_by_seed.values()]
            entries = [e for e in entries if e is not None and e["role"] == role]
            if entries:
                rows.append({"dataset": dataset, "model": describe(entries[0]), "seeds": len(entries),
                             **mean_and_std(entries)})
    path = write_summary(args.result_dir, f"{prefix}_summary", rows, {"seeds": list(results_by_seed)})
    print(format_summary(f"mean ± std over seeds {', '.join(str(s) for s in results_by_seed)}", rows, "model",
                         "dataset"), flush=True)
    log.info("seed summary written to %s and %s", path.with_suffix(".csv"), path.with_suffix(".json"))
    return rows
