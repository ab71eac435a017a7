"""``psm demo``: the main job end to end on the embedded offline world, on a laptop CPU, with no download.

It runs the same commands a user runs, in order: generate the offline world (``psm world generate``),
train the tiny PSM on it (``psm train`` with configs/world-demo.yaml), evaluate it on the world's
geographically held-out test split (``psm evaluate``: the paper's table), index the region
(``psm map index``) and draw soundscape maps for text queries at two hours, an audio query and an
uncertainty map (``psm map query`` / ``psm map uncertainty``), score every event's map against the world's
truth (``psm map agreement``), then an HTML report linking them.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from psm.cli import INTERRUPTED
from psm.cli import main as psm

CONFIG = Path(__file__).resolve().parent / "configs" / "world-demo.yaml"
TEXT_QUERIES = ("birds singing in the forest", "traffic noise on a busy road", "waves and water splashing")
HOURS = (6, 14)


@dataclass(frozen=True)
class DemoPlan:
    """How much the demo does for a world size: training steps, a time limit, batch and map spacing."""

    steps: int
    minutes: float | None  # a wall-clock limit on training (None: the steps alone)
    batch_size: int
    spacing_m: int
    val_every: int | None = None  # validation interval in steps (None: three times per run)


# `demo` (the default) is the recipe of docs/world.md's "What the tiny model reaches (8 CPU minutes)": its
# table is what a user should see (5 minutes left the maps at chance against the truth: mean ρ 0.02). With the
# cache filled up front and the folded HTSAT input norm (session 8), the 1,000 steps take ~6 of the 8 minutes
# on 2 cores. A 1,600-step schedule (~8 minutes) did not do better: its validation picked step 400
# (R@10 % 0.213 / 0.193 against 0.265 / 0.218).
# `tiny` (200 clips, 23 test clips) only shows every step run, in about a minute.
PLANS = {
    "demo": DemoPlan(steps=1000, minutes=8.0, batch_size=32, spacing_m=1000, val_every=100),
    "tiny": DemoPlan(steps=120, minutes=None, batch_size=16, spacing_m=400),
}


def _max_time(minutes: float) -> str:
    """Lightning's ``DD:HH:MM:SS`` for a number of minutes (whole seconds)."""
    seconds = max(1, round(minutes * 60))
    return f"00:{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _step(title: str, argv: list[str]) -> None:
    print(f"\n=== {title}\n$ psm {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    code = psm(argv)
    if code == INTERRUPTED:  # Ctrl-C in a step stops the whole demo with the same code (the step said so)
        raise SystemExit(INTERRUPTED)
    if code:
        raise SystemExit(f"psm demo: step failed with exit code {code}: psm {' '.join(argv)}")
    print(f"({time.perf_counter() - start:.0f} s)", flush=True)


def run_demo(
    seed: int = 0,
    out: str | Path | None = None,
    size: str = "demo",
    steps: int | None = None,
    minutes: float | None = None,
    spacing_m: int | None = None,
) -> int:
    """Run the whole pipeline into ``out`` (default ``outputs/demo``, ``outputs/demo-tiny`` for the tiny world)
    and return 0; every step's output stays there to look at. ``steps``, ``minutes`` (a training time limit)
    and ``spacing_m`` (of the map grid) default to the size's :data:`PLANS`."""
    if size not in PLANS:
        raise ValueError(f"size must be one of {sorted(PLANS)}, got {size!r}")
    plan = PLANS[size]
    steps = plan.steps if steps is None else steps
    minutes = plan.minutes if minutes is None else minutes
    spacing_m = plan.spacing_m if spacing_m is None else spacing_m
    out = Path(out if out is not None else ("outputs/demo" if size == "demo" else f"outputs/demo-{size}"))
    world, run = out / "world", out / "run"
    start = time.perf_counter()
    if not (world / "world.json").is_file():
        _step("1. the offline world", ["world", "generate", "--out", str(world), "--size", size, "--seed", str(seed)])
    else:
        built = json.loads((world / "world.json").read_text()).get("size")
        if built != size:
            raise SystemExit(
                f"psm demo: {world} holds a {built!r} world, not {size!r}: remove {out} or give another --out"
            )
        print(f"=== 1. the offline world: reusing {world}")
    # A rerun trains a new model: the last run's training state and index belong to the old one.
    for stale in (run, out / "index"):
        shutil.rmtree(stale, ignore_errors=True)
    manifest = str(world / "manifest.parquet")
    limit = [] if minutes is None else ["--trainer.max_time", _max_time(minutes)]
    val_every = min(steps, plan.val_every or max(1, steps // 3))
    _step(
        f"2. train the tiny PSM (PCME++, metadata fusion): {steps} steps"
        + ("" if minutes is None else f" or {minutes:g} minutes, whichever comes first"),
        [
            "train", "--config", str(CONFIG), "--data.manifest", manifest, "--trainer.default_root_dir", str(run),
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(val_every),
            *limit, "--data.batch_size", str(plan.batch_size), "--model.seed", str(seed),
            "--trainer.enable_progress_bar", "false",
        ],
    )  # fmt: skip
    ckpt = run / "export" / "best"
    _step(
        "3. evaluate on the held-out test area (the paper's table)",
        ["evaluate", "--checkpoint", str(ckpt), "--manifest", manifest, "--split", "test", "--out", str(out / "eval")],
    )
    bounds = json.loads((world / "world.json").read_text())["region_lonlat_bounds"]
    index = out / "index"
    _step(
        "4. index the region for maps",
        [
            "map", "index", "--checkpoint", str(ckpt), "--bbox", *map(str, bounds), "--spacing-m", str(spacing_m),
            "--source", f"raster:{world / 'imagery' / 'mosaic.tif'}", "--zoom", "1", "3", "5", "--out", str(index),
            "--no-progress",
        ],
    )  # fmt: skip
    maps = out / "maps"
    maps.mkdir(parents=True, exist_ok=True)
    outputs = []
    for text in TEXT_QUERIES:
        # One query at both hours on one colour scale (the paper's Figure 4), so the hour effect shows.
        name = text.split()[0]
        _step(
            f"5. map '{text}' at {' and '.join(f'{h} h' for h in HOURS)} in May, on one scale",
            [
                "map", "temporal", "--index", str(index), "--checkpoint", str(ckpt), "--text", text,
                "--month", "5", "--hours", *map(str, HOURS), "--zoom", "3", "--html", "--out", str(maps / name),
            ],
        )  # fmt: skip
        outputs += [maps / f"{name}_h{hour:02d}" for hour in HOURS]
    clip = sorted((world / "audio").rglob("*.*"))[0]
    _step(
        "6. map an audio query",
        ["map", "query", "--index", str(index), "--checkpoint", str(ckpt), "--audio", str(clip), "--month", "5",
         "--hour", "6", "--zoom", "3", "--out", str(maps / "audio_query")],
    )  # fmt: skip
    outputs.append(maps / "audio_query")
    _step(
        "7. uncertainty map",
        ["map", "uncertainty", "--index", str(index), "--checkpoint", str(ckpt), "--zoom", "1", "3", "5",
         "--out", str(maps / "uncertainty")],
    )  # fmt: skip

    _step(
        "8. how well do the maps agree with the world's truth? (Spearman ρ per event, hour effect)",
        # Zoom 1 (a 2.56 km footprint) is the scale closest to the truth's local event probabilities.
        ["map", "agreement", "--index", str(index), "--checkpoint", str(ckpt), "--world", str(world), "--month", "5",
         "--hours", *map(str, HOURS), "--zoom", "1", "--out", str(out / "agreement")],
    )  # fmt: skip

    from psm.maps.render import write_report

    table = (out / "eval" / "metrics.md").read_text() if (out / "eval" / "metrics.md").is_file() else None
    agreement = out / "agreement.md"
    if table is not None and agreement.is_file():
        table += "\n\n### Maps against the world's truth\n\n" + agreement.read_text()
    pngs = [p.with_suffix(".png") for p in outputs] + sorted(maps.glob("uncertainty*.png"))
    entries = [
        {"title": p.stem, "png": str(p), "html": str(p.with_suffix(".html")), "tif": str(p.with_suffix(".tif"))}
        for p in pngs
        if p.is_file()
    ]
    report = write_report(entries, table, out / "report.html")
    print(f"\nreport: {report}\ndone in {time.perf_counter() - start:.0f} s")
    print(f"ask your own questions: psm serve --index {index} --checkpoint {ckpt}  (then open http://127.0.0.1:8000/)")
    return 0
