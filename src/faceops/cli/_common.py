"""Arguments shared by several commands."""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser, section: str | None, example: str) -> None:
    """``--config`` and ``--set`` for a command reading config ``section`` (None: the whole file).

    ``example`` is the ``--set`` example its help shows; tests/test_cli.py loads every such example,
    so the help can only show a key that the loader accepts.
    """
    p.add_argument("--config", metavar="FILE", help="YAML config (defaults work without one)")
    key = (f"a key's dotted path in the file; the leading '{section}.' may be left out" if section
           else "a key's dotted path in the file, section first")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config value ({key}; the value is YAML), e.g. --set {example} "
                   "(repeatable)")
    p.set_defaults(config_section=section)
