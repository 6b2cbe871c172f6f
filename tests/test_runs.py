"""Runs written by several processes at once: a run is held by the process writing it, so two
searches started together each keep every point, and a restart continues where a dead one stopped."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import main
from runs import LOCK, load_results, open_run, write_manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
SEARCH = ["--zo_config", "search", "--finetune_dataset", "WFDB_Demo", "--no-pretrained", "--search_bp_batch", "4",
          "--search_r", "4", "--device", "cpu"]

# A search in its own process with the training replaced by a stand-in (the files are what is tested):
# its first point waits until the other search has reached its own first point, so both have read
# the results folder before either writes a point.
SEARCH_PROCESS = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import main

    sync, name = Path(sys.argv[1]), sys.argv[2]

    def finetune(data, dataset, cfg, device, **kwargs):
        started = sync / f"{name}.started"
        if not started.exists():
            started.touch()
            deadline = time.monotonic() + 120
            while len(list(sync.glob("*.started"))) < 2:
                if time.monotonic() > deadline:
                    raise SystemExit("the other search never reached its first point")
                time.sleep(0.05)
        return {"dataset": dataset, "r": cfg.r, "auc_roc_macro": cfg.step.zo_eps}, None

    main.finetune = finetune
    main.locate_datasets = lambda args: {"WFDB_Demo": None}
    main.load_experiment_datasets = lambda *args: None
    main.main(sys.argv[3:])
""")


def start(code, *argv, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_two_searches_started_together_each_keep_every_point(tmp_path, monkeypatch):
    results, sync = tmp_path / "result", tmp_path / "sync"
    sync.mkdir()
    dirs = ["--result_dir", results, "--checkpoint_dir", tmp_path / "checkpoints"]
    grids = {"a": ["1e-3", "5e-4"], "b": ["2e-4"]}     # same settings, so the same digest; other points
    searches = {name: start(SEARCH_PROCESS, sync, name, *SEARCH, *dirs, "--search_zo_eps", *grid)
                for name, grid in grids.items()}
    for name, search in searches.items():
        _, err = search.communicate(timeout=300)
        assert search.returncode == 0, err[-2000:]
    kept = {tuple(sorted(e["zo_eps"] for e in load_results(path))): path for path in results.glob("search_*.npy")}
    assert sorted(kept) == [(2e-4,), (5e-4, 1e-3)]          # every point of each search, in a file of its own

    # A restart with the grid of both continues the latest run and adds only the points it lacks.
    latest = max(kept.values(), key=lambda path: int(path.stem.rsplit("_", 1)[1]))
    already = {e["zo_eps"] for e in load_results(latest)}
    trained = []

    def finetune(data, dataset, cfg, device, **kwargs):
        trained.append(cfg.step.zo_eps)
        return {"dataset": dataset, "r": cfg.r, "auc_roc_macro": cfg.step.zo_eps}, None

    monkeypatch.setattr(main, "finetune", finetune)
    monkeypatch.setattr(main, "locate_datasets", lambda args: {"WFDB_Demo": None})
    monkeypatch.setattr(main, "load_experiment_datasets", lambda *args: None)
    restarted = main.main([*SEARCH, *map(str, dirs), "--search_zo_eps", "1e-3", "5e-4", "2e-4"])
    assert sorted(e["zo_eps"] for e in restarted) == [2e-4, 5e-4, 1e-3]
    assert sorted(trained) == sorted({1e-3, 5e-4, 2e-4} - already)
    assert sorted(e["zo_eps"] for e in load_results(latest)) == [2e-4, 5e-4, 1e-3]


HOLDING_PROCESS = textwrap.dedent("""
    import sys, time
    from runs import open_run

    path, _ = open_run(sys.argv[1], "run", {"setting": 1}, resume=False)
    print(path, flush=True)
    time.sleep(300)
""")


def test_a_run_is_not_continued_while_another_process_writes_it(tmp_path):
    holder = start(HOLDING_PROCESS, tmp_path)
    held = Path(holder.stdout.readline().strip())
    try:
        assert held == tmp_path / "run_0.npy" and held.with_suffix(LOCK).is_file()
        mine, resuming = open_run(tmp_path, "run", {"setting": 1}, resume=True)
        assert (mine, resuming) == (tmp_path / "run_1.npy", False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    write_manifest(mine, {"setting": 1}, finished=True)      # finished: no longer held
    assert open_run(tmp_path, "run", {"setting": 1}, resume=True) == (held, True)   # freed by the kill


@pytest.mark.parametrize("finished", [False, True])
def test_this_process_may_continue_a_run_it_holds(tmp_path, finished):
    path, _ = open_run(tmp_path, "run", {"setting": 1}, resume=False)
    write_manifest(path, {"setting": 1}, finished=finished)
    assert open_run(tmp_path, "run", {"setting": 1}, resume=True) == (path, True)


def test_a_run_name_is_claimed_in_the_checkpoint_folder_too(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "best_run_1_WFDB_Demo_teacher.pt").touch()          # an earlier version's checkpoint, unclaimed
    first, _ = open_run(tmp_path / "rA", "run", {"setting": 1}, resume=False, also_in=[checkpoints])
    second, _ = open_run(tmp_path / "rB", "run", {"setting": 1}, resume=False, also_in=[checkpoints])
    assert (first.name, second.name) == ("run_0.npy", "run_2.npy")
    assert [p.name for p in (tmp_path / "rB").glob("*.run.json")] == ["run_2.run.json"]   # no claim left behind
    assert (checkpoints / "run_0.claim").read_text() == str(first.with_suffix(".run.json").resolve())

    # a run whose checkpoints went elsewhere is not continued into a folder where its name is another run's
    open_run(tmp_path / "rC", "run", {"setting": 1}, resume=False)
    with pytest.raises(SystemExit, match=r"the name run_0 belongs to the run of .*rA"):
        open_run(tmp_path / "rC", "run", {"setting": 1}, resume=True, also_in=[checkpoints])
