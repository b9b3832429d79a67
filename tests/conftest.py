"""Test session set-up: offline environment, a network guard, a Prefect API, shared fixtures."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
FIXTURES = SHARED_DATA / "fixtures"
if not FIXTURES.is_dir():  # the benchmark data lives beside the checkout, never inside it
    raise RuntimeError(f"shared test data not found at {SHARED_DATA}: clone this repository beside shared/")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripted_server, helpers

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="swirl-tests-"))
# Set before any library import: offline, quiet, and isolated from the user's own state.
os.environ.update({
    "PREFECT_HOME": str(_SESSION_TMP / "prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_UPDATE_DOWNLOAD_COUNTS": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "DASK_LOGGING__DISTRIBUTED": "warning",
    "DO_NOT_TRACK": "1",
})
os.environ.pop("PREFECT_API_URL", None)
# Keep the user's converted SmolLM2 and BM25 indexes (slow to rebuild) unless CI isolates them.
os.environ.setdefault("SWIRL_CACHE_DIR", str(Path.home() / ".cache" / "swirl"))

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _check_address(address) -> None:
    if isinstance(address, tuple) and address:
        host = address[0]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                raise RuntimeError(f"test tried to reach the network: {address!r}") from None
            return
        if not ip.is_loopback and not ip.is_unspecified:
            raise RuntimeError(f"test tried to reach the network: {address!r}")


def _guarded_connect(self, address):
    _check_address(address)
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    _check_address(address)
    return _real_connect_ex(self, address)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """One Prefect API for the session; exported so CLI subprocesses and Dask workers use it too."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
        os.environ["PREFECT_API_URL"] = url
        yield url
        os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer: real code paths, seconds on CPU."""
    from helpers import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tools_db(prefect_api, tmp_path_factory) -> tuple[Path, list[dict]]:
    """A database of tools-protocol trajectories generated and curated through the flows (helpers.build_tools_db),
    built once per session, and the requests its policy got. Tests open it read-only."""
    from helpers import build_tools_db

    db = tmp_path_factory.mktemp("tools-db") / "tools.duckdb"
    return db, build_tools_db(db)


@pytest.fixture(scope="session")
def prefect_stack(tmp_path_factory):
    """A real `prefect server` (API + UI), the work pools, the `generate-nightly` deployment and a process
    worker (tests/prefect_stack.py): started once per session, shared by the deployment and browser tests.
    A failed start is cached by pytest and reported to every test that asks for the stack."""
    import time

    from prefect_stack import PrefectStack

    stack = PrefectStack(tmp_path_factory.mktemp("prefect-stack"))
    try:
        started = time.monotonic()
        stack.start()
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in stack.timings.items())
        print(f"\nprefect stack up in {time.monotonic() - started:.1f}s ({phases}): {stack.ui_url}")
        yield stack
    finally:
        stack.stop()
