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
# what chose the checkpoint, and when the run stopped: printed beside the test metrics of a summary
SELECTION_FIGURES = (("valid mAP", "best_valid_map", "{:.2f}"), ("iterations", "iterations", "{:.0f}"))
SUMMARY_FIGURES = ("auc_roc_macro", "F1score_b", "Map_value", "challenge_score", "memory", "time", "best_valid_map",
                   "iterations")


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
    figures = [(name, key, fmt) for name, key, fmt in TABLE_FIGURES if key in SUMMARY_FIGURES] + list(SELECTION_FIGURES)
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


COMPARE_FIGURES = ("auc_roc_macro", "F1score_b", "Map_value", "challenge_score")


def summarise_comparison(args, results_by_seed, simulated_mb, scale, prefix):
    """Per dataset and method: mean ± std over the seeds of the test metrics, trainable parameters,
    measured peak memory, s/iteration, and the simulated GPU peak at `scale`. Printed, written as
    `{prefix}_summary_{n}.csv` and `.json`, with two pictures beside them: accuracy against
    simulated memory (`..._tradeoff_{n}.png`) and validation mAP against iteration
    (`..._validation_{n}.png`)."""
    rows = []
    for dataset in args.finetune_dataset:
        for method in args.compare_methods:
            entries = [e for results in results_by_seed.values() for e in results
                       if e["dataset"] == dataset and e["method"] == method]
            rows.append({"dataset": dataset, "method": method, "seeds": len(entries),
                         **mean_and_std(entries),
                         "trainable_num": int(entries[0]["trainable_num"]), "simulated_gpu_mb": simulated_mb[method],
                         "histories": [e["history"] for e in entries]})
    scale_note = f"simulated GPU peak: {scale['config']}, batch {scale['batch']}, bp_batch {args.bp_batch}, " \
                 f"{scale['num_class']} classes"
    stem = write_summary(args.result_dir, f"{prefix}_summary", [{k: v for k, v in row.items() if k != "histories"}
                                                                for row in rows],
                         {"seeds": list(results_by_seed), "simulated": scale_note})
    pictures = [stem.with_name(stem.name.replace("_summary_", f"_{kind}_") + ".png") for kind in ("tradeoff", "validation")]
    plot_tradeoff(rows, pictures[0], scale_note)
    plot_validation(rows, pictures[1])
    print(format_comparison(rows, list(results_by_seed), scale_note), flush=True)
    log.info("comparison written to %s, %s and %s", stem.with_suffix(".csv"), *pictures)
    return rows


def format_comparison(rows, seeds, scale_note):
    figures = [(name, key, fmt) for name, key, fmt in TABLE_FIGURES if key in COMPARE_FIGURES] + list(SELECTION_FIGURES)
    width = max(len(row["method"]) for row in rows) + 2
    lines = []
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        lines.append(f"== {dataset}: mean ± std over seeds {', '.join(map(str, seeds))} ==")
        lines.append(f"{'method':<{width}}" + "".join(f"{name:>20}" for name, _, _ in figures)
                     + f"{'trainable':>12}{'peak MiB':>11}{'s/iter':>9}{'GPU MiB':>10}")
        for row in (row for row in rows if row["dataset"] == dataset):
            lines.append(f"{row['method']:<{width}}" + "".join(
                f"{fmt.format(row[key + '_mean']) + ' ± ' + fmt.format(row[key + '_std']):>20}"
                for _, key, fmt in figures) + f"{row['trainable_num']:>12,}{row['memory_mean']:>11.1f}"
                f"{row['time_mean']:>9.3f}{row['simulated_gpu_mb']:>10.0f}")
    lines.append(f"(peak MiB: measured on this run's device; GPU MiB: {scale_note})")
    return "\n".join(lines)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(figure, path):
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=150, bbox_inches="tight")


def plot_tradeoff(rows, path, scale_note):
    """Test macro AUROC (mean, error bar: std over seeds) against simulated GPU memory, a point per method."""
    plt = _pyplot()
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    figure, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for row in (row for row in rows if row["dataset"] == dataset):
            ax.errorbar(row["simulated_gpu_mb"], row["auc_roc_macro_mean"], yerr=row["auc_roc_macro_std"], fmt="o",
                        capsize=4, label=row["method"])
        ax.legend(fontsize=8)   # the ZO steps sit close together: a legend, not labels beside the points
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel(f"GPU memory of one training step, MiB ({scale_note.split(': ', 1)[1]})", fontsize=8)
        ax.set_ylabel("test macro AUROC (mean ± std over seeds)")
        ax.set_title(dataset)
        ax.grid(True, which="both", alpha=0.3)
    _save(figure, path)
    plt.close(figure)


def plot_validation(rows, path):
    """Validation mAP against epoch (samples seen / training records, so methods at other batch sizes
    line up), one curve per method: the mean over the seeds' histories at each validated epoch (a
    run that stopped early leaves the mean to the others)."""
    plt = _pyplot()
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    figure, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for row in (row for row in rows if row["dataset"] == dataset):
            by_epoch = {}
            for history in row["histories"]:
                with open(history, newline="") as f:
                    for entry in csv.DictReader(f):
                        by_epoch.setdefault(float(entry["epoch"]), []).append(float(entry["valid_map"]))
            epochs = sorted(by_epoch)
            ax.plot(epochs, [np.mean(by_epoch[e]) for e in epochs], marker=".", label=row["method"])
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation mAP (mean over seeds)")
        ax.set_title(dataset)
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
    _save(figure, path)
    plt.close(figure)


def format_memory_plan(title, plan, notes):
    """{method: simulated_memory.step_plan's dict} -> the printed plan under `title`, then `notes`."""
    def count(value, limit=None):
        return "none" if value is None else f">={value}" if value == limit else str(value)

    header = ("method", "counted MiB", "GPU allowance", "needs MiB", "fits", "largest bp_batch", "largest batch")
    rows = [(method, f"{p['peak_mb']:.1f}", f"x{p['gpu_ratio']:.3f} {p['ratio_source']}", f"{p['need_mb']:.1f}",
             "yes" if p["fits"] else "NO", count(p["largest_bp_batch"]) if "largest_bp_batch" in p else "-",
             count(p["largest_batch"], p["batch_limit"]) if "largest_batch" in p else "not counted")
            for method, p in plan.items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [f"== {title} ==", *("  ".join(cell.rjust(w) if i else cell.ljust(w)
                                          for i, (cell, w) in enumerate(zip(row, widths))) for row in [header, *rows])]
    return "\n".join([*lines, *notes])
