import os
import sys
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nobody listens on now, chosen by the OS: tests never use Flower's fixed
    defaults (8000, 9091-9094, 39091, 39093), which someone else's SuperLink may hold."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
sys.path.insert(0, str(PROJECT_DIR))


@pytest.fixture(autouse=True, scope="session")
def _private_calibration_cache(tmp_path_factory):
    """Keep tests from reading or filling the user's calibration cache, or writing copies of
    ledgers into the user's state directory."""
    os.environ["PRIVET_CACHE_DIR"] = str(tmp_path_factory.mktemp("privet-cache"))
    os.environ["PRIVET_STATE_DIR"] = str(tmp_path_factory.mktemp("privet-state"))
    yield


@pytest.fixture(autouse=True, scope="session")
def _patches_installed():
    """In-process accounting in tests runs as privet's entry points run it: with the
    dp-accounting patches (privet.patches) installed. tests/test_patches.py runs stock."""
    from privet import patches

    patches.install("dp-accounting")
    yield
