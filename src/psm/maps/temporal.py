"""Temporal maps: one query over hours (or months) on one shared scale → frames and an animated GIF (Figure 4).

Each frame is the same query under another hour (or month), every other metadata fixed; the frames share one
colour scale (joint percentiles of all frames, or a shared scale file), so a change of colour between frames
is a change of score, not of normalisation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from psm.maps.query import (
    MapIndex,
    MapQueryError,
    MetadataSetting,
    QueryEmbedding,
    Scale,
    ScaleSpec,
    condition,
    default_zoom,
    map_tags,
    resolve_scale,
    score,
    score_label,
)
from psm.maps.render import MapLegend, MapOutputs, render_map, write_gif, write_mp4

log = logging.getLogger(__name__)

NO_METADATA = MetadataSetting()
SHARED_SCALE = ScaleSpec("shared")


@dataclass
class TemporalMaps:
    """The frames of a temporal map (in order), the animation files and the shared scale."""

    dimension: str
    values: list[float]
    frames: list[MapOutputs]
    scale: Scale
    gif: Path | None = None
    mp4: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def frame_suffix(dimension: str, value: float) -> str:
    """File suffix of a frame, e.g. ``h06`` for hour 6 or ``m05`` for month 5."""
    v = f"{value:02g}" if float(value).is_integer() else f"{value:g}".replace(".", "p")
    return ("h" if dimension == "hour" else "m") + (v if len(v) > 1 else "0" + v)


def temporal_maps(
    index: MapIndex,
    model: Any,
    query: QueryEmbedding,
    prefix: str | Path,
    *,
    hours: Sequence[float] | None = None,
    months: Sequence[float] | None = None,
    zoom: int | None = None,
    base: MetadataSetting = NO_METADATA,
    scale: ScaleSpec = SHARED_SCALE,
    cmap: str = "viridis",
    basemap: str | None = None,
    width_px: int = 900,
    formats: Sequence[str] = ("tif", "png"),
    gif: bool = True,
    mp4: bool = False,
    duration_ms: int = 900,
    cache_dir: str | Path | None = None,
    allow_incomplete: bool = False,
    batch_size: int = 4096,
    device: str | torch.device | None = None,
    precision: str = "float32",
    scorer: str | None = None,
) -> TemporalMaps:
    """One query over ``hours`` or ``months`` (the other metadata from ``base``) with one shared scale.

    Writes PREFIX_hHH.tif/.png per frame (``formats``), PREFIX.gif, and PREFIX.mp4 when ``mp4`` and an
    ffmpeg are available. ``scale``: ``shared`` (joint 2–98 % of all frames; ``shared:FILE`` reads or writes
    the scale file), ``percentile`` (the same, joint), or ``raw`` (−CSD values, one joint colour range).
    """
    if (hours is None) == (months is None):
        raise MapQueryError("give exactly one of hours or months")
    dimension = "hour" if hours is not None else "month"
    values = [float(v) for v in (hours if hours is not None else months)]  # type: ignore[union-attr]
    if not values:
        raise MapQueryError(f"no {dimension}s given")
    if len(set(values)) != len(values):
        raise MapQueryError(f"repeated {dimension}s in {values}")
    zoom = default_zoom(index, zoom)
    prefix = Path(prefix)

    raws, settings, conds = [], [], []
    for v in values:
        setting = replace(base, **{dimension: v})
        cond = condition(
            index,
            model,
            zoom,
            setting,
            cache_dir=cache_dir,
            allow_incomplete=allow_incomplete,
            batch_size=batch_size,
            device=device,
            precision=precision,
        )
        raws.append(score(cond, query, scorer=scorer))
        settings.append(cond.setting)
        conds.append(cond)
    label = score_label(conds[0].probabilistic)
    # One scale for every frame: joint percentiles (or the shared file), never per frame.
    spec = scale if scale.mode != "percentile" else ScaleSpec("shared", None, scale.percentiles)
    resolved = resolve_scale(spec, raws, label)
    vmin, vmax = resolved.display_range()
    model_name = index.model_name(model)

    frames = []
    for v, raw, setting, cond in zip(values, raws, settings, conds, strict=True):
        raster = index.raster(resolved.apply(raw))
        what = f"{int(v):02d}:00" if dimension == "hour" and float(v).is_integer() else f"{v:g}"
        legend = MapLegend(
            title=f"{query.label} · {dimension} {what}",
            query=query.describe(),
            metadata={**setting.describe(), "zoom": str(zoom), "model": str(model_name)},
            value_label=resolved.value_label(label),
            notes=[
                f"one scale shared by the {len(values)} frames ({dimension}s {', '.join(f'{x:g}' for x in values)})"
            ],
        )
        tags = map_tags(setting, zoom, model_name, label, query=query, scale=resolved, shared_scale=True)
        out = render_map(
            raster,
            index.grid,
            prefix.with_name(f"{prefix.name}_{frame_suffix(dimension, v)}"),
            legend=legend,
            vmin=vmin,
            vmax=vmax,
            cmap=cmap,
            basemap=basemap,
            tags=tags,
            width_px=width_px,
            formats=tuple(dict.fromkeys([*formats, "png"])),  # the animation is made of the PNG frames
        )
        out.extra.update(value=v, valid_points=int(cond.valid.sum()))
        frames.append(out)

    result = TemporalMaps(dimension=dimension, values=values, frames=frames, scale=resolved)
    pngs = [f.png for f in frames if f.png is not None]
    if gif:
        result.gif = write_gif(pngs, prefix.with_name(prefix.name + ".gif"), duration_ms=duration_ms)
    if mp4:
        result.mp4 = write_mp4(pngs, prefix.with_name(prefix.name + ".mp4"), fps=1000.0 / max(1, duration_ms))
    result.extra["raw_scores"] = raws  # per frame, before scaling (for analyses such as Spearman vs truth)
    return result
