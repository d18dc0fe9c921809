"""``faceops ingest`` and ``faceops synth``."""

from __future__ import annotations

import argparse
import json

from faceops import config
from faceops.cli._common import add_config_args
from faceops.data.ingest import IngestConfig, format_summary, ingest
from faceops.data.synth import SynthConfig, synthesize

DEFAULT_STORE = "faceops-runs/store"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest", help="turn a face folder (or s3:// prefix) into a checksummed dataset",
        description="Scan SOURCE (one sub-folder per identity, e.g. LFW or ORL, or an s3:// prefix), "
        "validate and prepare every image in parallel, make VLR views, split by identity, make or import "
        "verification pairs, and publish shards + manifest.json + ingest_report.json to the store. "
        "Re-running with the same input and config does nothing and reports the same hash.")
    p.add_argument("source", help="folder of <identity>/<image> files, or s3://bucket/prefix")
    p.add_argument("--name", required=True, help="dataset name: stored at <store>/datasets/<name>")
    p.add_argument("--store", default=DEFAULT_STORE,
                   help=f"store URI: a folder, file:///path or s3://bucket/prefix (default {DEFAULT_STORE})")
    p.add_argument("--pairs", metavar="FILE", help="LFW pairs file (pairs.txt / pairsDevTrain.txt) to import")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_config_args(p, "ingest", "ingest.train_classes.rule=all")
    p.set_defaults(func=run_ingest)

    d = SynthConfig()  # the same defaults as a config's synth: section
    s = sub.add_parser("synth", help="write procedural synthetic faces for demos and tests",
                       description="Deterministic (by --seed) synthetic identities: OUT/id_XXXX/NNNN.png")
    s.add_argument("--identities", type=int, default=d.identities)
    s.add_argument("--images-per-identity", type=int, default=d.images_per_identity)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=d.seed)
    s.add_argument("--size", type=int, default=d.size, help="image side in pixels")
    s.add_argument("--style", choices=["classic", "fine"], default=d.style,
                   help="classic: identity survives any resolution; fine: in small features a 14x16 face loses "
                   "(the demo's)")
    s.set_defaults(func=run_synth)


def run_ingest(args: argparse.Namespace) -> int:
    cfg = config.load(IngestConfig, args.config, args.overrides, section="ingest")
    result = ingest(args.source, args.name, args.store, cfg, pairs_file=args.pairs)
    if args.json:
        print(json.dumps({"uri": result.uri, "content_hash": result.content_hash,
                          "already_present": result.already_present, "summary": result.summary}, indent=1))
    else:
        print(format_summary(result))
    return 0


def run_synth(args: argparse.Namespace) -> int:
    cfg = SynthConfig(args.identities, args.images_per_identity, args.seed, args.size, args.style)  # checks values
    out = synthesize(args.out, cfg.identities, cfg.images_per_identity, cfg.seed, cfg.size, style=cfg.style)
    print(f"wrote {args.identities} identities x {args.images_per_identity} images to {out}")
    return 0
