"""Check that the environment is exactly the lock (constraints.txt) and covers faceops[all].

Fails (exit 1, every difference listed) when an installed version differs from the lock, when a
distribution is installed but not locked, or when a requirement of faceops[all] (extras followed
recursively) is missing or outside its range. pip check alone misses the last case: it does not
know which extras were asked for.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

LOCK = Path(__file__).resolve().parents[1] / "constraints.txt"
ROOT, ROOT_EXTRAS = "faceops", ("all",)


def read_lock(path: Path = LOCK) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep:
                raise SystemExit(f"{path}: '{line}' is not an exact pin (name==version)")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def installed() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}


def walk_requirements(extras: tuple[str, ...] = ROOT_EXTRAS) -> list[tuple[Requirement, str]]:
    """Every requirement of ``faceops[extras]``, followed through the installed metadata: (the
    requirement, who needs it). What ``pip install faceops[extras]`` asks for, transitively."""
    found, seen = [], set()
    todo = [(ROOT, extra) for extra in ("", *extras)]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        env = {**default_environment(), "extra": extra}
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # reported by the caller as not installed
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            if req.marker is None and extra:
                continue  # already followed with the base requirements
            found.append((req, f"{name}[{extra}]" if extra else name))
            dep = canonicalize_name(req.name)
            todo += [(dep, "")] + [(dep, e) for e in req.extras]
    return found


def unmet_requirements(have: dict[str, str]) -> list[str]:
    """Requirements of faceops[all] that the environment does not satisfy."""
    problems = []
    for req, needed_by in walk_requirements():
        dep = canonicalize_name(req.name)
        if dep not in have:
            problems.append(f"{req} (needed by {needed_by}) is not installed: add it to the lock "
                            "(bash scripts/lock.sh)")
        elif req.specifier and not req.specifier.contains(have[dep], prereleases=True):
            problems.append(f"{dep}=={have[dep]} does not satisfy {req} (needed by {needed_by})")
    return problems


def lock_differences(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    diffs = [f"{n}: installed {have.get(n, 'nothing')}, locked {v}" for n, v in sorted(pins.items())
             if have.get(n) != v]
    diffs += [f"{n}=={v} is installed but not in the lock" for n, v in sorted(have.items())
              if n not in pins and n != ROOT]
    return diffs


def main() -> int:
    have = installed()
    problems = lock_differences(read_lock(), have) + unmet_requirements(have)
    for p in problems:
        print(f"[faceops] lock check: {p}", file=sys.stderr)
    if problems:
        print(f"[faceops] the environment does not match {LOCK.name}: "
              "rm -rf .venv && bash scripts/venv.sh", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
