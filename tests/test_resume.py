"""Interrupted runs continue exactly: SIGKILL and Ctrl-C, finished stages reloaded, the training
history, settings that must match, several seeds summarised; and pipeline_ecg.py's stages. Runs of
other result folders never share a checkpoint, and a resume refuses another run's."""
import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluation
import main
import model_file
import pipeline_ecg
import predict
import runs
from ecg_dataset import load_experiment_datasets
from Half_Trainer import METHODS, HalfTrainer
from pipeline_pretrain import pretrain

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = "tinylight"
# about 40 training records at batch 16: 3 iterations an epoch (the last one partial), 12 a stage, a
# validation every 2 iterations (counted in iterations: samples seen fall off the steps' grid)
FAST = ["--config", CONFIG, "--student_config", CONFIG, "--batch_size", "16", "--finetune_epoch", "4",
        "--interval", "2", "--interval_unit", "iterations", "--patience", "10", "--finetune_label_ratio", "0.3",
        "--finetune_dataset", "WFDB_Demo", "--device", "cpu"]
COMPARED = ("auc_roc_macro", "F1score_b", "Map_value", "best_valid_map", "iterations")


@pytest.fixture(scope="module")
def backbone(tiny_demo, tmp_path_factory):
    path = pipeline_ecg.pretrained_path(tmp_path_factory.mktemp("backbone"), main.pretrain, CONFIG)
    pretrain(tiny_demo["code15_train"], tiny_demo["code15_valid"], path,
             main.pretrain_config(config=CONFIG, pretrain_epochs=1, pretrain_batch_size=16, seed=18),
             torch.device("cpu"))
    return path


def run_dirs(root, backbone):
    """A fresh checkpoint and result folder under `root`, with the pretrained backbone in place."""
    checkpoints, results = root / "checkpoints", root / "result"
    checkpoints.mkdir(parents=True)
    shutil.copy(backbone, checkpoints / backbone.name)
    return ["--checkpoint_dir", str(checkpoints), "--result_dir", str(results)]


def argv_for(tiny_demo, dirs, *flags):
    return [*FAST, "--preprocessed_dir", str(tiny_demo["challenge_h5"].parent), *dirs, *flags]


@pytest.fixture(scope="module")
def uninterrupted(tiny_demo, backbone, tmp_path_factory):
    """The reference: the same run, never interrupted."""
    dirs = run_dirs(tmp_path_factory.mktemp("reference"), backbone)
    return main.main(argv_for(tiny_demo, dirs))[0], dirs


def assert_same_numbers(result, reference):
    for role_result, role_reference in ((result, reference), (result["teacher"], reference["teacher"])):
        for key in COMPARED:
            assert role_result[key] == role_reference[key], key
        np.testing.assert_array_equal(role_result["thresholds"], role_reference["thresholds"])


def test_sigkill_after_a_validation_then_resume_gives_the_uninterrupted_numbers(tiny_demo, backbone, uninterrupted,
                                                                                 tmp_path):
    reference, _ = uninterrupted
    dirs = run_dirs(tmp_path, backbone)
    checkpoints = Path(dirs[1])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "main.py"), *argv_for(tiny_demo, dirs)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(checkpoints.glob("resume_*_teacher.pt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not list(checkpoints.glob("merged_*"))
    assert not list(checkpoints.glob("*.tmp")) and not list(checkpoints.glob(".*.tmp"))

    resumed = main.main(argv_for(tiny_demo, dirs, "--resume"))[0]
    assert_same_numbers(resumed, reference)
    (manifest,) = Path(dirs[3]).glob("*.run.json")
    assert json.loads(manifest.read_text())["finished"] and not list(checkpoints.glob("resume_*"))


def test_ctrl_c_in_the_student_leaves_the_teacher_finished_and_resumes_exactly(tiny_demo, backbone, uninterrupted,
                                                                               tmp_path, monkeypatch, caplog):
    reference, reference_dirs = uninterrupted
    dirs = run_dirs(tmp_path, backbone)
    real_step, steps = HalfTrainer.step, []

    def interrupt_the_student(self, *args, **kwargs):
        steps.append(self.cfg.method)
        if self.cfg.method == "ft" and steps.count("ft") == 5:     # the student, after its 2nd validation
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(HalfTrainer, "step", interrupt_the_student)
    argv = argv_for(tiny_demo, dirs)
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit) as stop:
        main.main(argv)
    assert stop.value.code == 130
    assert "--resume" in caplog.text and "every file written so far is complete" in caplog.text
    checkpoints, results = Path(dirs[1]), Path(dirs[3])
    assert len(list(checkpoints.glob("merged_*_teacher.pt"))) == 1
    assert len(list(checkpoints.glob("resume_*_student.pt"))) == 1

    steps.clear()
    monkeypatch.setattr(HalfTrainer, "step", lambda self, *a, **k: (steps.append(self.cfg.method),
                                                                    real_step(self, *a, **k))[1])
    with caplog.at_level(logging.INFO):
        resumed = main.main([*argv, "--resume"])[0]
    assert "htuning" not in steps and steps.count("ft") == 12 - 4   # teacher reloaded; student from iteration 4
    assert "finished earlier, reloading" in caplog.text
    assert_same_numbers(resumed, reference)

    # the history continues across the resume: the same rows as the uninterrupted run's
    for role in ("teacher", "student"):
        (history,) = results.glob(f"*_{role}_history.csv")
        (reference_history,) = Path(reference_dirs[3]).glob(f"*_{role}_history.csv")
        rows, reference_rows = (list(csv.DictReader(open(p))) for p in (history, reference_history))
        assert [r["iteration"] for r in rows] == ["2", "4", "6", "8", "10", "12"]
        for row, reference_row in zip(rows, reference_rows):
            for column in ("iteration", "train_loss", "valid_map", "lr", "coef"):
                assert row[column] == reference_row[column], column
        assert (rows[0]["coef"] != "") == (role == "teacher" and main.fusion != "projection")
        assert float(rows[-1]["seconds"]) > 0


def test_two_interruptions_mid_epoch_then_two_resumes_give_the_uninterrupted_numbers(tiny_demo, backbone, tmp_path,
                                                                                       monkeypatch):
    """A validation after every iteration, 3 iterations an epoch: stopped before
    iteration 5 (the state of iteration 4, an epoch's first), resumed and stopped again before
    iteration 7, so the second resumable state was written by a run that began mid-epoch and
    validated twice in it; the second resume then ends exactly where an uninterrupted run does."""
    every_iteration = ("--stage", "teacher", "--interval", "1")
    (reference,) = main.main(argv_for(tiny_demo, run_dirs(tmp_path / "reference", backbone), *every_iteration))
    dirs = run_dirs(tmp_path / "interrupted", backbone)
    real_step = HalfTrainer.step

    def stop_at_call(n):
        calls = []

        def step(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real_step(self, *args, **kwargs)
        return step

    for stop_before, flags in ((5, ()), (3, ("--resume",))):   # iterations 1-4, then 5-6
        monkeypatch.setattr(HalfTrainer, "step", stop_at_call(stop_before))
        with pytest.raises(SystemExit) as stop:
            main.main(argv_for(tiny_demo, dirs, *every_iteration, *flags))
        assert stop.value.code == 130
    saved = torch.load(next(Path(dirs[1]).glob("resume_*_teacher.pt")), weights_only=True)
    assert saved["progress"]["current"] == 6 and saved["random"]["order"] is not None
    monkeypatch.setattr(HalfTrainer, "step", real_step)
    (resumed,) = main.main(argv_for(tiny_demo, dirs, *every_iteration, "--resume"))
    for key in COMPARED:
        assert resumed[key] == reference[key], key
    np.testing.assert_array_equal(resumed["thresholds"], reference["thresholds"])


def test_resume_with_nothing_to_resume_or_other_settings_starts_fresh(tiny_demo, backbone, tmp_path, monkeypatch,
                                                                      caplog):
    dirs = run_dirs(tmp_path, backbone)
    monkeypatch.setattr(main, "run_teacher_and_student",
                        lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with caplog.at_level(logging.INFO):
        with pytest.raises(SystemExit):
            main.main(argv_for(tiny_demo, dirs, "--resume"))
        assert "no unfinished run" in caplog.text
        caplog.clear()
        with pytest.raises(SystemExit):
            main.main(argv_for(tiny_demo, dirs, "--resume", "--zo_eps", "5e-4"))
    assert "other settings (zo_eps: 0.001 -> 0.0005)" in caplog.text
    assert len(list(Path(dirs[3]).glob("*.run.json"))) == 2


def test_several_seeds_run_in_turn_and_summarise(tiny_demo, backbone, tmp_path, capsys):
    dirs = run_dirs(tmp_path, backbone)
    argv = argv_for(tiny_demo, dirs, "--seed", "3", "4", "--finetune_epoch", "1")
    by_seed = main.main(argv)
    assert list(by_seed) == [3, 4]
    (summary_csv,) = Path(dirs[3]).glob("*seeds3-4_summary_0.csv")
    rows = list(csv.DictReader(open(summary_csv)))
    assert [row["model"].split()[0] for row in rows] == ["teacher", "student"]
    student = np.array([by_seed[s][0]["auc_roc_macro"] for s in (3, 4)])
    assert float(rows[1]["auc_roc_macro_mean"]) == pytest.approx(student.mean())
    assert float(rows[1]["auc_roc_macro_std"]) == pytest.approx(student.std(ddof=1))
    challenge = np.array([by_seed[s][0]["challenge_score"] for s in (3, 4)])
    assert float(rows[1]["challenge_score_mean"]) == pytest.approx(challenge.mean())
    summary = json.loads(summary_csv.with_suffix(".json").read_text())
    assert summary["seeds"] == [3, 4] and len(summary["summary"]) == 2
    assert "mean ± std over seeds 3, 4" in capsys.readouterr().out
    assert len(list(Path(dirs[3]).glob("htuning_*_seed3_0.npy"))) == 1
    assert len(list(Path(dirs[3]).glob("htuning_*_seed4_0.npy"))) == 1


def test_pipeline_script_stages_teacher_then_student_from_its_file(tiny_demo, backbone, tmp_path, capsys,
                                                                   monkeypatch):
    dirs = run_dirs(tmp_path, backbone)
    base = argv_for(tiny_demo, dirs, "--finetune_epoch", "1")
    base.remove("--finetune_dataset")
    base.remove("WFDB_Demo")
    base += ["--finetune_dataset", "WFDB_Demo"]
    (teacher,) = main.main([*base, "--stage", "teacher", "--zo_config", "zo_sign"], prog="pipeline_ecg.py")
    assert teacher["role"] == "teacher" and teacher["method"] == "zo_sign"
    merged = Path(teacher["checkpoint"])
    assert merged.is_file() and merged.name.startswith("merged_") and merged.name.endswith("_teacher.pt")
    out = capsys.readouterr().out
    assert "teacher tinylight/zo_sign" in out and "student" not in out

    trained = []
    real_finetune = pipeline_ecg.finetune
    monkeypatch.setattr(main, "finetune", lambda *a, **k: (trained.append(k.get("role")), real_finetune(*a, **k))[1])
    (student,) = main.main([*base, "--stage", "student", "--teacher", str(merged)], prog="pipeline_ecg.py")
    assert trained == ["student"]                          # the teacher is read from its file, not trained
    assert student["teacher"]["auc_roc_macro"] == teacher["auc_roc_macro"]
    assert "distilled" in capsys.readouterr().out
    (alone,) = main.main([*base, "--stage", "student", "--no-distill"], prog="pipeline_ecg.py")
    assert "teacher" not in alone and alone["role"] == "student"
    written = sorted(p.name for p in Path(dirs[3]).glob("*.json") if not p.name.endswith(".run.json"))
    assert written == ["tinylight_seed18_WFDB_Demo_student_0.json",
                       "tinylight_seed18_WFDB_Demo_student_1.json",
                       "zo_sign_tinylight_seed18_WFDB_Demo_teacher_0.json"]


def test_pipeline_script_runs_as_a_script(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "pipeline_ecg.py"), "--help"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and "--stage" in proc.stdout and "--teacher" in proc.stdout
    assert "python pipeline_ecg.py --finetune_dataset WFDB_PTBXL --stage student" in proc.stdout


def test_search_resumes_from_its_json_never_the_pickle(tiny_demo, backbone, tmp_path):
    dirs = run_dirs(tmp_path, backbone)
    grid = ["--zo_config", "search", "--search_zo_eps", "1e-3", "--search_bp_batch", "4", "--search_r", "4",
            "--finetune_epoch", "1"]
    first = main.main(argv_for(tiny_demo, dirs, *grid))
    (npy,) = Path(dirs[3]).glob("search_*.npy")
    npy.write_bytes(b"not a pickle: resuming must never read this file")
    grown = [*grid[:3], "5e-4", *grid[3:]]              # one more point: the file is rewritten whole
    again = main.main(argv_for(tiny_demo, dirs, *grown))
    assert [e["zo_eps"] for e in again] == [1e-3, 5e-4]
    assert again[0]["auc_roc_macro"] == first[0]["auc_roc_macro"]
    np.testing.assert_array_equal(again[0]["thresholds"], first[0]["thresholds"])
    assert [e["zo_eps"] for e in np.load(npy, allow_pickle=True)] == [1e-3, 5e-4]


# A run in its own process, stopped by Ctrl-C at the training step argv[1] (1 = the first): it leaves
# its best and resumable states behind.
STOPPED_RUN = """
import itertools, sys
import main
from Half_Trainer import HalfTrainer

real_step, step_number = HalfTrainer.step, itertools.count(1)

def step_then_stop(self, *args, **kwargs):
    if next(step_number) == int(sys.argv[1]):
        raise KeyboardInterrupt
    return real_step(self, *args, **kwargs)

HalfTrainer.step = step_then_stop
main.main(sys.argv[2:])
"""


def start_stopped_run(step, argv):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-c", STOPPED_RUN, str(step), *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def assert_stopped(run):
    _, err = run.communicate(timeout=600)
    assert run.returncode == 130, err[-2000:]


def shared_checkpoints(root, backbone, result_folders):
    """One checkpoint folder (with the backbone) and a result folder each: the folder flags of each run."""
    checkpoints = root / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(backbone, checkpoints / backbone.name)
    return checkpoints, [["--checkpoint_dir", str(checkpoints), "--result_dir", str(root / name)]
                         for name in result_folders]


def run_name(result_dir):
    (manifest,) = Path(result_dir).glob("*.run.json")
    return manifest.name[:-len(".run.json")]


def test_runs_of_other_result_folders_never_share_a_checkpoint(tiny_demo, backbone, tmp_path):
    checkpoints, dirs = shared_checkpoints(tmp_path, backbone, ["rA", "rB", "rC"])
    lrs = ["0.004", "0.001", "0.0002"]      # other settings under the same run prefix: other weights
    argvs = [argv_for(tiny_demo, flags, "--stage", "teacher", "--lr", lr) for flags, lr in zip(dirs, lrs)]
    together = [start_stopped_run(5, argv) for argv in argvs[:2]]     # stopped at iteration 4
    for run in together:
        assert_stopped(run)
    assert_stopped(start_stopped_run(5, argvs[2]))                     # one more, after them

    names = [run_name(flags[3]) for flags in dirs]
    assert len(set(names)) == 3
    for name in names:
        for kind in ("best", "resume"):
            saved = torch.load(checkpoints / f"{kind}_{name}_WFDB_Demo_teacher.pt", weights_only=True)
            assert saved["writer"]["run"] == name
    assert len(list(checkpoints.glob("resume_*"))) == 3 and len(list(checkpoints.glob("best_*"))) == 3

    data = load_experiment_datasets(tiny_demo["challenge_h5"], 0.3, 18)
    test_loader = torch.utils.data.DataLoader(data.test, batch_size=16)
    aurocs = []
    for name, flags, argv in zip(names, dirs, argvs):
        main.main([*argv, "--resume"])
        (recorded,) = json.loads((Path(flags[3]) / f"{name}.json").read_text())
        merged = checkpoints / f"merged_{name}_WFDB_Demo_teacher.pt"
        assert recorded["checkpoint"] == str(merged)
        _, net, model = model_file.load_merged(merged, torch.device("cpu"))
        labels, scores = evaluation.predict(net, test_loader, torch.device("cpu"))
        scored = evaluation.evaluate(labels, scores, thresholds=np.asarray(model["thresholds"]))
        for key in ("auc_roc_macro", "F1score_b", "Map_value"):
            assert scored[key] == pytest.approx(recorded[key]), (name, key)
        aurocs.append(recorded["auc_roc_macro"])
    assert len(set(aurocs)) == 3             # three different models: an overwrite could not pass unseen


def test_resume_refuses_a_resumable_state_another_run_wrote(tiny_demo, backbone, tmp_path):
    checkpoints, dirs = shared_checkpoints(tmp_path, backbone, ["rA", "rB"])
    argvs = [argv_for(tiny_demo, flags, "--stage", "teacher", "--finetune_epoch", "1") for flags in dirs]
    for argv in argvs:
        assert_stopped(start_stopped_run(3, argv))                     # after the first validation
    mine, other = (run_name(flags[3]) for flags in dirs)
    resumable = checkpoints / f"resume_{mine}_WFDB_Demo_teacher.pt"
    shutil.copy(checkpoints / f"resume_{other}_WFDB_Demo_teacher.pt", resumable)   # as runs did before claiming names
    folders = (checkpoints, Path(dirs[0][3]))
    before = {p: p.read_bytes() for folder in folders for p in folder.iterdir()}

    with pytest.raises(SystemExit) as refused:
        main.main([*argvs[0], "--resume"])
    message = str(refused.value.code)
    assert "\n" not in message and str(resumable) in message and f"run {other}," in message
    assert {p: p.read_bytes() for folder in folders for p in folder.iterdir()} == before   # nothing written or deleted


# ---------------------------------------------------------------------------------------------
# Files written before issue 35's move: the same layout is written, and files of it still load
# ---------------------------------------------------------------------------------------------
SAVED_LAYOUTS = Path(__file__).parent / "data" / "saved_layouts.json"
# the runs whose files saved_layouts.json records (recorded at 7541265 by the same flags), every method's teacher
# one; ft also its 1-lead student, distilled. Stages of 3 iterations, validated at 2 and 3.
LAYOUT_ARGV = ["--config", CONFIG, "--student_config", CONFIG, "--batch_size", "16", "--finetune_epoch", "1",
               "--interval", "2", "--interval_unit", "iterations", "--finetune_label_ratio", "0.3", "--seed", "18",
               "--finetune_dataset", "WFDB_Demo", "--no-pretrained", "--device", "cpu", "--leads_for_student", "1"]
# the methods whose files the test writes again: together every distinct file layout recorded; the other
# methods' files differ from htuning's only in the trainer's state, checked for every method by
# test_every_trainer_state_keeps_its_recorded_layout
LAYOUT_RUNS = ("ft", "htuning", "fzoo", "probe")
PLAIN_VALUES = {"int": 0, "float": 0.0, "str": "", "bool": False, "NoneType": None}


def layout(value):
    """The nested keys of `value`, a tensor as its dtype and shape, a plain value as its type."""
    if isinstance(value, torch.Tensor):
        return f"tensor {str(value.dtype).removeprefix('torch.')} {list(value.shape)}"
    if isinstance(value, dict):
        return {(k if isinstance(k, str) else f"{type(k).__name__}:{k}"): layout(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [layout(v) for v in value]
        if len(items) > 1 and all(item == items[0] for item in items):
            return {f"<{type(value).__name__}>": len(items), "each": items[0]}
        return {f"<{type(value).__name__}>": items}
    return type(value).__name__


def recorded_layouts():
    """{file: layout} of saved_layouts.json, its shared parts written out."""
    saved = json.loads(SAVED_LAYOUTS.read_text())

    def expand(node):
        if isinstance(node, str) and node.startswith("@"):
            return expand(saved["parts"][node[1:]])
        return {k: expand(v) for k, v in node.items()} if isinstance(node, dict) else node
    return {name: expand(content) for name, content in saved["files"].items()}


def in_layout(recorded, donor):
    """A value of the `recorded` layout: `donor`'s value wherever it has one of that layout (a run needs
    real values: its settings, generator states), else zeros of the tensor's dtype and shape, or the
    type's plain value."""
    if isinstance(recorded, str) and recorded.startswith("tensor "):
        if isinstance(donor, torch.Tensor) and layout(donor) == recorded:
            return donor
        _, dtype, shape = recorded.split(" ", 2)
        return torch.zeros(json.loads(shape), dtype=getattr(torch, dtype))
    if isinstance(recorded, str):
        return donor if type(donor).__name__ == recorded else PLAIN_VALUES[recorded]
    sequence = next((key for key in recorded if key.startswith("<")), None)
    if sequence is None:
        named = {str(k) if isinstance(k, str) else f"{type(k).__name__}:{k}": v
                 for k, v in (donor.items() if isinstance(donor, dict) else ())}
        return {(int(k[len("int:"):]) if k.startswith("int:") else k): in_layout(v, named.get(k))
                for k, v in recorded.items()}
    items = [recorded["each"]] * recorded[sequence] if "each" in recorded else recorded[sequence]
    donor = list(donor) if isinstance(donor, (list, tuple)) else []
    built = [in_layout(item, donor[i] if i < len(donor) else None) for i, item in enumerate(items)]
    return tuple(built) if sequence == "<tuple>" else built


def run_through_stops(argv, method, stopped, recorded, files):
    """main.main(argv) to its end: at each stop (KeyboardInterrupt), the stopped stage's resumable and best
    files are read into `files` and replaced by files built in the recorded layout, and the run continues
    (argv holds --resume). Returns the run's result."""
    while True:
        try:
            return main.main(argv)[0]
        except SystemExit as stop:
            assert stop.code == 130
        resume = stopped[-1]
        role = resume.stem.rsplit("_", 1)[1]
        for kind, path in (("resume", resume), ("best", resume.with_name(f"best{resume.name[len('resume'):]}"))):
            name = f"{kind} {method} {role}"
            files[name] = torch.load(path, weights_only=True)
            torch.save(in_layout(recorded[name], files[name]), path)


@pytest.fixture(scope="module")
def written_files(tiny_demo, tmp_path_factory):
    """Each run of LAYOUT_RUNS, every stage stopped right after its first resumable state and continued
    from files built in the recorded layout (run_through_stops). Returns the files read ({name as
    recorded: content}), the merged files' paths, and each run's flags and result."""
    recorded, root = recorded_layouts(), tmp_path_factory.mktemp("layouts")
    real_save, stopped = runs.Stage.save_resumable, []

    def save_then_stop(self, **state):
        real_save(self, **state)
        if self.resume not in stopped:
            stopped.append(self.resume)
            raise KeyboardInterrupt

    files, merged, argvs, results = {}, {}, {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(runs.Stage, "save_resumable", save_then_stop)
            for method in LAYOUT_RUNS:
                checkpoints = root / method / "checkpoints"
                argvs[method] = [*LAYOUT_ARGV, "--zo_config", method, "--stage", "both" if method == "ft" else
                                 "teacher", "--preprocessed_dir", str(tiny_demo["challenge_h5"].parent),
                                 "--checkpoint_dir", str(checkpoints), "--result_dir", str(root / method / "result"),
                                 "--resume"]
                results[method] = run_through_stops(argvs[method], method, stopped, recorded, files)
                for path in checkpoints.glob("merged_*.pt"):
                    name = f"merged {method} {path.stem.rsplit('_', 1)[1]}"
                    files[name], merged[name] = torch.load(path, weights_only=True), path
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(files=files, merged=merged, argvs=argvs, results=results, root=root)


def test_files_are_written_in_the_layout_recorded_before_the_move(written_files):
    recorded = recorded_layouts()
    assert set(written_files.files) == {name for name in recorded if name.split()[1] in LAYOUT_RUNS}
    for name, content in written_files.files.items():
        assert layout(content) == recorded[name], name


def test_files_in_the_recorded_layout_load(written_files, tmp_path):
    recorded = recorded_layouts()
    # every stage stopped continued from its files built in the recorded layout: its history goes on from them
    for name, content in written_files.files.items():
        if name.startswith("resume "):
            (history,) = (written_files.root / name.split()[1] / "result").glob(f"*_{name.split()[2]}_history.csv")
            with open(history, newline="") as f:
                rows = list(csv.DictReader(f))
            assert len(rows) == 2 and float(rows[0]["seconds"]) == content["history"][0]["seconds"], name
    # merged files built in the recorded layout: read by predict.py, by model_file and by a finished run's reload
    for name, path in written_files.merged.items():
        torch.save(in_layout(recorded[name], written_files.files[name]), path)
        model = predict.load_model(path, torch.device("cpu"))
        assert model.config == CONFIG and model.split is not None
        result, _, description = model_file.load_merged(path, torch.device("cpu"))
        assert result["iterations"] == 3 and description["leads"] == list(model.leads)
    reloaded = main.main(written_files.argvs["ft"])[0]
    for result, earlier in ((reloaded, written_files.results["ft"]),
                            (reloaded["teacher"], written_files.results["ft"]["teacher"])):
        assert all(result[key] == earlier[key] for key in COMPARED)


@pytest.fixture(scope="module")
def layout_data(tiny_demo):
    return load_experiment_datasets(tiny_demo["challenge_h5"], 0.3, 18)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_trainer_state_keeps_its_recorded_layout(method, layout_data, tmp_path, one_thread):
    """What each method's trainer saves for a resume (rng_state) after a step, as recorded before the
    move; and a state built in that layout is taken back."""
    recorded = recorded_layouts()[f"resume {method} teacher"]["random"]["trainer"]
    cfg = main.run_config(zo_config=method, config=CONFIG, batch_size=16, seed=18, pretrained=False,
                          checkpoint_dir=tmp_path, result_dir=tmp_path)
    training = pipeline_ecg.start_training(cfg, layout_data, torch.device("cpu"), 3)
    x, y = next(iter(torch.utils.data.DataLoader(layout_data.train, batch_size=16)))
    pipeline_ecg.train_step(training, x, y, None, cfg, 3, torch.device("cpu"))
    state = training.trainer.rng_state()
    assert layout(state) == recorded
    training.trainer.set_rng_state(in_layout(recorded, state))
