"""Shared fixtures. Tests that need the real records in ../shared skip cleanly without it."""
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """The folder of real Challenge sample records, or a skip where it is absent."""
    if not (SHARED_DATA / "cinc2021-sample").is_dir():
        pytest.skip(f"real sample records not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def published_backbone(shared_data):
    """The authors' published tinylight CODE-15 backbone in ../shared/data, or a skip where it is absent."""
    path = shared_data / "published" / "CODE_testtinylightbias_full_checkpoint.pkl"
    if not path.is_file():
        pytest.skip(f"published backbone not found at {path}")
    return path


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A small converted demo (make_demo's layout and formats), shared by every test that needs one."""
    from synthetic_ecg import make_demo

    return make_demo(tmp_path_factory.mktemp("demo"), seed=0, n_records=200, n_code15=200, workers=1)


@pytest.fixture
def one_thread():
    """Torch on one intra-op thread for the test: on a small machine shared with other work,
    OpenMP threads waiting on each other make small CPU steps several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


OUTPUT_DIRS = [REPO_ROOT / name for name in ("result", "pretrained_checkpoint", "demo")]


def _listing():
    return {p for d in OUTPUT_DIRS if d.is_dir() for p in d.rglob("*")}


@pytest.fixture(scope="session", autouse=True)
def repository_outputs_untouched():
    """Tests write under tmp paths only: the repository's own output folders must not gain a file."""
    before = _listing()
    yield
    added = sorted(str(p.relative_to(REPO_ROOT)) for p in _listing() - before)
    assert not added, f"tests wrote into the repository: {added[:10]}"
