"""Uncertainty maps: ‖σ‖₁ = Σ_k exp(log σ²_k / 2) of the image embeddings per zoom level (the paper's Figure 7).

Computed by the same conditioning pass as query maps (and cached with it): by default image-only (every
metadata type masked), optionally under a metadata setting. The zooms share one colour range so that the
maps compare; the COG holds the raw ‖σ‖₁ values.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from psm.maps.query import MapIndex, MapQueryError, MetadataSetting, condition, finite_percentiles, map_tags
from psm.maps.render import MapLegend, MapOutputs, render_map

IMAGE_ONLY = MetadataSetting(location=False)


def sigma_l1_values(
    index: MapIndex,
    model: Any,
    zoom: int,
    setting: MetadataSetting = IMAGE_ONLY,
    **condition_kwargs: Any,
) -> np.ndarray:
    """(N,) float32 ‖σ‖₁ of every point's image embedding at ``zoom`` (NaN where invalid)."""
    if not model.config.probabilistic:
        raise MapQueryError("a deterministic model has no σ: uncertainty maps need a probabilistic (PCME++) model")
    cond = condition(index, model, zoom, setting, **condition_kwargs)
    if cond.sigma_l1 is None:  # pragma: no cover - guarded above
        raise MapQueryError("the conditioned embeddings carry no σ")
    return cond.sigma_l1


def uncertainty_maps(
    index: MapIndex,
    model: Any,
    prefix: str | Path,
    *,
    zooms: Sequence[int] | None = None,
    setting: MetadataSetting = IMAGE_ONLY,
    cmap: str = "magma",
    percentiles: tuple[float, float] = (2.0, 98.0),
    basemap: str | None = None,
    width_px: int = 1000,
    formats: Sequence[str] = ("tif", "png", "html"),
    cache_dir: str | Path | None = None,
    allow_incomplete: bool = False,
    batch_size: int = 4096,
    device: str | torch.device | None = None,
    precision: str = "float32",
) -> list[MapOutputs]:
    """PREFIX_zZ.tif/.png/.html of ‖σ‖₁ for each zoom (default: all of the index's), on one colour range."""
    zooms = list(index.zooms if zooms is None else [index.check_zoom(z) for z in zooms])
    kwargs = dict(
        cache_dir=cache_dir,
        allow_incomplete=allow_incomplete,
        batch_size=batch_size,
        device=device,
        precision=precision,
    )
    values = {z: sigma_l1_values(index, model, z, setting, **kwargs) for z in zooms}
    vmin, vmax = finite_percentiles(list(values.values()), *percentiles)
    resolved = setting.resolve(model.config.metadata)
    model_name = index.model_name(model)
    prefix = Path(prefix)
    outputs = []
    for z, v in values.items():
        raster = index.raster(v)
        legend = MapLegend(
            title=f"Uncertainty ‖σ‖₁ of the image embedding, zoom {z}",
            query="",
            metadata={**resolved.describe(), "zoom": str(z), "model": str(model_name)},
            value_label=f"‖σ‖₁ = Σ exp(log σ²/2) (colours: p{percentiles[0]:g}–p{percentiles[1]:g} of all zooms)",
            notes=["higher = the model is less sure what this place sounds like"],
        )
        tags = map_tags(resolved, z, model_name, "sigma_l1")
        out = render_map(
            raster,
            index.grid,
            prefix.with_name(f"{prefix.name}_z{z}"),
            legend=legend,
            vmin=vmin,
            vmax=vmax,
            cmap=cmap,
            basemap=basemap,
            tags=tags,
            width_px=width_px,
            formats=formats,
        )
        out.extra.update(zoom=z, vmin=vmin, vmax=vmax)
        outputs.append(out)
    return outputs
