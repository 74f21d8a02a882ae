"""The HTML report in a real browser: loads without console errors, every image decodes.

Uses Debian's Chromium through Playwright (no browser download). Skips, saying why,
where either is missing; `.ci/run` installs both.
"""

import re
import shutil

import numpy as np
import pytest

from ensemble_kernel.core._engine import _top_k_neighbors
from ensemble_kernel.report.build import build_report
from ensemble_kernel.report.grids import InputRenderer
from ensemble_kernel.core._sources import ArraySource

from conftest import make_ensemble

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _report(tmp_path, with_inputs=True, **options):
    ens = make_ensemble(n_models=8, n_train=150, n_test=50)
    rng = np.random.default_rng(0)
    images = (rng.random((150, 8, 8)), rng.random((50, 8, 8))) if with_inputs else (None, None)
    found = _top_k_neighbors(ens.test, ens.train, 20, memory_budget=1 << 26)
    out = tmp_path / "report.html"
    build_report(ArraySource(ens.train), ArraySource(ens.test), ens.labels_train,
                 ens.labels_test, found=found, out=out, source="<script>alert(1)</script>",
                 renderer=InputRenderer(*images),
                 class_names=["a<b", "c&d", "e", "f", "g"],
                 features_train=rng.random((150, 4)), features_test=rng.random((50, 4)),
                 ranks=slice(0, 12), **options)
    return out


def test_report_is_self_contained_and_escapes_data(tmp_path):
    out = _report(tmp_path)
    html = out.read_text()
    assert NO_INPUTS_NOTE not in html  # the note only where there are no inputs
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "a&lt;b" in html and "http://" not in html and "https://" not in html
    assert html.count("data:image/png;base64,") >= 5  # sweep, pairs, threshold, failures, compare
    files = out.with_name("report_files")
    for name in ("pairs.png", "pairs.csv", "duplicates.csv", "duplicates_threshold.png",
                 "failures.png", "compare.png", "sweep.png", "sweep.csv", "accuracy.csv"):
        assert (files / name).is_file(), name


def test_a_sampled_sweep_says_so_in_the_report_and_an_unsampled_one_does_not(tmp_path):
    sampled = _report(tmp_path / "a", test_examples=20).read_text()
    assert "computed on 20 of 50 test examples (spread evenly)" in sampled
    assert "a standard error of about\n4.9 points near 95%" in sampled  # sqrt(.95 .05 / 20)
    whole = _report(tmp_path / "b").read_text()  # 50 test examples: within the default 2,000
    assert "test examples (spread evenly)" not in whole and "--sweep-examples" not in whole


NO_INPUTS_NOTE = "This source has no inputs, so the views above are tables only"


def test_report_without_inputs_says_so(tmp_path):
    """Without inputs: the note, no image grid (embedded or as a file), but every table."""
    out = _report(tmp_path, with_inputs=False)
    html = out.read_text()
    assert NO_INPUTS_NOTE in html
    # Only the two figures that need no inputs: the sweep and the threshold histogram.
    alts = re.findall(r'<img src="data:image/png;base64,[^"]*" alt="([^"]*)"', html)
    assert sorted(alts) == ["accuracy against the number of runs",
                            "distribution of top-1 kernel values"]
    files = out.with_name("report_files")
    assert {p.name for p in files.glob("*.png")} == {"duplicates_threshold.png", "sweep.png"}
    # The views are still there as tables, one row per pair / failure / comparison.
    for name, rows in (("pairs", 12), ("failures", None), ("compare", 10)):
        lines = (files / f"{name}.csv").read_text().splitlines()
        assert len(lines) > 1 and (rows is None or len(lines) == rows + 1), name
    first_pair = (files / "pairs.csv").read_text().splitlines()[1].split(",")
    assert re.search(rf"<td[^>]*>{first_pair[1]}</td>\s*<td[^>]*>{first_pair[2]}</td>", html)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed "
                    "(apt-get install chromium; .ci/run does)")
def test_report_opens_in_headless_chromium(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    out = _report(tmp_path)
    errors = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(out.as_uri())
            page.wait_for_load_state("load")
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert len(widths) >= 5 and all(w > 0 for w in widths)
    assert (tmp_path / "report.png").stat().st_size > 10_000
