"""Synthetic faces whose identity lives in small features, so very low resolution loses it.

In the classic style (:mod:`faceops.data.synth`) skin, hair and face colours identify people, and
those survive any downsampling: at 14x16 a recognizer still tells them apart (0.880 against 0.905 at
full resolution). Here the large areas never identify anyone (skin tone from a shared range, hair
from a shared palette, backdrop per image); a person is the colour of their iris, brows and lips,
drawn 1.5-3.5 px wide, plus the shape of eyes, brows, nose and mouth. An 8x downsample (112 -> 14x16)
blurs those strokes into the skin; 3.5x (32x32) mostly keeps them. Measured with the demo's
recognizer budget (configs/demo.yaml, 400 test pairs): HR 0.863 +- 0.017, 32x32 bicubic
0.875 +- 0.014, 14x16 bicubic 0.765 +- 0.013. Thinner strokes (all 1.5-3 px) drop HR to 0.77;
wider ones (2-5 px) leave 14x16 within 2 points of HR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from faceops.data.synth import CANVAS, photograph

HAIR = ((30, 25, 20), (70, 45, 25), (110, 75, 40), (120, 50, 30), (120, 120, 120))  # shared by everyone
Colour = tuple[int, int, int]


@dataclass
class FineIdentity:
    face_w: float
    face_h: float
    hairline: float
    eye_dx: float
    eye_y: float
    eye_r: float
    eye_aspect: float
    eye_slant: float
    brow_gap: float
    brow_tilt: float
    brow_arch: float
    brow_w: float
    nose_len: float
    nose_w: float
    mouth_w: float
    mouth_y: float
    mouth_curve: float
    lip_w: float
    iris: Colour  # the identifying colours: small features only
    brow: Colour
    lip: Colour


def _colour(rng: np.random.Generator, lo: int, hi: int) -> Colour:
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def make_identity(rng: np.random.Generator) -> FineIdentity:
    u = rng.uniform
    return FineIdentity(
        face_w=u(40, 48), face_h=u(54, 62), hairline=u(0.55, 0.85),
        eye_dx=u(12, 22), eye_y=u(-14, -4), eye_r=u(3.5, 6.5), eye_aspect=u(0.45, 1.0), eye_slant=u(-0.3, 0.3),
        brow_gap=u(1.6, 2.8), brow_tilt=u(-0.35, 0.35), brow_arch=u(-1.0, 5.0), brow_w=u(1.5, 3.5),
        nose_len=u(8, 22), nose_w=u(4, 14), mouth_w=u(9, 24), mouth_y=u(16, 30), mouth_curve=u(-5, 6),
        lip_w=u(1.5, 3.0), iris=_colour(rng, 0, 256), brow=_colour(rng, 0, 200), lip=_colour(rng, 40, 256),
    )


def _ellipse(cx: float, cy: float, a: float, b: float, angle: float, n: int = 20) -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x, y = a * np.cos(t), b * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + ca * xi - sa * yi, cy + sa * xi + ca * yi) for xi, yi in zip(x, y, strict=True)]


def _curve(x0: float, x1: float, y: float, bend: float, tilt: float = 0.0, n: int = 9) -> list[tuple[float, float]]:
    t = np.linspace(-1, 1, n)
    return [(float(x), float(y - bend * (1 - s * s) + tilt * s)) for x, s in zip(np.linspace(x0, x1, n), t,
                                                                                   strict=True)]


def render(ident: FineIdentity, rng: np.random.Generator, size: int = 112) -> Image.Image:
    """One image of ``ident``: pose, lighting, blink, expression, noise and the shared colours vary."""
    background = _colour(rng, 30, 230)
    tone = rng.uniform(0.55, 0.85)
    skin = (int(230 * tone + 20), int(190 * tone + 20), int(160 * tone + 15))
    hair = tuple(int(np.clip(c + rng.normal(0, 8), 0, 255)) for c in HAIR[rng.integers(len(HAIR))])

    def jitter(c: Colour) -> Colour:
        return tuple(int(np.clip(v + rng.normal(0, 10), 0, 255)) for v in c)

    iris, lip, brow = jitter(ident.iris), jitter(ident.lip), jitter(ident.brow)
    img = Image.new("RGB", (CANVAS, CANVAS), background)
    d = ImageDraw.Draw(img)
    cx, cy = CANVAS / 2 + rng.normal(0, 2.0), CANVAS / 2 + rng.normal(0, 2.0)
    yaw = rng.normal(0, 0.08)
    fw, fh = ident.face_w * (1 - abs(yaw) * 0.5), ident.face_h
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=skin)
    d.chord([cx - fw - 2, cy - fh - 8, cx + fw + 2, cy - fh + 2 * fh * ident.hairline * 0.6], 180, 360, fill=hair)
    fx = cx + yaw * fw
    blink = rng.uniform(0.7, 1.0)
    for side in (-1, 1):
        ex, ey = fx + side * ident.eye_dx * (1 - abs(yaw) * 0.4), cy + ident.eye_y
        r = ident.eye_r
        d.polygon(_ellipse(ex, ey, r * 1.6, r * 1.6 * ident.eye_aspect * blink, ident.eye_slant * side),
                  fill=(245, 245, 245))
        ir = min(r * 0.9, r * 1.6 * ident.eye_aspect * blink)
        d.ellipse([ex - ir, ey - ir, ex + ir, ey + ir], fill=iris)
        by = ey - r * ident.brow_gap + rng.normal(0, 0.5)
        d.line(_curve(ex - r * 2, ex + r * 2, by, ident.brow_arch, -ident.brow_tilt * side * 10), fill=brow,
               width=max(1, round(ident.brow_w)), joint="curve")
    ny = cy + ident.eye_y + 6
    shade = tuple(max(0, c - 60) for c in skin)
    d.polygon([(fx, ny), (fx - ident.nose_w / 2, ny + ident.nose_len), (fx + ident.nose_w / 2, ny + ident.nose_len)],
              fill=shade)
    smile = ident.mouth_curve + rng.normal(0, 1.5)
    d.line(_curve(fx - ident.mouth_w, fx + ident.mouth_w, cy + ident.mouth_y, -smile), fill=lip,
           width=max(1, round(ident.lip_w)), joint="curve")
    img = img.rotate(rng.normal(0, 5), resample=Image.Resampling.BILINEAR, center=(cx, cy), fillcolor=background)
    return photograph(img, rng, size, blur_p=0.2, blur_max=0.9, margins=(13, 19))
