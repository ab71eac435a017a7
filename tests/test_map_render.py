"""Map writers: COG validity and georeferencing, PNG size, offline HTML viewer, GIF, report page."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from psm.maps.query import GridSpec
from psm.maps.render import (
    MapLegend,
    MapOutputs,
    _markdown_to_html,
    _mercator_overlay,
    points_to_raster,
    render_map,
    validate_cog,
    write_cog,
    write_gif,
    write_html,
    write_png,
    write_report,
)

URL = re.compile(r"https?://", re.IGNORECASE)

GRIDS = {
    "EPSG:32633": GridSpec("EPSG:32633", (100.0, 0.0, 330_000.0, 0.0, -100.0, 5_830_000.0), 60, 40),
    "EPSG:6933": GridSpec("EPSG:6933", (1000.0, 0.0, 1_250_000.0, 0.0, -1000.0, 5_950_000.0), 60, 40),
}


def legend() -> MapLegend:
    return MapLegend(
        title="Where would I hear this?",
        query='text: "birds chirping"',
        metadata={"month": "5", "hour": "6", "location": "on", "zoom": "1"},
        value_label="−CSD",
        notes=["2,000 of 2,400 points have imagery"],
    )


def sample_raster(grid: GridSpec, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r = rng.normal(-3.0, 0.2, (grid.height, grid.width)).astype(np.float32)
    r[:5] = np.nan  # a band of nodata
    r[10, 10] = np.nan
    return r


@pytest.mark.parametrize("crs", sorted(GRIDS))
def test_cog_georeferenced_with_nodata(tmp_path, crs):
    import rasterio
    from rasterio.crs import CRS

    grid = GRIDS[crs]
    r = sample_raster(grid)
    path = write_cog(r, grid, tmp_path / "m.tif", tags={"PSM_QUERY": "q", "PSM_SCALE": {"vmin": 0}})
    assert validate_cog(path) == []
    with rasterio.open(path) as ds:
        assert ds.crs == CRS.from_user_input(crs)
        assert tuple(ds.transform)[:6] == grid.transform
        assert (ds.width, ds.height, ds.count, ds.dtypes[0]) == (60, 40, 1, "float32")
        assert np.isnan(ds.nodata)
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert ds.tags()["PSM_QUERY"] == "q" and json.loads(ds.tags()["PSM_SCALE"]) == {"vmin": 0}
        band = ds.read(1)
        masked = ds.read(1, masked=True)
    assert np.isnan(band[:5]).all() and np.isnan(band[10, 10])  # nodata, never 0
    assert not (band == 0).any()
    assert masked.mask[:5].all() and not masked.mask[20:].any()
    np.testing.assert_array_equal(band[20:], r[20:])
    assert [p.name for p in tmp_path.iterdir()] == ["m.tif"]  # no temporary file left


def test_cog_large_raster_is_tiled_with_overviews(tmp_path):
    import rasterio

    grid = GridSpec("EPSG:32633", (10.0, 0.0, 330_000.0, 0.0, -10.0, 5_830_000.0), 1200, 700)
    path = write_cog(sample_raster(grid), grid, tmp_path / "big.tif")
    with rasterio.open(path) as ds:
        assert ds.profile["tiled"] and ds.block_shapes[0] == (256, 256)
        assert ds.overviews(1)  # internal overviews
        ov = ds.read(1, out_shape=(ds.height // 4, ds.width // 4))
    assert np.isnan(ov[0]).all() and np.isfinite(ov[-1]).all()  # nodata stays nodata in overviews
    assert validate_cog(path) == []


def test_validate_cog_flags_a_striped_tiff(tmp_path):
    import rasterio

    grid = GridSpec("EPSG:32633", (10.0, 0.0, 330_000.0, 0.0, -10.0, 5_830_000.0), 1200, 700)
    path = tmp_path / "plain.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=1200,
        height=700,
        count=1,
        dtype="float32",
        crs=grid.crs,
        transform=grid.affine(),
    ) as ds:
        ds.write(np.zeros((700, 1200), np.float32), 1)
    problems = " ".join(validate_cog(path))
    assert "LAYOUT" in problems and "tiled" in problems and "overviews" in problems and "nodata" in problems


def test_cog_shape_mismatch_refused(tmp_path):
    with pytest.raises(ValueError, match="does not match the grid"):
        write_cog(np.zeros((3, 3), np.float32), GRIDS["EPSG:32633"], tmp_path / "x.tif")
    assert not list(tmp_path.iterdir())


def test_png_size_and_legend(tmp_path):
    from PIL import Image

    grid = GRIDS["EPSG:32633"]
    path = write_png(
        sample_raster(grid), tmp_path / "m.png", grid=grid, legend=legend(), vmin=-3.4, vmax=-2.6, width_px=800
    )
    with Image.open(path) as im:
        w, h = im.size
        px = np.asarray(im.convert("RGB"))
    assert w == 800 and 500 < h < 1000  # map (aspect 2:3) + title + colour bar + legend lines
    # The nodata band is drawn in the nodata grey, not in a colour of the scale.
    grey = np.all(px == (0xD9, 0xD9, 0xD9), axis=-1)
    assert grey.sum() > 1000


def test_png_shows_user_text_with_dollar_signs_as_typed(tmp_path):
    # Matplotlib would parse "$...$" as mathtext: a query such as "coins $x^$" made the whole PNG fail, and
    # "$5 and $10" lost its dollars. User text is drawn as typed.
    grid = GRIDS["EPSG:32633"]
    for i, q in enumerate(["price $\\frac$ tag", "a_b ^ $x^$", "cash register $5 and $10"]):
        lg = MapLegend(title=q, query=f'text: "{q}"', metadata={"note": q}, value_label=f"score of {q}")
        path = write_png(sample_raster(grid), tmp_path / f"m{i}.png", grid=grid, legend=lg, vmin=-3.4, vmax=-2.6)
        assert path.is_file()


def test_html_is_self_contained_with_legend(tmp_path):
    grid = GRIDS["EPSG:32633"]
    path = write_html(sample_raster(grid), tmp_path / "m.html", grid=grid, legend=legend(), vmin=-3.4, vmax=-2.6)
    page = path.read_text()
    assert not URL.search(page)  # nothing loaded from the network
    assert "<script src" not in page and "<link" not in page and "@import" not in page
    for text in ("Where would I hear this?", "birds chirping", "−CSD", "hour", "bounds (WGS84)", "no imagery"):
        assert text in page
    data = json.loads(re.search(r'id="psm-data">(.*?)</script>', page, re.S).group(1))
    assert (
        data["basemap"] is None
        and data["overlay"]
        and data["vw"] * data["vh"] * 2 == len(__import__("base64").b64decode(data["values"]))
    )
    _, south, east, _ = grid.bounds_wgs84()
    assert f"{south:.5f}" in page and f"{east:.5f}" in page


def _page_with_basemap(tmp_path, basemap: str) -> str:
    grid = GRIDS["EPSG:32633"]
    path = write_html(sample_raster(grid), tmp_path / "m.html", grid=grid, legend=legend(), vmin=-3.4, vmax=-2.6,
                      basemap=basemap)  # fmt: skip
    return path.read_text()


def test_html_basemap_is_the_only_url(tmp_path):
    grid = GRIDS["EPSG:32633"]
    tpl = "https://tiles.example.org/{z}/{x}/{y}.png"
    page = _page_with_basemap(tmp_path, tpl)
    assert {m.group(0) for m in re.finditer(r"https?://[^\s\"'<]+", page)} == {tpl}
    with pytest.raises(ValueError, match="XYZ URL template"):
        write_html(sample_raster(grid), tmp_path / "x.html", grid=grid, legend=legend(), vmin=0, vmax=1, basemap="x")


def test_mercator_overlay_matches_the_raster():
    from rasterio.transform import xy
    from rasterio.warp import transform as warp

    grid = GRIDS["EPSG:32633"]
    r = sample_raster(grid)
    merc, (x0, y0, x1, y1), (west, south, east, north) = _mercator_overlay(r, grid, 512)
    assert south < north and west < east and merc.dtype == np.float32
    # The overlay pixel under a point holds the raster value of the pixel containing that point.
    for row, col in ((30, 12), (20, 45), (39, 59)):
        x, y = xy(grid.affine(), row, col, offset="center")
        (mx,), (my,) = warp(grid.crs, "EPSG:3857", [x], [y])
        j = int((mx - x0) / (x1 - x0) * merc.shape[1])
        i = int((y1 - my) / (y1 - y0) * merc.shape[0])
        assert merc[i, j] == r[row, col]
    assert np.isnan(merc).any()


def test_html_viewer_script_runs(tmp_path):
    """Run the page's script under node with a stub DOM: it parses, fits the map and reads values out."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    grid = GRIDS["EPSG:32633"]
    r = np.full((grid.height, grid.width), 0.25, np.float32)
    r[:, :30] = 0.75
    page = write_html(r, tmp_path / "m.html", grid=grid, legend=legend(), vmin=0, vmax=1, basemap="x/{z}/{x}/{y}")
    harness = tmp_path / "h.js"
    harness.write_text(_NODE_HARNESS)
    res = subprocess.run([node, str(harness), str(page)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    w, s, e, n = grid.bounds_wgs84()
    assert s < out["lat"] < n and w < out["lon"] < e
    assert out["left"].endswith("0.75000") and out["right"].endswith("0.25000")
    assert out["outside"].endswith("outside the map")
    assert out["tiles"] > 0 and out["tile"].startswith("x/")
    assert out["lonLabels"] and all(lb.endswith("°") for lb in out["lonLabels"])


_NODE_HARNESS = r"""
const fs = require("fs");
const page = fs.readFileSync(process.argv[2], "utf8");
const data = page.match(/<script type="application\/json" id="psm-data">([\s\S]*?)<\/script>/)[1];
const code = page.match(/<script>([\s\S]*?)<\/script>/)[1];
const texts = [];
const ctx = new Proxy({}, {
  get: (t, k) => k === "fillText" ? (s => texts.push(s)) : (t[k] !== undefined ? t[k] : () => {}),
  set: (t, k, v) => { t[k] = v; return true; }});
const els = {};
function el(id) {
  if (!els[id]) els[id] = {id, textContent: id === "psm-data" ? data : "", style: {}, clientWidth: 800,
    clientHeight: 600, classList: {add() {}, remove() {}}, addEventListener(ev, f) { this["on_" + ev] = f; },
    setPointerCapture() {}, getBoundingClientRect() { return {left: 0, top: 0}; }, getContext() { return ctx; }};
  return els[id];
}
global.document = {getElementById: el};
global.window = {devicePixelRatio: 1, addEventListener() {}};
global.atob = s => Buffer.from(s, "base64").toString("binary");
global.Image = class { constructor() { this.complete = true; this.naturalWidth = 256; } };
eval(code + "\nglobal.__p = {readout, toScreen, tiles, fit, D};");
const p = global.__p, b = p.D.bounds;
texts.length = 0; p.fit();
const lonLabels = texts.slice();
const val = (x, y) => { const [sx, sy] = p.toScreen(x, y); p.readout(sx, sy); return el("readout").textContent; };
const cy = (b[1] + b[3]) / 2, dx = (b[2] - b[0]);
const centre = val((b[0] + b[2]) / 2, cy).match(/lat (\S+)\s+lon (\S+)/);
console.log(JSON.stringify({lat: +centre[1], lon: +centre[2], left: val(b[0] + 0.1 * dx, cy),
  right: val(b[2] - 0.1 * dx, cy), outside: val(b[2] + dx, cy), tiles: p.tiles.size,
  tile: [...p.tiles.values()][0].src, lonLabels}));
"""


def test_render_map_writes_all_three(tmp_path):
    grid = GRIDS["EPSG:6933"]
    out = render_map(sample_raster(grid), grid, tmp_path / "sub" / "q", legend=legend(), vmin=-3.4, vmax=-2.6)
    assert out.tif.name == "q.tif" and out.png.name == "q.png" and out.html.name == "q.html"
    assert all(p.is_file() for p in (out.tif, out.png, out.html))
    with pytest.raises(ValueError, match="unknown output formats"):
        render_map(sample_raster(grid), grid, tmp_path / "q", legend=legend(), vmin=0, vmax=1, formats=("jpg",))


def test_gif_one_frame_per_png(tmp_path):
    from PIL import Image

    grid = GRIDS["EPSG:32633"]
    frames = []
    for h in (0, 6, 12, 18):
        lg = legend()
        lg.title = f"hour {h:02d}"
        frames.append(
            write_png(sample_raster(grid, h), tmp_path / f"f{h}.png", grid=grid, legend=lg, vmin=-3.4, vmax=-2.6)
        )
    gif = write_gif(frames, tmp_path / "a.gif", duration_ms=500)
    with Image.open(gif) as im:
        assert im.n_frames == 4 and im.info.get("loop") == 0
        assert im.size == Image.open(frames[0]).size


def test_points_to_raster():
    r = points_to_raster(np.array([1.0, 2.0], np.float32), np.array([0, 2]), np.array([1, 0]), 3, 2)
    assert r.shape == (3, 2) and r[0, 1] == 1.0 and r[2, 0] == 2.0 and np.isnan(r).sum() == 4


def test_report_page(tmp_path):
    grid = GRIDS["EPSG:32633"]
    maps = [
        render_map(sample_raster(grid, i), grid, tmp_path / "maps" / f"m{i}", legend=legend(), vmin=-3.4, vmax=-2.6)
        for i in range(2)
    ]
    maps[1].title = "dawn chorus <6 h>"
    extra = {"title": "uncertainty", "png": maps[0].png, "description": "‖σ‖₁ at zoom 1"}
    table = "| model | R@10% | median rank |\n|---|---:|---|\n| psm-tiny | 0.120 | 33.5 |\n| random | 0.100 | 50 |"
    page = write_report([*maps, extra], table, tmp_path / "report.html").read_text()
    assert "href='maps/m0.html'" in page and "href='maps/m1.tif'" in page and "href='maps/m0.png'" in page
    assert "dawn chorus &lt;6 h&gt;" in page and "uncertainty" in page and "‖σ‖₁ at zoom 1" in page
    assert "<th>R@10%</th>" in page and "<td>psm-tiny</td>" in page and "<td>33.5</td>" in page
    assert page.count("data:image/png;base64,") == 3
    assert not URL.search(page)
    no_table = write_report(maps, None, tmp_path / "r2.html").read_text()
    assert "Retrieval" not in no_table


def test_markdown_to_html():
    html = _markdown_to_html("# Results\n\nsome text\n\n| a | b |\n|---|---|\n| 1 | <2> |")
    assert "<h2>Results</h2>" in html and "<p>some text</p>" in html
    assert "<th>a</th><th>b</th>" in html and "<td>&lt;2&gt;</td>" in html


def test_map_outputs_mapping_and_dataclass_mix(tmp_path):
    # write_report accepts MapOutputs and plain mappings; missing files are just not linked.
    out = write_report([MapOutputs(title="empty"), {"title": "also empty"}], "", tmp_path / "r.html").read_text()
    assert "empty" in out and "also empty" in out and "href" not in out


def test_mp4_through_ffmpeg_when_present(tmp_path, monkeypatch):
    import os
    import stat

    from psm.maps.render import write_mp4

    grid = GRIDS["EPSG:32633"]
    frames = [write_png(sample_raster(grid, i), tmp_path / f"f{i}.png", grid=grid, legend=legend(), vmin=0, vmax=1)
              for i in range(2)]  # fmt: skip
    path = os.environ.get("PATH", "")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert write_mp4(frames, tmp_path / "a.mp4") is None  # no encoder: skipped, not an error
    # A stand-in ffmpeg that records its arguments and writes the output file.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "ffmpeg"
    fake.write_text(f'#!/bin/sh\necho "$@" > "{bindir}/args.txt"\nfor a; do last="$a"; done\necho mp4 > "$last"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(bindir) + os.pathsep + path)
    out = write_mp4(frames, tmp_path / "a.mp4", fps=2)
    assert out == tmp_path / "a.mp4" and out.read_text() == "mp4\n"
    args = (bindir / "args.txt").read_text()
    assert "-framerate 2" in args and "libx264" in args and "yuv420p" in args


def test_cog_fallback_without_the_cog_driver(tmp_path, monkeypatch):
    """Older GDAL without the COG driver: a tiled GTiff with internal overviews, still validated."""
    import rasterio

    real = rasterio.Env.drivers
    monkeypatch.setattr(rasterio.Env, "drivers", lambda self: {k: v for k, v in real(self).items() if k != "COG"})
    grid = GridSpec("EPSG:32633", (10.0, 0.0, 330_000.0, 0.0, -10.0, 5_830_000.0), 1200, 700)
    path = write_cog(sample_raster(grid), grid, tmp_path / "f.tif")
    with rasterio.open(path) as ds:
        assert ds.profile["tiled"] and ds.overviews(1) and np.isnan(ds.nodata)
        assert ds.crs.to_epsg() == 32633
    assert validate_cog(path, require_layout=False) == []


def test_html_data_cannot_end_or_reopen_its_script_element(tmp_path):
    # Only "</" was escaped: a basemap URL or legend text holding "<!--<script>" could break the page.
    tpl = "https://tiles.example.org/{z}/{x}/{y}.png?a=<!--<script>&b=</script>"
    page = _page_with_basemap(tmp_path, tpl)
    raw = re.search(r'id="psm-data">(.*?)</script>', page, re.S).group(1)
    assert "<" not in raw and ">" not in raw and "&" not in raw
    assert json.loads(raw)["basemap"] == tpl
