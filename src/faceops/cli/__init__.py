"""The ``faceops`` command line.

Each module in this package defines ``register(subparsers)`` adding one command (or a group) whose
handler is ``func(args) -> int``. Commands are discovered, so adding a module adds a command.
Handlers are thin: they parse arguments and call the library.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from faceops import __version__
from faceops.config import ConfigError
from faceops.errors import FaceopsError


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faceops",
        description="faceops: ingest face datasets, train (VLR) face recognizers, evaluate, export "
        "and serve them — locally or as Kubeflow pipelines on a GPU cluster.",
    )
    parser.add_argument("--version", action="version", version=f"faceops {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:  # a usage error: exit 2, argparse's convention
        print(f"faceops {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FaceopsError as exc:
        print(f"faceops {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"faceops {args.command}: interrupted", file=sys.stderr)
        return 130
