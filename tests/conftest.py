"""Shared fixtures: the tiny model and the path to ../shared/data (tests using it skip when it is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test when that folder (or file) is not there."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture(autouse=True)
def _few_threads():
    # The CI machine has 2 cores; keep torch from oversubscribing them when tests run.
    torch.set_num_threads(2)


@pytest.fixture
def tiny_model():
    from psm.models.factory import create_model

    return create_model("psm-tiny", seed=0)


def tiny_batch(model, batch_size: int = 4, seed: int = 0, zooms=(1, 3, 5, 1)):
    """Random inputs of the right shapes for ``model`` (images, zoom, audio, is_longer, text, metadata)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    size = cfg.image.img_size
    images = torch.randn(batch_size, 3, size, size, generator=g)
    zoom = torch.tensor([zooms[i % len(zooms)] for i in range(batch_size)])
    audio = torch.randn(batch_size, 4, 1001, 64, generator=g)
    is_longer = torch.arange(batch_size) % 2 == 0
    ids = torch.randint(0, cfg.text.hf_config.get("vocab_size", 1024), (batch_size, 12), generator=g)
    mask = torch.ones_like(ids)
    spec = cfg.metadata
    metadata = spec.encode(
        latitude=torch.rand(batch_size, generator=g) * 180 - 90,
        longitude=torch.rand(batch_size, generator=g) * 360 - 180,
        month=torch.randint(1, 13, (batch_size,), generator=g).float(),
        hour=torch.randint(0, 24, (batch_size,), generator=g).float(),
        audio_source=[spec.audio_sources[i % len(spec.audio_sources)] for i in range(batch_size)],
        caption_source=[spec.caption_sources[i % len(spec.caption_sources)] for i in range(batch_size)],
    )
    return dict(
        images=images,
        zoom=zoom,
        audio_features=audio,
        is_longer=is_longer,
        input_ids=ids,
        attention_mask=mask,
        metadata=metadata,
    )


def make_raster_manifest(root, n: int = 24, val_every: int = 4, seed: int = 0):
    """A small real dataset: one GeoTIFF mosaic (EPSG:32633, 10 m) read as windows, WAV clips, a manifest."""
    import numpy as np
    import pandas as pd
    import rasterio
    import soundfile as sf
    from rasterio.transform import from_origin
    from rasterio.warp import transform

    rng = np.random.default_rng(seed)
    size = 3000  # a zoom-5 Sentinel-2 window is 1280 px: keep every sample ≥ 640 px from the edge
    with rasterio.open(
        root / "mosaic.tif",
        "w",
        driver="GTiff",
        height=size,
        width=size,
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=from_origin(330000, 5830000, 10, 10),
        tiled=True,
        compress="deflate",
    ) as dst:
        dst.write(rng.integers(0, 255, (3, size, size), dtype=np.uint8))
    rows = []
    for i in range(n):
        x = 330000 + 10 * (700 + (1600 * i) // max(1, n - 1))
        y = 5830000 - 10 * (700 + 230 * (i % 7))
        lon, lat = transform("EPSG:32633", "EPSG:4326", [x], [y])
        sf.write(root / f"c{i}.wav", (0.1 * rng.standard_normal(16000 * (2 + i % 5))).astype("float32"), 16000)
        rows.append(
            dict(
                key=f"k{i}",
                audio_path=f"c{i}.wav",
                latitude=lat[0],
                longitude=lon[0],
                audio_source=["iNat", "yfcc"][i % 2],
                caption=f"sound number {i} with birds",
                caption_source="meta",
                date="2020-05-01 06:00",
                image_sentinel2="mosaic.tif",
                split="val" if i % val_every == 0 else "train",
            )
        )
    pd.DataFrame(rows).to_parquet(root / "manifest.parquet")
    return root / "manifest.parquet"
