"""Embedding a split once for every evaluation: audio and text once, pre-fusion image features per zoom.

Metadata fusion is cheap next to the ViT, so image features are cached per zoom level and fused afterwards
for each metadata setting (all, none, each single type) — one pass over the images per zoom instead of one
per (zoom, setting). ``psm embed`` writes the same embeddings to Parquet.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from psm.data.batch import Batch, Sample, collate_samples
from psm.data.metadata import Metadata, MetadataSpec
from psm.data.text import MAX_LENGTH
from psm.models.heads import GaussianEmbedding
from psm.models.psm import PSM

BatchesForZoom = Callable[[int], Iterable[Batch | None]]


class NothingLoadedError(ValueError):
    """No sample of the split could be loaded: every one was skipped by the data error policy."""


def nothing_loaded_message(manifest: str | Path, split: str | None, problems: Sequence[object]) -> str:
    """Why nothing loaded, naming the manifest, the split and the first problem (file, row, key, reason)."""
    reasons = list(dict.fromkeys(str(p) for p in problems))
    first = f"; first: {reasons[0]}" if reasons else ""
    return f"{manifest}: no sample of split {split!r} could be loaded ({len(reasons)} problems{first})"


@dataclass
class ZoomFeatures:
    """Pre-fusion image features of the samples that loaded at one zoom level."""

    index: Tensor  # (n,) long: rows of SplitEmbeddings.keys, in data order
    features: Tensor  # (n, D) float32, CPU
    metadata: Metadata  # encoded metadata aligned with ``index`` (CPU)


@dataclass
class SplitEmbeddings:
    """Everything evaluation needs from one split; rows of ``audio``/``text`` follow ``keys``.

    ``text`` rows of samples without a caption hold a zero raw mean and zero log σ² (so adding them to a
    query changes nothing) and a NaN unit mean; ``has_caption`` marks the real ones.
    """

    keys: list[str]
    audio: GaussianEmbedding
    text: GaussianEmbedding | None
    has_caption: Tensor  # (N,) bool
    zooms: dict[int, ZoomFeatures] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


def take(emb: GaussianEmbedding, index: Tensor) -> GaussianEmbedding:
    """Rows ``index`` of an embedding."""
    return GaussianEmbedding(
        emb.mean[index], None if emb.logvar is None else emb.logvar[index], emb.unnormalized_mean[index]
    )


def to_device(emb: GaussianEmbedding, device: torch.device | str) -> GaussianEmbedding:
    """The embedding moved to ``device``."""
    return GaussianEmbedding(
        emb.mean.to(device), None if emb.logvar is None else emb.logvar.to(device), emb.unnormalized_mean.to(device)
    )


def _cat(parts: Sequence[GaussianEmbedding]) -> GaussianEmbedding:
    return GaussianEmbedding(
        torch.cat([p.mean for p in parts]),
        None if parts[0].logvar is None else torch.cat([p.logvar for p in parts]),
        torch.cat([p.unnormalized_mean for p in parts]),
    )


def eval_collate(spec: MetadataSpec) -> Callable[[Sequence[Sample | None]], Batch | None]:
    """A ``collate_fn`` for evaluation: drops skipped samples and keeps every caption, None included.

    ``collate_samples`` drops all captions of a batch when one is missing; evaluation tokenises per sample
    instead, so one caption-less sample does not cost its batch-mates their text.
    """

    def collate(samples: Sequence[Sample | None]) -> Batch | None:
        kept = [s for s in samples if s is not None]
        if not kept:
            return None
        batch = collate_samples(kept, spec, tokenizer=None)
        batch.captions = [s.caption for s in kept]  # may hold None: handled by embed_split
        return batch

    return collate


def _audio_inputs(batch: Batch, rows: Tensor) -> tuple[Tensor, Tensor]:
    from psm.data.audio import clap_fusion_features

    if batch.audio_features is not None:
        return batch.audio_features[rows], batch.is_longer[rows]
    if batch.waveforms is None or batch.waveform_lengths is None:
        raise ValueError("batch has neither audio features nor waveforms")
    lengths = batch.waveform_lengths[rows]
    wav = batch.waveforms[rows][:, : int(lengths.max())]
    # No generator and no chunk starts: the fixed middle chunk choice, so evaluation is deterministic.
    return clap_fusion_features(wav, lengths.cpu())


def _text_inputs(
    batch: Batch, rows: list[int], tokenizer: Any | None, max_length: int
) -> tuple[list[int], Tensor, Tensor] | None:
    """(positions in ``rows`` that have a caption, input_ids, attention_mask), or None without text."""
    if batch.input_ids is not None and batch.attention_mask is not None:
        ids, mask = batch.input_ids[rows], batch.attention_mask[rows]
        width = max(1, int(mask.sum(1).max()))  # batch-level padding: trim to these rows' longest caption
        return list(range(len(rows))), ids[:, :width], mask[:, :width]
    if batch.captions is None or tokenizer is None:
        return None
    present = [j for j, r in enumerate(rows) if batch.captions[r] is not None]
    if not present:
        return None
    tok = tokenizer(
        [batch.captions[rows[j]] for j in present],
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return present, tok["input_ids"], tok["attention_mask"]


@torch.inference_mode()
def embed_split(
    model: PSM,
    batches_for_zoom: BatchesForZoom,
    zooms: Sequence[int],
    *,
    tokenizer: Any | None = None,
    device: torch.device | str | None = None,
    max_length: int = MAX_LENGTH,
    progress: Callable[[str], None] | None = None,
) -> SplitEmbeddings:
    """Embed a split: pre-fusion image features for each zoom, audio and text once per sample key.

    ``batches_for_zoom(z)`` yields collated batches (None for fully skipped ones) with images at zoom ``z``.
    Audio comes as precomputed CLAP features or as waveforms, featurised on ``device`` with the
    deterministic chunk choice. Text comes as ``input_ids`` or as captions tokenised with ``tokenizer``.
    """
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with_text = model.text is not None
    index: dict[str, int] = {}
    audio_parts: list[GaussianEmbedding] = []
    text_raw: list[Tensor] = []
    text_logvar: list[Tensor] = []
    has_caption: list[Tensor] = []
    per_zoom: dict[int, ZoomFeatures] = {}
    dim = model.config.embed_dim
    probabilistic = model.config.probabilistic

    for zoom in zooms:
        idx: list[int] = []
        feats: list[Tensor] = []
        metas: list[Metadata] = []
        seen: set[str] = set()
        for batch in batches_for_zoom(int(zoom)):
            if batch is None or len(batch) == 0:
                continue
            dup = [k for k in batch.keys if k in seen]
            if dup or len(set(batch.keys)) != len(batch.keys):
                raise ValueError(
                    f"duplicate sample keys in the split (e.g. {dup[:3] or batch.keys[:3]}); keys must be unique"
                )
            seen.update(batch.keys)
            batch = batch.to(device)
            feats.append(model.image_features(batch.images, batch.zoom).float().cpu())
            metas.append(batch.metadata.to("cpu"))
            new = [i for i, k in enumerate(batch.keys) if k not in index]
            for k in batch.keys:
                if k not in index:
                    index[k] = len(index)
                idx.append(index[k])
            if not new:
                continue
            rows = torch.tensor(new, device=device)
            audio = model.encode_audio(*_audio_inputs(batch, rows))
            audio_parts.append(to_device(audio.detach(), "cpu"))
            if with_text:
                raw = torch.zeros(len(new), dim)
                lv = torch.zeros(len(new), dim)
                present = torch.zeros(len(new), dtype=torch.bool)
                text_in = _text_inputs(batch, new, tokenizer, max_length)
                if text_in is not None:
                    pos, ids, mask = text_in
                    t = model.encode_text(ids.to(device), mask.to(device))
                    raw[pos] = t.unnormalized_mean.float().cpu()
                    if t.logvar is not None:
                        lv[pos] = t.logvar.float().cpu()
                    present[pos] = True
                text_raw.append(raw)
                text_logvar.append(lv)
                has_caption.append(present)
        n = len(idx)
        per_zoom[int(zoom)] = ZoomFeatures(
            index=torch.tensor(idx, dtype=torch.long),
            features=torch.cat(feats) if feats else torch.zeros(0, dim),
            metadata=Metadata.concat(metas) if metas else Metadata(),
        )
        if progress is not None:
            progress(f"zoom {zoom}: embedded {n} samples")

    if not index:
        raise NothingLoadedError("no sample could be loaded: nothing to evaluate")
    audio_all = _cat(audio_parts)
    text_all = None
    captions = torch.zeros(len(index), dtype=torch.bool)
    if with_text:
        raw = torch.cat(text_raw)
        captions = torch.cat(has_caption)
        mean = raw / raw.norm(dim=-1, keepdim=True)
        mean[~captions] = float("nan")
        text_all = GaussianEmbedding(mean, torch.cat(text_logvar) if probabilistic else None, raw)
        if not captions.any():
            text_all = None  # no caption anywhere (or no tokenizer): nothing to add to the queries
    return SplitEmbeddings(list(index), audio_all, text_all, captions, per_zoom)


@torch.inference_mode()
def fuse_image(
    model: PSM,
    zf: ZoomFeatures,
    keep_metadata: Sequence[str] | None,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 1024,
) -> GaussianEmbedding:
    """Image embeddings of one zoom with the metadata named in ``keep_metadata`` (None: all, (): none)."""
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    uses_metadata = model.image.fusion is not None
    parts = []
    for i in range(0, len(zf.index), batch_size):
        sl = slice(i, i + batch_size)
        meta = zf.metadata.select(sl).to(device) if uses_metadata else None
        keep = keep_metadata if uses_metadata else None
        emb = model.embed_image_features(zf.features[sl].to(device), meta, keep_metadata=keep)
        parts.append(emb.detach())
    if not parts:
        dim = model.config.embed_dim
        empty = torch.zeros(0, dim, device=device)
        return GaussianEmbedding(empty, empty.clone() if model.config.probabilistic else None, empty.clone())
    return _cat(parts)


# --- Parquet export -------------------------------------------------------------------------------------


def _vector_column(values: Tensor, present: np.ndarray | None = None) -> Any:
    import pyarrow as pa

    arr = values.detach().float().cpu().numpy().astype(np.float32, copy=False)
    dim = arr.shape[1]
    # Zero only the hidden slots of null rows: a present row's NaN or inf is data and stays as it is.
    flat = np.where(present[:, None], arr, np.float32(0)) if present is not None else arr
    mask = None if present is None else pa.array(~present)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim, mask=mask)


def _scatter(n: int, index: Tensor, values: Tensor) -> Tensor:
    out = torch.zeros(n, values.shape[1], dtype=torch.float32)
    out[index] = values.float().cpu()
    return out


def embeddings_table(
    model: PSM,
    emb: SplitEmbeddings,
    *,
    row_info: dict[str, dict[str, Any]] | None = None,
    device: torch.device | str | None = None,
    file_metadata: dict[str, Any] | None = None,
) -> Any:
    """A pyarrow Table: one row per sample key, μ (unit and raw) and log σ² of every modality.

    Image columns per zoom ``z``: ``image_features_z{z}`` (pre-fusion) and ``image_{mean,mean_raw,logvar}_z{z}``
    fused with all metadata; null where the sample did not load at that zoom. ``text_*`` is null where the
    sample has no caption. ``row_info`` (key → dict) adds per-sample columns (split, lat/lon, sources, …).
    """
    import pyarrow as pa

    n = len(emb.keys)
    cols: dict[str, Any] = {"key": pa.array(emb.keys, pa.string())}
    if row_info:
        names = list(dict.fromkeys(name for info in row_info.values() for name in info))
        for name in names:
            cols[name] = pa.array([row_info.get(k, {}).get(name) for k in emb.keys])

    def add(prefix: str, e: GaussianEmbedding, present: np.ndarray | None, suffix: str = "") -> None:
        cols[f"{prefix}_mean{suffix}"] = _vector_column(e.mean, present)
        cols[f"{prefix}_mean_raw{suffix}"] = _vector_column(e.unnormalized_mean, present)
        if e.logvar is not None:
            cols[f"{prefix}_logvar{suffix}"] = _vector_column(e.logvar, present)

    add("audio", emb.audio, None)
    if emb.text is not None:
        add("text", emb.text, emb.has_caption.numpy())
    for zoom, zf in emb.zooms.items():
        present = np.zeros(n, dtype=bool)
        present[zf.index.numpy()] = True
        cols[f"image_features_z{zoom}"] = _vector_column(_scatter(n, zf.index, zf.features), present)
        fused = fuse_image(model, zf, None, device=device)
        full = GaussianEmbedding(
            _scatter(n, zf.index, fused.mean),
            None if fused.logvar is None else _scatter(n, zf.index, fused.logvar),
            _scatter(n, zf.index, fused.unnormalized_mean),
        )
        add("image", full, present, suffix=f"_z{zoom}")
    meta = {
        "format": "psm-embeddings",
        "format_version": 1,
        "model": model.config.name,
        "embed_dim": model.config.embed_dim,
        "probabilistic": model.config.probabilistic,
        "zooms": sorted(emb.zooms),
        "image_metadata": list(model.config.metadata.types),
        "columns": "*_mean: unit μ; *_mean_raw: μ before l2 normalisation; *_logvar: log σ²",
        **(file_metadata or {}),
    }
    table = pa.table(cols)
    return table.replace_schema_metadata({b"psm": json.dumps(meta).encode()})


def write_parquet_atomic(table: Any, path: str | Path) -> Path:
    """Write ``table`` to ``path`` via a temporary file in the same folder and a rename (never half-written)."""
    import pyarrow.parquet as pq

    from psm.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path
