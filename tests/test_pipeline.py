"""Pipelines end to end on tiny demo data: every main.py mode, the resumable search, distributed
pretraining, and the messages a researcher gets for missing data or checkpoints."""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluation
import main
import pipeline_ecg
from runs import Progress, load_results
from ecg_dataset import load_experiment_datasets
from helper_code import DEMO_CLASSES
from model_src_ecg import build_model
from pipeline_pretrain import pretrain

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = "tinylight"          # teacher and student alike: seconds per run
FAST = ["--config", CONFIG, "--student_config", CONFIG, "--batch_size", "16", "--finetune_epoch", "1",
        "--interval", "32", "--finetune_label_ratio", "0.3"]   # r and bp_batch: the defaults, read by the methods that use them


@pytest.fixture(scope="module")
def backbones(tiny_demo, tmp_path_factory):
    """A tinylight backbone pretrained for one epoch on the tiny demo's CODE-15 part."""
    checkpoint_dir = tmp_path_factory.mktemp("checkpoints")
    pretrain(tiny_demo["code15_train"], tiny_demo["code15_valid"],
             pipeline_ecg.pretrained_path(checkpoint_dir, main.pretrain, CONFIG),
             main.pretrain_config(config=CONFIG, pretrain_epochs=1, pretrain_batch_size=16, seed=18),
             torch.device("cpu"))
    return checkpoint_dir


def run_main(tiny_demo, checkpoint_dir, result_dir, *flags):
    argv = [*FAST, "--finetune_dataset", "WFDB_Demo", "--preprocessed_dir", str(tiny_demo["challenge_h5"].parent),
            "--checkpoint_dir", str(checkpoint_dir), "--result_dir", str(result_dir), "--device", "cpu", *flags]
    return main.main(argv)


@pytest.mark.parametrize("mode, method", [("evolution", "htuning"), ("FT", "ft"), ("lora_bp", "lora_bp"),
                                          ("zo", "zo"), ("zo_sign", "zo_sign"), ("hizoo", "hizoo"),
                                          ("sparse_mezo", "sparse_mezo"), ("fzoo", "fzoo"), ("probe", "probe")])
def test_each_mode_runs_end_to_end(mode, method, tiny_demo, backbones, tmp_path, capsys):
    results = run_main(tiny_demo, backbones, tmp_path, "--zo_config", mode)
    files = sorted(tmp_path.glob("*.npy"))
    assert len(files) == 1 and files[0].with_suffix(".json").is_file()
    saved = list(np.load(files[0], allow_pickle=True))
    assert len(saved) == len(results) == 1
    student, teacher = saved[0], saved[0]["teacher"]
    assert teacher["method"] == method and student["role"] == "student" and teacher["role"] == "teacher"
    for result in (student, teacher):
        assert 0.0 <= result["auc_roc_macro"] <= 1.0 and 0.0 <= result["Map_value"] <= 100.0
        assert result["trainable_num"] > 0 and result["memory"] >= 0 and result["time"] > 0
        assert len(result["auc_roc_per_class"]) == len(result["thresholds"]) == len(DEMO_CLASSES)
        assert np.isfinite(result["challenge_score"]) and result["challenge_score"] <= 1.0
    full = sum(p.numel() for p in build_model(CONFIG, len(DEMO_CLASSES)).parameters())
    assert student["trainable_num"] == full
    assert (teacher["trainable_num"] == full) == (method == "ft")
    reloaded = json.loads(files[0].with_suffix(".json").read_text())
    assert reloaded[0]["teacher"]["auc_roc_macro"] == pytest.approx(teacher["auc_roc_macro"])
    table = capsys.readouterr().out
    assert "WFDB_Demo" in table and "teacher" in table and "student" in table and "macro AUROC" in table
    assert "Challenge" in table and reloaded[0]["challenge_score"] == pytest.approx(student["challenge_score"])


def test_runs_never_overwrite_and_reduced_leads_without_teacher(tiny_demo, backbones, tmp_path):
    once = ["--interval", "100000"]     # one validation, at each stage's end: this test reads files, not curves
    run_main(tiny_demo, backbones, tmp_path, *once)
    first = sorted(tmp_path.glob("*.npy"))
    before = first[0].read_bytes()
    results = run_main(tiny_demo, backbones, tmp_path, *once, "--leads_for_student", "1", "--no-distill")
    files = sorted(tmp_path.glob("*.npy"))
    assert len(files) == 2 and first[0].read_bytes() == before
    assert results[0]["leads"] == 1 and results[0]["teacher"]["leads"] == 12


def test_search_resumes_after_interruption(tiny_demo, backbones, tmp_path, monkeypatch):
    grid = ["--zo_config", "search", "--search_zo_eps", "1e-3", "5e-4", "--search_bp_batch", "4", "--search_r", "4"]
    real_finetune, calls = main.finetune, []

    def interrupted_on_second_point(*args, **kwargs):
        calls.append(args[2].step.zo_eps)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_finetune(*args, **kwargs)

    monkeypatch.setattr(main, "finetune", interrupted_on_second_point)
    with pytest.raises(SystemExit) as stop:
        run_main(tiny_demo, backbones, tmp_path, *grid)
    assert stop.value.code == 130
    (path,) = tmp_path.glob("search_*.npy")
    first = load_results(path)
    assert [e["zo_eps"] for e in first] == [1e-3]

    calls.clear()
    monkeypatch.setattr(main, "finetune", lambda *a, **k: (calls.append(a[2].step.zo_eps), real_finetune(*a, **k))[1])
    results = run_main(tiny_demo, backbones, tmp_path, *grid)
    assert calls == [5e-4]                     # the finished point is not redone
    assert [e["zo_eps"] for e in results] == [1e-3, 5e-4]
    assert results[0]["auc_roc_macro"] == first[0]["auc_roc_macro"]
    assert len(json.loads(path.with_suffix(".json").read_text())) == 2


def test_search_with_other_settings_does_not_resume_into_an_earlier_file(tiny_demo, backbones, tmp_path):
    grid = ["--zo_config", "search", "--search_zo_eps", "1e-3", "--search_bp_batch", "4", "--search_r", "4"]
    trial = run_main(tiny_demo, backbones, tmp_path, *grid)
    longer = run_main(tiny_demo, backbones, tmp_path, *grid, "--finetune_epoch", "2")
    files = sorted(tmp_path.glob("search_*.npy"))
    assert len(files) == 2 and [len(np.load(f, allow_pickle=True)) for f in files] == [1, 1]
    assert trial[0]["iterations"] < longer[0]["iterations"]


def test_same_seed_same_numbers(tiny_demo, backbones, tmp_path):
    data = load_experiment_datasets(tiny_demo["challenge_h5"], 0.3, seed=5)
    cfg = main.run_config(config=CONFIG, r=4, bp_batch=4, batch_size=16, finetune_epoch=2, interval=96,
                                 seed=5, checkpoint_dir=backbones, result_dir=tmp_path, run_name="det")
    first, _ = pipeline_ecg.finetune(data, "WFDB_Demo", cfg, torch.device("cpu"))
    second, _ = pipeline_ecg.finetune(data, "WFDB_Demo", cfg, torch.device("cpu"))
    np.testing.assert_array_equal(first["ap_per_class"], second["ap_per_class"])
    assert first["auc_roc_macro"] == second["auc_roc_macro"]
    assert not list(Path(backbones).glob("*.tmp"))


def test_early_stop_after_patience_checks_without_gain(tiny_demo, backbones, tmp_path, monkeypatch):
    data = load_experiment_datasets(tiny_demo["challenge_h5"], 0.3, seed=5)
    cfg = main.run_config(config=CONFIG, r=4, bp_batch=4, batch_size=16, finetune_epoch=20, interval=1,
                                 patience=2, checkpoint_dir=backbones, result_dir=tmp_path, run_name="stop")
    monkeypatch.setattr(evaluation, "mean_average_precision", lambda labels, scores: 50.0)
    stopped, _ = pipeline_ecg.finetune(data, "WFDB_Demo", cfg, torch.device("cpu"))
    # the first check sets the best; two more without gain reach patience 2
    assert stopped["iterations"] == 3 and stopped["best_valid_map"] == 50.0


def test_validations_fall_at_the_same_samples_for_every_batch_size():
    """Counted in samples, an interval of 256 is 8 steps at batch 32 and 32 steps at batch 8, so
    patience spans as much data at either; counted in iterations (the published rule) it is not."""
    def validated(batch_size, **settings):
        cfg = main.run_config(batch_size=batch_size, bp_batch=min(8, batch_size), **settings)
        total = 4 * 256 // batch_size
        progress, due = Progress(), []
        for _ in range(total):
            progress.record(0.0, 0.0, batch_size)
            if pipeline_ecg.validation_due(cfg, progress, batch_size, total):
                due.append(progress.samples)
        return due
    samples = [256, 512, 768, 1024]
    assert validated(32, interval=256) == validated(8, interval=256) == samples
    assert validated(20, interval=256) == [260, 520, 780, 1020]   # the first step past each multiple, and the end
    assert validated(8, interval=8, interval_unit="iterations") == [64 * k for k in range(1, 17)]
    assert validated(32, interval=8, interval_unit="iterations") == samples


def test_samples_are_counted_as_seen_a_partial_last_batch_as_what_it_holds(tiny_demo, backbones, tmp_path):
    """39 training records at batch 16 are 16 + 16 + 7 an epoch: 39 samples, not 48, so an
    interval of 39 samples validates once an epoch and the history's epoch column counts whole epochs."""
    data = load_experiment_datasets(tiny_demo["challenge_h5"], 0.25, seed=5)
    train_records = len(data.train)
    assert train_records % 16, "the split must leave a partial last batch for this test"
    cfg = main.run_config(config=CONFIG, r=4, bp_batch=4, batch_size=16, finetune_epoch=3, interval=train_records,
                          patience=10, checkpoint_dir=backbones, result_dir=tmp_path, run_name="samples")
    result, _ = pipeline_ecg.finetune(data, "WFDB_Demo", cfg, torch.device("cpu"))
    with open(result["history"]) as f:
        epochs = [float(row["epoch"]) for row in csv.DictReader(f)]
    assert epochs == [1.0, 2.0, 3.0]


def test_every_method_starts_from_the_same_heads(tiny_demo, backbones, tmp_path):
    """The heads come from a generator of their own, seeded by the run's seed: ft and probe (no
    adapters) start from the heads the LoRA methods start from, whatever the adapters drew before."""
    data = load_experiment_datasets(tiny_demo["challenge_h5"], 0.3, seed=5)
    digests = {}
    for method in ("ft", "lora_bp", "lora_bp_accum", "htuning", "probe"):
        cfg = main.run_config(zo_config=method, config=CONFIG, batch_size=16, seed=5, checkpoint_dir=backbones,
                              result_dir=tmp_path)
        digests[method] = pipeline_ecg.start_training(cfg, data, torch.device("cpu"), 10).initial_heads_digest
    assert len(set(digests.values())) == 1, digests
    other_seed = main.run_config(zo_config="ft", config=CONFIG, batch_size=16, seed=6, checkpoint_dir=backbones,
                                 result_dir=tmp_path)
    assert pipeline_ecg.start_training(other_seed, data, torch.device("cpu"), 10).initial_heads_digest != digests["ft"]


def test_reduced_leads_ignore_the_other_leads(tiny_demo):
    data = load_experiment_datasets(tiny_demo["challenge_h5"], 0.3, seed=0)
    net = build_model(CONFIG, len(DEMO_CLASSES))
    loader = torch.utils.data.DataLoader(data.valid, batch_size=8)
    noisy = [(x + torch.randn_like(x) * torch.tensor([0.0] + [1.0] * 11).view(1, 12, 1, 1), y) for x, y in loader]
    _, clean_scores = evaluation.predict(net, loader, torch.device("cpu"), leads=1)
    _, noisy_scores = evaluation.predict(net, noisy, torch.device("cpu"), leads=1)
    np.testing.assert_allclose(clean_scores, noisy_scores, atol=1e-6)


def test_no_pretrained_starts_from_scratch(tiny_demo, tmp_path):
    results = run_main(tiny_demo, tmp_path / "empty", tmp_path, "--no-pretrained", "--interval", "100000")
    assert len(results) == 1 and np.isfinite(results[0]["teacher"]["auc_roc_macro"])


def test_missing_checkpoint_message(tiny_demo, tmp_path):
    with pytest.raises(SystemExit) as error:
        run_main(tiny_demo, tmp_path / "empty", tmp_path)
    message = str(error.value)
    assert str(tmp_path / "empty" / "CODE_testtinylightbias_full_checkpoint.pkl") in message
    assert "published" in message and "pipeline_pretrain.py" in message and "--no-pretrained" in message
    assert not list(tmp_path.glob("*.npy"))


def test_missing_data_message(tmp_path):
    with pytest.raises(SystemExit) as error:
        main.main(["--preprocessed_dir", str(tmp_path), "--result_dir", str(tmp_path / "result")])
    message = str(error.value)
    for dataset in ("WFDB_Ga", "WFDB_PTBXL", "WFDB_Ningbo", "WFDB_ChapmanShaoxing"):
        assert dataset in message
    assert "physionet.org" in message and "--demo" in message and str(tmp_path) in message


def test_pretrain_missing_code15_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="CODE-15 HDF5 not found.*zenodo.*--demo"):
        pretrain(tmp_path / "CODE15_train_32.hdf5", tmp_path / "CODE15_valid_32.hdf5", tmp_path / "x.pkl",
                 main.pretrain_config(config=CONFIG), torch.device("cpu"))


def test_pretraining_loads_no_fine_tuning():
    """pipeline_pretrain imports nothing of pipeline_ecg, not even through another module."""
    code = "import sys, pipeline_pretrain; print('pipeline_ecg' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "False"


def test_torchrun_two_processes_gloo(tiny_demo, tmp_path):
    out_dir = tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO_ROOT / "pipeline_pretrain.py"), "--config", CONFIG, "--train", str(tiny_demo["code15_train"]),
         "--valid", str(tiny_demo["code15_valid"]), "--checkpoint_dir", str(out_dir), "--epochs", "2",
         "--batch_size", "8", "--device", "cpu"],
        capture_output=True, text=True, timeout=240, env=env)
    log = proc.stderr.replace("\r", "\n")
    assert proc.returncode == 0, log[-3000:]
    digests = dict(re.findall(r"rank (\d)/2: final parameters sha256 (\w+)", log))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    writers = re.findall(r"rank (\d): epoch \d+, validation mAP [\d.]+, wrote", log)
    assert writers and set(writers) == {"0"}
    files = sorted(p.name for p in out_dir.iterdir())
    assert files == [f"{main.pretrain}{CONFIG}bias_full_checkpoint.pkl"]

    state = torch.load(out_dir / files[0], weights_only=True)
    expected = {k for k in build_model(CONFIG, 6).state_dict() if not k.startswith("auxiliary_classifier.")}
    assert set(state) == expected
    data = load_experiment_datasets(tiny_demo["challenge_h5"], 0.3, seed=0)
    cfg = main.run_config(config=CONFIG, r=4, bp_batch=4, batch_size=16, finetune_epoch=1, interval=2,
                                 checkpoint_dir=out_dir, run_name="ddp")
    net = pipeline_ecg.build_net(cfg, data.train.num_classes, data.positive_probably)
    assert torch.equal(net.state_dict()["encoder_layers.0.conv1.conv.weight"],
                       state["encoder_layers.0.conv1.conv.weight"])


def test_demo_reuses_data_pretrains_backbones_and_reports(tiny_demo, capsys):
    demo_root = tiny_demo["challenge_h5"].parent.parent
    results = main.main(["--demo", "--demo_dir", str(demo_root), "--config", CONFIG, "--finetune_epoch", "2",
                         "--interval", "1", "--device", "cpu"])
    assert (demo_root / "pretrained_checkpoint" / f"{main.pretrain}{CONFIG}bias_full_checkpoint.pkl").is_file()
    assert len(list((demo_root / "result").glob("demo_htuning_*.npy"))) == 1
    assert results[0]["dataset"] == "WFDB_Demo" and results[0]["teacher"]["method"] == "htuning"
    assert "== WFDB_Demo ==" in capsys.readouterr().out


def test_compare_fine_tunes_every_method_on_one_split_and_resumes(tiny_demo, backbones, tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.setitem(main.PAPER_SCALE, "config", CONFIG)           # the simulated count, small and quick
    monkeypatch.setitem(main.PAPER_SCALE, "batch", 8)
    methods = ["ft", "htuning", "probe"]
    compare = ["--zo_config", "compare", "--compare_methods", *methods, "--seed", "3", "4"]
    real_finetune, trained = main.finetune, []

    def interrupted_at_the_second_seeds_probe(*args, **kwargs):
        if args[2].method == "probe" and args[2].seed == 4:
            raise KeyboardInterrupt
        trained.append((args[2].seed, args[2].method))
        return real_finetune(*args, **kwargs)

    monkeypatch.setattr(main, "finetune", interrupted_at_the_second_seeds_probe)
    with pytest.raises(SystemExit) as stop:
        run_main(tiny_demo, backbones, tmp_path, *compare)
    assert stop.value.code == 130 and trained == [(3, "ft"), (3, "htuning"), (3, "probe"), (4, "ft"), (4, "htuning")]
    merged_before = sorted(p.name for p in Path(backbones).glob("merged_*compare*"))

    monkeypatch.setattr(main, "finetune", real_finetune)
    by_seed = run_main(tiny_demo, backbones, tmp_path, *compare, "--resume")
    merged_after = sorted(p.name for p in Path(backbones).glob("merged_*compare*"))
    assert len(merged_after) == 6 and set(merged_before) < set(merged_after)   # only seed 4's probe was trained
    for seed in (3, 4):
        assert [e["method"] for e in by_seed[seed]] == methods
        splits = {torch.load(e["checkpoint"], weights_only=True)["settings"]["split"] for e in by_seed[seed]}
        assert len(splits) == 1                                    # every method on the seed's one split
        assert len({e["initial_heads_digest"] for e in by_seed[seed]}) == 1   # and from the seed's one start
    assert by_seed[3][0]["initial_heads_digest"] != by_seed[4][0]["initial_heads_digest"]
    (summary,) = tmp_path.glob("*compare*_summary_0.csv")
    rows = {row["method"]: row for row in csv.DictReader(open(summary))}
    assert list(rows) == methods
    aurocs = [by_seed[s][2]["auc_roc_macro"] for s in (3, 4)]
    assert float(rows["probe"]["auc_roc_macro_mean"]) == pytest.approx(np.mean(aurocs))
    assert float(rows["probe"]["auc_roc_macro_std"]) == pytest.approx(np.std(aurocs, ddof=1))
    assert float(rows["ft"]["simulated_gpu_mb"]) > float(rows["htuning"]["simulated_gpu_mb"]) > 0
    assert int(rows["probe"]["trainable_num"]) < int(rows["htuning"]["trainable_num"])
    for kind in ("tradeoff", "validation"):
        (picture,) = tmp_path.glob(f"*compare*_{kind}_0.png")
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "mean ± std over seeds 3, 4" in out and "GPU MiB" in out
