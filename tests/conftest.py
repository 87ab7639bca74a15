"""Shared fixtures: real S3 (moto server) and GCS (fake-gcs-server) processes for the session, and a fresh run URL
per test on each kind of store."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid

import pytest
from support import servers

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_SESSION_TMP = pytest.StashKey[str]()


def pytest_configure(config):
    """One temporary directory for everything the session's processes make with ``tempfile`` (servers' data, writers
    killed before they clean up, staging of SIGKILLed trainers): $TMPDIR for the children, removed when the session
    passes, kept and named when it fails. pytest's own ``tmp_path`` roots stay where they were."""
    if os.environ.get("CLOUDCKPT_TEST_TMP") or hasattr(config, "workerinput"):
        return  # an xdist worker: it shares the controller's (its environment carries it)
    root = tempfile.mkdtemp(prefix="cloudckpt-tests-")
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
    os.environ["TMPDIR"] = os.environ["CLOUDCKPT_TEST_TMP"] = root
    tempfile.tempdir = root
    config.stash[_SESSION_TMP] = root


def pytest_unconfigure(config):
    root = config.stash.get(_SESSION_TMP, None)
    if root is None:
        return
    if getattr(config, "_cloudckpt_failed", True):
        sys.stderr.write(f"\nthe session's temporary files (servers' logs and data) are kept in {root}\n")
    else:
        shutil.rmtree(root, ignore_errors=True)


def pytest_sessionfinish(session, exitstatus):
    session.config._cloudckpt_failed = exitstatus != 0


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False, help="run full-size (slow) variants")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="full-size variant: run with --full")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_server():
    server = servers.start_moto()
    servers.apply_env(servers.s3_env(server.endpoint))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server():
    server = servers.start_fake_gcs()
    servers.apply_env(servers.gcs_env(server.endpoint))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azure_server():
    if servers.azurite_binary() is None:
        pytest.skip("Azurite is not installed (node + `make tools` install it under .tools/azurite)")
    pytest.importorskip("azure.storage.blob", reason="the azure extra is not installed (pip install '.[azure]')")
    server = servers.start_azurite()
    servers.apply_env(servers.azure_env(server.endpoint))
    yield server
    server.proc.kill()  # its data is a throw-away directory; SIGTERM waits ~10 s on open connections
    server.proc.wait()
    shutil.rmtree(server.argv[server.argv.index("--location") + 1], ignore_errors=True)


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3_url(s3_server) -> str:
    s3_server.revive()
    bucket = _name("ckpt")
    servers.make_s3_bucket(bucket)
    return f"s3://{bucket}/runs/r1"


@pytest.fixture
def gcs_url(gcs_server) -> str:
    gcs_server.revive()
    bucket = _name("ckpt")
    servers.make_gcs_bucket(bucket)
    return f"gs://{bucket}/runs/r1"


@pytest.fixture
def az_url(azure_server) -> str:
    azure_server.revive()
    container = _name("ckpt")
    servers.make_azure_container(container)
    return f"az://{container}/runs/r1"


@pytest.fixture
def local_url(tmp_path) -> str:
    return str(tmp_path / "store" / "runs" / "r1")


@pytest.fixture(params=["local", "s3", "gcs", "az"])
def store_url(request) -> str:
    """A fresh, empty run URL on each kind of store."""
    return request.getfixturevalue(f"{request.param}_url")
