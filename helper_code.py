"""Shared helpers: seeding, device choice, logging, atomic writes, peak-memory measurement.

Every script in the repository imports these from here; nothing here knows about ECGs except
the label facts further down.
"""
import contextlib
import logging
import os
import random
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

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
        os.replace(tmp, final_path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
