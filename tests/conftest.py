import pytest

from zoo import SHARED


@pytest.fixture(scope="session")
def shared():
    """The real models and datasets beside the repository (present in CI)."""
    if not (SHARED / "models").is_dir():
        pytest.skip(f"../shared not found at {SHARED}: real-model tests need it")
    return SHARED
