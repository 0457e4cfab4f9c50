"""The predict gallery: a self-contained page, opened in headless Chromium; filtering and sorting work."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pandas as pd
import pytest
from deploy_util import calibrated_run, synth_file

from waferlab.cli import main
from waferlab.deploy.gallery import GallerySelection

CHROMIUM = os.environ.get("WAFERLAB_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("gallery")
    run = calibrated_run(tmp, n_cal=45)
    data = synth_file(tmp / "fab.npz", 40, seed=7)
    rc = main(["predict", str(run), "--data", str(data), "--out", str(tmp / "p.csv"), "--gallery",
               str(tmp / "g.html"), "--no-progress"])
    assert rc == 0
    return {"html": tmp / "g.html", "csv": tmp / "p.csv"}


def test_gallery_is_self_contained(gallery: dict[str, Path]) -> None:
    html = gallery["html"].read_text()
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", html)  # nothing fetched from a network
    assert html.count("data:image/png;base64,") >= 40 and "data:image/jpeg;base64," in html  # maps + CAMs
    assert "Showing all 40 maps" in html


def test_selection_is_bounded_and_keeps_every_flagged_map_up_to_the_cap() -> None:
    import numpy as np

    from waferlab.deploy.predict import Chunk

    sel = GallerySelection(cap=5, per_class=3)
    n = 200
    frame = pd.DataFrame({"row": range(n), "lot": "", "wafer": 0, "pred_class": ["A", "B"] * (n // 2),
                          "prob": np.linspace(0.3, 1, n), "top2_class": "B", "top2_prob": 0.1,
                          "top3_class": "C", "top3_prob": 0.0, "p_none": 0.1, "defect": True,
                          "unknown_score": np.arange(n, dtype=float), "unknown": np.arange(n) >= n - 3,
                          "true_label": ""})
    chunk = Chunk(np.arange(n), np.zeros((n, 4, 4), np.uint8), np.full(n, ""), np.zeros(n), np.full(n, ""))
    sel.offer(chunk, frame)
    items = sel.items()
    flagged = int(((frame["prob"] < 0.5) | frame["unknown"]).sum())
    assert sel.n == n and sel.n_flagged == flagged and sel.counts == {"A": 100, "B": 100}
    assert len(items) == 5 + 2 * 3
    assert [it["row"] for it in items[:3]] == [199, 198, 197]  # the unknowns come first, strangest first


@pytest.mark.skipif(not (Path(CHROMIUM).exists() and importlib.util.find_spec("playwright")),
                    reason=f"no headless browser: needs {CHROMIUM} and the playwright package")
def test_gallery_filters_and_sorts_in_a_browser(gallery: dict[str, Path], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    rows = pd.read_csv(gallery["csv"])
    target = rows["pred_class"].value_counts().index[-1]  # the rarest predicted class
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto(gallery["html"].as_uri())
        assert page.locator(".card").count() == 40
        page.select_option("#filter", target)
        classes = page.locator(".card").evaluate_all("els => els.map(e => e.dataset.class)")
        assert classes == [target] * int((rows["pred_class"] == target).sum())
        page.select_option("#filter", "__all__")
        page.select_option("#sort", "conf-asc")
        shown = page.locator(".cls").all_inner_texts()
        probs = [float(t.rsplit(" ", 1)[1].rstrip("%")) for t in shown]
        assert probs == sorted(probs) and len(probs) == 40
        page.check("#cam")
        assert page.locator(".card img").first.get_attribute("src").startswith("data:image/jpeg")
        page.screenshot(path=str(tmp_path / "gallery.png"))
        browser.close()
    assert (tmp_path / "gallery.png").stat().st_size > 10_000
