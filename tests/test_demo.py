"""`psm demo` end to end (the README's first command): world, training, evaluation, maps, report."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    from psm.demo import run_demo

    out = tmp_path / "demo"
    assert run_demo(out=out, steps=12, spacing_m=800) == 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics  # the paper's table was computed
    assert "Mean ρ" in (out / "agreement.md").read_text()
    for name in ("birds_h06", "birds_h14", "traffic_h06", "waves_h14", "audio_query"):
        for suffix in (".tif", ".png", ".html"):
            assert (out / "maps" / f"{name}{suffix}").is_file(), name + suffix
    report = (out / "report.html").read_text()
    assert "Maps against the world" in report and "Mean ρ" in report and "birds_h06" in report
