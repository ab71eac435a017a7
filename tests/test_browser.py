"""The map viewer and the demo report in a real browser: headless Chromium driven by Playwright.

The pages are what users open first, and their script (pan, zoom, the value under the pointer) only runs in a
browser. Skips cleanly without Playwright or a Chromium binary (`make test` installs Debian's chromium where
it can; PSM_CHROMIUM names another binary).
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager

import numpy as np
import pytest

from psm.maps.render import render_map, write_html, write_report
from test_map_render import GRIDS, legend

# Flags for a closed network: no background connections, no first-run or component update.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_binary() -> str | None:
    """PSM_CHROMIUM, else the first Chromium on PATH."""
    if os.environ.get("PSM_CHROMIUM"):
        return os.environ["PSM_CHROMIUM"]
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@contextmanager
def browser_page():
    """A fresh page in headless Chromium that records script errors and every URL it requests."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no Chromium binary (install Debian's chromium, or set PSM_CHROMIUM)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=binary, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.errors, page.requests = [], []
            page.on("pageerror", lambda e: page.errors.append(str(e)))
            page.on("console", lambda m: m.type == "error" and page.errors.append(m.text))
            page.on("request", lambda r: page.requests.append(r.url))
            yield page
        finally:
            browser.close()


def pointer_readout(page, fx: float, fy: float) -> str:
    """Move the pointer to the fraction (fx, fy) of the map's bounds (from the west/north edge); the readout."""
    sx, sy = page.evaluate(
        "([fx, fy]) => { const b = D.bounds; return toScreen(b[0] + fx * (b[2] - b[0]), b[3] - fy * (b[3] - b[1])); }",
        [fx, fy],
    )
    box = page.locator("#map").bounding_box()
    page.mouse.move(box["x"] + sx, box["y"] + sy)
    return page.text_content("#readout")


def test_map_page_draws_reads_values_and_zooms_offline(tmp_path):
    grid = GRIDS["EPSG:32633"]  # 60 × 40 pixels
    raster = np.full((grid.height, grid.width), 0.25, np.float32)
    raster[:, :30] = 0.75  # the west half
    raster[:8] = np.nan  # the northern fifth has no imagery
    path = write_html(raster, tmp_path / "m.html", grid=grid, legend=legend(), vmin=0.0, vmax=1.0)
    with browser_page() as page:
        page.goto(path.as_uri())
        page.wait_for_function("img.complete && img.naturalWidth > 0")
        assert page.title() == legend().title
        assert 'text: "birds chirping"' in page.text_content("#side")
        west, east = pointer_readout(page, 0.25, 0.6), pointer_readout(page, 0.75, 0.6)
        assert west.endswith("value 0.75000") and east.endswith("value 0.25000")
        assert pointer_readout(page, 0.5, 0.05).endswith("value no data")
        assert pointer_readout(page, 1.02, 0.5).endswith("outside the map")  # in the margin of the fitted view
        # The overlay is on the canvas: the two halves differ in colour where the pointer read them.
        shot = page.locator("#map").screenshot()
        from io import BytesIO

        from PIL import Image

        image = np.asarray(Image.open(BytesIO(shot)).convert("RGB")).astype(int)
        box = page.locator("#map").bounding_box()
        dpr = image.shape[1] / box["width"]
        (wx, wy), (ex, ey) = (
            page.evaluate(
                "([fx, fy]) => { const b = D.bounds; "
                "return toScreen(b[0] + fx * (b[2] - b[0]), b[3] - fy * (b[3] - b[1])); }",
                [fx, 0.6],
            )
            for fx in (0.25, 0.75)
        )
        colour = lambda x, y: image[int(y * dpr), int(x * dpr)]  # noqa: E731
        assert np.abs(colour(wx, wy) - colour(ex, ey)).sum() > 60
        res = page.evaluate("view.res")
        page.click("#zin")
        assert page.evaluate("view.res") == pytest.approx(res / 2)
        page.click("#zfit")
        assert page.evaluate("view.res") == pytest.approx(res)
        # Dragging pans by the distance moved: 100 px east moves the view's centre 100 px of ground west.
        cx, cy = page.evaluate("[view.cx, view.cy]")
        page.mouse.move(box["x"] + 200, box["y"] + 300)
        page.mouse.down()
        page.mouse.move(box["x"] + 300, box["y"] + 340, steps=5)
        page.mouse.up()
        assert page.evaluate("[view.cx, view.cy]") == pytest.approx([cx - 100 * res, cy + 40 * res])
        # The wheel zooms about the pointer; the opacity slider reaches the drawing; the canvas follows the window.
        page.mouse.move(box["x"] + 300, box["y"] + 300)
        page.mouse.wheel(0, -400)
        page.wait_for_function(f"view.res < {res * 0.9}")
        page.eval_on_selector("#opacity", "e => { e.value = 20; e.dispatchEvent(new Event('input')); }")
        assert page.evaluate("opacity") == pytest.approx(0.2)
        page.set_viewport_size({"width": 900, "height": 600})
        page.wait_for_function("cv.width === Math.round(box.clientWidth * (window.devicePixelRatio || 1))")
        assert page.evaluate("W") == page.evaluate("box.clientWidth") < box["width"]
        assert page.errors == []
        assert all(url.startswith(("file:", "data:")) for url in page.requests), page.requests  # offline


def test_report_page_shows_every_map_and_links_to_its_viewer(tmp_path):
    grid = GRIDS["EPSG:32633"]
    rng = np.random.default_rng(0)
    maps = [
        render_map(
            rng.normal(-3.0, 0.2, (grid.height, grid.width)).astype(np.float32),
            grid,
            tmp_path / "maps" / f"m{i}",
            legend=legend(),
            vmin=-3.4,
            vmax=-2.6,
        )
        for i in range(2)
    ]
    table = "| model | R@10% |\n|---|---:|\n| psm-tiny | 0.248 |"
    report = write_report(maps, table, tmp_path / "report.html")
    with browser_page() as page:
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        widths = page.eval_on_selector_all("img", "els => els.map(e => e.complete ? e.naturalWidth : 0)")
        assert len(widths) == 2 and min(widths) > 0  # every thumbnail decoded
        assert page.inner_text("table").split() == ["model", "R@10%", "psm-tiny", "0.248"]
        page.click("a[href='maps/m1.html']")
        page.wait_for_function("typeof img !== 'undefined' && img.complete && img.naturalWidth > 0")
        assert page.url.endswith("maps/m1.html")
        assert page.errors == []


def test_map_page_draws_basemap_tiles_from_a_tile_server(tmp_path):
    """With --basemap, the viewer fetches XYZ tiles from the server and draws them under the map (a local
    tile server without CORS headers, as many are)."""
    from tile_server import TileServer

    grid = GRIDS["EPSG:32633"]
    raster = np.full((grid.height, grid.width), 0.5, np.float32)
    with TileServer() as server:
        path = write_html(
            raster, tmp_path / "m.html", grid=grid, legend=legend(), vmin=0, vmax=1, basemap=server.url_template
        )
        with browser_page() as page:
            page.goto(path.as_uri())
            page.wait_for_function("[...tiles.values()].some(t => t.complete && t.naturalWidth > 0)", timeout=10_000)
            loaded = page.evaluate("[...tiles.values()].filter(t => t.complete && t.naturalWidth > 0).length")
            assert loaded == page.evaluate("tiles.size") > 0 and server.total_requests >= loaded
            assert page.errors == []
