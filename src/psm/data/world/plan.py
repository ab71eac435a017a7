"""The sample plan: for every sample its place, time, platform, events, levels, caption, format and split.

Everything but the audio itself is decided here, vectorised over all samples (50,000 take about a second),
so the same plan serves a world written to disk and a stream that renders audio on the fly.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass

import numpy as np
import pandas as pd

from psm.data.world.captions import make_caption
from psm.data.world.grid import WorldGrid
from psm.data.world.landcover import CLASS_CODES, N_CODES
from psm.data.world.rules import (
    EVENT_NAMES,
    EVENT_SNR_DB,
    PLACE_HOURS,
    PLATFORM_CAPTIONS,
    PLATFORM_FORMATS,
    PLATFORM_HOURS,
    PLATFORM_MONTHS,
    PLATFORM_PLACES,
    PLATFORM_SHARE,
    PLATFORMS,
)
from psm.data.world.truth import Truth

_PLAN_STREAM = 11  # seed-sequence tag of plan randomness
# Clip length: (share over 10 s, shortest short clip); short clips have density ∝ 1/d² on [lo, 10] s
# (or a shorter upper end, see make_plan), long ones density ∝ 1/d² on [10, 30] s.
PLATFORM_DURATIONS: dict[str, tuple[float, float]] = {
    "iNat": (0.06, 3.0),
    "yfcc": (0.20, 4.0),
    "aporee": (0.30, 5.0),
    "freesound": (0.12, 3.0),
}
YEARS = (2008, 2023)
CODE_NAME = {code: name for name, code in CLASS_CODES.items()}


@dataclass
class Plan:
    """Per-sample table plus (N, E) arrays: event labels, their probabilities and levels (dB, NaN if absent)."""

    table: pd.DataFrame
    labels: np.ndarray
    probs: np.ndarray
    snr_db: np.ndarray

    def __len__(self) -> int:
        return len(self.table)


def _ordinal(d: int) -> str:
    return f"{d}{'th' if 11 <= d % 100 <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(d % 10, 'th')}"


def format_date(platform: str, year: int, month: int, day: int, hour: int, minute: int, second: int, style: int) -> str:
    """A date string as the platform would write it (freesound: no time of day, as in GeoSound)."""
    import datetime as dt

    if platform == "yfcc":
        return f"{year:04d}-{month:02d}-{day:02d} {hour:02d}:{minute:02d}:{second:02d}.0"
    if platform == "iNat":
        if style == 0:
            h12 = hour % 12 or 12
            tz = "CEST" if 4 <= month <= 10 else "CET"
            return f"{year:04d}/{month:02d}/{day:02d} {h12}:{minute:02d} {'PM' if hour >= 12 else 'AM'} {tz}"
        wd = calendar.day_abbr[dt.date(year, month, day).weekday()]
        off, tz = ("+0200", "CEST") if 4 <= month <= 10 else ("+0100", "CET")
        clock = f"{hour:02d}:{minute:02d}:{second:02d}"
        return f"{wd} {calendar.month_abbr[month]} {day:02d} {year:04d} {clock} GMT{off} ({tz})"
    if platform == "aporee":
        return f"{month}/{day}/{year % 100:02d} {hour}:{minute:02d}"
    return f"{calendar.month_name[month]} {_ordinal(day)}, {year}"


# The keynote sounds of a place (events.background): (classes and weights, Gaussian σ in m).
AMBIENCE: dict[str, tuple[dict[str, float], float]] = {
    "urban": ({"urban_core": 1.0, "industrial": 1.0, "residential": 0.5, "road": 2.0, "airport": 0.5}, 1000.0),
    "foliage": ({"forest": 1.0, "wetland": 0.4, "residential": 0.2}, 200.0),
    "water": ({"water": 1.0, "beach": 1.0}, 150.0),
}


def ambience_at(grid: WorldGrid, fractions: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """(urban, foliage, water) keynote strengths in [0, 1] at projected points (rounded to 3 decimals)."""
    from psm.data.world.grid import bilinear
    from psm.data.world.noise import gaussian_reflect

    row, col = grid.grid_index(x, y, grid.truth_cell_m)
    out = []
    for weights, sigma in AMBIENCE.values():
        mix = sum(w * fractions[CLASS_CODES[c]] for c, w in weights.items())
        field = gaussian_reflect(mix, sigma / grid.truth_cell_m)
        out.append(np.round(np.clip(bilinear(field, row, col), 0.0, 1.0), 3))
    return tuple(out)


def _profile_choice(rng: np.random.Generator, weights: np.ndarray, n: int) -> np.ndarray:
    p = np.asarray(weights, dtype=np.float64)
    return rng.choice(p.size, size=n, p=p / p.sum())


def make_plan(
    n: int,
    seed: int,
    grid: WorldGrid,
    truth: Truth,
    fractions: np.ndarray,
    dominant: np.ndarray,
    landcover_at,
    *,
    key_prefix: str = "",
    max_short_s: float = 10.0,
    long_share_scale: float = 1.0,
) -> Plan:
    """Plan ``n`` samples. ``fractions`` (N_CODES, H, W) and ``dominant`` (H, W) are on the truth grid;
    ``landcover_at(x, y)`` returns the 10 m class codes at projected points. Short clips last up to
    ``max_short_s``; the platforms' shares of clips over 10 s are scaled by ``long_share_scale``."""
    rng = np.random.default_rng([int(seed), _PLAN_STREAM, 0])
    cell = grid.truth_cell_m
    rows, cols = grid.shape(cell)
    left, bottom, right, top = grid.region_bounds
    gl, _, _, gt = grid.raster_bounds
    r0, r1 = round((gt - top) / cell), round((gt - bottom) / cell)
    c0, c1 = round((left - gl) / cell), round((right - gl) / cell)
    region_frac = fractions[:, r0:r1, c0:c1].reshape(N_CODES, -1)

    platform_idx = _profile_choice(rng, np.array([PLATFORM_SHARE[p] for p in PLATFORMS]), n)
    x = np.zeros(n)
    y = np.zeros(n)
    month = np.zeros(n, dtype=np.int64)
    hour = np.zeros(n, dtype=np.int64)
    for k, p in enumerate(PLATFORMS):
        sel = np.flatnonzero(platform_idx == k)
        if not sel.size:
            continue
        w = np.zeros(N_CODES)
        for name, weight in PLATFORM_PLACES[p].items():
            w[CLASS_CODES[name]] = weight
        density = w @ region_frac + 0.002 * w.max()  # every place possible, some much likelier
        cells = rng.choice(density.size, size=sel.size, p=density / density.sum())
        cr, cc = np.divmod(cells, c1 - c0)
        x[sel] = left + (cc + rng.random(sel.size)) * cell
        y[sel] = top - (cr + rng.random(sel.size)) * cell
        month[sel] = 1 + _profile_choice(rng, PLATFORM_MONTHS[p], sel.size)
    platform = np.asarray(PLATFORMS, dtype=object)[platform_idx]
    # Hour: the platform's habits times those of the kind of place (dominant land cover there).
    row0, col0 = grid.grid_index(x, y, cell)
    place = dominant[np.clip(np.rint(row0).astype(int), 0, rows - 1), np.clip(np.rint(col0).astype(int), 0, cols - 1)]
    u_hour = rng.random(n)
    for k, p in enumerate(PLATFORMS):
        for code in np.unique(place[platform_idx == k]):
            sel = np.flatnonzero((platform_idx == k) & (place == code))
            w = PLATFORM_HOURS[p] * PLACE_HOURS[CODE_NAME[int(code)]]
            cdf = np.cumsum(w) / w.sum()
            hour[sel] = np.minimum(np.searchsorted(cdf, u_hour[sel], side="right"), 23)

    # Coordinates as the manifest stores them (6 decimals, ~0.1 m); the truth is taken at exactly those.
    lon, lat = grid.to_lonlat(x, y)
    lat, lon = np.round(lat, 6), np.round(lon, 6)
    x, y = grid.to_xy(lat, lon)
    x = np.clip(x, left, right)
    y = np.clip(y, bottom, top)

    probs = truth.probabilities_xy(x, y, hour, month, platform)
    labels = rng.random(probs.shape) < probs
    lo = np.array([EVENT_SNR_DB[e][0] for e in EVENT_NAMES])
    hi = np.array([EVENT_SNR_DB[e][1] for e in EVENT_NAMES])
    snr = lo + (hi - lo) * rng.random(probs.shape)
    snr = np.where(labels, np.round(snr, 2), np.nan).astype(np.float32)

    # Clip length, storage format and rate, level, date.
    long_share = np.array([PLATFORM_DURATIONS[p][0] for p in PLATFORMS])[platform_idx] * long_share_scale
    short_lo = np.minimum(np.array([PLATFORM_DURATIONS[p][1] for p in PLATFORMS])[platform_idx], max_short_s)
    u = rng.random(n)
    short = 1.0 / (1.0 / max_short_s + u * (1.0 / short_lo - 1.0 / max_short_s))
    long_ = 1.0 / (1.0 / 10.0 - u * (1.0 / 10.0 - 1.0 / 30.0))
    duration = np.round(np.where(rng.random(n) < long_share, long_, short), 2)
    fmt = np.empty(n, dtype=object)
    rate = np.zeros(n, dtype=np.int64)
    for k, p in enumerate(PLATFORMS):
        sel = np.flatnonzero(platform_idx == k)
        table = PLATFORM_FORMATS[p]
        pick = _profile_choice(rng, np.array([w for _, _, w in table]), sel.size)
        fmt[sel] = np.array([f for f, _, _ in table], dtype=object)[pick]
        rate[sel] = np.array([r for _, r, _ in table])[pick]
    fmt[(fmt == "wav") & (duration > 10.0)] = "flac"  # long WAVs would bloat the disk
    peak_dbfs = np.round(rng.uniform(-24.0, -3.0, n), 2)
    year = rng.integers(YEARS[0], YEARS[1] + 1, n)
    day_u = rng.random(n)
    minute = rng.integers(0, 60, n)
    second = rng.integers(0, 60, n)
    style = rng.integers(0, 2, n)

    point_class = landcover_at(x, y)
    ambience = ambience_at(grid, fractions, x, y)
    row, col = grid.grid_index(x, y, cell)
    dom = dominant[np.clip(np.rint(row).astype(int), 0, rows - 1), np.clip(np.rint(col).astype(int), 0, cols - 1)]

    cap_src = np.empty(n, dtype=object)
    captions = np.empty(n, dtype=object)
    dates = np.empty(n, dtype=object)
    keys = np.empty(n, dtype=object)
    paths = np.empty(n, dtype=object)
    for i in range(n):
        p = platform[i]
        crng = np.random.default_rng([int(seed), _PLAN_STREAM, 1, i])
        fams = PLATFORM_CAPTIONS[p]
        fam = list(fams)[int(crng.choice(len(fams), p=np.array(list(fams.values())) / sum(fams.values())))]
        present = [EVENT_NAMES[e] for e in np.flatnonzero(labels[i])]
        snr_i = {EVENT_NAMES[e]: float(snr[i, e]) for e in np.flatnonzero(labels[i])}
        cap_src[i] = fam
        captions[i] = make_caption(crng, fam, p, present, snr_i, CODE_NAME[int(dom[i])], int(hour[i]), int(month[i]))
        m = int(month[i])
        day = 1 + int(day_u[i] * calendar.monthrange(int(year[i]), m)[1])
        dates[i] = format_date(p, int(year[i]), m, day, int(hour[i]), int(minute[i]), int(second[i]), int(style[i]))
        keys[i] = f"{key_prefix}{i:06d}"
        paths[i] = f"audio/{i // 1000:03d}/{keys[i]}.{fmt[i]}"

    reported_hour = pd.array(hour, dtype="Int64")
    reported_hour[platform == "freesound"] = pd.NA  # the platform gives no time of day
    table = pd.DataFrame(
        {
            "key": keys.astype(str),
            "audio_path": paths.astype(str),
            "latitude": lat,
            "longitude": lon,
            "audio_source": platform.astype(str),
            "caption": captions.astype(str),
            "caption_source": cap_src.astype(str),
            "date": dates.astype(str),
            "month": pd.array(month, dtype="Int64"),
            "hour": reported_hour,
            "true_hour": hour,
            "x": np.round(x, 3),
            "y": np.round(y, 3),
            "landcover": np.asarray([CODE_NAME[int(c)] for c in point_class], dtype=object).astype(str),
            "dominant_landcover": np.asarray([CODE_NAME[int(c)] for c in dom], dtype=object).astype(str),
            "duration_s": duration,
            "sample_rate": rate,
            "format": fmt.astype(str),
            "peak_dbfs": peak_dbfs,
            "amb_urban": ambience[0],
            "amb_foliage": ambience[1],
            "amb_water": ambience[2],
        }
    )
    return Plan(table=table, labels=labels, probs=probs, snr_db=snr)
