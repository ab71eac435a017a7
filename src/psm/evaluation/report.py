"""Tables laid out like the paper's Tables 1–4, and atomic writing of ``metrics.json`` / ``metrics.md``.

Rows: metadata setting × without/with added text; columns: zoom × {I2S R@10 %, I2S MedR, S2I R@10 %,
S2I MedR}. Everything is rendered from the JSON-ready result dict, so a saved ``metrics.json`` can be
re-rendered later.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from psm.atomic import write_text_atomic
from psm.evaluation.retrieval import recall_key


def _fmt(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def retrieval_table(result: dict[str, Any]) -> str:
    """The retrieval table (Markdown) of an evaluation result."""
    pct = result.get("recall_pct", 10.0)
    rkey = recall_key(pct)
    zooms = sorted({r["zoom"] for r in result["results"]}, key=int)
    header = ["Metadata", "Text"]
    for z in zooms:
        header += [f"z{z} I2S R@{pct:g}%", f"z{z} I2S MedR", f"z{z} S2I R@{pct:g}%", f"z{z} S2I MedR"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":--", ":--"] + ["--:"] * (4 * len(zooms))) + "|"]
    by_key = {(r["metadata"], r["add_text"], r["zoom"]): r for r in result["results"]}
    settings = list(dict.fromkeys(r["metadata"] for r in result["results"]))
    for name in settings:
        for with_text in (False, True):
            if not any((name, with_text, z) in by_key for z in zooms):
                continue
            cells = [name, "+ text" if with_text else "–"]
            for z in zooms:
                r = by_key.get((name, with_text, z))
                if r is None:
                    cells += ["–"] * 4
                    continue
                cells += [
                    _fmt(r["i2s"][rkey], 4),
                    _fmt(r["i2s"]["median_rank"], 2),
                    _fmt(r["s2i"][rkey], 4),
                    _fmt(r["s2i"]["median_rank"], 2),
                ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def uncertainty_table(result: dict[str, Any]) -> str | None:
    """Mean ‖σ‖₁ per modality (and metadata setting) and zoom, or None for deterministic models."""
    rows = result.get("uncertainty") or []
    if not rows:
        return None
    zooms = sorted({r["zoom"] for r in rows}, key=int)
    labels = list(
        dict.fromkeys((r["modality"], r["metadata"]) for r in rows)
    )  # first-seen order: audio, text, audio+text, image per setting, …
    values = {(r["modality"], r["metadata"], r["zoom"]): r["sigma_l1"] for r in rows}
    lines = [
        "| Modality | Metadata | " + " | ".join(f"z{z} mean ‖σ‖₁" for z in zooms) + " |",
        "|:--|:--|" + "|".join(["--:"] * len(zooms)) + "|",
    ]
    for modality, meta in labels:
        cells = [modality, meta or "–"] + [_fmt(values.get((modality, meta, z)), 4) for z in zooms]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(result: dict[str, Any]) -> str:
    """The full Markdown report: header line, sample counts, retrieval table and uncertainty table."""
    s = result.get("samples", {})
    score = "−CSD" if result.get("score") == "-csd" else "cosine"
    title = f"## Retrieval: {result.get('model', 'model')} on split {result.get('split', '?')} (ranked by {score})"
    counts = ", ".join(f"zoom {z}: {n}" for z, n in (s.get("evaluated") or {}).items())
    notes = [f"Gallery = every evaluated sample, one positive per query ({counts})."]
    if s.get("expected") is not None:
        skipped = ", ".join(f"zoom {z}: {n}" for z, n in (s.get("skipped") or {}).items())
        notes.append(f"Split rows: {s['expected']}; skipped by the data error policy: {skipped}.")
    if s.get("num_problems"):
        notes.append(f"{s['num_problems']} data problems reported (see metrics.json `samples.problems`).")
    pct = result.get("recall_pct", 10.0)
    notes.append(
        f"R@{pct:g}% = share of queries whose 1-based, tie-averaged rank is < {pct:g}/100 · N; MedR = median rank "
        "(official definitions). '+ text' adds the sample's caption to the query."
    )
    parts = [title, "", *notes, "", retrieval_table(result)]
    unc = uncertainty_table(result)
    if unc:
        parts += ["", "### Uncertainty (mean ‖σ‖₁)", "", unc]
    return "\n".join(parts) + "\n"


def _json_safe(obj: Any) -> Any:
    # NaN/inf are not JSON; a metric that could not be computed (e.g. no rank at all) becomes null.
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def write_metrics(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``metrics.json`` (strict JSON) and ``metrics.md`` into ``out_dir``, each atomically."""
    out_dir = Path(out_dir)
    js = write_text_atomic(out_dir / "metrics.json", json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n")
    md = write_text_atomic(out_dir / "metrics.md", markdown_report(result))
    return js, md
