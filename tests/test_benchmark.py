"""Every section of benchmark.py, run as `python benchmark.py SECTION` would, at the smallest size that
still goes through its code: each method in its own process where the section does that, and the
figures it returns checked against what they must be. (`memory` runs in tests/test_memory.py.)"""
import json

import pytest

import bench_common
import bench_data
import bench_training
import benchmark
import evaluation
from model_src_ecg import build_model
from onnx_export import ONNX_PACKAGES, ONNX_RUNTIME, missing_onnx_packages

SECTIONS_TESTED_HERE = ("model", "data", "metrics", "inference", "step")
SECTIONS_TESTED_ELSEWHERE = ("memory",)   # tests/test_memory.py: test_memory_section_reports_its_methods_...


def run_section(tmp_path, *argv):
    """benchmark.main on the CPU; the returned figures, checked to be what --json wrote."""
    out = tmp_path / "figures.json"
    results = benchmark.main([*argv, "--device", "cpu", "--json", str(out)])
    assert json.loads(out.read_text()) == {argv[0]: json.loads(json.dumps(results))}
    return results


def test_every_section_has_a_test():
    assert sorted(benchmark.SECTIONS) == sorted(SECTIONS_TESTED_HERE + SECTIONS_TESTED_ELSEWHERE), \
        "a new benchmark section needs its tiny run in this file"


def test_model_section(tmp_path):
    results = run_section(tmp_path, "model", "--config", "tinylight", "--batch", "1", "--repeats", "1")
    backbone = {"tinylight_explicit", "tinylight_fused"}
    lora = set(results) - backbone
    assert backbone < set(results) and lora and all(m.startswith("lora_") for m in lora)
    folded = {m for m in lora if m.startswith("lora_fold_")}   # each LoRA case folded and on the low-rank path
    assert folded and {m.replace("lora_fold_", "lora_lowrank_") for m in folded} == lora - folded
    for method, row in results.items():
        assert row["ms_per_batch"] > 0 and row["peak_mb"] >= 0, method
    for method in backbone:
        assert results[method]["peak_mb"] > 0, "a first forward allocates its activations"
    fused, explicit = results["tinylight_fused"], results["tinylight_explicit"]
    assert fused["speedup_vs_explicit"] == explicit["ms_per_batch"] / fused["ms_per_batch"]


def test_data_section(tmp_path):
    results = run_section(tmp_path, "data", "--records", str(bench_data.DATA_MIN_RECORDS), "--workers", "1")
    assert set(results) == {"project", "reference"}
    for method, row in results.items():
        assert row["records_per_s"] > 0 and row["peak_mb"] >= 0 and row["peak_mb_quarter"] >= 0, method
    assert results["project"]["speedup"] == results["project"]["records_per_s"] / results["reference"]["records_per_s"]


def test_data_section_refuses_too_few_records(capsys):
    with pytest.raises(SystemExit) as stop:
        benchmark.main(["data", "--records", str(bench_data.DATA_MIN_RECORDS - 1)])
    assert stop.value.code == 2 and "argument --records: the data section needs at least" in capsys.readouterr().err


def test_metrics_section(tmp_path):
    results = run_section(tmp_path, "metrics", "--records", "300")
    project, reference = results["project"], results["reference"]
    assert project["max_abs_diff"] <= 1e-9
    assert project["time_s"] > 0 and reference["time_s"] > 0
    assert project["speedup"] == reference["time_s"] / project["time_s"]


def test_metrics_section_stops_when_the_project_and_the_reference_disagree(monkeypatch):
    real_evaluate = evaluation.evaluate

    def off_by_a_little(*args, **kwargs):
        metrics = real_evaluate(*args, **kwargs)
        return {**metrics, "hamming_loss": metrics["hamming_loss"] + 1e-6}

    monkeypatch.setattr(evaluation, "evaluate", off_by_a_little)
    with pytest.raises(AssertionError, match="project and reference metrics differ by 1e-06"):
        benchmark.main(["metrics", "--records", "300"])


def test_inference_section(tmp_path):
    results = run_section(tmp_path, "inference", "--config", "tiny", "--student_config", "tinylight", "--batch", "1",
                          "--repeats", "2", "--threads", "1")
    teacher, student = results["teacher"], results["student"]
    for config, row in (("tiny", teacher), ("tinylight", student)):
        assert row["parameters"] == sum(p.numel() for p in build_model(config, bench_common.MODEL_NUM_CLASS).parameters())
        assert 0 < row["best_ms_per_record"] <= row["ms_per_record"] and row["peak_mb"] >= 0
    assert student["latency_ratio"] == teacher["ms_per_record"] / student["ms_per_record"]
    assert student["best_vs_first_student"] == 1.0
    onnx_rows = ("student eager, 1 thread", "student ONNX Runtime, 1 thread")
    if missing_onnx_packages((*ONNX_PACKAGES, ONNX_RUNTIME)):
        assert set(results) == {"teacher", "student"}
        return
    assert set(results) == {"teacher", "student", *onnx_rows}
    eager, runtime = (results[row] for row in onnx_rows)
    assert runtime["parameters"] == eager["parameters"] == student["parameters"]
    assert runtime["speedup_vs_eager"] == eager["best_ms_per_record"] / runtime["best_ms_per_record"]


def test_step_section(tmp_path, monkeypatch):
    """One round over the methods its ratios read (the other methods' steps are counted in test_memory.py)."""
    ratio_methods = ("htuning", "htuning_naive", "lora_bp", "ft", "floor")
    assert set(ratio_methods) < set(bench_training.STEP_METHODS)
    monkeypatch.setattr(bench_training, "STEP_ROUNDS", 1)
    monkeypatch.setattr(bench_training, "STEP_METHODS", ratio_methods)
    results = run_section(tmp_path, "step", "--config", "tinylight", "--batch", "2", "--bp_batch", "1",
                          "--num_class", "2", "--repeats", "1")
    assert set(results) == set(ratio_methods)
    for method, row in results.items():
        assert row["time_s"] > 0 and row["peak_mb"] >= 0, method
    fused = results["htuning"]
    assert fused["time_vs_naive"] == fused["time_s"] / results["htuning_naive"]["time_s"]
    assert fused["time_vs_floor"] == fused["time_s"] / results["floor"]["time_s"]
    assert fused["mem_vs_lora_bp"] == fused["peak_mb"] / results["lora_bp"]["peak_mb"]
    assert fused["ft_mem_over_this"] == results["ft"]["peak_mb"] / fused["peak_mb"]
