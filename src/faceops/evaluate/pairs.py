"""Verification pairs: LFW pairs files, and the pairs faceops generates for a dataset split.

Format (LFW README, section 3c): a header line, either ``N`` (one set of N genuine then N impostor
pairs) or ``S N`` (S folds, each of N genuine then N impostor lines); genuine lines are
``name i j`` and impostor lines ``name1 i name2 j``, fields separated by whitespace. Images are
``DIR/<name>/<name>_<i:04d>.jpg`` (another extension is accepted when no ``.jpg`` exists, so a set
stored as PNG or GIF files resolves too).

Generated pairs (:func:`generate_pairs`) follow the same idea as LFW's: genuine pairs spread over
as many people as possible, impostor pairs between any two people, single-image people included.
A protocol smaller than :data:`MIN_PROTOCOL_PEOPLE` people or :data:`MIN_PROTOCOL_PAIRS` pairs is
still produced from what the data holds, and :func:`protocol_size` says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from faceops.errors import FaceopsError

#: Below these a held-out protocol cannot separate two recipes (issue 11: 8 people and 600 pairs gave
#: standard errors of several points); smaller data is still used, and reported as too small.
MIN_PROTOCOL_PEOPLE = 300  # people with >= 2 images (genuine pairs, identification probes)
MIN_PROTOCOL_PAIRS = 2000


class PairsError(FaceopsError):
    """A pairs file is malformed or names images that are missing."""


@dataclass(frozen=True)
class Pair:
    name1: str
    num1: int
    name2: str
    num2: int
    genuine: bool
    fold: int  # 0 when the header gives no folds


@dataclass
class PairList:
    pairs: list[Pair]
    n_folds: int  # 1 when the header gives no folds (then no fold-wise protocol exists)
    source: str = ""

    @property
    def has_folds(self) -> bool:
        return self.n_folds > 1


@dataclass
class ResolvedPairs:
    """Pairs as indices into a list of unique image files (each image embedded once)."""

    images: list[Path]  # unique image files, in first-seen order
    identities: list[str]  # identity name of each image
    index: list[tuple[int, int]] = field(default_factory=list)  # (image a, image b) per kept pair
    genuine: list[bool] = field(default_factory=list)
    folds: list[int] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)  # images not found (only when skipping)
    skipped_pairs: int = 0


def image_path(root: str | Path, name: str, num: int) -> Path:
    """``root/<name>/<name>_NNNN.jpg``; a name that is not a bare folder name (``..``, a path) is refused,
    so a pairs file cannot make evaluation read outside its image folder."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise PairsError(f"pairs name {name!r} is not an identity folder name of {root} (a path or '..' would "
                         "escape it): use bare identity names as in LFW's pairs.txt")
    return Path(root) / name / f"{name}_{num:04d}.jpg"


def find_image(root: str | Path, name: str, num: int) -> Path | None:
    """The file a pairs line means: ``<name>_NNNN.jpg``, else the same stem with any other extension."""
    path = image_path(root, name, num)
    if path.is_file():
        return path
    if not path.parent.is_dir():
        return None
    others = sorted(p for p in path.parent.glob(f"{path.stem}.*") if p.is_file())
    return others[0] if others else None


def _int(token: str, where: str) -> int:
    try:
        value = int(token)
    except ValueError:
        raise PairsError(f"{where}: {token!r} is not an image number") from None
    if value < 1:
        raise PairsError(f"{where}: image number {value} must be >= 1")
    return value


def _parse_header(line: str, source: str) -> tuple[int, int]:
    """(folds, pairs of each kind per fold)."""
    tokens = line.split()
    try:
        values = [int(t) for t in tokens]
    except ValueError:
        values = []
    if len(values) == 1:
        return 1, values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise PairsError(f"{source}:1: header {line.strip()!r} must be 'N' or 'FOLDS N' (LFW pairs format)")


def parse_pairs(path: str | Path) -> PairList:
    """Parse a pairs file; the line counts and the genuine/impostor layout must match the header."""
    path = Path(path)
    if not path.is_file():
        raise PairsError(f"pairs file not found: {path}")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        raise PairsError(f"{path}: empty pairs file")
    n_folds, per_fold = _parse_header(lines[0], str(path))
    body = lines[1:]
    if len(body) != 2 * n_folds * per_fold:
        raise PairsError(f"{path}: header says {n_folds} fold(s) of {per_fold} genuine + {per_fold} impostor "
                         f"pairs ({2 * n_folds * per_fold} lines), found {len(body)} pair lines")
    pairs = []
    for k, line in enumerate(body):
        where = f"{path}:{k + 2}"
        fold, pos = divmod(k, 2 * per_fold)
        expect_genuine = pos < per_fold
        tokens = line.split()
        if len(tokens) == 3 and expect_genuine:
            name, i, j = tokens
            pairs.append(Pair(name, _int(i, where), name, _int(j, where), True, fold))
        elif len(tokens) == 4 and not expect_genuine:
            name1, i, name2, j = tokens
            pairs.append(Pair(name1, _int(i, where), name2, _int(j, where), False, fold))
        else:
            kind = "a genuine 'name i j'" if expect_genuine else "an impostor 'name1 i name2 j'"
            raise PairsError(f"{where}: expected {kind} line here (fold {fold}), got {line.strip()!r}")
    return PairList(pairs=pairs, n_folds=n_folds, source=str(path))


def resolve_pairs(pairs: PairList, root: str | Path, skip_missing: bool = False) -> ResolvedPairs:
    """Map pairs onto image files under ``root``; a missing image is an error unless ``skip_missing``
    (then the pairs using it are dropped and counted)."""
    root = Path(root)
    if not root.is_dir():
        raise PairsError(f"image folder not found: {root}")
    out = ResolvedPairs(images=[], identities=[])
    position: dict[tuple[str, int], int] = {}

    def index_of(name: str, num: int) -> int | None:
        if (name, num) in position:
            return position[(name, num)]
        path = find_image(root, name, num)
        if path is None:
            path = image_path(root, name, num)
            if not skip_missing:
                raise PairsError(f"{pairs.source or 'pairs'}: image {path} not found (pass --skip-missing "
                                 "to drop the pairs whose images are missing)")
            if path not in out.missing:
                out.missing.append(path)
            return None
        position[(name, num)] = len(out.images)
        out.images.append(path)
        out.identities.append(name)
        return position[(name, num)]

    for p in pairs.pairs:
        a, b = index_of(p.name1, p.num1), index_of(p.name2, p.num2)
        if a is None or b is None:
            out.skipped_pairs += 1
            continue
        out.index.append((a, b))
        out.genuine.append(p.genuine)
        out.folds.append(p.fold)
    return out


# -- generated pairs -------------------------------------------------------------------------------
def _groups(labels: np.ndarray) -> list[np.ndarray]:
    """Image indices of each label, labels in ascending order."""
    order = np.argsort(labels, kind="stable")
    cuts = np.flatnonzero(np.diff(labels[order])) + 1
    return np.split(order, cuts) if labels.size else []


def _person_pairs(idx: np.ndarray, limit: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Up to ``limit`` distinct pairs of one person's images, in a seeded random order."""
    n = idx.size
    total = n * (n - 1) // 2
    if total <= 4 * limit:  # enumerate and shuffle
        i, j = np.triu_indices(n, 1)
        keep = rng.permutation(total)[:limit]
        return [(int(idx[i[k]]), int(idx[j[k]])) for k in keep]
    seen: dict[tuple[int, int], None] = {}  # many more pairs than needed: draw without enumerating
    while len(seen) < limit:
        a, b = rng.choice(n, 2, replace=False)
        seen.setdefault((int(idx[min(a, b)]), int(idx[max(a, b)])), None)
    return list(seen)


def _genuine(people: list[np.ndarray], want: int, rng: np.random.Generator) -> list[tuple[int, int, bool]]:
    """Dealt round-robin: every person gives one pair before anyone gives a second."""
    queues = [_person_pairs(idx, want, rng) for idx in people if idx.size >= 2]
    out: list[tuple[int, int, bool]] = []
    depth = 0
    while len(out) < want:
        active = [q for q in queues if len(q) > depth]
        if not active:
            break
        for k in rng.permutation(len(active))[:want - len(out)]:
            a, b = active[k][depth]
            out.append((min(a, b), max(a, b), True))
        depth += 1
    return out


def _impostor(people: list[np.ndarray], want: int, rng: np.random.Generator) -> list[tuple[int, int, bool]]:
    """Two different people drawn uniformly (single-image people too), one image of each."""
    if len(people) < 2:
        return []
    sizes = np.array([p.size for p in people])
    found: dict[tuple[int, int, bool], None] = {}
    for _ in range(20):  # each round draws twice what is missing; duplicates are rare past tiny data
        need = want - len(found)
        if need <= 0:
            break
        pa, pb = rng.integers(len(people), size=(2, 2 * need))
        pa, pb = pa[pa != pb], pb[pa != pb]
        ia = (rng.random(pa.size) * sizes[pa]).astype(np.int64)
        ib = (rng.random(pb.size) * sizes[pb]).astype(np.int64)
        for x, y, i, j in zip(pa, pb, ia, ib, strict=True):
            a, b = int(people[x][i]), int(people[y][j])
            found.setdefault((min(a, b), max(a, b), False), None)
            if len(found) == want:
                break
    return list(found)


def generate_pairs(labels: np.ndarray | Sequence[int], n_pairs: int, seed: int) -> list[tuple[int, int, bool]]:
    """Balanced, seeded verification pairs ``(i, j, genuine)`` over one split's images (``i < j``).

    Genuine pairs are dealt round-robin over the people with at least two images, each person's pairs
    in a seeded order, so the pairs cover as many people as the count allows and nobody with hundreds
    of images dominates. Impostor pairs join two people drawn uniformly, single-image people
    (distractors) included, as LFW's mismatched pairs do. Half are genuine: when the data has fewer
    genuine pairs than ``n_pairs / 2`` the impostors are cut to match.
    """
    y = np.asarray(labels).ravel()
    rng = np.random.default_rng(seed)
    people = _groups(y)
    want = n_pairs // 2
    genuine = _genuine(people, want, rng)
    impostor = _impostor(people, want, rng)
    n = min(len(genuine), len(impostor))
    return sorted(genuine[:n]) + sorted(impostor[:n])


@dataclass(frozen=True)
class ProtocolSize:
    """How big a split's verification / identification protocol is, and whether that is enough."""

    people: int  # people with >= 2 images: genuine pairs and identification probes
    distractors: int  # single-image people: impostor pairs and the gallery only
    pairs: int
    genuine: int

    @property
    def measurable(self) -> bool:
        return self.people >= MIN_PROTOCOL_PEOPLE and self.pairs >= MIN_PROTOCOL_PAIRS

    def as_dict(self) -> dict:
        return {"people": self.people, "distractors": self.distractors, "pairs": self.pairs,
                "genuine": self.genuine, "measurable": self.measurable}

    def shortfall(self) -> str:
        """Empty when measurable, else a sentence saying what is missing."""
        if self.measurable:
            return ""
        return (f"{self.people} people with >= 2 images and {self.pairs} pairs, fewer than the "
                f"{MIN_PROTOCOL_PEOPLE} people / {MIN_PROTOCOL_PAIRS} pairs a protocol needs to tell two "
                "recipes apart: the data has no more, so its figures carry wide standard errors")


def protocol_size(labels: np.ndarray | Sequence[int], pairs: Sequence[tuple[int, int, bool]]) -> ProtocolSize:
    """The size of the protocol ``pairs`` and the gallery/probe split of ``labels`` give."""
    counts = np.bincount(np.unique(np.asarray(labels).ravel(), return_inverse=True)[1]) if len(labels) else \
        np.zeros(0, np.int64)
    return ProtocolSize(people=int((counts >= 2).sum()), distractors=int((counts == 1).sum()),
                        pairs=len(pairs), genuine=sum(bool(p[2]) for p in pairs))
