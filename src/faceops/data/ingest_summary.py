"""Ingest step 5 (reporting): the summary an ingest returns, logs and stores, and its CLI table.

The same summary dict goes to the CLI, ``ingest_report.json`` and the manifest, so the three never
disagree; its keys and their order are part of the dataset's bytes.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

from faceops.data.dataset_plan import Plan
from faceops.data.ingest_config import HELD_OUT, INGEST_LOGGER, PAIRS_SPLIT, ROLES, IngestConfig

log = logging.getLogger(INGEST_LOGGER)

REPORT = "ingest_report.json"
MAX_LOGGED = 10  # rejected files named one by one in the log and the summary


@dataclass
class IngestResult:
    uri: str
    content_hash: str
    already_present: bool
    summary: dict


def log_rejected(rejected: list[dict], source: str, report_url: str) -> None:
    """Name the first rejected files (sorted) in the log, and where the rest are listed."""
    for r in sorted(rejected, key=lambda r: r["file"])[:MAX_LOGGED]:
        log.warning("rejected %s/%s: %s (skipped; see %s)", source.rstrip("/"), r["file"], r["reason"], report_url)
    if len(rejected) > MAX_LOGGED:
        log.warning("... and %d more rejected file(s): see %s", len(rejected) - MAX_LOGGED, report_url)


def summarise(plan: Plan, cfg: IngestConfig, scanned: int, accepted: int, rejected: list[dict],
              skipped: list[str], imported: dict | None, shard_bytes: int, t0: float) -> dict:
    """The ingest summary (CLI table, ingest_report.json, manifest): splits count what their reader
    returns, so ``train`` is the training classes and their trained images."""
    splits = {}
    for split, rels in plan.split_images.items():
        if split == PAIRS_SPLIT:
            splits[split] = {"identities": len({r.split("/", 1)[0] for r in rels}), "images": len(rels)}
            continue
        used = [r for r in rels if split != "train" or plan.image_roles[r] == "train_class"]
        people = {r.split("/", 1)[0] for r in used}
        splits[split] = {"identities": len(people), "images": len(used)}
        if split in HELD_OUT:
            splits[split]["distractors"] = sum(plan.people[i]["role"] == "distractor" for i in people)
    roles = plan.role_counts()
    return {
        "scanned": scanned, "accepted": accepted, "rejected": len(rejected),
        "rejected_by_reason": dict(Counter(r["reason"].split(" (")[0].split(" of ")[0] for r in rejected)),
        "skipped_non_image": len(skipped),
        "identities_found": len(plan.people), "train_classes": roles.get("train_class", 0),
        "train_class_rule": cfg.train_classes.describe(),
        "roles": {r: roles.get(r, 0) for r in ROLES},
        "distractor_identities": roles.get("distractor", 0),
        "train_images_over_cap": sum(1 for rel, r in plan.image_roles.items()
                                     if r == "unused" and plan.people[rel.split("/", 1)[0]]["role"] == "train_class"),
        "splits": splits,
        "pairs": {**{s: len(p) for s, p in plan.pairs.items()},
                  **({PAIRS_SPLIT: len(imported["pairs"])} if imported else {})},
        "protocol": {s: p.as_dict() for s, p in plan.protocol.items()},
        "bytes": shard_bytes, "seconds": round(time.time() - t0, 2),
        "rejected_files": [f"{r['file']}: {r['reason']}" for r in sorted(rejected, key=lambda r: r["file"])
                           ][:MAX_LOGGED],
    }


def format_summary(result: IngestResult) -> str:
    s = result.summary
    rows = [("dataset", result.uri), ("content hash", result.content_hash[:16]),
            ("status", "already present (nothing to do)" if result.already_present else "ingested"),
            ("scanned images", s["scanned"]), ("accepted", s["accepted"]), ("rejected", s["rejected"])]
    rows += [(f"  rejected: {k}", v) for k, v in sorted(s["rejected_by_reason"].items())]
    rows += [("  rejected file", f) for f in s.get("rejected_files", [])]
    if s["rejected"]:
        rows += [("  every rejection in", f"{result.uri}/{REPORT}")]
    roles = s["roles"]
    unused = f", {roles['unused']} unused" if roles["unused"] else ""
    rows += [("skipped non-image files", s["skipped_non_image"]),
             ("people", f"{s['identities_found']}: {roles['train_class']} training classes, {roles['eval']} eval, "
                        f"{roles['distractor']} distractors{unused}"),
             ("training-class rule", s["train_class_rule"]),
             ("images over the class cap", s["train_images_over_cap"])]
    for k, v in s["splits"].items():
        extra = f", {v['distractors']} distractors" if v.get("distractors") else ""
        rows.append((f"split {k}", f"{v['identities']} ids, {v['images']} images{extra}"))
    rows += [(f"pairs {k}", v) for k, v in s["pairs"].items()]
    for k, p in s["protocol"].items():
        size = f"{p['people']} people (+{p['distractors']} distractors), {p['pairs']} pairs"
        rows.append((f"protocol {k}", size if p["measurable"] else f"{size}: too small to compare recipes"))
    rows += [("bytes", f"{s['bytes'] / 1e6:.1f} MB"), ("time", f"{s['seconds']:.1f} s")]
    width = max(len(str(k)) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
