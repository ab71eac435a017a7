"""A generated world read back: its truth function, files, tables and grids (:func:`load_world`)."""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from psm.data.world.grid import WorldGrid
from psm.data.world.rules import EVENT_NAMES, PLATFORMS
from psm.data.world.truth import Truth, source_band_names

if TYPE_CHECKING:
    from psm.data.world.plan import Plan


class WorldError(ValueError):
    """A folder that is not a (complete, compatible) world."""


class World:
    """A world folder. ``truth`` is the exact function the generator drew the labels from."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        meta = self.path / "world.json"
        if not meta.is_file():
            raise WorldError(f"{self.path} is not a world: no world.json (run `psm world generate`)")
        self.info = json.loads(meta.read_text(encoding="utf-8"))
        if self.info.get("format") != "psm-world":
            raise WorldError(f"{meta}: not a psm world description")
        self.grid = WorldGrid.from_dict(self.info["grid"])
        bands = self.info["truth"]["spatial_bands"]
        if bands != source_band_names():
            raise WorldError(
                f"{meta}: written by generator {self.info.get('generator_version')} with other event sources "
                f"than this psm defines; regenerate the world"
            )

    def __repr__(self) -> str:
        return f"World({str(self.path)!r}, size={self.size!r}, seed={self.seed}, samples={self.info['samples']})"

    # --- identity ----------------------------------------------------------------------------------
    @property
    def size(self) -> str:
        return self.info["size"]

    @property
    def seed(self) -> int:
        return int(self.info["seed"])

    @property
    def events(self) -> tuple[str, ...]:
        return EVENT_NAMES

    @property
    def platforms(self) -> tuple[str, ...]:
        return PLATFORMS

    @property
    def streamed(self) -> bool:
        return self.info["audio"] == "stream"

    # --- files -------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        name = self.info["files"]["manifest"] or self.info["files"]["plan"]
        return self.path / name

    @property
    def mosaic_path(self) -> Path:
        return self.path / self.info["imagery"]["mosaic"]

    @property
    def landcover_path(self) -> Path:
        return self.path / self.info["imagery"]["landcover"]

    def layer_path(self, month: int, hour: int) -> Path:
        """The truth layer file of (month, hour), if that pair was written."""
        key = f"m{int(month):02d}_h{int(hour):02d}"
        files = self.info["truth"]["layers"]["files"]
        if key not in files:
            raise KeyError(
                f"no truth layer for month {month}, hour {hour}; written: {sorted(files)} "
                f"(use world.truth.layer(month, hour) for any other)"
            )
        return self.path / files[key]

    def manifest(self) -> pd.DataFrame:
        """The manifest (or, for a streamed world, the planned manifest without audio files)."""
        return pd.read_parquet(self.manifest_path)

    def events_table(self) -> pd.DataFrame:
        """Per-sample labels, probabilities and levels (events.parquet)."""
        return pd.read_parquet(self.path / self.info["files"]["events"])

    # --- truth -------------------------------------------------------------------------------------
    @cached_property
    def truth(self) -> Truth:
        import rasterio

        with rasterio.open(self.path / self.info["truth"]["spatial"]) as src:
            spatial = src.read()
        return Truth(self.grid, spatial)

    def probability(self, event: str, lat, lon, hour, month, platform=None) -> np.ndarray:
        """P(``event`` audible | lat, lon, hour, month[, platform]) — vectorised (see :class:`Truth`)."""
        return self.truth.probability(event, lat, lon, hour, month, platform)

    def probabilities(self, lat, lon, hour, month, platform=None) -> np.ndarray:
        """(N, E) probabilities of all events, columns in :attr:`events` order."""
        return self.truth.probabilities(lat, lon, hour, month, platform)

    def read_layer(self, month: int, hour: int) -> tuple[np.ndarray, object]:
        """(E, rows, cols) float32 probabilities of the stored truth layer (month, hour), and its transform.

        Stored as uint16 × 1e-4 (the GeoTIFF's scale); ``truth.layer(month, hour)`` gives any other pair."""
        import rasterio

        with rasterio.open(self.layer_path(month, hour)) as src:
            data = src.read().astype(np.float32) * np.asarray(src.scales, dtype=np.float32)[:, None, None]
            return data, src.transform

    @cached_property
    def landcover(self) -> np.ndarray:
        """The 10 m land-cover raster (class codes), read whole."""
        import rasterio

        with rasterio.open(self.landcover_path) as src:
            return src.read(1)

    @cached_property
    def fractions(self) -> np.ndarray:
        """(N_CODES, H, W) land-cover fractions on the 100 m truth grid (index = class code; 0 unused)."""
        import rasterio

        from psm.data.world.landcover import N_CODES

        with rasterio.open(self.path / self.info["truth"]["fractions"]) as src:
            pct = src.read().astype(np.float64) / 100.0
        out = np.zeros((N_CODES, *pct.shape[1:]))
        out[1:] = pct
        return out

    def replan(self, samples: int, seed: int | None = None, **kwargs) -> Plan:
        """A new plan of ``samples`` samples in this world (no audio, no files written), with its split.

        With the world's seed and sample count it reproduces the stored plan exactly; any other seed or count
        gives fresh samples from the same truth (statistical checks, baselines)."""
        from psm.data.world.generate import SIZES, assign_split
        from psm.data.world.plan import make_plan
        from psm.data.world.truth import dominant_classes

        seed = self.seed if seed is None else int(seed)
        spec = SIZES[self.size]
        grid = self.grid
        n = self.landcover.shape[0]
        left, _, _, top = grid.raster_bounds
        classes = self.landcover

        def landcover_at(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            c = np.clip(((x - left) / grid.gsd_m).astype(int), 0, n - 1)
            r = np.clip(((top - y) / grid.gsd_m).astype(int), 0, n - 1)
            return classes[r, c]

        opts = {"max_short_s": spec.max_short_s, "long_share_scale": spec.long_share_scale}
        opts.update(kwargs)
        plan = make_plan(
            samples,
            seed,
            grid,
            self.truth,
            self.fractions,
            dominant_classes(self.fractions, grid.truth_cell_m),
            landcover_at,
            key_prefix=f"w{seed}_",
            **opts,
        )
        assign_split(plan, self.info["split"], seed)
        return plan

    def landcover_at(self, lat, lon) -> np.ndarray:
        """Land-cover class names at WGS 84 points (from the 10 m raster)."""
        import rasterio

        from psm.data.world.landcover import CLASS_CODES

        names = {v: k for k, v in CLASS_CODES.items()}
        x, y = self.grid.to_xy(np.atleast_1d(lat), np.atleast_1d(lon))
        with rasterio.open(self.landcover_path) as src:
            codes = np.array([v[0] for v in src.sample(zip(x.ravel(), y.ravel(), strict=True))])
        return np.array([names.get(int(c), "nodata") for c in codes], dtype=object).reshape(x.shape)


def load_world(path: str | os.PathLike[str]) -> World:
    """Open a generated world folder; ``load_world(d).truth`` is its truth function."""
    return World(path)
