"""Every entry script refuses a bad flag before any work: one argparse-style line, exit status 2."""
import subprocess
import sys
from pathlib import Path

import pytest

import main

REPO_ROOT = Path(__file__).resolve().parents[1]

BAD_MAIN_FLAGS = [
    (["--r", "-3"], "--r"),
    (["--bp_batch", "0"], "--bp_batch"),
    (["--bp_batch", "200"], "--bp_batch"),
    (["--batch_size", "16", "--bp_batch", "17"], "--bp_batch"),
    (["--zo_eps", "0"], "--zo_eps"),
    (["--zo_eps", "-1e-3"], "--zo_eps"),
    (["--finetune_label_ratio", "0"], "--finetune_label_ratio"),
    (["--finetune_label_ratio", "1"], "--finetune_label_ratio"),
    (["--gradient_sparsity", "1"], "--gradient_sparsity"),
    (["--gradient_sparsity", "-0.1"], "--gradient_sparsity"),
    (["--q", "0"], "--q"),
    (["--finetune_epoch", "0"], "--finetune_epoch"),
    (["--patience", "0"], "--patience"),
    (["--interval", "0"], "--interval"),
    (["--interval_unit", "epochs"], "--interval_unit"),
    (["--head_rule", "half"], "--head_rule"),
    (["--fusion", "average"], "--fusion"),
    (["--fusion", "projection", "--q", "2"], "--zo_config htuning"),
    (["--finetune_dataset", "WFDB_Nowhere"], "--finetune_dataset"),
    (["--config", "huge"], "--config"),
    (["--student_config", "huge"], "--student_config"),
    (["--lr", "nan"], "--lr"),
    (["--seed", "-1"], "--seed"),
    (["--zo_config", "search", "--search_bp_batch", "4", "500"], "--search_bp_batch"),
    (["--search_zo_eps", "0"], "--search_zo_eps"),
    (["--demo", "--r", "-3"], "--r"),
]


@pytest.mark.parametrize("flags, named", BAD_MAIN_FLAGS)
def test_main_refuses_bad_values_in_one_line(flags, named, tmp_path, capsys, monkeypatch):
    touched = []
    monkeypatch.setattr(main, "prepare_demo", lambda *a: touched.append("demo"))
    monkeypatch.setattr(main, "locate_datasets", lambda *a: touched.append("data"))
    with pytest.raises(SystemExit) as stop:
        main.main([*flags, "--demo_dir", str(tmp_path)])
    assert stop.value.code == 2 and not touched
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("main.py: error: argument ") and named in err[0]


def test_pipeline_stage_and_teacher_combinations_are_checked(tmp_path, capsys):
    cases = [(["--stage", "student"], "--teacher"),
             (["--stage", "teacher", "--teacher", str(tmp_path / "t.pt")], "--teacher"),
             (["--stage", "student", "--teacher", str(tmp_path / "absent.pt")], "file not found"),
             (["--finetune_dataset", "WFDB_Ga", "WFDB_PTBXL"], "unrecognized arguments"),
             (["--zo_config", "search"], "--zo_config")]
    for flags, named in cases:
        with pytest.raises(SystemExit) as stop:
            main.main(flags, prog="pipeline_ecg.py")
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("pipeline_ecg.py: error:"), err
        assert named in err[0]


@pytest.mark.parametrize("script, flags, named", [
    ("main.py", ["--demo", "--r", "-3"], "--r"),
    ("pipeline_ecg.py", ["--zo_eps", "0"], "--zo_eps"),
    ("pipeline_pretrain.py", ["--epochs", "0"], "--epochs"),
    ("pipeline_pretrain.py", ["--config", "huge"], "--config"),
    ("datacollection.py", ["--workers", "0"], "--workers"),
    ("datacollection.py", ["--valid-fraction", "1.5"], "--valid-fraction"),
    ("benchmark.py", ["step", "--batch", "4", "--bp-batch", "8"], "--bp-batch"),
    ("benchmark.py", ["nosuchsection"], "section"),
])
def test_each_script_refuses_a_bad_flag_without_a_traceback(script, flags, named, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / script), *flags], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and f"{script}: error: " in lines[0] and named in lines[0], proc.stderr
    assert not list(tmp_path.iterdir())           # nothing made, nothing written
