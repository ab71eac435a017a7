"""Metadata of a recording (place, month, hour, platform, caption source): names, vocabularies, encodings.

This is the single definition of every metadata encoding in psm. The official code keeps four copies
(loader and three map scripts) and one of them slices lat/lon wrongly; here the data pipeline, the model
and the map scripts all call :class:`MetadataSpec`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch import Tensor

# Token order of the fusion transformer, as in the official code: [CLS, image, asource, tsource, latlong,
# month, time]. The transformer has no positional embedding, so the order only matters for checkpoints.
METADATA_TYPES: tuple[str, ...] = ("audio_source", "caption_source", "location", "month", "hour")

# Names used by the official code (``--metadata_type latlong_month_time_asource_tsource``).
OFFICIAL_METADATA_NAMES: dict[str, str] = {
    "asource": "audio_source",
    "tsource": "caption_source",
    "latlong": "location",
    "month": "month",
    "time": "hour",
}

# Width of each continuous encoding (categorical types are embedded from an id).
ENCODING_WIDTH: dict[str, int] = {"location": 4, "month": 2, "hour": 2}
CATEGORICAL_TYPES: tuple[str, ...] = ("audio_source", "caption_source")

# GeoSound's vocabularies with the official ids (index = id).
OFFICIAL_AUDIO_SOURCES: tuple[str, ...] = ("yfcc", "iNat", "aporee", "freesound")
OFFICIAL_CAPTION_SOURCES: tuple[str, ...] = ("meta", "qwen", "pengi")


def _is_missing(item: object) -> bool:
    """None, NaN, or pandas' NA / NaT (a nullable string column's gaps): a value left out."""
    if item is None:
        return True
    try:
        return bool(item != item)  # only NaN (and NaT) differ from themselves
    except TypeError:  # pandas NA: its truth value is ambiguous, which only a missing value answers
        return True


class MetadataError(ValueError):
    """Bad metadata: an unknown type or source name, or a value out of range."""


def check_metadata_names(names: Iterable[str], allowed: Sequence[str] = METADATA_TYPES) -> tuple[str, ...]:
    """Validate metadata type names (ours or the official aliases) and return them in our names."""
    out = []
    for name in names:
        canonical = OFFICIAL_METADATA_NAMES.get(name, name)
        if canonical not in allowed:
            raise MetadataError(f"unknown metadata type {name!r}; this model knows: {', '.join(allowed) or '(none)'}")
        out.append(canonical)
    return tuple(out)


def parse_official_metadata_type(value: str) -> tuple[str, ...]:
    """Turn the official ``metadata_type`` string (e.g. ``latlong_month_time``, ``none``) into type names."""
    if value in ("", "none"):
        return ()
    present = {OFFICIAL_METADATA_NAMES[k] for k in OFFICIAL_METADATA_NAMES if k in value.split("_")}
    return tuple(t for t in METADATA_TYPES if t in present)


@dataclass(frozen=True)
class MetadataSpec:
    """Which metadata a model uses, its vocabularies and the exact encoding formulas.

    Defaults reproduce the official code, quirks included (see docs/faithfulness.md):
    ``latitude_period_deg=180`` encodes lat as sin/cos(2π·lat/180) = sin/cos(π·lat/90), so lat +90 and -90
    coincide; ``hour_period=23`` makes hours 0 and 23 coincide. Set 360 and 24 to fix them (new models only).
    """

    types: tuple[str, ...] = METADATA_TYPES
    audio_sources: tuple[str, ...] = OFFICIAL_AUDIO_SOURCES
    caption_sources: tuple[str, ...] = OFFICIAL_CAPTION_SOURCES
    latitude_period_deg: float = 180.0
    longitude_period_deg: float = 360.0
    month_period: float = 12.0
    hour_period: float = 23.0

    def __post_init__(self) -> None:
        types = check_metadata_names(self.types)
        # Keep the official token order whatever order the user listed.
        object.__setattr__(self, "types", tuple(t for t in METADATA_TYPES if t in types))
        object.__setattr__(self, "audio_sources", tuple(self.audio_sources))
        object.__setattr__(self, "caption_sources", tuple(self.caption_sources))
        for name in ("audio_sources", "caption_sources"):
            vocab = getattr(self, name)
            if len(set(vocab)) != len(vocab) or not vocab:
                raise MetadataError(f"{name} must be a non-empty list of distinct names, got {vocab!r}")

    @classmethod
    def from_dict(cls, d: Mapping | None) -> MetadataSpec:
        """Build from a config mapping; unknown keys are an error so that typos do not pass silently."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise MetadataError(f"unknown metadata config keys {sorted(unknown)}; known: {sorted(known)}")
        for key in ("types", "audio_sources", "caption_sources"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def to_dict(self) -> dict:
        """Plain-YAML form of this spec."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    # --- encodings ------------------------------------------------------------------------------
    def encode_location(self, latitude: Tensor, longitude: Tensor) -> Tensor:
        """[sin, cos](2π·lat/P_lat) ++ [sin, cos](2π·lon/P_lon) → (..., 4)."""
        lat = 2 * math.pi * latitude / self.latitude_period_deg
        lon = 2 * math.pi * longitude / self.longitude_period_deg
        return torch.stack([lat.sin(), lat.cos(), lon.sin(), lon.cos()], dim=-1)

    def encode_month(self, month: Tensor) -> Tensor:
        """[sin, cos](2π·m/12) for m in 1..12 → (..., 2)."""
        angle = 2 * math.pi * month / self.month_period
        return torch.stack([angle.sin(), angle.cos()], dim=-1)

    def encode_hour(self, hour: Tensor) -> Tensor:
        """[sin, cos](2π·h/P_hour) for h in 0..23 → (..., 2); official P_hour = 23."""
        angle = 2 * math.pi * hour / self.hour_period
        return torch.stack([angle.sin(), angle.cos()], dim=-1)

    def source_id(self, kind: str, name: str | int) -> int:
        """Id of an audio or caption source name (``kind`` is ``audio_source`` or ``caption_source``)."""
        vocab = self.audio_sources if kind == "audio_source" else self.caption_sources
        if isinstance(name, (int, np.integer)):
            if not 0 <= int(name) < len(vocab):
                raise MetadataError(f"{kind} id {name} out of range 0..{len(vocab) - 1}")
            return int(name)
        try:
            return vocab.index(name)
        except ValueError:
            raise MetadataError(f"unknown {kind} {name!r}; known: {', '.join(vocab)}") from None

    def encode(
        self,
        *,
        latitude: Sequence[float] | Tensor | None = None,
        longitude: Sequence[float] | Tensor | None = None,
        month: Sequence[float] | Tensor | None = None,
        hour: Sequence[float] | Tensor | None = None,
        audio_source: Sequence[str | int] | Tensor | None = None,
        caption_source: Sequence[str | int] | Tensor | None = None,
        batch_size: int | None = None,
    ) -> Metadata:
        """Encode raw metadata for a batch. Anything left out, or NaN, is marked invalid (masked in fusion).

        Values are range-checked (lat in [-90, 90], lon in [-180, 180], month 1..12, hour 0..23) and a bad
        value raises :class:`MetadataError` naming the batch row.
        """
        raw = {
            "latitude": latitude,
            "longitude": longitude,
            "month": month,
            "hour": hour,
            "audio_source": audio_source,
            "caption_source": caption_source,
        }
        sizes = {k: len(v) for k, v in raw.items() if v is not None}
        if batch_size is None:
            if not sizes:
                raise MetadataError("encode() needs at least one metadata field or batch_size")
            batch_size = next(iter(sizes.values()))
        bad = {k: n for k, n in sizes.items() if n != batch_size}
        if bad:
            raise MetadataError(f"metadata fields have different lengths: {bad}, expected {batch_size}")
        if (latitude is None) != (longitude is None):
            raise MetadataError("latitude and longitude must be given together")

        def floats(v) -> Tensor:
            return torch.as_tensor(np.asarray(v, dtype=np.float64) if not isinstance(v, Tensor) else v).to(
                torch.float64
            )

        values: dict[str, Tensor] = {}
        valid: dict[str, Tensor] = {}
        zeros_valid = torch.zeros(batch_size, dtype=torch.bool)

        if latitude is not None:
            lat, lon = floats(latitude), floats(longitude)
            ok = ~(lat.isnan() | lon.isnan())
            _check_range("latitude", lat, -90, 90, ok)
            _check_range("longitude", lon, -180, 180, ok)
            values["location"] = torch.where(ok[:, None], self.encode_location(lat.nan_to_num(), lon.nan_to_num()), 0.0)
            valid["location"] = ok
        for name, lo, hi, enc in (("month", 1, 12, self.encode_month), ("hour", 0, 23, self.encode_hour)):
            v = raw[name]
            if v is None:
                continue
            t = floats(v)
            ok = ~t.isnan()
            _check_range(name, t, lo, hi, ok)
            # Invalid entries are encoded as zeros, as the official loader does.
            values[name] = torch.where(ok[:, None], enc(t.nan_to_num()), 0.0)
            valid[name] = ok
        for name in CATEGORICAL_TYPES:
            v = raw[name]
            if v is None:
                continue
            if isinstance(v, Tensor):
                ids = v.long()
                for row, i in enumerate(ids.tolist()):
                    if i >= 0:
                        try:
                            self.source_id(name, i)
                        except MetadataError as e:
                            raise MetadataError(f"row {row}: {e}") from None
            else:
                id_list = []
                for row, item in enumerate(v):
                    if _is_missing(item):
                        id_list.append(-1)
                        continue
                    try:
                        id_list.append(self.source_id(name, item))
                    except MetadataError as e:
                        raise MetadataError(f"row {row}: {e}") from None
                ids = torch.tensor(id_list, dtype=torch.long)
            valid[name] = ids >= 0
            values[name] = ids.clamp(min=0)
        for name in self.types:
            if name not in values:
                width = ENCODING_WIDTH.get(name)
                values[name] = (
                    torch.zeros(batch_size, dtype=torch.long)
                    if width is None
                    else torch.zeros(batch_size, width, dtype=torch.float64)
                )
                valid[name] = zeros_valid.clone()
        return Metadata(
            values={k: (v.float() if v.is_floating_point() else v) for k, v in values.items()},
            valid=valid,
        )


def _check_range(name: str, t: Tensor, lo: float, hi: float, ok: Tensor) -> None:
    bad = ok & ((t < lo) | (t > hi))
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        shown = ", ".join(f"row {r}: {t[r].item():g}" for r in rows[:5])
        raise MetadataError(f"{name} out of range [{lo}, {hi}] ({len(rows)} rows; {shown})")


@dataclass
class Metadata:
    """Encoded metadata of a batch: ``values[type]`` (ids or encodings) and ``valid[type]`` (B,) bool."""

    values: dict[str, Tensor] = field(default_factory=dict)
    valid: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Metadata:
        """Move every tensor to ``device``."""
        return Metadata(
            {k: v.to(device) for k, v in self.values.items()},
            {k: v.to(device) for k, v in self.valid.items()},
        )

    def __len__(self) -> int:
        for v in self.valid.values():
            return len(v)
        return 0

    def select(self, index: Tensor | slice) -> Metadata:
        """Rows ``index`` of every field."""
        return Metadata({k: v[index] for k, v in self.values.items()}, {k: v[index] for k, v in self.valid.items()})

    @staticmethod
    def concat(parts: Sequence[Metadata]) -> Metadata:
        """Concatenate batches along the batch dimension."""
        keys = parts[0].values.keys()
        return Metadata(
            {k: torch.cat([p.values[k] for p in parts]) for k in keys},
            {k: torch.cat([p.valid[k] for p in parts]) for k in keys},
        )
