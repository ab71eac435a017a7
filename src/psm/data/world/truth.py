"""The truth function P(event audible | place, hour, month[, platform]), vectorised.

The spatial factor of every source (rules.py) is computed once on the 100 m truth grid from the land-cover
fractions and stored (``truth/spatial.tif``, float32); the truth at any point is that grid interpolated
bilinearly (cell centres), times the source's hour and month profiles, combined over sources (noisy-OR)
and adjusted for the platform. The generator draws every label from this very function, and
:func:`psm.data.world.load_world` rebuilds it from the stored grid, so both give identical numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from psm.data.world.grid import WorldGrid, bilinear
from psm.data.world.landcover import CLASS_CODES
from psm.data.world.noise import gaussian_reflect
from psm.data.world.rules import EVENT_INDEX, EVENT_NAMES, EVENTS, PLATFORMS, apply_odds, odds_factors

DOMINANT_RADIUS_M = 250.0  # σ of the Gaussian weighting for a sample's dominant land cover


def source_list() -> list[tuple[int, object]]:
    """(event index, Source) for every source of every event, in band order of spatial.tif."""
    return [(i, s) for i, e in enumerate(EVENTS) for s in e.sources]


def source_band_names() -> list[str]:
    """Band descriptions of spatial.tif: ``<event>:<source>``."""
    return [f"{EVENTS[i].name}:{s.name}" for i, s in source_list()]


def smooth_fractions(fractions: np.ndarray, radius_m: float, cell_m: float) -> np.ndarray:
    """Class fractions (N_CODES, H, W) weighted by a Gaussian of σ = radius_m (edges reflected)."""
    out = gaussian_reflect(fractions, radius_m / cell_m)
    out[0] = 0.0
    return np.clip(out, 0.0, 1.0, out=out)


def spatial_fields(fractions: np.ndarray, cell_m: float) -> np.ndarray:
    """(n_sources, H, W) float32 spatial factors S_s from the land-cover fractions on the truth grid.

    Smoothing is linear, so each source smooths its own affinity-weighted sum of fractions once."""
    out = []
    for _, src in source_list():
        if not src.affinity:
            out.append(np.ones(fractions.shape[1:], dtype=np.float32))
            continue
        mix = np.zeros(fractions.shape[1:], dtype=np.float64)
        for name, weight in src.affinity:
            mix += weight * fractions[CLASS_CODES[name]]
        drive = gaussian_reflect(mix, src.radius_m / cell_m)
        out.append((1.0 - np.exp(-src.gain * np.maximum(drive, 0.0))).astype(np.float32))
    return np.stack(out)


def _int_array(v, lo: int, hi: int, name: str) -> np.ndarray:
    a = np.asarray(v)
    if a.dtype.kind == "f":
        if np.isnan(a).any():
            raise ValueError(f"{name} has NaN values; the truth needs a known {name}")
        if not np.all(a == np.round(a)):
            raise ValueError(f"{name} must be whole numbers (the integer {name} of the recording)")
    a = a.astype(np.int64)
    if a.size and (a.min() < lo or a.max() > hi):
        raise ValueError(f"{name} must be in {lo}..{hi}, got values {a.min()}..{a.max()}")
    return a


class Truth:
    """P(audible) of every event class anywhere in the world; see the module docstring."""

    def __init__(self, grid: WorldGrid, spatial: np.ndarray) -> None:
        self.grid = grid
        self.spatial = np.ascontiguousarray(spatial, dtype=np.float32)
        self.sources = source_list()
        if self.spatial.shape[0] != len(self.sources):
            raise ValueError(f"spatial has {self.spatial.shape[0]} bands, the rules define {len(self.sources)} sources")
        self._hours = np.stack([s.hours for _, s in self.sources])  # (S, 24)
        self._months = np.stack([s.months for _, s in self.sources])  # (S, 12)
        self._pmax = np.array([s.p_max for _, s in self.sources])
        self._event_of = np.array([i for i, _ in self.sources])

    events = EVENT_NAMES
    platforms = PLATFORMS

    def spatial_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(n_sources, N) spatial factors at projected points."""
        row, col = self.grid.grid_index(np.ravel(x), np.ravel(y), self.grid.truth_cell_m)
        return bilinear(self.spatial, row, col)

    def probabilities_xy(
        self,
        x: np.ndarray,
        y: np.ndarray,
        hour: np.ndarray | int,
        month: np.ndarray | int,
        platform: str | Sequence[str | None] | np.ndarray | None = None,
    ) -> np.ndarray:
        """(N, E) probabilities at projected points (metres of the world's CRS), float64."""
        x = np.atleast_1d(np.asarray(x, dtype=np.float64)).ravel()
        y = np.atleast_1d(np.asarray(y, dtype=np.float64)).ravel()
        n = x.size
        h = np.broadcast_to(_int_array(hour, 0, 23, "hour"), (n,)) if n else np.zeros(0, np.int64)
        m = np.broadcast_to(_int_array(month, 1, 12, "month"), (n,)) if n else np.zeros(0, np.int64)
        q = self.spatial_at(x, y)  # (S, N)
        q = q * self._pmax[:, None] * self._hours[:, h] * self._months[:, m - 1]
        miss = np.ones((len(EVENTS), n), dtype=np.float64)
        for s in range(q.shape[0]):
            miss[self._event_of[s]] *= 1.0 - q[s]
        p = (1.0 - miss).T  # (N, E)
        return apply_odds(p, self._odds(platform, n))

    def _odds(self, platform, n: int) -> np.ndarray:
        if platform is None or isinstance(platform, str):
            return odds_factors(platform)[None, :]
        plats = np.asarray(platform, dtype=object)
        if plats.shape != (n,):
            raise ValueError(f"platform must be one name or one per point ({n}), got shape {plats.shape}")
        table = {p: odds_factors(p) for p in PLATFORMS}
        table[None] = odds_factors(None)
        try:
            return np.stack([table[p] for p in plats.tolist()]) if n else np.ones((0, len(EVENTS)))
        except KeyError as e:
            raise ValueError(f"unknown platform {e.args[0]!r}; known: {', '.join(PLATFORMS)}") from None

    def probabilities(
        self,
        lat: np.ndarray,
        lon: np.ndarray,
        hour: np.ndarray | int,
        month: np.ndarray | int,
        platform: str | Sequence[str | None] | np.ndarray | None = None,
    ) -> np.ndarray:
        """(N, E) probabilities at WGS 84 points; columns follow :data:`EVENT_NAMES`."""
        x, y = self.grid.to_xy(np.atleast_1d(lat), np.atleast_1d(lon))
        return self.probabilities_xy(x, y, hour, month, platform)

    def probability(
        self,
        event: str,
        lat: np.ndarray,
        lon: np.ndarray,
        hour: np.ndarray | int,
        month: np.ndarray | int,
        platform: str | Sequence[str | None] | np.ndarray | None = None,
    ) -> np.ndarray:
        """P(``event`` audible) at WGS 84 points (vectorised over lat/lon/hour/month/platform)."""
        if event not in EVENT_INDEX:
            raise ValueError(f"unknown event {event!r}; known: {', '.join(EVENT_NAMES)}")
        lat_a, lon_a = np.broadcast_arrays(np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64))
        p = self.probabilities(lat_a.ravel(), lon_a.ravel(), hour, month, platform)[:, EVENT_INDEX[event]]
        return p.reshape(lat_a.shape)

    def layer(self, month: int, hour: int, cell_m: float | None = None, platform: str | None = None) -> np.ndarray:
        """(E, rows, cols) probabilities at the cell centres of a ``cell_m`` grid over the raster extent."""
        cell = self.grid.layer_cell_m if cell_m is None else cell_m
        rows, cols = self.grid.shape(cell)
        left, _, _, top = self.grid.raster_bounds
        xs = left + (np.arange(cols) + 0.5) * cell
        ys = top - (np.arange(rows) + 0.5) * cell
        X, Y = np.meshgrid(xs, ys)
        p = self.probabilities_xy(X.ravel(), Y.ravel(), hour, month, platform)
        return p.T.reshape(len(EVENTS), rows, cols).astype(np.float32)


def fractions_from_counts(counts: np.ndarray) -> np.ndarray:
    """(N_CODES, H, W) class fractions from per-cell class pixel counts (N_CODES, H, W)."""
    total = counts.sum(axis=0, keepdims=True)
    return (counts / np.maximum(total, 1)).astype(np.float64)


def dominant_classes(fractions: np.ndarray, cell_m: float, radius_m: float = DOMINANT_RADIUS_M) -> np.ndarray:
    """(H, W) code of the dominant class within ``radius_m`` (Gaussian σ) of each truth cell."""
    sm = smooth_fractions(fractions, radius_m, cell_m)
    sm[0] = -1.0
    return np.argmax(sm, axis=0).astype(np.uint8)
