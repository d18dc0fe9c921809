"""Shared pytest fixtures.

``moto_s3`` (session)
    A real S3 endpoint over HTTP: moto's ``ThreadedMotoServer`` on 127.0.0.1 at a free port, started
    once per session. Yields the environment settings a store needs, as a dict::

        {"FACEOPS_S3_ENDPOINT": "127.0.0.1:PORT", "FACEOPS_S3_ACCESS_KEY": ..., "FACEOPS_S3_SECRET_KEY": ...,
         "FACEOPS_S3_SECURE": "false", "FACEOPS_S3_REGION": "us-east-1"}

    Apply them with ``monkeypatch.setenv`` (or use ``s3_env``). moto accepts any credentials and
    keeps buckets for the whole session: give each test its own bucket (see ``s3_bucket``).

``s3_env`` (function)
    ``moto_s3`` applied to ``os.environ`` for the test (undone afterwards); returns the same dict.

``s3_bucket`` (function)
    ``s3_env`` plus a fresh, empty bucket with a unique name; returns its URI ``s3://NAME``, ready
    for ``open_store``.

``data_dir`` (session)
    The real face data folder: ``$FACEOPS_DATA`` or ``<repo>/../shared/data``. Tests using it are
    skipped, with the path in the reason, when it is absent. Never copy images into the repo.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["skip_budget"]  # tests/skip_budget.py: only GPU / real-data skips are allowed
MOTO_CREDENTIALS = {  # moto accepts any; distinctive values so leak checks can search for them
    "FACEOPS_S3_ACCESS_KEY": "faceops-test-access",
    "FACEOPS_S3_SECRET_KEY": "faceops-test-secret",
}


def _wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[dict[str, str]]:
    server_mod = pytest.importorskip("moto.server", reason="needs moto[server] (pip install 'moto[server]')")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log line per request
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    _wait_for_port(host, port)
    try:
        yield {
            "FACEOPS_S3_ENDPOINT": f"{host}:{port}",
            **MOTO_CREDENTIALS,
            "FACEOPS_S3_SECURE": "false",
            "FACEOPS_S3_REGION": "us-east-1",
        }
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto_s3: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in moto_s3.items():
        monkeypatch.setenv(name, value)
    return moto_s3


@pytest.fixture
def s3_bucket(s3_env: dict[str, str]) -> str:
    from minio import Minio

    name = f"test-{uuid.uuid4().hex[:16]}"
    client = Minio(
        s3_env["FACEOPS_S3_ENDPOINT"], s3_env["FACEOPS_S3_ACCESS_KEY"], s3_env["FACEOPS_S3_SECRET_KEY"],
        secure=False, region=s3_env["FACEOPS_S3_REGION"],
    )
    client.make_bucket(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("FACEOPS_DATA") or REPO.parent / "shared" / "data").expanduser()
    if not path.is_dir():
        pytest.skip(f"needs real data: not found at {path} (set FACEOPS_DATA to the data folder)")
    return path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> str:
    """A small ingested synthetic dataset (8 identities x 6 faces, both VLR sizes); returns its URI."""
    from faceops.data.ingest import IngestConfig, TrainClassConfig, ingest
    from faceops.data.synth import synthesize

    root = tmp_path_factory.mktemp("tiny")
    faces = synthesize(root / "faces", identities=8, images_per_identity=6, seed=1, progress=False)
    cfg = IngestConfig(train_classes=TrainClassConfig(rule="all"), pairs_per_split=40)
    return ingest(str(faces), "tiny", str(root / "store"), cfg, progress=False).uri


def kill_at_first_checkpoint(cmd: list[str], out: Path, env: dict, timeout_s: float = 300.0) -> None:
    """Start a training command (or a whole ``faceops run``), SIGKILL it (whole process group) once
    ``out/last.pt`` exists."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + timeout_s
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture
def one_thread():
    """One torch thread and a fixed seed for the test (model tests: stable, and fair to a shared CPU)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def random_faces(n: int = 2):
    """``n`` random inputs in the recognizers' [-1, 1] 3x112x112 input space."""
    import torch

    return torch.rand(n, 3, 112, 112) * 2 - 1
