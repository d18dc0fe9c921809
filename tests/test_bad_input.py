"""Bad input at every door: each case gets one clear error naming the file or URI and what to do
(or, for a corrupt image, a documented skip that names it), and nothing already done is lost.

Cases go through the CLI, as a user meets them: exit code 1 and one ``faceops CMD: error: …`` line.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultproxy import moto_with_auth
from PIL import Image

from faceops.cli import main
from faceops.data.ingest import IngestConfig, TrainClassConfig, ingest
from faceops.data.manifest import load_manifest
from faceops.data.synth import synthesize
from faceops.serve.local import free_port
from faceops.storage import open_store
from faceops.storage.s3 import S3Settings, S3Store

SETS = ["--set", "train_classes.rule=all", "--set", "pairs_per_split=10", "--set", "workers=1"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("bad") / "faces", identities=4, images_per_identity=3, seed=5,
                      progress=False)


@pytest.fixture
def faces(pristine: Path, tmp_path: Path) -> Path:
    """A private copy a test may spoil."""
    return Path(shutil.copytree(pristine, tmp_path / "faces"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(err: str, command: str) -> str:
    """The CLI's single error line (no traceback)."""
    lines = [ln for ln in err.splitlines() if ln.startswith(f"faceops {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def nothing_published(store: Path) -> bool:
    return not store.exists() or not any(k.endswith("manifest.json") for k in open_store(str(store)).list())


# -- ingest ---------------------------------------------------------------------------------------
def test_ingest_corrupt_image_is_named_skipped_and_the_rest_ingested(faces, tmp_path, capsys, caplog):
    """Policy (faceops.data.ingest): a bad file is rejected with its reason, not fatal."""
    caplog.set_level(logging.WARNING)
    corrupt = faces / "id_0001" / "0002.png"
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # truncated mid-file
    store = tmp_path / "store"
    rc, out, _ = run(capsys, "ingest", str(faces), "--name", "d", "--store", str(store), *SETS)
    assert rc == 0
    assert "rejected file" in out and "id_0001/0002.png: truncated or corrupt" in out
    assert f"{store.as_uri()}/datasets/d/ingest_report.json" in out
    assert f"{faces}/id_0001/0002.png" in caplog.text
    manifest = load_manifest(str(store / "datasets" / "d"))
    assert manifest["summary"]["accepted"] == 11 and manifest["summary"]["rejected"] == 1
    assert "id_0001/0002.png" not in {im["id"] for im in manifest["images"]}


def test_ingest_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, "ingest", str(tmp_path / "empty"), "--name", "d", "--store", str(tmp_path / "s"))
    line = one_error(err, "ingest")
    assert rc == 1 and f"no images found under {tmp_path / 'empty'}" in line
    assert "<root>/<identity>/<image>" in line and nothing_published(tmp_path / "s")


def test_ingest_source_of_non_images_only(tmp_path, capsys):
    (tmp_path / "src" / "someone").mkdir(parents=True)
    (tmp_path / "src" / "someone" / "notes.txt").write_text("no faces here")
    rc, _, err = run(capsys, "ingest", str(tmp_path / "src"), "--name", "d", "--store", str(tmp_path / "s"))
    line = one_error(err, "ingest")
    assert rc == 1 and f"no images found under {tmp_path / 'src'}" in line and "GIF" in line
    assert nothing_published(tmp_path / "s")


def test_ingest_a_gif_set_is_not_refused(faces, tmp_path, capsys):
    """A public face set stored as GIF files (refused with "no images found" before formats were
    told by content)."""
    for f in sorted(faces.rglob("*.png")):
        Image.open(f).convert("RGB").save(f.with_suffix(".gif"), "GIF")
        f.unlink()
    rc, out, _ = run(capsys, "ingest", str(faces), "--name", "gif", "--store", str(tmp_path / "s"), *SETS)
    assert rc == 0 and load_manifest(str(tmp_path / "s" / "datasets" / "gif"))["summary"]["accepted"] == 12


def test_ingest_missing_folder(tmp_path, capsys):
    rc, _, err = run(capsys, "ingest", str(tmp_path / "nope"), "--name", "d", "--store", str(tmp_path / "s"))
    line = one_error(err, "ingest")
    assert rc == 1 and f"source {tmp_path / 'nope'} does not exist" in line and "s3://" in line
    assert nothing_published(tmp_path / "s")


def test_ingest_pairs_path_escaping_the_source_and_missing_pairs_file(faces, tmp_path, capsys):
    store = tmp_path / "store"
    kept = ingest(str(faces), "kept", str(store), IngestConfig(train_classes=TrainClassConfig(rule="all"),
                                                               pairs_per_split=10, workers=1), progress=False)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1\nid_0000 1 2\n../../etc 1 id_0001 1\n")
    rc, _, err = run(capsys, "ingest", str(faces), "--name", "p", "--store", str(store), "--pairs", str(pairs),
                     *SETS)
    line = one_error(err, "ingest")
    assert rc == 1 and str(pairs) in line and "'../../etc'" in line and "escape" in line
    rc, _, err = run(capsys, "ingest", str(faces), "--name", "p", "--store", str(store),
                     "--pairs", str(tmp_path / "missing.txt"), *SETS)
    assert rc == 1 and f"pairs file not found: {tmp_path / 'missing.txt'}" in one_error(err, "ingest")
    assert not (store / "datasets" / "p").exists()
    assert load_manifest(kept.uri)["content_hash"] == kept.content_hash  # what was done is intact


def test_ingest_unreachable_s3_endpoint(faces, s3_env, monkeypatch, capsys):
    endpoint = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("FACEOPS_S3_ENDPOINT", endpoint)
    monkeypatch.setenv("FACEOPS_S3_ATTEMPTS", "2")
    rc, _, err = run(capsys, "ingest", str(faces), "--name", "d", "--store", "s3://faceops-bad/runs", *SETS)
    line = one_error(err, "ingest")
    assert rc == 1 and "s3://faceops-bad/runs/datasets/d" in line and endpoint in line
    assert "cannot be reached" in line and "FACEOPS_S3_ENDPOINT" in line and "re-run" in line
    assert s3_env["FACEOPS_S3_SECRET_KEY"] not in err


@pytest.fixture(scope="module")
def moto_auth() -> Iterator[dict[str, str]]:
    pytest.importorskip("boto3", reason="boto3 (a moto dependency) is needed to create a user")
    with moto_with_auth() as env:
        yield env


def test_ingest_wrong_credentials(faces, moto_auth, monkeypatch, capsys):
    S3Store.from_uri("s3://creds", settings=S3Settings.from_env(moto_auth), create_bucket=True).exists("x")
    for name, value in {**moto_auth, "FACEOPS_S3_SECRET_KEY": "wrong-secret-value"}.items():
        monkeypatch.setenv(name, value)
    rc, _, err = run(capsys, "ingest", str(faces), "--name", "d", "--store", "s3://creds", *SETS)
    line = one_error(err, "ingest")
    assert rc == 1 and "s3://creds" in line and "rejected the credentials (SignatureDoesNotMatch)" in line
    assert "check FACEOPS_S3_ACCESS_KEY/FACEOPS_S3_SECRET_KEY" in line
    assert "wrong-secret-value" not in err and moto_auth["FACEOPS_S3_SECRET_KEY"] not in err
    good = S3Store.from_uri("s3://creds", settings=S3Settings.from_env(moto_auth))
    assert list(good.list()) == []  # nothing half-written with the bad key


# -- serve ----------------------------------------------------------------------------------------
def serve(capsys, repo: str) -> tuple[int, str]:
    ports = [str(free_port()) for _ in range(3)]
    rc, _, err = run(capsys, "serve", "--repo", repo, "--grpc-port", ports[0], "--http-port", ports[1],
                     "--metrics-port", ports[2])
    return rc, one_error(err, "serve")


def test_serve_missing_repository(tmp_path, capsys):
    rc, line = serve(capsys, str(tmp_path / "models"))
    assert rc == 1 and f"model repository {tmp_path / 'models'} does not exist" in line
    assert "faceops export" in line


@pytest.mark.parametrize(("uri", "says"), [
    ("ftp://host/models", "unsupported store URI 'ftp://host/models': use a path, file:///path or s3://"),
    ("s3://Bad_Bucket/models", "invalid bucket name 'Bad_Bucket'"),
])
def test_serve_bad_repository_uri(uri, says, capsys):
    rc, line = serve(capsys, uri)
    assert rc == 1 and says in line


# -- the client (embed / verify) ------------------------------------------------------------------
def test_verify_unreachable_server(pristine, capsys):
    url = f"127.0.0.1:{free_port()}"
    a, b = pristine / "id_0000" / "0000.png", pristine / "id_0001" / "0000.png"
    rc, _, err = run(capsys, "verify", str(a), str(b), "--url", url, "--threshold", "0.5",
                     "--retries", "1", "--timeout", "2")
    line = one_error(err, "verify")
    assert rc == 1 and url in line and "unreachable" in line and "faceops serve" in line


def test_embed_wrong_image_file(pristine, tmp_path, capsys):
    notes = tmp_path / "face.jpg"
    notes.write_text("not a picture")
    good = pristine / "id_0000" / "0000.png"
    rc, _, err = run(capsys, "embed", str(good), str(notes), "--url", f"127.0.0.1:{free_port()}")
    line = one_error(err, "embed")
    assert rc == 1 and f"{notes} is not a readable image" in line and "pass a face image file" in line
    rc, _, err = run(capsys, "embed", str(tmp_path / "nope.png"), "--url", f"127.0.0.1:{free_port()}")
    assert rc == 1 and f"image not found: {tmp_path / 'nope.png'}" in one_error(err, "embed")
    with Image.open(good) as img:
        assert img.size == (112, 112)  # the good input is untouched
