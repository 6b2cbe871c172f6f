"""Shared helpers: seeding, the learning-rate schedule, device choice, logging, flags, atomic writes,
peak-memory measurement (measured, and simulated by counting live tensor storage); the names of the
files every script shares; and the label facts.

This module imports nothing from the project: every other module may import it.
"""
import argparse
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import random
import re
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO_ROOT = Path(__file__).resolve().parent

log = logging.getLogger("adagrad_fusion")


def setup_logging(level=logging.INFO):
    """One log format for every entry point; tqdm bars write to stderr beside it."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def seed_everything(seed):
    """Seed Python, NumPy and torch (CPU and CUDA) from one integer."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def warmup_linear_decay(optimizer, total, warmup_fraction):
    """Linear warm-up over the first `warmup_fraction` of `total` steps, then linear decay to 0: the
    schedule of fine-tuning and of pretraining."""
    warmup = max(1, int(warmup_fraction * total))

    def factor(step):
        if step < warmup:
            return step / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def state_digest(state):
    """sha256 (16 hex digits) of a state dict's tensors: equal digests mean identical models."""
    digest = hashlib.sha256()
    for value in state.values():
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def to_jsonable(value):
    """Numbers, arrays and tensors as JSON values; NaN (an undefined per-class metric) as null."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def settings_digest(settings):
    """8 hex digits naming a dict of settings: the same settings always give the same digest."""
    return hashlib.sha256(json.dumps(to_jsonable(settings), sort_keys=True).encode()).hexdigest()[:8]


def settings_differences(saved, current):
    """'name: saved -> now' for every setting that differs, for a message saying why a state is not used."""
    saved, current = to_jsonable(saved), to_jsonable(current)
    names = sorted(set(saved) | set(current))
    return ", ".join(f"{n}: {saved.get(n)!r} -> {current.get(n)!r}" for n in names if saved.get(n) != current.get(n))


# ---------------------------------------------------------------------------------------------
# Flags: every entry script refuses a bad value up front, in one argparse-style line, exit status 2.
# ---------------------------------------------------------------------------------------------
class FlagParser(argparse.ArgumentParser):
    """argparse with one spelling of every flag and one-line errors.

    Flags are spelled with underscores (`--bp_batch`) in --help and in every message, whichever
    way add_argument was given them; the same flag typed with hyphens (`--bp-batch`) is read as
    it, and so is the other way round (`--no_distill` for `--no-distill`). `old_spellings`
    ({earlier flag: current flag}) keeps flags that were renamed working, either way spelled,
    without showing them. A bad value stops with `prog: error: argument --flag: what it
    accepts`, exit status 2.
    """

    def __init__(self, *args, old_spellings=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.old_spellings = {_with_underscores(old): new for old, new in (old_spellings or {}).items()}

    def add_argument(self, *names, **kwargs):
        return super().add_argument(*dict.fromkeys(_with_underscores(name) for name in names), **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        end = args.index("--") if "--" in args else len(args)   # after a bare --, values only
        return super().parse_known_args([*map(self.known_spelling, args[:end]), *args[end:]], namespace)

    def known_spelling(self, token):
        """`token` (`--flag` or `--flag=value`) with the flag as this parser knows it: an earlier
        spelling mapped to the current one, hyphens and underscores swapped where needed; a flag
        it does not know stays as typed, for argparse to name."""
        flag, equals, value = token.partition("=")
        known = self._option_string_actions
        if not flag.startswith("--") or flag in known:
            return token
        current = self.old_spellings.get(_with_underscores(flag), _with_underscores(flag))
        # argparse's --no-X of a yes/no flag X whose name has underscores: --no-memory_guard
        negation = "--no-" + current[len("--no_"):] if current.startswith("--no_") else current
        for spelling in (current, _with_hyphens(current), negation):
            if spelling in known:
                return spelling + equals + value
        return token

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _with_underscores(flag):
    return "--" + flag[2:].replace("-", "_") if flag.startswith("--") else flag


def _with_hyphens(flag):
    return "--" + flag[2:].replace("_", "-") if flag.startswith("--") else flag


def int_at_least(low):
    """argparse type: an integer >= low."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    return parse


def float_in(low=None, high=None, low_closed=False, high_closed=False):
    """argparse type: a finite number in the interval given (open ends unless said closed)."""
    interval = (f"{'[' if low_closed else '('}{'-inf' if low is None else f'{low:g}'}, "
                f"{'inf' if high is None else f'{high:g}'}{']' if high_closed else ')'}")

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}") from None
        below = low is not None and (value < low or (value == low and not low_closed))
        above = high is not None and (value > high or (value == high and not high_closed))
        if not np.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text}")
        return value
    return parse


MEBIBYTES_PER = {"mib": 1, "gib": 1024}


def memory_size(text):
    """argparse type: a memory size in MiB or GiB (8GiB, 7500MiB, 1.5GiB), as MiB, above 0."""
    match = re.fullmatch(r"(\d+\.?\d*|\.\d+)\s*(MiB|GiB)", text.strip(), re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a size in MiB or GiB such as 8GiB or 7500MiB, got {text!r}")
    mebibytes = float(match[1]) * MEBIBYTES_PER[match[2].lower()]
    if mebibytes <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text!r}")
    return mebibytes

def get_device(name=None):
    """CUDA when present, else CPU; chosen once by the entry point and passed down."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def atomic_path(final_path):
    """Yield a temporary path beside `final_path`; rename it over `final_path` only on success.

    An interrupted or failing write never leaves a partial file under the final name, and an
    existing file there is untouched until the new one is complete.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final_path.name}.", suffix=".tmp", dir=final_path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, final_path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _release_freed_heap():
    """Hand freed heap pages back to the OS (glibc), so a block's resident peak is its own.

    Without it, memory an earlier block freed stays mapped and a later block can grow into it
    without raising the high-water mark. Does nothing where glibc is absent.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status_kb(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss():
    """Reset the kernel's resident-set high-water mark (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_kb():
    hwm = _proc_status_kb("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def _current_rss_kb():
    rss = _proc_status_kb("VmRSS")
    return rss if rss is not None else _peak_rss_kb()


class PeakMemory:
    """Peak memory of a block above its starting point, in MiB.

    On CUDA: the caching allocator's max_memory_allocated above what was allocated at entry.
    On CPU: the process's peak resident set above its resident set at entry (Linux resets the
    high-water mark at entry; elsewhere the lifetime peak is used, which can only overstate).
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak_mb = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _release_freed_heap()
            _reset_peak_rss()
            self._base = _current_rss_kb() * 1024
        return self

    def read(self):
        """Peak so far above the baseline, in MiB."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _peak_rss_kb() * 1024
        return max(peak - self._base, 0) / 2**20

    def __exit__(self, *exc):
        self.peak_mb = self.read()
        return False


ALLOCATOR_BLOCK_BYTES = 512  # the CUDA caching allocator rounds every allocation up to this


class LiveStorageCounter(TorchDispatchMode):
    """Simulated allocator: bytes of live tensor storage, counted at every aten op, and their peak.

    Every tensor an op returns is looked up by its storage: a storage not seen before (or whose
    predecessor at that address has died) is an allocation of its nbytes rounded up to
    ALLOCATOR_BLOCK_BYTES, and it is freed when its last reference dies (a weak reference tells).
    This is what a caching allocator's "allocated" counter sees, so the peak is the one
    `torch.cuda.max_memory_allocated` would report for the same sequence of ops, minus scratch
    memory a kernel takes and returns inside one op (cuDNN workspaces), which no op exposes.

    Works on real tensors and on FakeTensors (enter a FakeTensorMode first, then this): fake
    tensors hold no data, so a model of any size runs in seconds on a CPU. Where code reads a
    fake value into Python (`float(loss)`, `int(seed)`), the counter answers 1; no shape in the
    steps depends on a value, so the bytes do not either. Only tensors created while it is
    active are counted: enter it before building the model.
    """

    def __init__(self):
        super().__init__()
        self._live = {}        # storage address -> (weak reference, bytes)
        self._total = 0        # bytes of the tracked storages; some may have died since the last prune
        self.peak_bytes = 0

    @staticmethod
    def _rounded(nbytes):
        return -(-nbytes // ALLOCATOR_BLOCK_BYTES) * ALLOCATOR_BLOCK_BYTES

    def _prune(self):
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self._total -= self._live.pop(key)[1]

    def _track(self, tensor):
        storage = tensor.untyped_storage()
        ref = StorageWeakRef(storage)
        size = self._rounded(storage.nbytes())
        known = self._live.get(ref.cdata)
        if known is not None and not known[0].expired() and known[1] >= size:
            return
        self._total += size - (known[1] if known is not None else 0)
        self._live[ref.cdata] = (ref, size)
        if self._total > self.peak_bytes:  # _total never understates, so only a rise needs the exact count
            self._prune()
            self.peak_bytes = max(self.peak_bytes, self._total)

    def live_bytes(self):
        self._prune()
        return self._total

    def reset_peak(self):
        """Start a new peak from what is alive now (torch.cuda.reset_peak_memory_stats)."""
        self.peak_bytes = self.live_bytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            return True if args[0].dtype == torch.bool else 1
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return out


# ---------------------------------------------------------------------------------------------
# Where the data come from, and the names of the files every script shares (the folders they
# sit in are main.py's settings)
# ---------------------------------------------------------------------------------------------
CHALLENGE_DATA_URL = "https://physionet.org/content/challenge-2021/1.0.3/training/"
CODE15_DATA_URL = "https://zenodo.org/records/4916206"
PUBLISHED_BACKBONES = "the CODE-15 backbone of that name published with the H-Tuning paper's code (ICML 2025)"
CODE15_TRAIN_H5 = "CODE15_train_32.hdf5"
CODE15_VALID_H5 = "CODE15_valid_32.hdf5"


def h5_name(dataset, num_classes):
    """A converted Challenge dataset: `class_sepe{C}_dataset_{DATASET}_32.hdf5`."""
    return f"class_sepe{num_classes}_dataset_{dataset}_32.hdf5"


def backbone_name(pretrain, config):
    """A CODE-15 backbone: `{pretrain}{config}bias_full_checkpoint.pkl`, the published files' pattern."""
    return f"{pretrain}{config}bias_full_checkpoint.pkl"


# ---------------------------------------------------------------------------------------------
# Label facts: the project's own copy of the PhysioNet/CinC Challenge 2021 scored-label table.
# One row per scored diagnosis, in the table's order: SNOMED CT code, abbreviation, name, and the
# number of records carrying it in each source (columns in SOURCES order).
# ---------------------------------------------------------------------------------------------
LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
NUM_LEADS = len(LEADS)

SOURCES = ("CPSC", "CPSC_Extra", "StPetersburg", "PTB", "PTB_XL", "Georgia", "Chapman_Shaoxing", "Ningbo")

SCORED_LABELS = (
    ("164889003", "AF", "atrial fibrillation", (1221, 153, 2, 15, 1514, 570, 1780, 0)),
    ("164890007", "AFL", "atrial flutter", (0, 54, 0, 1, 73, 186, 445, 7615)),
    ("6374002", "BBB", "bundle branch block", (0, 0, 1, 20, 0, 116, 0, 385)),
    ("426627000", "Brady", "bradycardia", (0, 271, 11, 0, 0, 6, 0, 7)),
    ("733534002", "CLBBB", "complete left bundle branch block", (0, 0, 0, 0, 0, 0, 0, 213)),
    ("713427006", "CRBBB", "complete right bundle branch block", (0, 113, 0, 0, 542, 28, 0, 1096)),
    ("270492004", "IAVB", "1st degree av block", (722, 106, 0, 0, 797, 769, 247, 893)),
    ("713426002", "IRBBB", "incomplete right bundle branch block", (0, 86, 0, 0, 1118, 407, 0, 246)),
    ("39732003", "LAD", "left axis deviation", (0, 0, 0, 0, 5146, 940, 382, 1163)),
    ("445118002", "LAnFB", "left anterior fascicular block", (0, 0, 0, 0, 1626, 180, 0, 380)),
    ("164909002", "LBBB", "left bundle branch block", (236, 38, 0, 0, 536, 231, 205, 35)),
    ("251146004", "LQRSV", "low qrs voltages", (0, 0, 0, 0, 182, 374, 249, 794)),
    ("698252002", "NSIVCB", "nonspecific intraventricular conduction disorder", (0, 4, 1, 0, 789, 203, 235, 536)),
    ("426783006", "NSR", "sinus rhythm", (918, 4, 0, 80, 18092, 1752, 1826, 6299)),
    ("284470004", "PAC", "premature atrial contraction", (616, 73, 3, 0, 398, 639, 258, 1054)),
    ("10370003", "PR", "pacing rhythm", (0, 3, 0, 0, 296, 0, 0, 1182)),
    ("365413008", "PRWP", "poor R wave Progression", (0, 0, 0, 0, 0, 0, 0, 638)),
    ("427172004", "PVC", "premature ventricular contractions", (0, 188, 0, 0, 0, 0, 0, 1091)),
    ("164947007", "LPR", "prolonged pr interval", (0, 0, 0, 0, 340, 0, 12, 40)),
    ("111975006", "LQT", "prolonged qt interval", (0, 4, 0, 0, 118, 1391, 57, 337)),
    ("164917005", "QAb", "qwave abnormal", (0, 1, 0, 0, 548, 464, 235, 828)),
    ("47665007", "RAD", "right axis deviation", (0, 1, 0, 0, 343, 83, 215, 638)),
    ("59118001", "RBBB", "right bundle branch block", (1857, 1, 2, 0, 0, 542, 454, 195)),
    ("427393009", "SA", "sinus arrhythmia", (0, 11, 2, 0, 772, 455, 0, 2550)),
    ("426177001", "SB", "sinus bradycardia", (0, 45, 0, 0, 637, 1677, 3889, 12670)),
    ("427084000", "STach", "sinus tachycardia", (0, 303, 11, 1, 826, 1261, 1568, 5687)),
    ("63593006", "SVPB", "supraventricular premature beats", (0, 53, 4, 0, 157, 1, 0, 9)),
    ("164934002", "TAb", "t wave abnormal", (0, 22, 0, 0, 2345, 2306, 1876, 5167)),
    ("59931005", "TInv", "t wave inversion", (0, 5, 1, 0, 294, 812, 157, 2720)),
    ("17338001", "VPB", "ventricular premature beats", (0, 8, 0, 0, 0, 357, 294, 0)),
)

# Which column of the table counts each downstream dataset's records.
DATASET_SOURCE = {
    "WFDB_Ga": "Georgia",
    "WFDB_PTBXL": "PTB_XL",
    "WFDB_Ningbo": "Ningbo",
    "WFDB_ChapmanShaoxing": "Chapman_Shaoxing",
}
DATASETS = tuple(DATASET_SOURCE)   # G12EC, PTB-XL, Ningbo, Chapman-Shaoxing

# A dataset keeps the codes counted more than this many times in its column.
MIN_CLASS_COUNT = 200

# The synthetic demo dataset's classes, in the scored table's order, each drawn from its own
# physiology (synthetic_ecg.py): CODE-15's six (AF, IAVB, LBBB, RBBB, SB, STach), sinus rhythm (the
# Challenge score's baseline), and nine that CODE-15 does not label: axis deviation left and right,
# low QRS voltage, premature atrial and ventricular beats, pacing rhythm, long QT, pathological Q
# waves, T-wave inversion.
DEMO_DATASET = "WFDB_Demo"
DEMO_CLASSES = ("164889003", "270492004", "39732003", "164909002", "251146004", "426783006", "284470004",
                "10370003", "427172004", "111975006", "164917005", "47665007", "59118001", "426177001", "427084000",
                "59931005")

LABEL_ABBREVIATION = {code: abbreviation for code, abbreviation, _, _ in SCORED_LABELS}
LABEL_NAME = {code: name for code, _, name, _ in SCORED_LABELS}

# The Challenge 2021 scoring weights, the project's own copy of the weight table in the official
# PhysioNet/CinC Challenge 2021 evaluation code (BSD 2-Clause, PhysioNet/Computing in Cardiology
# Challenges). CHALLENGE_CLASSES are the 26 scored classes in the table's order; 'a|b' is one class
# made of two equivalent codes. CHALLENGE_WEIGHTS_80THS[j][k] * 1/80 is the credit for predicting
# class k on a recording labelled j (every weight is a multiple of 1/80): 1 on the diagonal, partial
# credit for clinically close mistakes. The table is symmetric.
CHALLENGE_CLASSES = (
    "164889003", "164890007", "6374002", "426627000", "733534002|164909002", "713427006|59118001",
    "270492004", "713426002", "39732003", "445118002", "164947007", "251146004",
    "111975006", "698252002", "426783006", "284470004|63593006", "10370003", "365413008",
    "427172004|17338001", "164917005", "47665007", "427393009", "426177001", "427084000",
    "164934002", "59931005",
)
CHALLENGE_WEIGHTS_80THS = (
    (80, 40, 38, 24, 38, 32, 24, 24, 28, 28, 24, 34, 36, 28, 20, 27, 30, 34, 30, 32, 28, 24, 24, 30, 40, 40),  # AF
    (40, 80, 38, 24, 38, 32, 24, 24, 28, 28, 24, 34, 36, 28, 20, 27, 30, 34, 30, 32, 28, 24, 24, 30, 40, 40),  # AFL
    (38, 38, 80, 26, 38, 34, 26, 26, 30, 30, 26, 36, 38, 30, 22, 29, 32, 36, 32, 30, 30, 26, 26, 32, 38, 38),  # BBB
    (24, 24, 26, 80, 26, 32, 40, 40, 36, 36, 40, 30, 28, 36, 36, 37, 34, 30, 34, 16, 36, 40, 40, 34, 24, 24),  # Brady
    (38, 38, 38, 26, 80, 34, 26, 26, 30, 30, 26, 36, 38, 30, 22, 29, 32, 36, 32, 30, 30, 26, 26, 32, 38, 38),  # CLBBB|LBBB
    (32, 32, 34, 32, 34, 80, 32, 32, 36, 36, 32, 38, 36, 36, 28, 35, 38, 38, 38, 24, 36, 32, 32, 38, 32, 32),  # CRBBB|RBBB
    (24, 24, 26, 40, 26, 32, 80, 40, 36, 36, 40, 30, 28, 36, 36, 37, 34, 30, 34, 16, 36, 40, 40, 34, 24, 24),  # IAVB
    (24, 24, 26, 40, 26, 32, 40, 80, 36, 36, 40, 30, 28, 36, 36, 37, 34, 30, 34, 16, 36, 40, 40, 34, 24, 24),  # IRBBB
    (28, 28, 30, 36, 30, 36, 36, 36, 80, 40, 36, 34, 32, 40, 32, 39, 38, 34, 38, 20, 40, 36, 36, 38, 28, 28),  # LAD
    (28, 28, 30, 36, 30, 36, 36, 36, 40, 80, 36, 34, 32, 40, 32, 39, 38, 34, 38, 20, 40, 36, 36, 38, 28, 28),  # LAnFB
    (24, 24, 26, 40, 26, 32, 40, 40, 36, 36, 80, 30, 28, 36, 36, 37, 34, 30, 34, 16, 36, 40, 40, 34, 24, 24),  # LPR
    (34, 34, 36, 30, 36, 38, 30, 30, 34, 34, 30, 80, 38, 34, 26, 33, 36, 38, 36, 26, 34, 30, 30, 36, 34, 34),  # LQRSV
    (36, 36, 38, 28, 38, 36, 28, 28, 32, 32, 28, 38, 80, 32, 24, 31, 34, 38, 34, 28, 32, 28, 28, 34, 36, 36),  # LQT
    (28, 28, 30, 36, 30, 36, 36, 36, 40, 40, 36, 34, 32, 80, 32, 39, 38, 34, 38, 20, 40, 36, 36, 38, 28, 28),  # NSIVCB
    (20, 20, 22, 36, 22, 28, 36, 36, 32, 32, 36, 26, 24, 32, 80, 33, 30, 26, 30, 12, 32, 36, 36, 30, 20, 20),  # NSR
    (27, 27, 29, 37, 29, 35, 37, 37, 39, 39, 37, 33, 31, 39, 33, 80, 37, 33, 37, 19, 39, 37, 37, 37, 27, 27),  # PAC|SVPB
    (30, 30, 32, 34, 32, 38, 34, 34, 38, 38, 34, 36, 34, 38, 30, 37, 80, 36, 40, 22, 38, 34, 34, 40, 30, 30),  # PR
    (34, 34, 36, 30, 36, 38, 30, 30, 34, 34, 30, 38, 38, 34, 26, 33, 36, 80, 36, 26, 34, 30, 30, 36, 34, 34),  # PRWP
    (30, 30, 32, 34, 32, 38, 34, 34, 38, 38, 34, 36, 34, 38, 30, 37, 40, 36, 80, 22, 38, 34, 34, 40, 30, 30),  # PVC|VPB
    (32, 32, 30, 16, 30, 24, 16, 16, 20, 20, 16, 26, 28, 20, 12, 19, 22, 26, 22, 80, 20, 16, 16, 22, 32, 32),  # QAb
    (28, 28, 30, 36, 30, 36, 36, 36, 40, 40, 36, 34, 32, 40, 32, 39, 38, 34, 38, 20, 80, 36, 36, 38, 28, 28),  # RAD
    (24, 24, 26, 40, 26, 32, 40, 40, 36, 36, 40, 30, 28, 36, 36, 37, 34, 30, 34, 16, 36, 80, 40, 34, 24, 24),  # SA
    (24, 24, 26, 40, 26, 32, 40, 40, 36, 36, 40, 30, 28, 36, 36, 37, 34, 30, 34, 16, 36, 40, 80, 34, 24, 24),  # SB
    (30, 30, 32, 34, 32, 38, 34, 34, 38, 38, 34, 36, 34, 38, 30, 37, 40, 36, 40, 22, 38, 34, 34, 80, 30, 30),  # STach
    (40, 40, 38, 24, 38, 32, 24, 24, 28, 28, 24, 34, 36, 28, 20, 27, 30, 34, 30, 32, 28, 24, 24, 30, 80, 40),  # TAb
    (40, 40, 38, 24, 38, 32, 24, 24, 28, 28, 24, 34, 36, 28, 20, 27, 30, 34, 30, 32, 28, 24, 24, 30, 40, 80),  # TInv
)
# Each scored code's row/column in the weight table (equivalent codes share one).
CHALLENGE_CLASS_OF = {code: index for index, merged in enumerate(CHALLENGE_CLASSES) for code in merged.split("|")}


def dataset_classes(dataset):
    """SNOMED codes a dataset is scored on: count > MIN_CLASS_COUNT in its column, in table order.

    Codes are kept literally, so equivalent pairs (59118001 / 713427006, ...) stay separate classes.
    """
    if dataset == DEMO_DATASET:
        return list(DEMO_CLASSES)
    if dataset not in DATASET_SOURCE:
        raise KeyError(f"unknown dataset {dataset!r}; known: {', '.join([*DATASET_SOURCE, DEMO_DATASET])}")
    column = SOURCES.index(DATASET_SOURCE[dataset])
    return [code for code, _, _, counts in SCORED_LABELS if counts[column] > MIN_CLASS_COUNT]
