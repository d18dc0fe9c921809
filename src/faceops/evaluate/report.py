"""``report.html``: a self-contained page beside metrics.json, its figures as PNGs in the same folder.

The page opens with what happened in words (a sentence and a table per VLR size,
:mod:`.report_headline`), then where it came from (run, dataset hash, models, config), then every
setting's figures. Figures: ROC (TAR vs FAR, log FAR), DET (FRR vs FAR, log-log), genuine/impostor
score histograms per setting, and for VLR runs a sample grid per size (VLR | bicubic | DSR | HR), each
super-resolved face captioned with its identity cosine when the caller gives them. Plots use
matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from faceops.evaluate.report_headline import Provenance, headline, provenance_section
from faceops.evaluate.sr_metrics import identity_cosine
from faceops.evaluate.verification import roc_curve

REPORT_FILE = "report.html"
FAR_FLOOR = 1e-5  # left edge of the log-FAR axes (FAR = 0 points cannot be drawn on a log axis)
CAPTION_H = 0.2  # inches added to each grid row for the identity-cosine caption under its faces


@dataclass
class Curve:
    label: str  # setting, e.g. "hr" or "32x32 dsr"
    scores: np.ndarray
    genuine: np.ndarray


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_").lower()


def plot_roc(curves: list[Curve], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for c in curves:
        roc = roc_curve(c.scores, c.genuine)
        ax.plot(np.maximum(roc.far, FAR_FLOOR), roc.tar, label=c.label)
    ax.set(xscale="log", xlim=(FAR_FLOOR, 1), ylim=(0, 1.01), xlabel="FAR (false accept rate)",
           ylabel="TAR (true accept rate)", title="ROC")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_det(curves: list[Curve], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for c in curves:
        roc = roc_curve(c.scores, c.genuine)
        ax.plot(np.maximum(roc.far, FAR_FLOOR), np.maximum(roc.frr, FAR_FLOOR), label=c.label)
    ax.plot([FAR_FLOOR, 1], [FAR_FLOOR, 1], color="grey", lw=0.8, ls="--", label="EER line")
    ax.set(xscale="log", yscale="log", xlim=(FAR_FLOOR, 1), ylim=(FAR_FLOOR, 1),
           xlabel="FAR (false accept rate)", ylabel="FRR (false reject rate)", title="DET")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_histogram(curve: Curve, path: Path, bins: int, threshold: float | None) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    edges = np.linspace(min(-0.2, curve.scores.min()), max(1.0, curve.scores.max()), bins + 1)
    ax.hist(curve.scores[curve.genuine], bins=edges, alpha=0.6, density=True, label="genuine")
    ax.hist(curve.scores[~curve.genuine], bins=edges, alpha=0.6, density=True, label="impostor")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.3f}")
    ax.set(xlabel="cosine similarity", ylabel="density", title=f"scores: {curve.label}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sample_cosines(sr_emb: np.ndarray, hr_emb: np.ndarray) -> np.ndarray:
    """Each sample's identity cosine, cos(recognizer(SR), recognizer(HR)), row by row: the per-face
    terms of :func:`~faceops.evaluate.sr_metrics.identity_cosine`'s mean."""
    return np.array([identity_cosine(sr_emb[i : i + 1], hr_emb[i : i + 1]) for i in range(len(sr_emb))])


def grid_captions(columns: Mapping[str, np.ndarray],
                  cosines: Mapping[str, Sequence[float]] | None) -> dict[str, list[str]]:
    """The caption under each face of a grid, per column: "cos 0.812" where the column has cosines."""
    cosines = cosines or {}
    unknown = sorted(set(cosines) - set(columns))
    if unknown:
        raise ValueError(f"cosines for grid column(s) {unknown}, the grid has {list(columns)}")
    captions = {}
    for name, imgs in columns.items():
        values = cosines.get(name)
        if values is None:
            captions[name] = [""] * len(imgs)
            continue
        if len(values) != len(imgs):
            raise ValueError(f"grid column {name!r} has {len(imgs)} faces but {len(values)} cosines")
        captions[name] = [f"cos {c:.3f}" for c in values]
    return captions


def plot_grid(columns: dict[str, np.ndarray], path: Path, title: str,
              cosines: Mapping[str, Sequence[float]] | None = None) -> None:
    """Rows = faces, columns = views; small views are shown with nearest-neighbour pixels. ``cosines``
    (column -> one per face) are written under the faces of those columns."""
    plt = _plt()
    n = len(next(iter(columns.values())))
    captions = grid_captions(columns, cosines)
    cell_h = 1.6 + (CAPTION_H if cosines else 0.0)
    fig, axes = plt.subplots(n, len(columns), figsize=(1.6 * len(columns), cell_h * n + 0.4), squeeze=False)
    for j, (name, imgs) in enumerate(columns.items()):
        axes[0, j].set_title(f"{name}\n{imgs.shape[2]}x{imgs.shape[1]}", fontsize=8)
        for i in range(n):
            axes[i, j].imshow(imgs[i], interpolation="nearest")
            axes[i, j].axis("off")
            if captions[name][i]:
                axes[i, j].text(0.5, -0.03, captions[name][i], transform=axes[i, j].transAxes, ha="center",
                                va="top", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def plus_minus(value: float, se: float, sep: str = "±") -> str:
    """A figure with its standard error, e.g. ``0.9123±0.0051``."""
    return f"{value:.4f}{sep}{se:.4f}"


def setting_rows(metrics: dict, repeat_hr: bool = True) -> list[tuple[str, dict]]:
    """(name, block) per evaluated setting: HR, then each VLR size's settings (``repeat_hr``: with
    the size's copy of the HR block, so each size reads as a complete table)."""
    rows = [("HR", metrics)]
    for size, per_size in metrics.get("vlr", {}).items():
        rows += [(f"{size} {kind}", block) for kind, block in per_size.items() if repeat_hr or kind != "hr"]
    return rows


def _settings_table(metrics: dict) -> str:
    head = ("<tr><th>setting</th><th>accuracy ± SE</th><th>EER</th><th>AUC</th><th>TAR@1e-2</th><th>TAR@1e-3</th>"
            "<th>TAR@1e-4</th><th>threshold</th><th>rank-1 ± SE</th><th>rank-5</th><th>PSNR</th><th>SSIM</th>"
            "<th>PSNR-Y</th><th>SSIM-Y</th><th>identity cos</th></tr>")
    body = []
    for name, b in setting_rows(metrics):
        v, i, sr = b["verification"], b["identification"], b.get("super_resolution")
        cells = [plus_minus(v["accuracy"], v["accuracy_se"], " ± "),
                 *(_fmt(c) for c in (v["eer"], v["auc"], *v["tar_at_far"].values(), v["threshold"])),
                 plus_minus(i["rank1"], i["rank1_se"], " ± "), _fmt(i["rank5"])]
        cells += ([f"{sr['psnr']:.2f}", _fmt(sr["ssim"]), f"{sr['psnr_y']:.2f}", _fmt(sr["ssim_y"]),
                   _fmt(sr["identity_cosine"])] if sr else ["-"] * 5)
        body.append("<tr><td>" + html.escape(name) + "</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _notes(metrics: dict) -> str:
    """What the table's figures mean, and what its control row is for."""
    notes = ["± is the standard error: of the mean over folds for accuracy, binomial over probes for rank-1.",
             "TAR at FAR is conservative (best TAR at a threshold whose FAR is at most the target); the "
             "accuracy threshold is never chosen on the pairs it scores.",
             "PSNR/SSIM are against the HR face, on RGB and on the BT.601 luma Y."]
    if any("bicubic_finetuned" in per_size for per_size in metrics.get("vlr", {}).values()):
        notes.append("bicubic_finetuned is the control for dsr_finetuned: the same fine-tune (budget and recipe) "
                     "on bicubic faces instead of DSR outputs, so dsr_finetuned − bicubic_finetuned is what DSR "
                     "adds beyond the extra training.")
    return "".join(f"<p>{html.escape(n)}</p>" for n in notes)


STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:0.5em 0}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
         "caption{font-weight:bold;text-align:left}table.headline td:last-child{text-align:left}"
         "#provenance td:last-child{text-align:left;word-break:break-all}pre{background:#f6f6f6;padding:0.5em}"
         "img{margin:4px;border:1px solid #eee}.note{color:#555;font-size:90%}")


def _grid_section(out: Path, grids: Mapping[str, dict[str, np.ndarray]],
                  cosines: Mapping[str, Mapping[str, Sequence[float]]]) -> list[str]:
    """Draw each size's sample grid; the section's HTML parts ([] without grids)."""
    if not grids:
        return []
    parts = ["<h2>Super-resolution samples</h2>"]
    if any(cosines.get(size) for size in grids):
        parts.append("<p class='note'>Under each super-resolved face: its identity cosine, cos(recognizer(SR), "
                     "recognizer(HR)), with the base recognizer (1 = the same embedding as the HR face).</p>")
    for size, columns in grids.items():
        name = f"samples_{_slug(size)}.png"
        plot_grid(columns, out / name, f"VLR {size}: " + " | ".join(columns), cosines.get(size))
        parts.append(f'<img src="{name}" alt="VLR {html.escape(size)} samples: {html.escape(" | ".join(columns))}">')
    return parts


def write_report(out: Path, metrics: dict, curves: list[Curve], grids: dict[str, dict[str, np.ndarray]],
                 info: dict, hist_bins: int = 50, *, provenance: Provenance | Mapping[str, Any] | None = None,
                 grid_cosines: Mapping[str, Mapping[str, Sequence[float]]] | None = None) -> Path:
    """Write the PNGs and ``report.html`` into ``out``; returns the page's path.

    ``info``: the evaluation's facts (model, data, protocol, ...; None and empty values are left out).
    ``provenance``: run id, dataset hash, config, model versions (:class:`.Provenance` or a mapping of
    its fields), over a ``provenance`` block of ``metrics``; absent fields are left out of the page.
    ``grid_cosines``: per VLR size, per grid column (e.g. "bicubic", "DSR"), each shown face's
    identity cosine (:func:`sample_cosines`), written under the face.
    """
    prov = Provenance.gather(provenance, metrics, info)
    plot_roc(curves, out / "roc.png")
    plot_det(curves, out / "det.png")
    thresholds = {"hr": metrics["verification"]["threshold"]}
    for size, per_size in metrics.get("vlr", {}).items():
        thresholds.update({f"{size} {k}": b["verification"]["threshold"] for k, b in per_size.items()})
    hist_files = []
    for c in curves:
        name = f"hist_{_slug(c.label)}.png"
        plot_histogram(c, out / name, hist_bins, thresholds.get(c.label))
        hist_files.append(name)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>faceops evaluation</title>",
        f"<style>{STYLE}</style></head><body><h1>faceops evaluation</h1>",
        headline(metrics, prov), provenance_section(prov, info),
        "<h2>Settings</h2>", _settings_table(metrics), _notes(metrics),
        '<h2>ROC and DET</h2><img src="roc.png" alt="ROC"><img src="det.png" alt="DET">',
        "<h2>Score distributions</h2>", *(f'<img src="{f}" alt="{f}">' for f in hist_files),
        *_grid_section(out, grids, grid_cosines or {}),
        "</body></html>",
    ]
    path = out / REPORT_FILE
    path.write_text("\n".join(parts))
    return path
