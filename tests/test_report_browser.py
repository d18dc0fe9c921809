"""report.html reads at a glance: the headline (sentence + table per VLR size), provenance with absent
fields left out, identity cosines under the SR samples, and, in a real headless Chromium, every image
loads and the headline tables are there. The page is written from a realistic metrics dict (both VLR
sizes, every setting) and small generated images, not by running a pipeline."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import skip_budget

from faceops.evaluate.identification import identification_metrics
from faceops.evaluate.report import Curve, grid_captions, sample_cosines, write_report
from faceops.evaluate.report_headline import Estimate, Provenance, headline, provenance_section, sentence
from faceops.evaluate.sr_metrics import identity_cosine
from faceops.evaluate.verification import verification_metrics

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=10000")
BROWSER_TIMEOUT_S = 120  # a shared 2-core machine: Chromium's cold start can take a while
SIZES = ("14x16", "32x32")
HR_SIDE = 32  # small generated faces: the report draws whatever size it is given
#: (accuracy, SE) per setting; the headline's figures below are worked out by hand from these
ACCURACY = {
    "14x16": {"hr": (0.952, 0.006), "bicubic": (0.880, 0.009), "bicubic_finetuned": (0.890, 0.009),
              "dsr": (0.910, 0.008), "dsr_finetuned": (0.921, 0.008)},
    "32x32": {"hr": (0.952, 0.006), "bicubic": (0.945, 0.007), "bicubic_finetuned": (0.946, 0.007),
              "dsr": (0.947, 0.007), "dsr_finetuned": (0.950, 0.007)},
}
PROVENANCE = {"run_id": "run-0042", "dataset_hash": "3f9a1c0de1b2", "config": {"evaluate": {"n_folds": 10}},
              "models": {"recognizer": {"name": "iresnet50", "version": "7"}, "finetuned": "iresnet50-dsr-ft:3",
                         "finetuned_bicubic": "iresnet50-bicubic-ft:3",
                         "dsr": {"14x16": {"name": "dsr-14x16", "version": "2"}, "32x32": "dsr-32x32:5"}}}


def _block(rng: np.random.Generator, accuracy: float, se: float, sr: bool) -> dict:
    """A metrics.json block from the real metric functions on synthetic scores, then the accuracy set."""
    genuine = np.arange(200) % 2 == 0
    scores = np.where(genuine, 0.6, 0.1) + rng.normal(0, 0.15, genuine.size)
    labels = np.repeat(np.arange(20), 3)
    block = {"verification": verification_metrics(scores, genuine, n_folds=10, seed=0),
             "identification": identification_metrics(rng.normal(size=(labels.size, 8)), labels)}
    block["verification"].update(accuracy=accuracy, accuracy_se=se)
    if sr:
        block["super_resolution"] = {"psnr": 24.1, "ssim": 0.71, "psnr_y": 25.3, "ssim_y": 0.74,
                                     "identity_cosine": 0.62}
    return block


def realistic_metrics() -> tuple[dict, list[Curve]]:
    rng = np.random.default_rng(0)
    hr = _block(rng, *ACCURACY["14x16"]["hr"], sr=False)
    metrics = {"verification": hr["verification"], "identification": hr["identification"], "vlr": {}}
    curves = [Curve("hr", rng.random(100), np.arange(100) % 2 == 0)]
    for size in SIZES:
        metrics["vlr"][size] = {"hr": hr}
        for kind, (acc, se) in ACCURACY[size].items():
            if kind != "hr":
                metrics["vlr"][size][kind] = _block(rng, acc, se, sr=True)
                curves.append(Curve(f"{size} {kind}", rng.random(100), np.arange(100) % 2 == 0))
    return metrics, curves


def small_grids(n: int = 3) -> tuple[dict, dict]:
    rng = np.random.default_rng(1)
    grids, cosines = {}, {}
    for size in SIZES:
        w, h = (int(x) for x in size.split("x"))
        faces = {name: rng.integers(0, 256, (n, side_h, side_w, 3), dtype=np.uint8)
                 for name, (side_h, side_w) in (("VLR", (h, w)), ("bicubic", (HR_SIDE, HR_SIDE)),
                                                ("DSR", (HR_SIDE, HR_SIDE)), ("HR", (HR_SIDE, HR_SIDE)))}
        grids[size] = faces
        cosines[size] = {"bicubic": rng.uniform(0.3, 0.7, n), "DSR": rng.uniform(0.5, 0.9, n)}
    return grids, cosines


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    metrics, curves = realistic_metrics()
    grids, cosines = small_grids()
    info = {"model": "s3://models/iresnet50/last.pt", "data": "s3://data/faces", "faces": 60, "pairs": 200,
            "flip": False, "dsr": ["dsr14.onnx", "dsr32.onnx"], "finetuned": None, "finetuned_bicubic": None,
            "threshold protocol": "10-fold (seeded, balanced) on 200 pairs"}
    return write_report(out, metrics, curves, grids, info, hist_bins=10, provenance=PROVENANCE,
                        grid_cosines=cosines)


# -- the headline's words and figures -------------------------------------------------------------
def _acc(size: str) -> dict[str, Estimate]:
    return {kind: Estimate(*v) for kind, v in ACCURACY[size].items()}


def test_difference_se_is_that_of_two_independent_accuracies() -> None:
    d = Estimate(0.91, 0.008).minus(Estimate(0.88, 0.009))
    assert d.value == pytest.approx(0.03) and d.se == pytest.approx(math.sqrt(0.008**2 + 0.009**2))
    assert d.measurable  # 3.0 points >= 2 x 1.2
    assert not Estimate(0.011, 0.0113).measurable and not Estimate(0.0, 0.0).measurable


def test_sentence_says_what_happened_in_points() -> None:
    # loss 95.2 - 88.0 = 7.2 ± sqrt(0.6² + 0.9²) = 1.08; DSR 91.0 - 88.0 = 3.0 ± 1.20; fine-tune 92.1 - 91.0
    # = 1.1 ± 1.13 (< 2 SE); control 89.0 - 88.0 = 1.0 ± 1.27 (< 2 SE); DSR beyond it 92.1 - 89.0 = 3.1 ± 1.20
    assert sentence("14x16", _acc("14x16")) == (
        "At 14x16, bicubic upsampling loses 7.2 ± 1.1 points against HR; DSR recovers 3.0 ± 1.2 of them; "
        "fine-tuning on DSR outputs adds 1.1 ± 1.1 (no measurable difference). The same fine-tune on bicubic "
        "faces (the control) adds 1.0 ± 1.3 (no measurable difference), so what DSR adds beyond the extra "
        "training (DSR + fine-tune − control) is +3.1 ± 1.2.")
    assert sentence("32x32", _acc("32x32")).startswith(
        "At 32x32, bicubic upsampling loses 0.7 ± 0.9 points against HR (no measurable difference); DSR recovers "
        "0.2 ± 1.0 of them (no measurable difference);")


def test_sentence_words_losses_and_missing_settings() -> None:
    acc = {"hr": Estimate(0.95, 0.005), "bicubic": Estimate(0.90, 0.005), "dsr": Estimate(0.86, 0.005)}
    assert sentence("16x16", acc) == ("At 16x16, bicubic upsampling loses 5.0 ± 0.7 points against HR; "
                                      "DSR loses a further 4.0 ± 0.7.")
    assert sentence("16x16", {"hr": acc["hr"], "bicubic": acc["bicubic"]}) == \
        "At 16x16, bicubic upsampling loses 5.0 ± 0.7 points against HR."
    assert sentence("16x16", {"hr": acc["hr"]}) == ""


def test_headline_table_rows_differences_and_what_serves_them() -> None:
    metrics, _ = realistic_metrics()
    page = headline(metrics, Provenance.gather(PROVENANCE, metrics, {}))
    table = page[page.index("<table class='headline' id='headline-14x16'>"):]
    table = table[: table.index("</table>")]
    rows = re.findall(r"<tr data-setting='(\w+)'>(.*?)</tr>", table)
    assert [kind for kind, _ in rows] == ["hr", "bicubic", "dsr", "dsr_finetuned", "bicubic_finetuned"]
    cells = {kind: re.findall(r"<td>(.*?)</td>", row) for kind, row in rows}
    assert cells["hr"] == ["HR", "95.2 ± 0.6", "+7.2 ± 1.1", "recognizer iresnet50 (version 7)"]
    assert cells["bicubic"][2] == "reference"
    assert cells["dsr"][1:] == ["91.0 ± 0.8", "+3.0 ± 1.2",
                                "DSR dsr-14x16 (version 2) → recognizer iresnet50 (version 7)"]
    assert cells["dsr_finetuned"][2:] == ["+4.1 ± 1.2", "DSR dsr-14x16 (version 2) → recognizer iresnet50-dsr-ft:3"]
    assert cells["bicubic_finetuned"][2:] == ["+1.0 ± 1.3 (no measurable difference)",
                                              "recognizer iresnet50-bicubic-ft:3"]
    assert "id='headline-32x32'" in page and page.count("class='headline-sentence'") == 2


def test_headline_without_vlr_gives_the_hr_accuracy() -> None:
    v = {"accuracy": 0.9931, "accuracy_se": 0.0012}
    page = headline({"verification": v}, Provenance.gather(None, {}, {"model": "r50.pt"}))
    assert "HR verification accuracy (recognizer r50.pt): 99.3 ± 0.1 %." in page
    assert "<table" not in page


# -- provenance -------------------------------------------------------------------------------------
def test_provenance_leaves_absent_fields_out() -> None:
    info = {"model": "rec.pt", "data": "file:///faces", "dsr": [], "finetuned": None, "flip": False}
    prov = Provenance.gather(None, {}, info)
    section = provenance_section(prov, info)
    assert "None" not in section and "run id" not in section and "content hash" not in section
    assert "<details>" not in section  # no config given
    assert "<td>recognizer</td><td>rec.pt</td>" in section and "<td>dataset</td><td>file:///faces</td>" in section
    assert "<td>flip</td><td>False</td>" in section and "<td>dsr</td>" not in section


def test_provenance_from_metrics_json_and_the_runner() -> None:
    metrics = {"provenance": {"run_id": "from-metrics", "content_hash": "abc123", "config": "evaluate: {}\n"}}
    prov = Provenance.gather({"run_id": "from-runner"}, metrics, {})
    assert (prov.run_id, prov.dataset_hash) == ("from-runner", "abc123")
    section = provenance_section(prov, {})
    assert "<details><summary>config (YAML)</summary><pre>evaluate: {}\n</pre></details>" in section
    with pytest.raises(ValueError, match="unknown provenance field.*'hash'"):
        Provenance.gather({"hash": "x"}, {}, {})


# -- per-sample identity cosines -------------------------------------------------------------------
def test_sample_cosines_are_the_terms_of_the_mean_identity_cosine() -> None:
    rng = np.random.default_rng(2)
    sr, hr = rng.normal(size=(5, 16)), rng.normal(size=(5, 16))
    per_sample = sample_cosines(sr, hr)
    assert per_sample.shape == (5,) and per_sample.mean() == pytest.approx(identity_cosine(sr, hr))
    assert per_sample[0] == pytest.approx(sr[0] @ hr[0] / np.linalg.norm(sr[0]) / np.linalg.norm(hr[0]))


def test_grid_captions_go_under_the_super_resolved_faces() -> None:
    grids, cosines = small_grids(n=2)
    captions = grid_captions(grids["14x16"], {"DSR": [0.81234, 0.5]})
    assert captions == {"VLR": ["", ""], "bicubic": ["", ""], "DSR": ["cos 0.812", "cos 0.500"], "HR": ["", ""]}
    with pytest.raises(ValueError, match="'DSR' has 2 faces but 1 cosines"):
        grid_captions(grids["14x16"], {"DSR": [0.8]})
    with pytest.raises(ValueError, match=r"column\(s\) \['dsr'\]"):
        grid_captions(grids["14x16"], {"dsr": [0.8, 0.7]})


def test_written_page_reads_top_down(report: Path) -> None:
    page = report.read_text()
    order = [page.index(s) for s in ("id='headline'", "id='provenance'", "<h2>Settings</h2>",
                                     "Super-resolution samples")]
    assert order == sorted(order)
    assert "<td>run id</td><td>run-0042</td>" in page and "<td>dataset content hash</td><td>3f9a1c0de1b2</td>" in page
    assert "n_folds: 10" in page and "None" not in page
    assert "identity cosine, cos(recognizer(SR), recognizer(HR))" in page


# -- a real browser ---------------------------------------------------------------------------------
def test_chromium_skip_is_allowed_only_when_not_root(monkeypatch) -> None:
    monkeypatch.setattr(skip_budget, "is_root", lambda: False)
    assert skip_budget.allowed("Skipped: needs chromium (/usr/bin/chromium)")
    monkeypatch.setattr(skip_budget, "is_root", lambda: True)
    assert not skip_budget.allowed("Skipped: needs chromium (/usr/bin/chromium)")


CHECK_SCRIPT = """<img id='probe-missing' src='missing-on-purpose.png' alt=''>
<script>
window.addEventListener("load", () => {
  for (const img of document.images) img.dataset.naturalWidth = String(img.naturalWidth);
  document.body.dataset.checked = "1";
});
</script>
"""


class _Dom(HTMLParser):
    """The images (their attributes), the headline tables' settings and the body's attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict] = []
        self.tables: dict[str, list[str]] = {}
        self.body: dict = {}
        self._table: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        elif tag == "body":
            self.body = a
        elif tag == "table" and "headline" in (a.get("class") or "").split():
            self._table = a["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table and "data-setting" in a:
            self.tables[self._table].append(a["data-setting"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None


def render(page: Path, profile: Path) -> str:
    """Chromium's DOM of ``page`` after its load event (``--dump-dom``), with a fresh profile."""
    r = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                       capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_every_image_loads_in_chromium_and_the_headline_is_there(report: Path, tmp_path: Path) -> None:
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"needs chromium ({CHROMIUM}; as root, bash scripts/test.sh installs it: apt-get install "
                    "chromium)")
    check = report.with_name("check.html")  # beside the report, so its images resolve the same way
    check.write_text(report.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    dom = _Dom()
    dom.feed(render(check, tmp_path / "profile"))
    assert dom.body.get("data-checked") == "1", "the load handler never ran"
    probe = [img for img in dom.images if img.get("id") == "probe-missing"]
    assert probe and probe[0]["data-natural-width"] == "0"  # the check does see a broken image
    shown = [img for img in dom.images if img.get("id") != "probe-missing"]
    srcs = {img["src"] for img in shown}
    assert {"roc.png", "det.png", "samples_14x16.png", "samples_32x32.png"} <= srcs and len(shown) == 2 + 9 + 2
    broken = [img["src"] for img in shown if int(img.get("data-natural-width", "0")) <= 0]
    assert not broken, f"images that did not load: {broken}"
    expected = ["hr", "bicubic", "dsr", "dsr_finetuned", "bicubic_finetuned"]
    assert dom.tables == {f"headline-{size}": expected for size in SIZES}
