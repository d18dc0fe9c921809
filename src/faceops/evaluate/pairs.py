"""LFW verification pairs files (``pairs.txt``, ``pairsDevTrain.txt``, ``pairsDevTest.txt``).

Format (LFW README, section 3c): a header line, either ``N`` (one set of N genuine then N impostor
pairs) or ``S N`` (S folds, each of N genuine then N impostor lines); genuine lines are
``name i j`` and impostor lines ``name1 i name2 j``, fields separated by whitespace. Images are
``DIR/<name>/<name>_<i:04d>.jpg``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from faceops.errors import FaceopsError


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
        path = image_path(root, name, num)
        if not path.is_file():
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
