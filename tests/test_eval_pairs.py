"""LFW pairs parsing and resolution: format rules on small files, then the real View 1 file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from faceops.evaluate import PairsError, image_path, parse_pairs, resolve_pairs

DATA = Path(os.environ.get("FACEOPS_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
DEVTRAIN_PAIRS = DATA / "lfw_meta" / "pairsDevTrain.txt"
DEVTRAIN_IMAGES = DATA / "lfw_devtrain"
needs_lfw = pytest.mark.skipif(not DEVTRAIN_PAIRS.is_file() or not DEVTRAIN_IMAGES.is_dir(),
                               reason=f"needs real data: LFW not found under {DATA} (set FACEOPS_DATA)")

FOLDED = """2\t2
Ann\t1\t2
Bob\t1\t3
Ann\t1\tBob\t2
Cy\t1\tAnn\t2
Bob\t2\t3
Cy\t1\t2
Bob\t1\tCy\t1
Ann\t2\tCy\t2
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "pairs.txt"
    p.write_text(text)
    return p


def _images(root: Path, files: dict[str, int]) -> Path:
    for name, n in files.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(1, n + 1):
            image_path(root, name, i).write_bytes(b"jpeg")
    return root


def test_folded_header(tmp_path: Path) -> None:
    pl = parse_pairs(_write(tmp_path, FOLDED))
    assert pl.n_folds == 2 and pl.has_folds
    assert [p.fold for p in pl.pairs] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [p.genuine for p in pl.pairs] == [True, True, False, False] * 2
    assert pl.pairs[2] == type(pl.pairs[2])("Ann", 1, "Bob", 2, False, 0)
    assert pl.pairs[4].name1 == pl.pairs[4].name2 == "Bob"


def test_single_set_header(tmp_path: Path) -> None:
    pl = parse_pairs(_write(tmp_path, "1\nAnn 1 2\nAnn 1 Bob 1\n"))
    assert pl.n_folds == 1 and not pl.has_folds and len(pl.pairs) == 2


@pytest.mark.parametrize("text, match", [
    ("", "empty"),
    ("ten\nAnn 1 2\n", "header"),
    ("2\nAnn 1 2\nAnn 1 Bob 1\n", "found 2 pair lines"),
    ("1\nAnn 1 Bob 1\nAnn 1 2\n", "expected a genuine"),
    ("1\nAnn 1 2\nAnn 1 2\n", "expected an impostor"),
    ("1\nAnn x 2\nAnn 1 Bob 1\n", "not an image number"),
    ("1\nAnn 0 2\nAnn 1 Bob 1\n", ">= 1"),
])
def test_malformed_files_name_the_line(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(PairsError, match=match):
        parse_pairs(_write(tmp_path, text))


def test_missing_pairs_file(tmp_path: Path) -> None:
    with pytest.raises(PairsError, match="not found"):
        parse_pairs(tmp_path / "nope.txt")


def test_resolve_dedupes_images(tmp_path: Path) -> None:
    root = _images(tmp_path / "imgs", {"Ann": 2, "Bob": 3, "Cy": 2})
    r = resolve_pairs(parse_pairs(_write(tmp_path, FOLDED)), root)
    assert len(r.index) == 8 and r.skipped_pairs == 0
    assert len(r.images) == len(set(r.images)) == 7
    a, b = r.index[0]
    assert r.images[a] == root / "Ann" / "Ann_0001.jpg" and r.images[b] == root / "Ann" / "Ann_0002.jpg"
    assert r.identities[a] == "Ann" and r.folds == [0, 0, 0, 0, 1, 1, 1, 1]


def test_missing_image_is_an_error_naming_it(tmp_path: Path) -> None:
    root = _images(tmp_path / "imgs", {"Ann": 2, "Bob": 2, "Cy": 2})  # Bob_0003 missing
    with pytest.raises(PairsError, match="Bob_0003.jpg"):
        resolve_pairs(parse_pairs(_write(tmp_path, FOLDED)), root)
    r = resolve_pairs(parse_pairs(_write(tmp_path, FOLDED)), root, skip_missing=True)
    assert r.skipped_pairs == 2 and [p.name for p in r.missing] == ["Bob_0003.jpg"]
    assert len(r.index) == 6


@needs_lfw
def test_real_devtrain_pairs_all_resolve() -> None:
    pl = parse_pairs(DEVTRAIN_PAIRS)
    assert len(pl.pairs) == 2200 and pl.n_folds == 1
    assert sum(p.genuine for p in pl.pairs) == 1100
    assert all(p.name1 == p.name2 for p in pl.pairs if p.genuine)
    assert all(p.name1 != p.name2 for p in pl.pairs if not p.genuine)
    first = pl.pairs[0]
    assert (first.name1, first.num1, first.num2) == ("Aaron_Peirsol", 1, 2)
    r = resolve_pairs(pl, DEVTRAIN_IMAGES)
    assert len(r.index) == 2200 and r.skipped_pairs == 0 and not r.missing
    assert all(p.is_file() for p in r.images)
    assert len(r.images) == len(set(r.images))


def test_a_pairs_name_cannot_escape_the_image_folder(tmp_path):
    from faceops.evaluate.pairs import PairsError, image_path

    (tmp_path / "images").mkdir()
    for name in ("..", "../secret", "a/b", ""):
        with pytest.raises(PairsError, match="escape"):
            image_path(tmp_path / "images", name, 1)
    assert image_path(tmp_path / "images", "Aaron_Peirsol", 2).name == "Aaron_Peirsol_0002.jpg"
