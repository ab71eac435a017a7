"""`psm demo` end to end (the README's first command): world, training, evaluation, maps, report."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    from psm.demo import run_demo

    out = tmp_path / "demo"
    assert run_demo(out=out, size="tiny", steps=12, spacing_m=800) == 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics  # the paper's table was computed
    assert "Mean ρ" in (out / "agreement.md").read_text()
    for name in ("birds_h06", "birds_h14", "traffic_h06", "waves_h14", "audio_query"):
        for suffix in (".tif", ".png", ".html"):
            assert (out / "maps" / f"{name}{suffix}").is_file(), name + suffix
    # A query's two hours share one colour scale (so the hour effect shows), and animate.
    import rasterio

    scales = []
    for hour in ("06", "14"):
        with rasterio.open(out / "maps" / f"birds_h{hour}.tif") as ds:
            scales.append(json.loads(ds.tags()["PSM_SCALE"]))
    assert scales[0] == scales[1] and scales[0]["shared"] and (out / "maps" / "birds.gif").is_file()
    report = (out / "report.html").read_text()
    assert "Maps against the world" in report and "Mean ρ" in report and "birds_h06" in report


def test_demo_refuses_a_world_of_another_size(tmp_path):
    """Reusing outputs/demo after a --size change would index one world with a model trained on another."""
    from psm.demo import run_demo

    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "world.json").write_text(json.dumps({"size": "tiny"}))
    with pytest.raises(SystemExit, match="holds a 'tiny' world"):
        run_demo(out=tmp_path, size="demo")
    with pytest.raises(ValueError, match="size must be one of"):
        run_demo(out=tmp_path, size="huge")


def test_max_time_is_lightnings_format():
    from psm.demo import _max_time

    assert _max_time(5) == "00:00:05:00" and _max_time(0.5) == "00:00:00:30" and _max_time(90.25) == "00:01:30:15"
