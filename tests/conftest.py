import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

FIXTURES = REPO / "tests" / "fixtures" / "opensora"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """One real ComfyUI server for the session, with the pack and the tiny test models installed."""
    from comfy_host import ComfyServer

    base = tmp_path_factory.mktemp("comfy-base")
    server = ComfyServer(base_dir=base, extra_args=["--preview-method", "latent2rgb"])
    server.prepare()
    from demo_models import install_tiny_models
    from demo_models_v2 import install_tiny_models_v2

    server.tiny_models = install_tiny_models(server.models)
    server.tiny_models.update(install_tiny_models_v2(server.models))
    server.start()
    yield server
    server.stop()
