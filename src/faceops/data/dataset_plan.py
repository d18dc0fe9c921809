"""Ingest step 3: who is a training class, an eval person or a distractor, which split holds which
image in which order, and the verification pairs (generated, or imported from an LFW pairs file).

Decided from identity names and image counts alone, never from pixels: the plan is the same for the
same accepted files and config, whatever order they were decoded in.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from faceops.data.ingest_config import (
    HELD_OUT,
    INGEST_LOGGER,
    PAIRS_SPLIT,
    SPLITS,
    IngestConfig,
    IngestError,
    SplitConfig,
)
from faceops.evaluate.pairs import ProtocolSize, generate_pairs, image_path, parse_pairs, protocol_size

log = logging.getLogger(INGEST_LOGGER)


@dataclass
class Plan:
    """Who serves which role, which images each split holds, and the generated pairs: everything
    ingest decides from identity names and image counts alone (no pixels)."""

    people: dict[str, dict]  # identity -> {"split", "role", "images"}
    split_images: dict[str, list[str]]  # split -> image ids ("<identity>/<file>") in shard order
    image_roles: dict[str, str]  # image id -> role (a training class's images beyond its cap: "unused")
    pairs: dict[str, list[tuple[int, int, bool]]]  # val/test: indices into the split
    protocol: dict[str, ProtocolSize]  # val/test

    def role_counts(self) -> dict[str, int]:
        return dict(Counter(p["role"] for p in self.people.values()))


def _targets(n: int, splits: SplitConfig) -> tuple[int, int]:
    """People the val and test fractions ask for (at least 2 each when there are 3+ people)."""
    n_val, n_test = int(round(n * splits.val)), int(round(n * splits.test))
    if splits.val > 0 and n >= 3:
        n_val = max(n_val, 2)
    if splits.test > 0 and n >= 3:
        n_test = max(n_test, 2)
    return n_val, n_test


def _divide(people: list[str], val_share: float, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """A seeded val/test division with ``val_share`` of ``people`` in val."""
    order = [people[i] for i in rng.permutation(len(people))]
    k = int(round(len(order) * val_share))
    return order[:k], order[k:]


def assign_roles(counts: dict[str, int], cfg: IngestConfig) -> dict[str, tuple[str, str]]:
    """identity -> (split, role) for every identity.

    The val/test fractions of the people with >= 2 images are drawn first from the people the
    training-class rule leaves out (they cannot train), then from the rest; whoever the rule leaves
    out beyond that is held out as well. Everyone left trains. Single-image people are distractors,
    divided val:test in the same ratio.
    """
    rule = cfg.train_classes.resolved()
    rng = np.random.default_rng(cfg.seed)
    multi = sorted(i for i, n in counts.items() if n >= 2)
    singles = sorted(i for i, n in counts.items() if n < 2)
    left_out = [i for i in multi if counts[i] < rule.min_images]
    eligible = [i for i in multi if counts[i] >= rule.min_images]
    held_share = cfg.splits.val + cfg.splits.test
    if held_share == 0:  # nowhere to hold anyone out: kept, in no protocol
        out = {i: ("train", "train_class") for i in eligible}
        out.update({i: ("train", "unused") for i in left_out + singles})
        return out
    n_val, n_test = _targets(len(multi), cfg.splits)
    pool = [left_out[i] for i in rng.permutation(len(left_out))] + [eligible[i] for i in rng.permutation(len(eligible))]
    n_held = min(len(pool), max(n_val + n_test, len(left_out)))
    held = [pool[i] for i in rng.permutation(n_held)]
    k_val = n_val if n_held == n_val + n_test else int(round(n_held * cfg.splits.val / held_share))
    out = {i: ("train", "train_class") for i in pool[n_held:]}
    out.update({i: ("val", "eval") for i in held[:k_val]})
    out.update({i: ("test", "eval") for i in held[k_val:]})
    val_d, test_d = _divide(singles, cfg.splits.val / held_share, rng)
    out.update({i: ("val", "distractor") for i in val_d})
    out.update({i: ("test", "distractor") for i in test_d})
    return out


def plan_dataset(per_identity: dict[str, list[str]], cfg: IngestConfig) -> Plan:
    """Roles, split contents and pairs for ``per_identity`` (identity -> its image ids)."""
    roles = assign_roles({i: len(r) for i, r in per_identity.items()}, cfg)
    cap = cfg.train_classes.resolved().max_images
    rng = np.random.default_rng(cfg.seed)
    split_images: dict[str, list[str]] = {s: [] for s in SPLITS}
    image_roles: dict[str, str] = {}
    for ident in sorted(roles):
        split, role = roles[ident]
        rels = sorted(per_identity[ident])
        trained = set(rels)
        if role == "train_class" and cap and len(rels) > cap:  # balanced classes: a seeded pick trains
            trained = {rels[k] for k in rng.choice(len(rels), cap, replace=False)}
        for rel in rels:
            image_roles[rel] = role if rel in trained else "unused"
        split_images[split].extend(rels)
    pairs, protocol = {}, {}
    for k, split in enumerate(HELD_OUT, start=1):
        names = [r.split("/", 1)[0] for r in split_images[split]]
        labels = np.unique(names, return_inverse=True)[1] if names else np.zeros(0, np.int64)
        pairs[split] = generate_pairs(labels, cfg.pairs_per_split, cfg.seed + k)
        protocol[split] = protocol_size(labels, pairs[split])
    people = {i: {"split": s, "role": r, "images": len(per_identity[i])} for i, (s, r) in sorted(roles.items())}
    return Plan(people, split_images, image_roles, pairs, protocol)


def warn_small(plan: Plan, cfg: IngestConfig) -> None:
    """Say so when the data cannot give the protocol or the training classes a run expects."""
    if not any(p["role"] == "train_class" for p in plan.people.values()) and cfg.splits.train > 0:
        log.warning("no training classes: no person meets the training-class rule (%s); set "
                    "ingest.train_classes (e.g. rule: all) to train on this dataset", cfg.train_classes.describe())
    short = plan.protocol["test"].shortfall()
    if short and cfg.splits.test > 0:
        log.warning("test split: %s", short)


def import_pairs(pairs_file: str, accepted: Collection[str], plan: Plan) -> dict:
    """Resolve an LFW pairs file; its images form the ``pairs`` split (identities may overlap train),
    and its folds are kept. ``name_NNNN.jpg`` also matches the same stem in another format."""
    parsed = parse_pairs(pairs_file)
    for k, p in enumerate(parsed.pairs):
        for who in (p.name1, p.name2):
            if not who or who in (".", "..") or "/" in who or "\\" in who:
                raise IngestError(f"{pairs_file}: pair {k + 1} names {who!r}, which is not an identity folder "
                                  "of the source (a path or '..' would escape it): use bare identity names "
                                  "as in LFW's pairs.txt")
    by_stem: dict[str, str] = {}
    for rel in sorted(accepted):
        by_stem.setdefault(rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel, rel)

    def resolve(name: str, num: int) -> str:
        rel = image_path("", name, num).as_posix()
        return rel if rel in accepted else by_stem.get(rel.rsplit(".", 1)[0], rel)

    refs = [(resolve(p.name1, p.num1), resolve(p.name2, p.num2), p) for p in parsed.pairs]
    miss = sorted({f for a, b, _ in refs for f in (a, b) if f not in accepted})
    if miss:
        raise IngestError(f"{pairs_file}: pairs reference {len(miss)} image(s) missing from the source "
                          f"or rejected at ingest, e.g. {miss[:3]} (see the rejected files above): add them "
                          "to the source or use the pairs file that belongs to it")
    files = sorted({f for a, b, _ in refs for f in (a, b)})
    plan.split_images[PAIRS_SPLIT] = files
    index = {f: i for i, f in enumerate(files)}
    return {"pairs": [(index[a], index[b], p.genuine) for a, b, p in refs],
            "folds": [p.fold for _, _, p in refs], "n_folds": parsed.n_folds, "file": Path(pairs_file).name}
