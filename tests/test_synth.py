"""Synthetic faces: deterministic, and not trivially separable on raw pixels."""

import numpy as np
from PIL import Image

from faceops.data.synth import synthesize


def test_deterministic(tmp_path):
    a = synthesize(tmp_path / "a", 3, 2, seed=7, progress=False)
    b = synthesize(tmp_path / "b", 3, 2, seed=7, progress=False)
    c = synthesize(tmp_path / "c", 3, 2, seed=8, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 6
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def raw_pixel_nn_accuracy(root) -> float:
    """Leave-one-out 1-NN identification on raw pixels."""
    paths = sorted(root.rglob("*.png"))
    x = np.stack([np.asarray(Image.open(p).resize((32, 32)), np.float32).ravel() for p in paths])
    y = np.array([p.parent.name for p in paths])
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float((y[d.argmin(1)] == y).mean())


def test_raw_pixel_nearest_neighbour_is_far_from_perfect(tmp_path):
    # a trained recognizer reaches well above this on held-out identities (tests/test_real_faces.py,
    # the demo report); raw pixels confuse identities because pose, light and backdrop vary per image
    acc = raw_pixel_nn_accuracy(synthesize(tmp_path, 20, 6, seed=0, progress=False))
    assert acc < 0.7


def _identity_signal_kept_at(style: str, size: tuple[int, int], tmp_path) -> float:
    """Between-identity variance of the mean face kept after a down-up resampling to ``size``, as a share."""
    import numpy as np
    from PIL import Image

    root = synthesize(tmp_path / style, identities=12, images_per_identity=4, seed=1, progress=False, style=style)

    def means(resample: bool) -> np.ndarray:
        out = []
        for person in sorted(root.iterdir()):
            faces = []
            for f in sorted(person.iterdir()):
                img = Image.open(f).convert("RGB")
                if resample:
                    img = img.resize(size, Image.Resampling.BICUBIC).resize((112, 112), Image.Resampling.BICUBIC)
                faces.append(np.asarray(img, dtype=np.float32))
            out.append(np.mean(faces, axis=0))
        return np.stack(out)

    hr, low = means(False), means(True)
    return float(low.var(axis=0).sum() / hr.var(axis=0).sum())


def test_fine_faces_lose_more_identity_at_14x16_than_classic_ones(tmp_path):
    """The demo's faces (style fine) carry identity in small strokes a 14x16 face blurs away; the classic
    ones in colours that survive: the share of between-identity signal kept at 14x16 is clearly lower."""
    fine = _identity_signal_kept_at("fine", (14, 16), tmp_path)
    classic = _identity_signal_kept_at("classic", (14, 16), tmp_path)
    assert fine < classic - 0.03, (fine, classic)  # seeded: 0.879 against 0.925
    assert _identity_signal_kept_at("fine", (32, 32), tmp_path) > fine  # 32x32 keeps more of it


def test_an_unknown_style_is_refused(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="synth style 'blurry'"):
        synthesize(tmp_path, identities=1, images_per_identity=1, style="blurry")
