"""The one sample type and the one batch type that every data path produces (no positional tuples)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from psm.data.metadata import Metadata, MetadataSpec

# Raw metadata fields a sample may carry; the model's MetadataSpec turns them into tokens.
RAW_METADATA_FIELDS: tuple[str, ...] = ("latitude", "longitude", "month", "hour", "audio_source", "caption_source")


@dataclass
class Sample:
    """One training/evaluation example. Audio is either a waveform (48 kHz) or precomputed CLAP features."""

    key: str
    image: Tensor  # (3, H, W), normalised for the encoder
    zoom: int
    metadata: dict[str, Any] = field(default_factory=dict)  # RAW_METADATA_FIELDS; missing or None = unknown
    caption: str | None = None
    waveform: Tensor | None = None  # (T,) float32 at 48 kHz
    audio_features: Tensor | None = None  # (4, 1001, 64) CLAP fusion features
    is_longer: bool | None = None


@dataclass
class Batch:
    """A collated batch; audio as padded waveforms (featurised on the training device) or as features."""

    keys: list[str]
    images: Tensor
    zoom: Tensor
    metadata: Metadata
    captions: list[str] | None = None
    input_ids: Tensor | None = None
    attention_mask: Tensor | None = None
    # (B,) bool: which rows have a caption; None = every row has one. A row without one is tokenised as ""
    # so that the text tower's shapes (and, under DDP, its parameters' use) do not depend on the data.
    caption_mask: Tensor | None = None
    waveforms: Tensor | None = None  # (B, T_max) zero-padded
    waveform_lengths: Tensor | None = None  # (B,)
    audio_features: Tensor | None = None  # (B, 4, 1001, 64)
    is_longer: Tensor | None = None  # (B,) bool

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move every tensor to ``device``."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = v.to(device, non_blocking=non_blocking)
            elif isinstance(v, Metadata):
                v = v.to(device)
            out[f.name] = v
        return Batch(**out)


def collate_samples(
    samples: list[Sample],
    spec: MetadataSpec,
    tokenizer: Any | None = None,
    max_length: int = 128,
    pad_to: str = "longest",
) -> Batch:
    """Stack samples into a :class:`Batch`: encode metadata with ``spec`` and tokenise captions.

    ``pad_to="longest"`` pads captions to the batch's longest (fast; identical embeddings thanks to the
    attention mask), ``"max_length"`` pads to 128 as the official loader did.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    raw = {name: [s.metadata.get(name) for s in samples] for name in RAW_METADATA_FIELDS}
    nan = float("nan")
    metadata = spec.encode(
        latitude=[nan if v is None else v for v in raw["latitude"]],
        longitude=[nan if v is None else v for v in raw["longitude"]],
        month=[nan if v is None else v for v in raw["month"]],
        hour=[nan if v is None else v for v in raw["hour"]],
        audio_source=raw["audio_source"],
        caption_source=raw["caption_source"],
    )
    batch = Batch(
        keys=[s.key for s in samples],
        images=torch.stack([s.image for s in samples]),
        zoom=torch.tensor([s.zoom for s in samples], dtype=torch.long),
        metadata=metadata,
    )
    has_caption = [s.caption is not None for s in samples]
    # With a tokenizer, every batch carries text, captioned or not: a batch (or a rank's batch under DDP)
    # whose rows all lack captions must still run the text tower, and rows that have one keep their text
    # loss (psm.losses.TriModalLoss masks the rest) instead of one missing caption dropping the batch's.
    if all(has_caption) or (tokenizer is not None):
        batch.captions = [s.caption or "" for s in samples]
        if not all(has_caption):
            batch.caption_mask = torch.tensor(has_caption)
        if tokenizer is not None:
            tok = tokenizer(
                batch.captions,
                padding=pad_to,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            batch.input_ids, batch.attention_mask = tok["input_ids"], tok["attention_mask"]
    if all(s.audio_features is not None for s in samples):
        batch.audio_features = torch.stack([s.audio_features for s in samples])
        batch.is_longer = torch.tensor([bool(s.is_longer) for s in samples])
    elif all(s.waveform is not None for s in samples):
        lengths = torch.tensor([len(s.waveform) for s in samples])
        wav = torch.zeros(len(samples), int(lengths.max()))
        for i, s in enumerate(samples):
            wav[i, : len(s.waveform)] = s.waveform
        batch.waveforms, batch.waveform_lengths = wav, lengths
    else:
        raise ValueError("samples mix waveforms and precomputed audio features, or lack audio")
    return batch
