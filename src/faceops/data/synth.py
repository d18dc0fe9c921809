"""Procedural synthetic faces for demos and tests.

Each identity draws its geometry and colours (face shape, skin, eyes, brows, nose, mouth, hair)
from a seeded RNG; each image then varies pose, lighting, expression, position and noise, so the
identities are learnable yet raw-pixel nearest neighbour is clearly beaten by a trained model.

Two styles: ``classic`` (here: quick to learn, and identity survives any resolution, which suits
tests) and ``fine`` (:mod:`faceops.data.synth_fine`: identity in small features that 14x16 loses,
the demo's faces).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from faceops.config import check

CANVAS = 160  # drawn larger, then cropped/resized (like a detector crop around the face)


@dataclass
class SynthConfig:
    """The config's ``synth:`` section: the faces that ``synth://`` (a pipeline's default source)
    and ``faceops synth`` draw."""

    identities: int = 40
    images_per_identity: int = 12
    seed: int = 0
    size: int = 112  # image side in pixels
    # classic: identity in colours and shapes that survive any resolution; fine: in small features (eyes,
    # brows, lips) that a 14x16 face loses, so DSR has something to recover (faceops.data.synth_fine)
    style: Literal["classic", "fine"] = "classic"

    def __post_init__(self) -> None:
        check(self.identities >= 1, f"synth.identities must be >= 1, got {self.identities}")
        check(self.images_per_identity >= 1,
              f"synth.images_per_identity must be >= 1, got {self.images_per_identity}")
        check(self.size >= 1, f"synth.size must be >= 1, got {self.size}")


@dataclass
class Identity:
    face_w: float
    face_h: float
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    hair_style: int
    eye_dx: float
    eye_y: float
    eye_r: float
    iris: tuple[int, int, int]
    brow_tilt: float
    brow_w: float
    nose_len: float
    nose_w: float
    mouth_w: float
    mouth_y: float
    lip: tuple[int, int, int]


def _colour(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def make_identity(rng: np.random.Generator) -> Identity:
    tone = rng.uniform(0.35, 1.0)
    skin = (int(230 * tone + 20), int(190 * tone + 20), int(160 * tone + 15))
    return Identity(
        face_w=rng.uniform(38, 52), face_h=rng.uniform(50, 64), skin=skin,
        hair=_colour(rng, 10, 200), hair_style=int(rng.integers(0, 4)),
        eye_dx=rng.uniform(13, 22), eye_y=rng.uniform(-14, -4), eye_r=rng.uniform(3.0, 6.0),
        iris=_colour(rng, 20, 160), brow_tilt=rng.uniform(-0.35, 0.35), brow_w=rng.uniform(1.5, 4.5),
        nose_len=rng.uniform(8, 20), nose_w=rng.uniform(4, 11), mouth_w=rng.uniform(10, 24),
        mouth_y=rng.uniform(16, 30), lip=_colour(rng, 90, 220),
    )


def render(ident: Identity, rng: np.random.Generator, size: int = 112) -> Image.Image:
    """One image of ``ident`` with random pose, lighting, expression and noise."""
    background = _colour(rng, 30, 230)  # per image, so the backdrop never identifies anyone
    img = Image.new("RGB", (CANVAS, CANVAS), background)
    d = ImageDraw.Draw(img)
    cx, cy = CANVAS / 2 + rng.normal(0, 2.5), CANVAS / 2 + rng.normal(0, 2.5)
    yaw = rng.normal(0, 0.12)  # horizontal squash + shift of the features
    fw, fh = ident.face_w * (1 - abs(yaw) * 0.5), ident.face_h
    if ident.hair_style in (1, 3):  # long hair behind the face
        d.ellipse([cx - fw - 8, cy - fh - 6, cx + fw + 8, cy + fh * 0.9], fill=ident.hair)
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=ident.skin)
    if ident.hair_style != 2:  # fringe / cap of hair
        d.chord([cx - fw - 2, cy - fh - 8, cx + fw + 2, cy + fh * 0.3], 180, 360, fill=ident.hair)
    fx = cx + yaw * fw
    blink = rng.uniform(0.55, 1.0)
    for side in (-1, 1):
        ex, ey = fx + side * ident.eye_dx * (1 - abs(yaw) * 0.4), cy + ident.eye_y
        r = ident.eye_r
        d.ellipse([ex - r * 1.6, ey - r * blink, ex + r * 1.6, ey + r * blink], fill=(245, 245, 245))
        d.ellipse([ex - r * 0.8, ey - r * 0.8 * blink, ex + r * 0.8, ey + r * 0.8 * blink], fill=ident.iris)
        by = ey - r * 2.2 + rng.normal(0, 0.8)
        tilt = ident.brow_tilt * side * 10
        d.line([ex - r * 2, by + tilt, ex + r * 2, by - tilt], fill=tuple(c // 2 for c in ident.hair),
               width=max(1, int(round(ident.brow_w))))
    ny = cy + ident.eye_y + 6
    shade = tuple(max(0, c - 45) for c in ident.skin)
    d.polygon([(fx, ny), (fx - ident.nose_w / 2, ny + ident.nose_len), (fx + ident.nose_w / 2,
                                                                         ny + ident.nose_len)], fill=shade)
    smile = rng.normal(0, 4)  # expression
    my = cy + ident.mouth_y
    bend = 2 + abs(smile)
    d.arc([fx - ident.mouth_w, my - bend, fx + ident.mouth_w, my + bend],
          10 if smile >= 0 else 190, 170 if smile >= 0 else 350, fill=ident.lip, width=3)
    img = img.rotate(rng.normal(0, 7), resample=Image.Resampling.BILINEAR, center=(cx, cy),
                     fillcolor=background)
    return photograph(img, rng, size, blur_p=0.3, blur_max=1.2, margins=(10, 22))


def photograph(img: Image.Image, rng: np.random.Generator, size: int, blur_p: float, blur_max: float,
               margins: tuple[int, int]) -> Image.Image:
    """A drawn face as a camera gives it: directional light and gain, noise, sometimes blur, then a
    detector-like crop (margin drawn from ``margins``) resized to ``size``."""
    a = np.asarray(img, dtype=np.float32)
    ang = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS] / CANVAS - 0.5
    light = 1 + rng.uniform(0.0, 0.35) * (np.cos(ang) * xx + np.sin(ang) * yy)
    a = a * light[..., None] * rng.uniform(0.75, 1.2)
    a = a + rng.normal(0, rng.uniform(2, 8), a.shape)
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if rng.random() < blur_p:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, blur_max)))
    m = int(rng.integers(*margins))
    img = img.crop((m, m, CANVAS - m, CANVAS - m))
    return img.resize((size, size), Image.Resampling.BICUBIC)


def synthesize(out: str | Path, identities: int, images_per_identity: int, seed: int = 0,
               size: int = 112, progress: bool = True, style: str = "classic") -> Path:
    """Write ``out/<id_XXXX>/<NNNN>.png``; deterministic by ``seed`` (and ``style``)."""
    from faceops.data import synth_fine

    styles = {"classic": (make_identity, render), "fine": (synth_fine.make_identity, synth_fine.render)}
    if style not in styles:
        raise ValueError(f"synth style {style!r}: one of {', '.join(styles)}")
    make_identity_, render_ = styles[style]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(identities), desc="synth", unit="id", disable=not progress):
        rng = np.random.default_rng([seed, i])
        ident = make_identity_(rng)
        folder = out / f"id_{i:04d}"
        folder.mkdir(exist_ok=True)
        for k in range(images_per_identity):
            render_(ident, np.random.default_rng([seed, i, k + 1]), size).save(folder / f"{k:04d}.png")
    return out
