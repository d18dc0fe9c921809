"""The ingest's vocabulary: its config (the YAML ``ingest:`` section), its error and the split names.

Kept apart from the steps so that reading a config, or naming a split, does not import the decoding
and shard-writing code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from faceops.config import check
from faceops.data.degrade import DegradeConfig
from faceops.data.prepare import PrepareConfig
from faceops.errors import FaceopsError

INGEST_LOGGER = "faceops.data.ingest"  # every ingest step logs under this one name, as before the split
log = logging.getLogger(INGEST_LOGGER)

SPLITS = ("train", "val", "test")
HELD_OUT = ("val", "test")
PAIRS_SPLIT = "pairs"  # images referenced by an imported pairs file (LFW protocol)
ROLES = ("train_class", "eval", "distractor", "unused")  # "unused": kept, but in no protocol


class IngestError(FaceopsError):
    pass


@dataclass(frozen=True)
class ClassRule:
    min_images: int  # people with fewer images are held out, not trained on
    max_images: int  # images a class trains on at most (a seeded pick); 0 = all


#: Named training-class rules (``ingest.train_classes.rule``).
TRAIN_CLASS_RULES: dict[str, ClassRule] = {
    "seeds": ClassRule(8, 150),  # seed 000: at least 8 images, at most 150 trained on (balanced classes)
    "all": ClassRule(2, 0),  # every person with two or more images, all of them
}


@dataclass
class TrainClassConfig:
    """Which people become training classes: a recipe choice, not a filter on what a dataset holds
    (people who do not qualify stay in the dataset, held out for evaluation)."""

    rule: str = "seeds"  # a name in TRAIN_CLASS_RULES: seeds (8-150 images), all (>= 2)
    min_images: int | None = None  # overrides the rule's minimum
    max_images: int | None = None  # overrides the rule's cap (0 = no cap)

    def __post_init__(self) -> None:
        check(self.rule in TRAIN_CLASS_RULES, f"train_classes.rule {self.rule!r} is not one of "
              f"{', '.join(TRAIN_CLASS_RULES)}")
        check(self.min_images is None or self.min_images >= 2,
              f"train_classes.min_images must be >= 2 (a class needs two images), got {self.min_images}")
        check(self.max_images is None or self.max_images >= 0,
              f"train_classes.max_images must be >= 0 (0 = no cap), got {self.max_images}")
        r = self.resolved()
        check(r.max_images == 0 or r.max_images >= r.min_images,
              f"train_classes.max_images ({r.max_images}) must be 0 or >= min_images ({r.min_images})")

    def resolved(self) -> ClassRule:
        base = TRAIN_CLASS_RULES[self.rule]
        return ClassRule(base.min_images if self.min_images is None else self.min_images,
                         base.max_images if self.max_images is None else self.max_images)

    def describe(self) -> str:
        r = self.resolved()
        cap = f"at most {r.max_images} trained on" if r.max_images else "all trained on"
        return f"{self.rule}: >= {r.min_images} images, {cap}"


@dataclass
class SplitConfig:
    """Shares of the people with >= 2 images (identity-disjoint). ``val``/``test`` are minimums: people
    the training-class rule leaves out are held out too, divided val:test in the same ratio, and so
    are the single-image people (distractors)."""

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1

    def __post_init__(self) -> None:
        check(min(self.train, self.val, self.test) >= 0, "splits: fractions must be >= 0")
        check(abs(self.train + self.val + self.test - 1.0) < 1e-6,
              f"splits: train+val+test must be 1, got {self.train + self.val + self.test:g}")


@dataclass
class IngestConfig:
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    degrade: DegradeConfig = field(default_factory=DegradeConfig)
    splits: SplitConfig = field(default_factory=SplitConfig)
    train_classes: TrainClassConfig = field(default_factory=TrainClassConfig)
    min_images_per_identity: int | None = None  # deprecated alias of train_classes.min_images
    max_images_per_identity: int | None = None  # deprecated alias of train_classes.max_images
    min_image_size: int = 16  # smaller sources are rejected ("too small")
    pairs_per_split: int = 3000  # generated val/test verification pairs (half genuine)
    seed: int = 0
    workers: int = 0  # decoding processes; 0 = all cores
    shard_size: int = 4096  # images per shard file

    def __post_init__(self) -> None:
        check(self.shard_size >= 1, "shard_size must be >= 1")
        check(self.workers >= 0, "workers must be >= 0")
        check(self.pairs_per_split >= 2, f"pairs_per_split must be >= 2, got {self.pairs_per_split}")
        aliases = {"min_images": self.min_images_per_identity, "max_images": self.max_images_per_identity}
        given = {k: v for k, v in aliases.items() if v is not None}
        if given:  # the old names meant "drop people below"; now they only choose training classes
            log.warning("ingest.min/max_images_per_identity are deprecated: they now set "
                        "ingest.train_classes.min_images/max_images (who trains; every person is kept)")
            self.train_classes = replace(self.train_classes, **given)
            self.min_images_per_identity = self.max_images_per_identity = None
