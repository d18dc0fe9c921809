"""LFW pairs parsing and resolution (format rules on small files, then the real View 1 file); an
imported pairs file keeping its folds; generated pairs and the size of the protocol they give."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from faceops.evaluate import PairsError, image_path, parse_pairs, resolve_pairs, verification_metrics
from faceops.evaluate.pairs import MIN_PROTOCOL_PAIRS, generate_pairs, protocol_size

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


def test_another_image_format_resolves_by_stem(tmp_path: Path) -> None:
    root = _images(tmp_path / "imgs", {"Ann": 2, "Bob": 3, "Cy": 2})
    (root / "Bob" / "Bob_0003.jpg").rename(root / "Bob" / "Bob_0003.png")
    r = resolve_pairs(parse_pairs(_write(tmp_path, FOLDED)), root)
    assert root / "Bob" / "Bob_0003.png" in r.images and r.skipped_pairs == 0


def test_imported_pairs_keep_their_own_folds(tmp_path: Path) -> None:
    """Ingest with a 2-fold LFW pairs file (faces stored as PNG): the folds survive into the dataset
    and the accuracy is 2-fold with its standard error."""
    from faceops.data.ingest import IngestConfig, TrainClassConfig, ingest
    from faceops.data.reader import load_split
    from faceops.data.synth import synthesize

    faces = synthesize(tmp_path / "synth", identities=3, images_per_identity=3, seed=6, progress=False)
    root = tmp_path / "lfw"
    for name, ident in zip(("Ann", "Bob", "Cy"), sorted(faces.iterdir()), strict=True):
        (root / name).mkdir(parents=True)
        for k, f in enumerate(sorted(ident.iterdir()), start=1):
            f.rename(root / name / f"{name}_{k:04d}.png")
    cfg = IngestConfig(train_classes=TrainClassConfig(rule="all"), pairs_per_split=4, workers=1)
    r = ingest(str(root), "folds", str(tmp_path / "store"), cfg, pairs_file=str(_write(tmp_path, FOLDED)),
               progress=False)
    data = load_split(r.uri, "pairs", views=["hr"])
    assert data.folds == [0, 0, 0, 0, 1, 1, 1, 1] and len(data.pairs) == 8
    genuine = np.array([g for _, _, g in data.pairs])
    m = verification_metrics(np.where(genuine, 0.9, 0.1), genuine, folds=data.folds)
    assert (m["folds"], m["accuracy"], m["accuracy_se"]) == (2, 1.0, 0.0)


def test_generated_pairs_are_balanced_spread_and_seeded() -> None:
    # 40 people with 2 images (one genuine pair each), one with 60 images, 50 single-image distractors
    labels = np.r_[np.repeat(np.arange(40), 2), np.full(60, 40), np.arange(41, 91)]
    pairs = generate_pairs(labels, 200, seed=0)
    genuine = [(a, b) for a, b, g in pairs if g]
    impostor = [(a, b) for a, b, g in pairs if not g]
    assert len(genuine) == len(impostor) == 100 and len(set(pairs)) == 200
    assert all(a < b for a, b, _ in pairs)
    assert all(labels[a] == labels[b] for a, b in genuine) and all(labels[a] != labels[b] for a, b in impostor)
    people = {int(labels[a]) for a, _ in genuine}
    assert people == set(range(41))  # every person with 2+ images gives a pair before anyone a second
    assert sum(labels[a] == 40 for a, _ in genuine) == 60  # the big one fills the rest, not the lot
    lone = set(range(41, 91))
    assert sum(bool({int(labels[a]), int(labels[b])} & lone) for a, b in impostor) > 50  # distractors used
    assert generate_pairs(labels, 200, seed=0) == pairs and generate_pairs(labels, 200, seed=1) != pairs


def test_generated_pairs_use_what_exists_and_say_so() -> None:
    labels = np.r_[np.repeat(np.arange(5), 2), np.arange(5, 9)]  # 5 genuine pairs exist
    pairs = generate_pairs(labels, 600, seed=0)
    assert len(pairs) == 10 and sum(g for _, _, g in pairs) == 5
    size = protocol_size(labels, pairs)
    assert (size.people, size.distractors, size.pairs, size.genuine) == (5, 4, 10, 5)
    assert not size.measurable and f"{MIN_PROTOCOL_PAIRS} pairs" in size.shortfall()
    assert generate_pairs([0, 0, 0], 10, seed=0) == []  # one person: no impostor, so nothing
