from pathlib import Path

import pytest
import torch

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference-timings"


@pytest.fixture
def reference_tables() -> list[Path]:
    """The SPDY authors' measured tables; not shipped with spdy (no licence), so skip without them."""
    tables = sorted(REFERENCE.glob("*.txt"))
    if not tables:
        pytest.skip(f"reference timing tables not found at {REFERENCE}")
    return tables


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: on a shared 2-core machine two threads mostly wait
    for each other, and one thread makes reductions run in a fixed order."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
