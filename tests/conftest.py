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
