"""Every entry script refuses a bad flag before any work (one argparse-style line, exit status 2),
shows its flags with underscores and reads them with hyphens too; predict.py --threads."""
import argparse
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import benchmark
import main
import predict
from datacollection import CODE15_LABELS
from helper_code import FlagParser, backbone_name
from model_src_ecg import build_model
from synthetic_ecg import write_demo_challenge

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
    (["--zo_estimator", "fzoo"], "--zo_config htuning"),
    (["--finetune_dataset", "WFDB_Nowhere"], "--finetune_dataset"),
    (["--config", "huge"], "--config"),
    (["--student_config", "huge"], "--student_config"),
    (["--lr", "nan"], "--lr"),
    (["--seed", "-1"], "--seed"),
    (["--zo_config", "search", "--search_bp_batch", "4", "500"], "--search_bp_batch"),
    (["--search_zo_eps", "0"], "--search_zo_eps"),
    (["--demo", "--r", "-3"], "--r"),
    # flags the chosen methods never read
    (["--coef", "0.5"], "--coef"),                                       # fusion projection has no c
    (["--zo_config", "lora_bp", "--bp_batch", "4"], "--bp_batch"),
    (["--zo_config", "ft", "--r", "4"], "--r"),
    (["--zo_config", "probe", "--no-recompute"], "--recompute"),
    (["--bn_running_stats", "refreshed"], "--bn_running_stats"),         # htuning's ZO passes refresh them
    (["--zo_config", "zo", "--fzoo_directions", "4"], "--fzoo_directions"),
    (["--zo_config", "search", "--zo_eps", "1e-4"], "--zo_eps"),
    (["--zo_config", "compare", "--compare_methods", "ft", "probe", "--bp_batch", "4"], "--bp_batch"),
    (["--plan", "--memory_budget", "0"], "--memory_budget"),
    (["--plan", "--memory_budget=-1GiB"], "--memory_budget"),
    (["--plan", "--memory_budget", "-1GiB"], "--memory_budget"),
    (["--plan", "--memory_budget", "8XB"], "--memory_budget"),
    (["--plan", "--memory_budget", "0GiB"], "--memory_budget"),
    (["--plan"], "--plan"),
    (["--memory_budget", "8GiB"], "--memory_budget"),
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


@pytest.mark.parametrize("flags", [["--coef", "0.5", "--fusion", "normalized"],
                                   ["--zo_config", "lora_bp_accum", "--bp_batch", "4", "--bn_running_stats", "refreshed"],
                                   ["--zo_config", "compare", "--compare_methods", "ft", "htuning", "--bp_batch", "4"],
                                   ["--zo_config", "ft", "--no-recompute"],
                                   ["--zo_config", "zo", "--zo_eps", "1e-4", "--q", "2"]])
def test_main_takes_flags_that_a_chosen_method_reads(flags):
    args = main.settings_from(main.build_parser(), flags)
    assert all(getattr(args, flag.lstrip("-").removeprefix("no-"), None) is not None for flag in flags
               if flag.startswith("--"))


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
    ("main.py", ["--plan", "--memory_budget", "8XB"], "--memory_budget"),
    ("pipeline_ecg.py", ["--zo_eps", "0"], "--zo_eps"),
    ("pipeline_pretrain.py", ["--epochs", "0"], "--pretrain_epochs"),            # earlier spellings: the
    ("pipeline_pretrain.py", ["--config", "huge"], "--config"),                  # message names the flag
    ("datacollection.py", ["--workers", "0"], "--convert_workers"),              # as it is spelled now
    ("datacollection.py", ["--valid-fraction", "1.5"], "--code15_valid_fraction"),
    ("benchmark.py", ["step", "--batch", "4", "--bp-batch", "8"], "--bp_batch"),
    ("benchmark.py", ["nosuchsection"], "section"),
])
def test_each_script_refuses_a_bad_flag_without_a_traceback(script, flags, named, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / script), *flags], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and f"{script}: error: " in lines[0] and named in lines[0], proc.stderr
    assert not list(tmp_path.iterdir())           # nothing made, nothing written


# ---------------------------------------------------------------------------------------------
# One spelling: underscores shown, hyphens (and earlier spellings) read as the same flag
# ---------------------------------------------------------------------------------------------
def every_parser():
    return {**{prog: main.build_parser(prog) for prog in main.SCRIPT_FLAGS},
            "predict.py": predict.build_parser(), "benchmark.py": benchmark.build_parser()}


def shown_flags(parser):
    return [flag for action in parser._actions for flag in action.option_strings
            if flag.startswith("--") and action.help != argparse.SUPPRESS]


@pytest.mark.parametrize("script", list(every_parser()))
def test_help_shows_every_flag_with_underscores_and_reads_it_with_hyphens(script, capsys):
    parser = every_parser()[script]
    flags = shown_flags(parser)
    negations = {f"--no-{flag[2:]}" for flag in flags}          # argparse's --no-X of a yes/no flag
    assert [f for f in flags if "-" in f[2:] and f not in negations] == []
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    help_text = capsys.readouterr().out
    for flag in flags:
        assert flag in help_text
        twin = "--" + (flag[2:].replace("_", "-") if "_" in flag else flag[2:].replace("-", "_"))
        assert parser.known_spelling(twin) == flag and parser.known_spelling(f"{twin}=3") == f"{flag}=3"
    assert parser.known_spelling("--no_such-flag") == "--no_such-flag"   # left for argparse to name


def test_both_spellings_give_the_same_settings(tmp_path):
    bench = benchmark.build_parser()
    assert vars(bench.parse_args(["step", "--bp-batch", "4", "--num-class", "3", "--student-config", "tiny"])) == \
        vars(bench.parse_args(["step", "--bp_batch", "4", "--num_class=3", "--student_config", "tiny"]))
    run = main.build_parser("main.py")
    assert vars(run.parse_args(["--bp-batch", "4", "--no_distill", "--search-r", "4", "8"])) == \
        {"bp_batch": 4, "distill": False, "search_r": [4, 8]}
    convert = main.build_parser("datacollection.py")
    for spelling in ("--data-root", "--data_root"):
        assert vars(convert.parse_args([spelling, "X", "--valid_fraction", "0.2", "--out", "Y"])) == \
            {"data_root": Path("X"), "code15_valid_fraction": 0.2, "preprocessed_dir": Path("Y")}
    model = tmp_path / "model.pt"
    model.write_bytes(b"")
    apply = predict.build_parser()
    assert vars(apply.parse_args(["--model", str(model), "--batch-size", "4", "--challenge-outputs", "out"])) == \
        vars(apply.parse_args(["--model", str(model), "--batch_size", "4", "--challenge_outputs", "out"]))


def test_values_after_a_bare_double_dash_are_left_as_they_are():
    parser = FlagParser(prog="x.py")
    parser.add_argument("--bp-batch", type=int)
    parser.add_argument("names", nargs="*")
    assert vars(parser.parse_args(["--bp-batch", "2", "--", "--bp-batch"])) == {"bp_batch": 2, "names": ["--bp-batch"]}


# ---------------------------------------------------------------------------------------------
# predict.py --threads
# ---------------------------------------------------------------------------------------------
def test_predict_threads_sets_the_threads_that_score(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    backbone = tmp_path / backbone_name("CODE_test", "tinylight")
    torch.save(build_model("tinylight", len(CODE15_LABELS), r=0).state_dict(), backbone)
    write_demo_challenge(tmp_path / "records", 2, np.random.default_rng(0))
    scored_on, score = [], predict.probabilities
    monkeypatch.setattr(predict, "probabilities", lambda *a: (scored_on.append(torch.get_num_threads()), score(*a))[1])
    before = torch.get_num_threads()
    try:
        for flags, expected in ((["--threads", "1"], 1), ([], 3)):   # without the flag: torch's setting, untouched
            torch.set_num_threads(3)
            scored_on.clear()
            summary = predict.main(["--model", str(backbone), "--records", str(tmp_path / "records"),
                                    "--out", str(tmp_path / "p.csv"), "--device", "cpu", *flags])
            assert summary["predicted"] == 2 and scored_on and set(scored_on) == {expected}
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        predict.main(["--model", str(backbone), "--records", str(tmp_path / "records"), "--threads", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err == ["predict.py: error: argument --threads: must be an integer >= 1, got 0"]


def test_memory_sizes_read_in_mib_or_gib():
    from helper_code import memory_size

    assert [memory_size(text) for text in ("8GiB", "7500MiB", "1.5gib", "64 MiB")] == [8192, 7500, 1536, 64]
    for text in ("0", "0MiB", "-1GiB", "8XB", "8GB", "GiB", "8"):
        with pytest.raises(argparse.ArgumentTypeError):
            memory_size(text)


def test_main_docstring_names_every_method_and_run_mode():
    """main.py's opening lines are a newcomer's first list of what --zo_config takes."""
    from Half_Trainer import METHODS

    missing = {*METHODS, *main.RUN_MODES} - set(re.findall(r"[a-z_]+", main.__doc__))
    assert not missing, f"main.py's docstring names no {sorted(missing)}"
