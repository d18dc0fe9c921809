"""The top of ``report.html``: what happened, in words and one table per VLR size, then where it came from.

Headline: per VLR size, the verification accuracy (± standard error) of each setting (HR, bicubic,
DSR, DSR + fine-tune and the bicubic + fine-tune control), its difference against bicubic and what
serves it, then one plain sentence ("At 14x16, bicubic upsampling loses 7.2 ± 1.1 points against HR;
DSR recovers 3.0 ± 1.3 of them; ..."). Differences are in percentage points; the standard error of a
difference is that of two independent accuracies, sqrt(se1² + se2²), and a difference under
:data:`MEASURABLE_SE` standard errors is called "no measurable difference".

Provenance: run id, dataset and its content hash, model versions and the resolved config (folded
away as YAML). Each comes from :class:`Provenance` (given by the runner, or a ``provenance`` block in
metrics.json); a field that is absent is left out, never shown as "None".
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

MEASURABLE_SE = 2.0  # |difference| under this many standard errors: "no measurable difference"
NO_DIFFERENCE = "no measurable difference"
#: headline rows, in the order they read: (setting key in metrics.json, what the row is called)
ROWS = (("hr", "HR"), ("bicubic", "bicubic"), ("dsr", "DSR"), ("dsr_finetuned", "DSR + fine-tune"),
        ("bicubic_finetuned", "bicubic + fine-tune (control)"))
#: model roles of :attr:`Provenance.models`, and the info keys (``write_report``'s ``info``) they fall back to
MODEL_ROLES = {"recognizer": "model", "finetuned": "finetuned", "finetuned_bicubic": "finetuned_bicubic",
               "dsr": None}
ROLE_NAMES = {"recognizer": "recognizer", "finetuned": "recognizer fine-tuned on DSR outputs",
              "finetuned_bicubic": "recognizer fine-tuned on bicubic faces (control)"}


@dataclass(frozen=True)
class Estimate:
    """An accuracy (a fraction) or a difference of two, with its standard error."""

    value: float
    se: float

    def minus(self, other: Estimate) -> Estimate:
        """The difference of two independent estimates: SE sqrt(se1² + se2²)."""
        return Estimate(self.value - other.value, math.hypot(self.se, other.se))

    @property
    def measurable(self) -> bool:
        return self.value != 0 and abs(self.value) >= MEASURABLE_SE * self.se


def points(x: float, se: float) -> str:
    """Percentage points to one decimal (two when the SE would round to 0.0)."""
    digits = 1 if round(100 * se, 1) > 0 or se == 0 else 2
    return f"{100 * x:.{digits}f}"


def signed_points(d: Estimate) -> str:
    """``+3.0 ± 1.3`` (percentage points), with "(no measurable difference)" when it is not."""
    sign = "+" if d.value >= 0 else "−"
    text = f"{sign}{points(abs(d.value), d.se)} ± {points(d.se, d.se)}"
    return text if d.measurable else f"{text} ({NO_DIFFERENCE})"


def _change(d: Estimate, up: str, down: str, tail: str = "") -> str:
    """``up``/``down`` (by the sign of ``d``), its size ± SE in points, ``tail``, and the verdict when
    unmeasurable."""
    text = f"{up if d.value >= 0 else down} {points(abs(d.value), d.se)} ± {points(d.se, d.se)}{tail}"
    return text if d.measurable else f"{text} ({NO_DIFFERENCE})"


def accuracies(per_size: Mapping[str, Any]) -> dict[str, Estimate]:
    """Setting -> verification accuracy ± SE, for the settings of one VLR size."""
    return {kind: Estimate(b["verification"]["accuracy"], b["verification"]["accuracy_se"])
            for kind, b in per_size.items()}


def sentence(size: str, acc: Mapping[str, Estimate]) -> str:
    """What happened at one VLR size, in words; "" without both the HR and bicubic settings."""
    hr, bic, dsr = acc.get("hr"), acc.get("bicubic"), acc.get("dsr")
    dsr_ft, bic_ft = acc.get("dsr_finetuned"), acc.get("bicubic_finetuned")
    if hr is None or bic is None:
        return ""
    loss = hr.minus(bic)
    clauses = [f"At {size}, bicubic upsampling {_change(loss, 'loses', 'gains', ' points against HR')}"]
    if dsr is not None:
        d = dsr.minus(bic)
        if loss.value > 0:
            clauses.append(f"DSR {_change(d, 'recovers', 'loses a further', ' of them' if d.value >= 0 else '')}")
        else:
            clauses.append(f"DSR {_change(d, 'adds', 'loses')}")
    if dsr is not None and dsr_ft is not None:
        clauses.append(f"fine-tuning on DSR outputs {_change(dsr_ft.minus(dsr), 'adds', 'costs')}")
    text = "; ".join(clauses) + "."
    if bic_ft is not None:
        control = f"The same fine-tune on bicubic faces (the control) {_change(bic_ft.minus(bic), 'adds', 'costs')}"
        if dsr_ft is not None:
            control += (f", so what DSR adds beyond the extra training (DSR + fine-tune − control) is "
                        f"{signed_points(dsr_ft.minus(bic_ft))}")
        text += f" {control}."
    return text


@dataclass
class Provenance:
    """Where a report's figures came from. Every field is optional; empty ones are left out of the page."""

    run_id: str = ""  # the run (the ``run_id`` label of its metrics)
    dataset: str = ""  # the dataset URI (or image folder) evaluated on
    dataset_hash: str = ""  # the dataset manifest's ``content_hash``
    config: Mapping[str, Any] | str | None = None  # the resolved run config: a mapping or its YAML text
    models: Mapping[str, Any] = field(default_factory=dict)  # role (:data:`MODEL_ROLES`) -> a name, or
    #   {"name": ..., "version": ...}; "dsr" maps each VLR size to its DSR model

    @classmethod
    def gather(cls, given: Provenance | Mapping[str, Any] | None, metrics: Mapping[str, Any],
               info: Mapping[str, Any]) -> Provenance:
        """``given`` over metrics.json's ``provenance`` block (``content_hash`` read as ``dataset_hash``),
        with the dataset and model names of ``info`` where neither says."""
        merged: dict[str, Any] = {}
        for source in (metrics.get("provenance"), given):
            if isinstance(source, Provenance):
                source = {f.name: getattr(source, f.name) for f in fields(source)}
            for key, value in (source or {}).items():
                key = "dataset_hash" if key == "content_hash" else key
                if value not in (None, "", {}, []):
                    merged[key] = value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(f"unknown provenance field(s) {unknown}; known: {sorted(known)}")
        merged.setdefault("dataset", info.get("data") or "")
        fallback = {role: info.get(key) for role, key in MODEL_ROLES.items() if key and info.get(key)}
        merged["models"] = {**fallback, **merged.get("models", {})}
        return cls(**merged)

    def model(self, role: str, size: str | None = None) -> str:
        """The model serving ``role`` (the DSR model of ``size``), as "name (version)"; "" when unknown."""
        ref = self.models.get(role)
        if role == "dsr":
            ref = ref.get(size) if isinstance(ref, Mapping) else None
        if isinstance(ref, Mapping):
            name, version = ref.get("name") or ref.get("uri") or "", ref.get("version")
            return f"{name} (version {version})" if version not in (None, "") else str(name)
        return "" if ref is None else str(ref)


def served(prov: Provenance, size: str, kind: str) -> str:
    """What turns a setting's faces into embeddings, e.g. "DSR dsr14.onnx (version 3) → recognizer r50.pt"."""
    recognizer = {"dsr_finetuned": "finetuned", "bicubic_finetuned": "finetuned_bicubic"}.get(kind, "recognizer")
    steps = []
    if kind.startswith("dsr") and prov.model("dsr", size):
        steps.append(f"DSR {prov.model('dsr', size)}")
    if prov.model(recognizer):
        steps.append(f"recognizer {prov.model(recognizer)}")
    return " → ".join(steps)


def headline_table(size: str, per_size: Mapping[str, Any], prov: Provenance) -> str:
    acc = accuracies(per_size)
    bic = acc.get("bicubic")
    head = ("<tr><th>setting</th><th>accuracy ± SE (%)</th><th>vs bicubic (points)</th>"
            "<th>served by</th></tr>")
    body = []
    for kind, name in ROWS:
        if kind not in acc:
            continue
        a = acc[kind]
        diff = "reference" if kind == "bicubic" else signed_points(a.minus(bic)) if bic else ""
        cells = [name, f"{points(a.value, a.se)} ± {points(a.se, a.se)}", diff, served(prov, size, kind)]
        body.append(f"<tr data-setting='{kind}'>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return (f"<table class='headline' id='headline-{html.escape(size)}'><caption>VLR {html.escape(size)}</caption>"
            f"{head}{''.join(body)}</table>")


def headline(metrics: Mapping[str, Any], prov: Provenance) -> str:
    """The summary section: a sentence and a table per VLR size (the HR accuracy alone without VLR)."""
    vlr = metrics.get("vlr") or {}
    parts = ["<section id='headline'><h2>Summary</h2>"]
    if not vlr:
        v = metrics["verification"]
        hr = Estimate(v["accuracy"], v["accuracy_se"])
        by = f" (recognizer {prov.model('recognizer')})" if prov.model("recognizer") else ""
        parts.append(f"<p>HR verification accuracy{html.escape(by)}: {points(hr.value, hr.se)} ± "
                     f"{points(hr.se, hr.se)} %.</p>")
    for size, per_size in vlr.items():
        text = sentence(size, accuracies(per_size))
        if text:
            parts.append(f"<p class='headline-sentence'>{html.escape(text)}</p>")
    parts += [headline_table(size, per_size, prov) for size, per_size in vlr.items()]
    if vlr:
        parts.append(f"<p class='note'>Points are percentage points of verification accuracy; ± is one standard "
                     f"error, that of a difference is sqrt(se1² + se2²) (the two accuracies taken as independent); "
                     f"a difference under {MEASURABLE_SE:g} standard errors is reported as "
                     f"{NO_DIFFERENCE}.</p>")
    parts.append("</section>")
    return "".join(parts)


def _yaml(config: Mapping[str, Any] | str) -> str:
    if isinstance(config, str):
        return config
    import yaml

    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)


def _shown(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def _rows(pairs: list[tuple[str, Any]]) -> str:
    """Table rows of the pairs whose value says something (no None, "" or empty list)."""
    return "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_shown(v))}</td></tr>"
                   for k, v in pairs if v not in (None, "", [], (), {}))


def provenance_section(prov: Provenance, info: Mapping[str, Any]) -> str:
    """Run id, dataset and hash, model versions, the evaluation's own facts (``info``, empty ones left
    out) and the config folded away as YAML."""
    rows = [("run id", prov.run_id), ("dataset", prov.dataset), ("dataset content hash", prov.dataset_hash)]
    for role in MODEL_ROLES:
        ref = prov.models.get(role)
        if role == "dsr" and isinstance(ref, Mapping):
            rows += [(f"DSR {size}", prov.model("dsr", size)) for size in ref]
        elif role != "dsr":
            rows.append((ROLE_NAMES[role], prov.model(role)))
    shown = {"data", *(k for k in MODEL_ROLES.values() if k)}  # already above, from provenance or info
    if isinstance(prov.models.get("dsr"), Mapping):
        shown.add("dsr")
    rows += [(k, v) for k, v in info.items() if k not in shown]
    parts = ["<section id='provenance'><h2>Provenance</h2>", f"<table>{_rows(rows)}</table>"]
    if prov.config:
        parts.append(f"<details><summary>config (YAML)</summary><pre>{html.escape(_yaml(prov.config))}</pre>"
                     "</details>")
    parts.append("</section>")
    return "".join(parts)
