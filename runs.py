"""A run's files and everything resuming needs: one scheme for every kind of run.

A run is named `{prefix}_{n}`. Its number is claimed by creating `{prefix}_{n}.run.json` with an
exclusive create, so two runs started together into one folder never share a name. The name is
claimed the same way in the checkpoint folder, by `{prefix}_{n}.claim` (it holds the path of the
run's manifest), and a name that earlier checkpoints there use is skipped: runs with different
result folders and one checkpoint folder, together or one after the other, never share a file.
A `--resume` whose run's name belongs there to another run stops, saying so. The manifest
holds the run's settings and whether it finished; `--resume` continues the latest run of the same
prefix whose settings are the same, an unfinished one first (a search always does, so a grown grid
continues in the same file). Its results go to `{prefix}_{n}.npy` and `.json`.

While a process writes a run it holds it: an exclusive lock on `{prefix}_{n}.lock`, which the
operating system releases when the process ends, however it ends. A run another process holds is
never continued, so two searches (or two `--resume`s) started together each write a run of their
own and both keep every result; a restart after a crash finds the run free and continues it.

A run trains stages (a dataset's teacher or student). A stage's files are named
`{run}_{dataset}_{role}` and carry the stage's settings, so a file written under other settings is
never used, and their writer (the run, the stage and its settings' digest): a file that another run
wrote under this name is refused, in one line naming both, by a resume, a reload and --teacher
(check_writer). A file from before checkpoints recorded their writer is judged by its settings alone:
- `best_*.pt` (checkpoint_dir): the best state so far;
- `resume_*.pt` (checkpoint_dir): everything needed to continue exactly, rewritten at every
  validation (weights, optimizer, scheduler, counters, every random generator, the history);
- `merged_*.pt` (checkpoint_dir): the finished stage, reloaded instead of trained again;
- `*_history.csv` (result_dir): one row per validation.

NOT_AFFECTING_RESULTS is the one list of settings that say where files go, how fast a run goes or
which run to continue, and never what it computes: they are left out of every settings check.
"""
import csv
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:   # not POSIX: runs are not held, and two processes could continue one run
    fcntl = None

import numpy as np
import torch

from helper_code import atomic_path, settings_differences, settings_digest, state_digest, to_jsonable

log = logging.getLogger("adagrad_fusion.runs")

NOT_AFFECTING_RESULTS = ("run_name", "checkpoint_dir", "result_dir", "demo_dir", "workers", "device", "resume",
                         "plan", "memory_budget", "memory_guard")
HISTORY_COLUMNS = ("iteration", "epoch", "train_loss", "valid_map", "lr", "coef", "seconds")
MANIFEST = ".run.json"
LOCK = ".lock"
CLAIM = ".claim"      # in a folder of checkpoints: this run name is taken there, by the run it names
CHECKPOINT_KINDS = ("best", "resume", "merged")
_held = {}            # lock path -> the open file through which this process holds that run


def affecting_results(settings):
    """The settings that decide a run's numbers, sorted by name."""
    return {k: v for k, v in sorted(settings.items()) if k not in NOT_AFFECTING_RESULTS}


# ---------------------------------------------------------------------------------------------
# Runs: numbered, claimed atomically, resumable by settings
# ---------------------------------------------------------------------------------------------
def claim(folder, prefix, suffix=MANIFEST, also_in=()):
    """`folder/{prefix}_{n}` with the first n whose `suffix` file this call could create exclusively
    (the file is left empty for the caller to fill) and whose name is free in every folder of
    `also_in` (take_name). Concurrent callers always get different n."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        stem = folder / f"{prefix}_{n}"
        taken = []
        for other in also_in:
            if not take_name(other, stem.name, stem.with_name(stem.name + MANIFEST)):
                break
            taken.append(Path(other) / f"{stem.name}{CLAIM}")
        if len(taken) == len(also_in):
            try:
                with open(stem.with_name(stem.name + suffix), "x"):
                    return stem
            except FileExistsError:
                pass
        for name_claim in taken:   # the name is not free everywhere: give back what this try took
            name_claim.unlink()
        n += 1


def take_name(folder, name, manifest):
    """Claim the run name `name` in `folder` for the run whose manifest is `manifest`: True when this
    call created `{name}.claim` exclusively (holding the manifest's path), False when the name is
    taken there: claimed by a run, or used by checkpoints written before runs claimed their names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if any(next(folder.glob(f"{kind}_{name}_*.pt"), None) for kind in CHECKPOINT_KINDS):
        return False
    try:
        with open(folder / f"{name}{CLAIM}", "x") as f:
            f.write(str(Path(manifest).resolve()))
    except FileExistsError:
        return False
    return True


def check_name_held(folder, manifest):
    """Stop with one line when the name of the run whose manifest is `manifest` was claimed in
    `folder` by another run (whose files there would be read as this run's). A run from before runs
    claimed their names claims it now."""
    manifest = Path(manifest).resolve()
    name = manifest.name[:-len(MANIFEST)]
    name_claim = Path(folder) / f"{name}{CLAIM}"
    name_claim.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(name_claim, "x") as f:
            f.write(str(manifest))
    except FileExistsError:
        pass
    owner = name_claim.read_text()
    if owner != str(manifest):
        raise SystemExit(f"error: --resume: run {name} of {manifest.parent} writes its checkpoints in {folder}, where "
                         f"the name {name} belongs to the run of {owner or 'another process'} ({name_claim}); not "
                         f"continuing it")


def _manifests(result_dir, prefix):
    """(n, manifest content) of every run `{prefix}_{n}` in result_dir, by n."""
    found = []
    for manifest in Path(result_dir).glob(f"{prefix}_*{MANIFEST}"):
        number = manifest.name[len(prefix) + 1:-len(MANIFEST)]
        text = manifest.read_text() if number.isdigit() else ""
        if text:  # empty: claimed a moment ago, its manifest not yet written
            found.append((int(number), json.loads(text)))
    return sorted(found, key=lambda item: item[0])


def hold(path):
    """Hold the run whose .npy is `path` for this process; False when another process holds it.

    The lock lives as long as the open file: the operating system drops it when the process
    ends, a SIGKILL included. This process may hold a run again (a retry after an exception)."""
    lock = Path(path).with_suffix(LOCK).resolve()
    if fcntl is None or lock in _held:
        return True
    f = open(lock, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return False
    except OSError as error:   # a file system without locks: the run goes unheld, as without fcntl
        log.warning("cannot lock %s (%s): another process could continue this run at the same time", lock, error)
        f.close()
        return True
    _held[lock] = f
    return True


def release(path):
    """Let other processes continue the run of `path`."""
    f = _held.pop(Path(path).with_suffix(LOCK).resolve(), None)
    if f is not None:
        f.close()


def open_run(result_dir, prefix, settings, resume, also_in=()):
    """(path of the run's .npy, resuming), the run held by this process (hold): with `resume`, the
    latest run of `prefix` with these settings that no other process holds, unfinished ones first
    (a finished one is reloaded stage by stage, not trained again); otherwise, or when there is
    none, a newly claimed run. `also_in`: the other folders the run writes to (its checkpoints),
    where its name is claimed too, so that no other run writes files of that name there."""
    settings = affecting_results(settings)
    digest = settings_digest(settings)
    if resume:
        runs = _manifests(result_dir, prefix)
        same = [(content["finished"], n) for n, content in runs if content["digest"] == digest]
        for finished, n in sorted(same, key=lambda item: (item[0], -item[1])):   # unfinished first, then latest
            path = Path(result_dir) / f"{prefix}_{n}.npy"
            if hold(path):
                for folder in also_in:
                    check_name_held(folder, path.with_suffix(MANIFEST))
                log.info("resuming %s%s", path.with_suffix(MANIFEST), " (finished: its stages are reloaded)" * finished)
                return path, True
            log.info("--resume: %s is being written by another process; not continuing it", path.with_suffix(MANIFEST))
        unfinished = [(n, content) for n, content in runs if not content["finished"]]
        if same:
            log.info("--resume: every run %s_* with these settings is being written; starting a new run", prefix)
        elif unfinished:
            n, content = unfinished[-1]
            log.warning("--resume: %s_%d was run with other settings (%s); starting a new run", prefix, n,
                        settings_differences(content["settings"], to_jsonable(settings)))
        else:
            log.info("--resume: no unfinished run %s_* in %s; starting a new run", prefix, result_dir)
    path = claim(result_dir, prefix, also_in=also_in).with_suffix(".npy")
    hold(path)   # before its manifest says what it is: no other process can take it first
    write_manifest(path, settings, finished=False)
    return path, False


def write_manifest(path, settings, finished):
    """The run's settings and whether it finished; a finished run is no longer held."""
    settings = affecting_results(settings)
    with atomic_path(Path(path).with_suffix(MANIFEST)) as tmp:
        tmp.write_text(json.dumps({"settings": to_jsonable(settings), "digest": settings_digest(settings),
                                   "finished": finished}, indent=1))
    if finished:
        release(path)


def save_results(npy_path, results):
    """The run's results list as .npy and JSON beside it, each written atomically."""
    with atomic_path(npy_path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.array(results, dtype=object), allow_pickle=True)
    with atomic_path(Path(npy_path).with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(to_jsonable(results), indent=1))


def load_results(npy_path):
    """A run's results list from its JSON (never from the pickled .npy, which could run code):
    lists of numbers back to arrays, and null back to NaN. [] when there is none yet."""
    def restore(value):
        if isinstance(value, dict):
            return {k: restore(v) for k, v in value.items()}
        if isinstance(value, list):
            return np.array([np.nan if v is None else v for v in value], dtype=np.float64)
        return np.nan if value is None else value
    json_path = Path(npy_path).with_suffix(".json")
    return [restore(entry) for entry in json.loads(json_path.read_text())] if json_path.is_file() else []


# ---------------------------------------------------------------------------------------------
# Stages: the files of one dataset's teacher or student, and the state a resume restores
# ---------------------------------------------------------------------------------------------
@dataclass
class Progress:
    """The training loop's counters; saved with every resumable state."""
    current: int = 0
    best_map: float = -np.inf
    checks_without_gain: int = 0
    step_seconds: float = 0.0           # inside the step only: the reported s/iteration
    elapsed: float = 0.0                # wall seconds of the stage, across resumes
    batch_in_epoch: int = 0
    samples: int = 0                    # training samples seen
    loss_sum: float = 0.0
    loss_count: int = 0

    def record(self, loss, seconds, samples):
        """One training step done: its loss, the seconds it took and the samples it saw."""
        self.current += 1
        self.batch_in_epoch += 1
        self.samples += samples
        self.loss_sum += loss
        self.loss_count += 1
        self.step_seconds += seconds


def check_writer(path, saved):
    """Stop with one line when the checkpoint `saved`, read from `path`, was written by a stage other
    than the one its file name says: another run wrote it under this name, and its weights are not
    this stage's. A file renamed by hand (not `{kind}_...pt`), or written before checkpoints recorded
    their writer, passes: only its settings can tell."""
    writer, name = saved.get("writer"), Path(path).name
    kind = name.split("_", 1)[0]
    if writer is not None and kind in CHECKPOINT_KINDS and name != f"{kind}_{writer['stage']}.pt":
        raise SystemExit(f"error: {path} was written by {writer['stage']} (run {writer['run']}, settings "
                         f"{writer['settings']}), not by {name[len(kind) + 1:-len('.pt')]}, the stage its name "
                         f"says: another run wrote it under this name; not using it")


class Stage:
    """One stage's files and the settings that must match to reuse them: the run's settings, the
    split and the teacher (a digest of its weights). Every file records its writer: the run, the
    stage and the settings' digest."""

    def __init__(self, cfg, split_indices, dataset, role, teacher_state=None):
        key = f"{cfg.run_name}_{dataset}_{role}"
        checkpoints = Path(cfg.checkpoint_dir)
        self.best, self.resume, self.merged = (checkpoints / f"{kind}_{key}.pt" for kind in CHECKPOINT_KINDS)
        self.history = Path(cfg.result_dir) / f"{key}_history.csv"
        split = np.concatenate([np.append(indices, -1) for indices in split_indices]).astype(np.int64)
        self.settings = to_jsonable({**affecting_results(asdict(cfg)), "dataset": dataset, "role": role,
                                     "split": hashlib.sha256(split.tobytes()).hexdigest()[:16],
                                     "teacher": None if teacher_state is None else state_digest(teacher_state)})
        self.writer = {"run": cfg.run_name, "stage": key, "settings": settings_digest(self.settings)}

    def _load(self, path, device="cpu"):
        """The dict saved at `path`, refused when another run wrote it (check_writer)."""
        saved = torch.load(path, map_location=device, weights_only=True)
        check_writer(path, saved)
        return saved

    def _usable(self, path, what):
        """The saved dict at `path` if it exists and was written under these settings, else None
        (saying why when the file exists but was written under other settings)."""
        if not path.is_file():
            return None
        saved = self._load(path)
        if saved["settings"] != self.settings:
            log.warning("not using %s %s: written under other settings (%s)", what, path,
                        settings_differences(saved["settings"], self.settings))
            return None
        return saved

    def finished(self):
        """The merged file's dict when this stage finished earlier under these settings, else None."""
        return self._usable(self.merged, "finished stage")

    def resumable(self):
        """The resumable state written at the last validation under these settings, else None."""
        return self._usable(self.resume, "resumable state")

    def start_over(self):
        """A fresh start: files this stage left earlier (a search's previous point) are not continued;
        another run's files are never deleted (check_writer)."""
        for stale in (self.resume, self.merged):
            if stale.is_file():
                self._load(stale)
                stale.unlink()

    def save_best(self, state):
        with atomic_path(self.best) as tmp:
            torch.save({"writer": self.writer, "state": state}, tmp)

    def load_best(self, device):
        saved = self._load(self.best, device)
        return saved["state"] if "writer" in saved else saved   # no writer: the bare state of an earlier version

    def save_resumable(self, **state):
        with atomic_path(self.resume) as tmp:
            torch.save({"settings": self.settings, "writer": self.writer, **state}, tmp)

    def save_merged(self, **content):
        """The finished stage, atomically; its resumable state is no longer needed."""
        with atomic_path(self.merged) as tmp:
            torch.save({"settings": self.settings, "writer": self.writer, **content}, tmp)
        self.resume.unlink(missing_ok=True)

    def write_history(self, rows):
        with atomic_path(self.history) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)


def random_states(cutmix_rng, order_epoch_start, trainer):
    """Every random state a stage draws from: torch, NumPy, CutMix's generator, the data order at
    the start of the current epoch, and the trainer's generator of z."""
    name, keys, *rest = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cutmix": cutmix_rng.bit_generator.state, "order": order_epoch_start,
            "trainer": trainer.rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), *rest]}


def restore_random_states(states, cutmix_rng, order_generator, trainer):
    torch.set_rng_state(states["torch"])
    cutmix_rng.bit_generator.state = states["cutmix"]
    order_generator.set_state(states["order"])
    trainer.set_rng_state(states["trainer"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
