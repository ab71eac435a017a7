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
