"""Samples generated on the fly: the audio of any planned sample, rendered when asked, never written.

``large`` (50,000 samples, ~100 h of audio) would not fit a laptop's disk as files; written with
``stream=True`` its folder holds the imagery, the truth and the plan (``plan.parquet``, ``events.parquet``)
but no audio, and :func:`iter_samples` renders each clip when it is needed, bit-identical to the file a
full generation would have written. :func:`iter_shard_records` turns the stream into
:class:`psm.data.shards.ShardRecord` s for :func:`psm.data.shards.pack_records` (``psm world pack``).
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from psm.data.world.rules import EVENT_NAMES
from psm.data.world.world import World, load_world


@dataclass
class WorldSample:
    """One sample of a world with its audio (float32 mono at ``sample_rate``) and its truth."""

    index: int
    key: str
    latitude: float
    longitude: float
    month: int
    hour: int | None  # as the platform reports it (None for freesound)
    true_hour: int
    audio_source: str
    caption: str
    caption_source: str
    date: str
    split: str
    events: tuple[str, ...]
    probabilities: np.ndarray  # (E,) P(audible) of every event for this place, time and platform
    waveform: np.ndarray
    sample_rate: int
    format: str
    metadata: dict = field(default_factory=dict)

    def encoded(self) -> bytes:
        """The audio file's bytes in the sample's planned format (identical to a written world's file)."""
        from psm.data.world.mixing import encode

        return encode(self.waveform, self.sample_rate, self.format, serial=zlib.crc32(self.key.encode()))

    def meta(self) -> dict:
        """Shard metadata (the keys of :func:`psm.data.manifest.manifest_records`), plus the true labels."""
        return {
            "latitude": self.latitude,
            "longitude": self.longitude,
            "month": self.month,
            "hour": self.hour,
            "audio_source": self.audio_source,
            "caption_source": self.caption_source,
            "caption": self.caption,
            "split": self.split,
            "date": self.date,
            "events": list(self.events),
        }


def _world(world: World | str) -> World:
    return world if isinstance(world, World) else load_world(world)


def _tables(w: World) -> tuple[pd.DataFrame, pd.DataFrame]:
    return w.manifest(), w.events_table()


def iter_samples(
    world: World | str,
    *,
    split: str | None = None,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[WorldSample]:
    """Render samples ``start:stop`` of a world (optionally one split) in plan order."""
    from psm.data.world.generate import ambience_of
    from psm.data.world.mixing import render_clip

    w = _world(world)
    manifest, ev = _tables(w)
    snr = ev[[f"snr_{e}" for e in EVENT_NAMES]].to_numpy(dtype=np.float32)
    probs = ev[[f"p_{e}" for e in EVENT_NAMES]].to_numpy(dtype=np.float64)
    stop = len(manifest) if stop is None else min(stop, len(manifest))
    for i in range(max(0, start), stop):
        row = manifest.iloc[i]
        if split is not None and row["split"] != split:
            continue
        e = ev.iloc[i]
        rate = int(e["sample_rate"])
        audio = render_clip(w.seed, i, float(e["duration_s"]), rate, snr[i], float(e["peak_dbfs"]), ambience_of(ev, i))
        yield WorldSample(
            index=i,
            key=str(row["key"]),
            latitude=float(row["latitude"]),
            longitude=float(row["longitude"]),
            month=int(row["month"]),
            hour=None if pd.isna(row["hour"]) else int(row["hour"]),
            true_hour=int(e["true_hour"]),
            audio_source=str(row["audio_source"]),
            caption=str(row["caption"]),
            caption_source=str(row["caption_source"]),
            date=str(row["date"]),
            split=str(row["split"]),
            events=tuple(EVENT_NAMES[j] for j in np.flatnonzero(np.isfinite(snr[i]))),
            probabilities=probs[i],
            waveform=audio,
            sample_rate=rate,
            format=str(e["format"]),
            metadata={"landcover": e["landcover"], "dominant_landcover": e["dominant_landcover"]},
        )


def iter_shard_records(
    world: World | str,
    *,
    split: str | None = None,
    start: int = 0,
    stop: int | None = None,
    image_format: str = "png",
) -> Iterator:
    """:class:`~psm.data.shards.ShardRecord` s of streamed samples: encoded audio and the raw imagery window
    the largest zoom needs (1280 px around the sample), like ``psm data pack`` makes from a manifest."""
    from PIL import Image

    from psm.data.imagery import read_raster_window
    from psm.data.imagery_sources import get_imagery_source
    from psm.data.shards import ShardRecord

    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    w = _world(world)
    source = get_imagery_source("sentinel2")
    size = max(source.zoom_levels) * source.tile_size
    import rasterio

    with rasterio.open(w.mosaic_path) as mosaic:
        for s in iter_samples(w, split=split, start=start, stop=stop):
            window = read_raster_window(mosaic, s.latitude, s.longitude, size_px=size, gsd_m=source.base_gsd_m)
            buf = io.BytesIO()
            if image_format == "png":
                Image.fromarray(window).save(buf, format="PNG", compress_level=1)
            else:
                Image.fromarray(window).save(buf, format="JPEG", quality=95)
            yield ShardRecord(
                key=s.key,
                meta=s.meta(),
                image=buf.getvalue(),
                image_ext=image_format,
                audio=s.encoded(),
                audio_ext=s.format,
            )
