from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference-timings"


@pytest.fixture
def reference_tables() -> list[Path]:
    """The SPDY authors' measured tables; not shipped with spdy (no licence), so skip without them."""
    tables = sorted(REFERENCE.glob("*.txt"))
    if not tables:
        pytest.skip(f"reference timing tables not found at {REFERENCE}")
    return tables
