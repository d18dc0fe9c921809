"""The seeds' training recipes, as data: each is a section of a ready config in ``configs/``.

``recipe(FinetuneConfig, "finetune", "14x16")`` is ``configs/vlr_14x16.yaml``'s ``finetune:`` section
read as the typed config, exactly what ``faceops train finetune --config configs/vlr_14x16.yaml``
trains; the code holds no recipe numbers of its own.
"""

from __future__ import annotations

from typing import TypeVar

from faceops import config

T = TypeVar("T")

#: recipe name -> the packaged config that holds it
RECIPES = {
    "32x32": "vlr_face",  # seed 003: DSR and fine-tune at 32x32
    "14x16": "vlr_14x16",  # seed 003: the 14x16 recipe 32x32 was tuned from
    "stable": "finetune_stable",  # seed 004: the NaN-free fine-tune (lower LRs, softer margin)
    "arcface_resnet34": "arcface_resnet34",  # seed 002: ResNet-34 ArcFace in three phases
    "demo": "demo",  # the CPU demo: every stage in minutes
}


def recipe(cls: type[T], section: str, name: str) -> T:
    """Section ``section`` of recipe ``name`` as ``cls``; an unknown name lists the known ones."""
    if name not in RECIPES:
        what = {"finetune": "fine-tune", "dsr": "DSR"}.get(section, section)
        raise config.ConfigError(f"unknown {what} recipe {name!r}; choose one of {', '.join(sorted(RECIPES))}")
    path = config.packaged_config(RECIPES[name])
    if section not in config.read_yaml(path):
        raise config.ConfigError(f"recipe {name!r} ({path.name}) has no '{section}' section")
    return config.load(cls, path, section=section)
