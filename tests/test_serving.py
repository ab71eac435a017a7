"""psm serve: a real HTTP server on 127.0.0.1 answering map queries, checked against the library's own maps."""

from __future__ import annotations

import io
import json
import math
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import rasterio

from psm.maps.query import MapIndex, MetadataSetting, ScaleSpec, condition, embed_text_query, query_map, top_k
from psm.serving.server import MapService, make_server, tile_bounds
from test_map_query import make_checkpoint, write_test_index


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server on a free port over a small index, and what a direct (library) query needs."""
    from psm.models.factory import create_model

    root = tmp_path_factory.mktemp("serve")
    ckpt = make_checkpoint(root)
    model = create_model(ckpt).eval()
    index_dir = write_test_index(root / "index", model)
    service = MapService(index_dir, ckpt, cache_dir=root / "cache")
    server = make_server(service, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield {
        "url": f"http://{host}:{port}", "service": service, "root": root, "ckpt": ckpt, "index": index_dir,
        "server": server,
    }  # fmt: skip
    server.shutdown()
    server.server_close()


def get(url: str, data: bytes | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET (or a POST with ``data``); HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def raw_request(url: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` as is on a new connection to the server at ``url`` and return what comes back before the
    server closes; b"TIMEOUT" if it neither answers nor closes within ``timeout`` seconds."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except TimeoutError:
            return b"TIMEOUT"
    return answer


def test_info_and_page(served):
    status, ctype, body = get(served["url"] + "/api/info")
    info = json.loads(body)
    assert status == 200 and ctype == "application/json"
    assert info["zoom_levels"] == [1, 3] and info["num_points"] == MapIndex(served["index"]).num_points
    assert info["metadata_types"] == ["audio_source", "caption_source", "location", "month", "hour"]
    assert info["text_queries"] and "iNat" in info["audio_sources"]
    status, ctype, body = get(served["url"] + "/")
    assert status == 200 and ctype.startswith("text/html") and b"Where would I hear this?" in body
    assert get(served["url"] + "/health")[:2] == (200, "text/plain; charset=utf-8")


def test_map_tif_equals_the_library_map(served, tmp_path):
    # The served COG is the very map `psm map query` writes for the same query and setting.
    svc = served["service"]
    status, ctype, body = get(served["url"] + "/map.tif?text=birds+chirping&month=5&hour=6&audio_source=iNat&zoom=3")
    assert status == 200 and ctype == "image/tiff"
    q = embed_text_query(svc.model, svc.tokenizer, "birds chirping")
    setting = MetadataSetting(month=5, hour=6, audio_source="iNat")
    ref = query_map(svc.index, svc.model, q, tmp_path / "ref", zoom=3, setting=setting, formats=("tif",))
    with rasterio.open(io.BytesIO(body)) as served_map, rasterio.open(ref.tif) as direct:
        assert served_map.crs == direct.crs and served_map.transform == direct.transform
        a, b = served_map.read(1, masked=True), direct.read(1, masked=True)
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_array_equal(a.filled(0), b.filled(0))
        assert a.mask.any() and not a.mask.all()  # the ellipse's outside and the points without imagery are nodata


def test_metadata_changes_the_map_and_percentile_scale(served):
    base = served["url"] + "/map.tif?text=birds&zoom=1"
    maps = []
    for extra in ("&month=5&hour=6", "&month=5&hour=20", "&month=5&hour=6&scale=percentile"):
        status, _, body = get(base + extra)
        assert status == 200
        with rasterio.open(io.BytesIO(body)) as ds:
            maps.append(ds.read(1, masked=True))
    assert not np.ma.allclose(maps[0], maps[1])  # the hour is fused into the map
    assert maps[2].min() >= 0.0 and maps[2].max() <= 1.0  # percentile scale maps to [0, 1]


def test_html_and_png_maps(served):
    status, ctype, body = get(served["url"] + "/map.html?text=waves&prompt_ensemble=true&title=Waves")
    assert status == 200 and ctype.startswith("text/html")
    assert b"Waves" in body and b"the sound of waves" not in body  # the legend names the query, not each prompt
    # request text that reaches the page is escaped, never markup (a link to this server cannot run a script)
    status, _, body = get(served["url"] + "/map.html?text=%3Cscript%3Ex()%3C/script%3E&title=%3Cb%3Eq%3C/b%3E")
    assert status == 200 and b"<script>x()" not in body and b"<b>q</b>" not in body and b"&lt;b&gt;q" in body
    status, ctype, body = get(served["url"] + "/map.png?text=waves&width=400")
    assert status == 200 and ctype == "image/png" and body[:8] == b"\x89PNG\r\n\x1a\n"


def test_top_places_equal_the_library_ranking(served):
    svc = served["service"]
    status, _, body = get(served["url"] + "/api/top?text=traffic&month=1&hour=8&k=7")
    top = json.loads(body)
    assert status == 200 and len(top["places"]) == 7 and top["zoom"] == 1
    cond = condition(svc.index, svc.model, 1, MetadataSetting(month=1, hour=8), cache_dir=served["root"] / "cache")
    ids, scores = top_k(cond, embed_text_query(svc.model, svc.tokenizer, "traffic"), 7)
    assert [p["point_id"] for p in top["places"]] == ids.tolist()
    np.testing.assert_allclose([p["score"] for p in top["places"]], scores, rtol=1e-6)
    pts = svc.index.points.iloc[ids]
    np.testing.assert_allclose([p["latitude"] for p in top["places"]], pts["latitude"])


def test_audio_query_by_post(served, tmp_path):
    import soundfile as sf

    t = np.arange(16000 * 2) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, format="WAV")
    status, _, body = get(served["url"] + "/api/top?filename=clip.wav&k=3", data=buf.getvalue())
    assert status == 200, body
    top = json.loads(body)
    assert top["query"] == "audio: clip.wav" and len(top["places"]) == 3
    # a body that is not audio: a clear 400, and the server goes on
    status, _, body = get(served["url"] + "/api/top?filename=my%20clip.wav", data=b"not a wav file at all")
    error = json.loads(body)["error"]
    assert status == 400 and "my clip.wav" in error and "psm-serve-" not in error  # the client's name, no temp path
    assert get(served["url"] + "/health")[0] == 200


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("/map.tif?month=5", "needs text="),
        ("/map.tif?text=birds&month=13", "month"),
        ("/map.tif?text=birds&audio_source=tiktok", "tiktok"),
        ("/map.tif?text=birds&zoom=5", "zoom"),
        ("/map.tif?text=birds&hour=dawn", "must be a number"),
        ("/map.tif?text=birds&scale=shared", "shared"),
        ("/map.tif?text=birds&scale=percentile:90,10", "percentiles"),
        ("/map.tif?text=birds&cmap=nope", "colormap"),
        ("/map.tif?text=birds&width=5", "width"),
        ("/map.tif?text=birds&mnth=5", "unknown parameters ['mnth']"),
        ("/map.tif?text=birds&month=5&month=6", "given 2 times"),
        ("/api/top?text=birds&k=0", "k must be"),
        ("/api/top?text=birds&month=nan", "finite number"),
        ("/api/top?filename=x.exe", "audio file name"),
        ("/api/top?text=birds&filename=a.wav", "either text or an audio body"),
    ],
)
def test_bad_requests_get_a_clear_400(served, query, message):
    data = b"RIFF" if "filename" in query else None
    status, ctype, body = get(served["url"] + query, data=data)
    assert status == 400 and ctype == "application/json"
    assert message in json.loads(body)["error"]


def test_unknown_routes_and_oversized_bodies(served):
    assert get(served["url"] + "/map.jpg?text=birds")[0] == 404
    assert get(served["url"] + "/nothing")[0] == 404
    req = urllib.request.Request(served["url"] + "/api/top?filename=a.wav", method="POST", data=b"x")
    req.add_header("Content-Length", str(1 << 40))  # announced, never sent: refused before reading
    try:
        urllib.request.urlopen(req, timeout=30)
        raise AssertionError("an oversized body was accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 413


def test_concurrent_requests_all_answered(served):
    results = []

    def ask(hour):
        results.append(get(served["url"] + f"/api/top?text=birds&month=4&hour={hour}&k=2")[0])

    threads = [threading.Thread(target=ask, args=(h,)) for h in (1, 2, 3, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 4


def test_service_refuses_a_model_that_did_not_build_the_index(served, tmp_path):
    from psm.maps.query import MapQueryError

    other = make_checkpoint(tmp_path, overrides={"embed_dim": 16})
    with pytest.raises(MapQueryError, match="embed_dim"):
        MapService(served["index"], other)


def test_cli_serves_until_stopped(served):
    # `psm serve` starts, announces its address, answers, and reports a bad start with exit code 2.
    proc = subprocess.Popen(
        [sys.executable, "-m", "psm.cli", "serve", "--index", str(served["index"]), "--checkpoint",
         str(served["ckpt"]), "--port", "0", "--cache-dir", str(served["root"] / "cache")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        url = None
        while time.time() < deadline and url is None:
            line = proc.stdout.readline()
            if "http://" in line:
                url = line.split()[2]
        assert url, proc.stderr.read()
        status, _, body = get(url + "api/top?text=birds&k=1")
        assert status == 200 and len(json.loads(body)["places"]) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run(
        [sys.executable, "-m", "psm.cli", "serve", "--index", str(Path(served["root"]) / "missing"), "--checkpoint",
         str(served["ckpt"])],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "not a map index" in bad.stderr


def test_query_page_in_a_browser(served):
    # The page fills its choices from /api/info, draws a text query's map in its frame, and lists top places.
    from test_browser import browser_page

    with browser_page() as page:
        page.goto(served["url"] + "/")
        page.wait_for_function("document.querySelectorAll('#zoom option').length === 2")
        page.fill("#text", "birds chirping")
        page.fill("#month", "5")
        page.fill("#hour", "6")
        page.select_option("#audio_source", "iNat")
        page.click("#draw")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('drawn')", timeout=60_000)
        frame = page.frame_locator("#map")
        assert "birds chirping" in frame.locator("body").inner_text()
        assert page.locator("#downloads a").count() == 2
        xyz = page.input_value("#xyz")
        assert xyz.startswith(served["url"] + "/tiles/{z}/{x}/{y}.png?") and "month=5" in xyz
        page.click("#top")
        page.wait_for_function("document.querySelectorAll('#places tbody tr').length === 20", timeout=60_000)
        # braces typed in the query stay encoded in the XYZ URL: only {z}, {x} and {y} are for the GIS to fill
        page.fill("#text", "{x} birds")
        page.click("#draw")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('drawn')", timeout=60_000)
        xyz = page.input_value("#xyz")
        assert xyz.count("{") == 3 and "text=%7Bx%7D+birds" in xyz
        # an hour out of range is stopped by the form itself
        page.fill("#hour", "99")
        page.click("#draw")
        assert page.evaluate("!document.getElementById('hour').checkValidity()")
        # a clip the server cannot decode: its message is shown, not a broken page
        page.fill("#hour", "6")
        page.set_input_files("#audio", files=[{"name": "junk.wav", "mimeType": "audio/wav", "buffer": b"junk"}])
        page.click("#draw")
        page.wait_for_function("document.getElementById('status').className === 'error'", timeout=60_000)
        assert "junk.wav" in page.text_content("#status") and "psm-serve-" not in page.text_content("#status")
        # (Chromium logs each 4xx answer as a console error: that one is expected)
        assert [e for e in page.errors if "status of 400" not in e] == []
        assert all(u.startswith((served["url"], "data:", "about:")) for u in page.requests)


def test_scale_spec_of_a_request_is_the_library_one():
    from psm.serving.server import parse_query_request

    req = parse_query_request({"text": ["a", "b"], "scale": ["percentile:5,95"], "location": ["off"]})
    assert req.texts == ["a", "b"] and ScaleSpec.parse(req.scale).percentiles == (5.0, 95.0)
    assert req.setting == MetadataSetting(location=False)


def _tile_of(lon: float, lat: float, z: int) -> tuple[int, int]:
    n = 2**z
    x = int((lon + 180.0) / 360.0 * n)
    y = int((1.0 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2.0 * n)
    return x, y


def test_tile_bounds():
    half = 20_037_508.342789244
    assert tile_bounds(0, 0, 0) == pytest.approx((-half, -half, half, half))
    assert tile_bounds(1, 1, 0) == pytest.approx((0.0, 0.0, half, half))  # y counts down from the north
    with pytest.raises(ValueError, match="no tile"):
        tile_bounds(3, 8, 0)


def test_tiles_show_the_maps_scores_on_its_colour_scale(served):
    # Each tile pixel is the colour of the grid point under its centre, on the whole map's scale: checked against
    # the served COG of the same query, sampled at the tile pixels' centres by an independent transform.
    from PIL import Image
    from rasterio.transform import from_bounds, xy
    from rasterio.warp import transform as warp
    from rasterio.warp import transform_bounds

    from psm.maps.render import colorize

    query = "?text=birds&month=5&hour=6&zoom=3"
    status, _, tif = get(served["url"] + "/map.tif" + query)
    with rasterio.open(io.BytesIO(tif)) as ds:
        scores, inverse, crs = ds.read(1, masked=True).filled(np.nan), ~ds.transform, ds.crs
        vmin, vmax = float(np.nanmin(scores)), float(np.nanmax(scores))
        west, south, east, north = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    z = 12
    x, y = _tile_of((west + east) / 2, (south + north) / 2, z)
    status, ctype, png = get(served["url"] + f"/tiles/{z}/{x}/{y}.png" + query)
    assert status == 200 and ctype == "image/png"
    tile = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))
    assert tile.shape == (256, 256, 4)
    rows, cols = np.mgrid[0:256, 0:256]
    mx, my = xy(from_bounds(*tile_bounds(z, x, y), 256, 256), rows.ravel(), cols.ravel(), offset="center")
    gx, gy = warp("EPSG:3857", crs, mx, my)
    c, r = inverse * (np.asarray(gx), np.asarray(gy))
    r, c = np.floor(r).astype(int), np.floor(c).astype(int)
    inside = (r >= 0) & (r < scores.shape[0]) & (c >= 0) & (c < scores.shape[1])
    expected = np.zeros((256 * 256, 4), dtype=np.uint8)
    expected[inside] = colorize(scores[r[inside], c[inside]], vmin, vmax)
    agree = (tile.reshape(-1, 4) == expected).all(axis=1)
    assert agree.mean() > 0.99  # (pixels whose centre falls on a grid cell edge may round the other way)
    assert (tile[..., 3] == 255).sum() > 1000 and (tile[..., 3] == 0).sum() > 1000  # map and nodata both shown
    # a tile far from the index is empty, and a second request of the map reuses its scored raster
    far_x, far_y = _tile_of(-100.0, 40.0, z)
    status, _, png = get(served["url"] + f"/tiles/{z}/{far_x}/{far_y}.png" + query)
    assert status == 200 and (np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))[..., 3] == 0).all()
    assert len(served["service"]._rasters) >= 1


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/tiles/30/0/0.png?text=birds", 400, "no tile"),
        ("/tiles/2/4/0.png?text=birds", 400, "no tile"),
        ("/tiles/2/a/0.png?text=birds", 400, "a tile is /tiles/Z/X/Y.png"),
        ("/tiles/" + "9" * 5000 + "/0/0.png?text=birds", 400, "a tile is /tiles/Z/X/Y.png"),
        ("/tiles/2/1/1.png?month=5", 400, "text query"),
    ],
)
def test_bad_tile_requests(served, path, status, message):
    got, _, body = get(served["url"] + path)
    assert got == status and message in json.loads(body)["error"]


def test_tile_coordinates_in_other_digits_are_a_400(served):
    # "²" (byte B2 of the request line) passes str.isdigit() but not int(): a 400, not an internal error
    answer = raw_request(served["url"], b"GET /tiles/\xb2/0/0.png?text=birds HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 400") and b"a tile is" in answer


def test_head_requests(served):
    for path, ctype in (("/health", "text/plain; charset=utf-8"), ("/tiles/12/2190/1342.png?text=birds", "image/png")):
        req = urllib.request.Request(served["url"] + path, method="HEAD")
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200 and r.headers["Content-Type"] == ctype and r.read() == b""
            assert int(r.headers["Content-Length"]) > 0


def test_tiles_can_be_read_from_other_origins(served):
    # a web map on another origin that fetches its tiles (MapLibre, OpenLayers with crossOrigin) needs CORS
    with urllib.request.urlopen(served["url"] + "/tiles/12/2190/1342.png?text=birds", timeout=120) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "*"


def test_bad_or_stalled_bodies_do_not_hold_the_server(served, monkeypatch):
    assert 0 < served["server"].RequestHandlerClass.timeout <= 600  # the default too ends a stalled request
    monkeypatch.setattr(served["server"].RequestHandlerClass, "timeout", 1.0)
    post = b"POST /api/top?filename=a.wav HTTP/1.0\r\nContent-Length: %s\r\n\r\nabc"
    answer = raw_request(served["url"], post % b"-1")  # read(-1) would wait for the client to close
    assert answer.startswith(b"HTTP/1.0 400") and b"Content-Length" in answer
    answer = raw_request(served["url"], post % b"100")  # 3 of 100 bytes, then silence
    assert answer.startswith(b"HTTP/1.0 408")
    assert raw_request(served["url"], b"GET /health HTTP/1.0\r\n") == b""  # headers never finished: closed


def test_a_slow_reader_gets_the_whole_answer(served, monkeypatch):
    # The request timeout bounds each write, not the whole answer: a big map to a slow client arrives whole.
    import socket

    monkeypatch.setattr(served["server"].RequestHandlerClass, "timeout", 1.0)
    monkeypatch.setattr(served["service"], "render", lambda *args, **kwargs: bytes(4 << 20))
    host, port = served["url"].removeprefix("http://").split(":")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        s.settimeout(30)
        s.connect((host, int(port)))
        s.sendall(b"GET /map.tif?text=birds HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := s.recv(1 << 16):
            answer += chunk
            time.sleep(0.05)  # ~1 MB/s: the answer takes ~4 s, the timeout is 1 s
    assert answer.endswith(bytes(4 << 20)) and b"Content-Length: 4194304" in answer


def test_oversized_body_that_is_sent_gets_its_413(served, monkeypatch):
    # The client sends the whole body before it reads the answer: unread data would reset the connection.
    monkeypatch.setattr("psm.serving.server.MAX_AUDIO_BYTES", 1 << 20)
    status, _, body = get(served["url"] + "/api/top?filename=a.wav", data=bytes(16 << 20))
    assert status == 413 and "over 1 MiB" in json.loads(body)["error"]


def test_errors_do_not_show_server_paths(served, monkeypatch):
    index = str(Path(served["index"]).resolve())
    status, _, body = get(served["url"] + "/map.tif?text=birds&zoom=5")
    assert status == 400 and "zoom 5" in json.loads(body)["error"] and index not in body.decode()

    def broken(*args, **kwargs):
        raise PermissionError("[Errno 13] Permission denied: '/srv/lab/psm-cache/z3.npy'")

    monkeypatch.setattr(served["service"], "render", broken)
    status, _, body = get(served["url"] + "/map.png?text=birds")
    assert status == 500 and "PermissionError" in body.decode() and "/srv/lab" not in body.decode()


def test_a_client_that_leaves_is_not_an_error(served, monkeypatch, caplog):
    # Web maps drop the tiles they no longer show: the server notes it, without an error and a traceback.
    import socket
    import struct

    def slow(*args, **kwargs):
        time.sleep(0.5)
        return bytes(8 << 20)

    monkeypatch.setattr(served["service"], "render", slow)
    host, port = served["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"GET /map.png?text=birds HTTP/1.0\r\n\r\n")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    time.sleep(1.5)
    assert not [r for r in caplog.records if r.levelno >= 40], [r.getMessage() for r in caplog.records]
    assert get(served["url"] + "/health")[0] == 200


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize(("host", "client"), [("::1", "[::1]"), ("", "127.0.0.1")])
def test_binds_to_ipv6_and_to_every_address(served, host, client):
    if ":" in host and not _ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback")
    server = make_server(served["service"], host, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert get(f"http://{client}:{server.server_address[1]}/health")[:2] == (200, "text/plain; charset=utf-8")
    finally:
        server.shutdown()
        server.server_close()
