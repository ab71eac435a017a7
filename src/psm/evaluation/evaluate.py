"""The paper's evaluation: I2S and S2I retrieval per zoom × metadata setting × with/without added text.

For each zoom level the split is embedded once (see :mod:`psm.evaluation.embed`); for each metadata setting
(all, none, each single type — the paper's Table 4) the cached image features are fused again. Queries are
ranked against the whole split (one positive per query) by −CSD (PCME++) or cosine (InfoNCE), with the
official metrics of :mod:`psm.evaluation.retrieval`. Samples the data's error policy skipped are counted, not
silently lost.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from psm.data.metadata import check_metadata_names
from psm.evaluation.embed import (
    BatchesForZoom,
    NothingLoadedError,
    SplitEmbeddings,
    embed_split,
    fuse_image,
    nothing_loaded_message,
    take,
    to_device,
)
from psm.evaluation.retrieval import fuse_query, metrics_from_ranks, retrieval_ranks, sigma_l1
from psm.models.heads import GaussianEmbedding
from psm.models.psm import PSM

log = logging.getLogger(__name__)

ALL = "all"
NONE = "none"
RESULT_FORMAT = "psm-evaluation"

MetadataSetting = tuple[str, tuple[str, ...] | None]


def metadata_settings(model: PSM, names: Sequence[str] | None = None) -> list[MetadataSetting]:
    """(name, keep_metadata) pairs: ``all`` (None), ``none`` (()), then each single type the model uses.

    A model without metadata fusion has the single setting ``none``. ``names`` selects a subset by name.
    """
    types = model.config.metadata.types if model.image.fusion is not None else ()
    settings: list[MetadataSetting] = [(NONE, ())]
    if types:
        settings = [(ALL, None), (NONE, ()), *((t, (t,)) for t in types)]
    if names is None:
        return settings
    wanted = []
    for name in names:
        canonical = name if name in (ALL, NONE) else check_metadata_names([name], types)[0]
        match = [s for s in settings if s[0] == canonical]
        if not match:
            raise ValueError(f"unknown metadata setting {name!r}; this model has {[s[0] for s in settings]}")
        if match[0] not in wanted:
            wanted.append(match[0])
    return wanted


def _mean_sigma(emb: GaussianEmbedding, rows: torch.Tensor | None = None) -> float | None:
    if emb.logvar is None:
        return None
    lv = emb.logvar if rows is None else emb.logvar[rows]
    return float(sigma_l1(lv).mean()) if len(lv) else math.nan


@torch.inference_mode()
def evaluate_embeddings(
    model: PSM,
    emb: SplitEmbeddings,
    *,
    settings: Sequence[MetadataSetting] | None = None,
    add_text: Sequence[bool] = (False, True),
    recall_pct: float = 10.0,
    device: torch.device | str | None = None,
    chunk_rows: int = 1024,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Retrieval rows and mean ‖σ‖₁ rows for every zoom in ``emb``, metadata setting and text choice.

    Each zoom's gallery is the samples that loaded at that zoom. Added text (official ``add_text``) fuses the
    sample's own caption into the image query (I2S) and into the audio query (S2I); a sample without a caption
    keeps its plain query.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    settings = list(settings) if settings is not None else metadata_settings(model)
    text_choices = [t for t in add_text if not t or emb.text is not None]
    rows: list[dict[str, Any]] = []
    sigmas: list[dict[str, Any]] = []
    for zoom, zf in emb.zooms.items():
        n = len(zf.index)
        if n == 0:
            log.warning("zoom %s: no sample loaded; skipped", zoom)
            continue
        audio = to_device(take(emb.audio, zf.index), device)
        text = to_device(take(emb.text, zf.index), device) if emb.text is not None else None
        captioned = emb.has_caption[zf.index].to(device)
        sigmas.append({"zoom": zoom, "modality": "audio", "metadata": None, "sigma_l1": _mean_sigma(audio)})
        if text is not None:
            sigmas.append(
                {"zoom": zoom, "modality": "text", "metadata": None, "sigma_l1": _mean_sigma(text, captioned)}
            )
            sigmas.append(
                {
                    "zoom": zoom,
                    "modality": "audio+text",
                    "metadata": None,
                    "sigma_l1": _mean_sigma(fuse_query(audio, text)),
                }
            )
        for name, keep in settings:
            image = fuse_image(model, zf, keep, device=device)
            sigmas.append({"zoom": zoom, "modality": "image", "metadata": name, "sigma_l1": _mean_sigma(image)})
            for with_text in text_choices:
                i2s_query = fuse_query(image, text) if with_text else image
                s2i_query = fuse_query(audio, text) if with_text else audio
                if with_text:
                    sigmas.append(
                        {
                            "zoom": zoom,
                            "modality": "image+text",
                            "metadata": name,
                            "sigma_l1": _mean_sigma(i2s_query),
                        }
                    )
                i2s = retrieval_ranks(i2s_query, audio, chunk_rows=chunk_rows)
                s2i = retrieval_ranks(s2i_query, image, chunk_rows=chunk_rows)
                rows.append(
                    {
                        "zoom": zoom,
                        "metadata": name,
                        "keep_metadata": None if keep is None else list(keep),
                        "add_text": bool(with_text),
                        "n": n,
                        "n_with_caption": int(captioned.sum()) if with_text else None,
                        "i2s": metrics_from_ranks(i2s, n, recall_pct),
                        "s2i": metrics_from_ranks(s2i, n, recall_pct),
                    }
                )
    return rows, sigmas


def evaluate_model(
    model: PSM,
    batches_for_zoom: BatchesForZoom,
    zooms: Sequence[int] = (1, 3, 5),
    *,
    tokenizer: Any | None = None,
    metadata: Sequence[str] | None = None,
    add_text: Sequence[bool] = (False, True),
    recall_pct: float = 10.0,
    device: torch.device | str | None = None,
    expected: int | None = None,
    problems: Sequence[str] = (),
    info: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Embed a split through ``batches_for_zoom(z)`` and evaluate it; returns the JSON-ready result dict.

    ``expected`` is the number of samples the split should have (e.g. its manifest rows): the difference to
    what loaded at each zoom is reported as skipped. ``metadata`` selects metadata settings by name.
    """
    settings = metadata_settings(model, metadata)
    emb = embed_split(model, batches_for_zoom, zooms, tokenizer=tokenizer, device=device, progress=progress)
    rows, sigmas = evaluate_embeddings(
        model, emb, settings=settings, add_text=add_text, recall_pct=recall_pct, device=device
    )
    evaluated = {str(z): len(zf.index) for z, zf in emb.zooms.items()}
    samples: dict[str, Any] = {
        "expected": expected,
        "evaluated": evaluated,
        "skipped": None if expected is None else {z: expected - n for z, n in evaluated.items()},
        "with_caption": int(emb.has_caption.sum()),
        "problems": list(dict.fromkeys(problems))[:200],
        "num_problems": len(set(problems)),
    }
    probabilistic = model.config.probabilistic
    return {
        "format": RESULT_FORMAT,
        "format_version": 1,
        "model": model.config.name,
        "probabilistic": probabilistic,
        "score": "-csd" if probabilistic else "cosine",
        "recall_pct": recall_pct,
        "zooms": [int(z) for z in zooms],
        "metadata_settings": [name for name, _ in settings],
        **(info or {}),
        "samples": samples,
        "results": rows,
        "uncertainty": sigmas if probabilistic else [],
    }


def count_split_rows(manifest: str | Path, split: str | None) -> int:
    """Rows of ``manifest`` in ``split`` (all rows when None), valid or not: the samples evaluation owes."""
    from psm.data.manifest import ManifestError, read_manifest

    df = read_manifest(manifest)
    if split is None:
        return len(df)
    if "split" not in df.columns:
        raise ManifestError(f"{manifest}: no 'split' column, cannot select split {split!r}")
    return int((df["split"].astype("string") == split).sum())


def manifest_loaders(
    model: PSM,
    manifest: str | Path,
    split: str | None,
    *,
    imagery_source: str | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    on_error: str = "skip",
    skip_log: Any | None = None,
    pin_memory: bool = False,
    raster: Any | None = None,
) -> tuple[Any, BatchesForZoom]:
    """(dataset, batches_for_zoom) over a manifest split, evaluation transforms, in manifest order; rasters are
    read with ``raster`` (:class:`psm.data.imagery.RasterBands`, default RGB uint8)."""
    from torch.utils.data import DataLoader

    from psm.data.dataset import ManifestDataset
    from psm.evaluation.embed import eval_collate

    cfg = model.config
    source = imagery_source or cfg.image.imagery_source
    first_zoom = source_zoom_levels(source)[0]
    ds = ManifestDataset(
        manifest,
        imagery_source=source,
        train=False,
        zoom=first_zoom,
        split=split,
        spec=cfg.metadata,
        input_size=cfg.image.img_size,
        on_error=on_error,  # type: ignore[arg-type]
        skip_log=skip_log,
        raster=raster,
    )
    collate = eval_collate(cfg.metadata)

    def batches(zoom: int) -> Any:
        # One dataset for every zoom (the manifest is parsed and its bad rows reported once); workers get
        # a fresh copy of it, with this zoom, each time a loader is iterated.
        ds.zoom = int(zoom)
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=pin_memory,
        )

    return ds, batches


def source_zoom_levels(source: str) -> tuple[int, ...]:
    """Zoom levels an imagery source offers (sentinel2, bing: 1, 3, 5; google_earth: 1)."""
    from psm.data.imagery_sources import get_imagery_source

    return get_imagery_source(source).zoom_levels


def evaluate_manifest(
    model: PSM,
    manifest: str | Path,
    split: str | None = "test",
    *,
    zooms: Sequence[int] | None = None,
    tokenizer: Any | None = None,
    metadata: Sequence[str] | None = None,
    imagery_source: str | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    on_error: str = "skip",
    recall_pct: float = 10.0,
    device: torch.device | str | None = None,
    info: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    raster: Any | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on a manifest split (``ManifestDataset``, ``train=False``) at each zoom level.

    Skipped samples are collected from every loader process and reported in ``result["samples"]``.
    """
    from psm.data.errors import SkipLog

    source = imagery_source or model.config.image.imagery_source
    zooms = tuple(zooms) if zooms else source_zoom_levels(source)
    bad = [z for z in zooms if z not in source_zoom_levels(source)]
    if bad:
        raise ValueError(f"zoom levels {bad} are not offered by {source!r} (levels {source_zoom_levels(source)})")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    expected = count_split_rows(manifest, split)
    if expected == 0:
        raise ValueError(f"{manifest}: no rows in split {split!r}")
    with tempfile.TemporaryDirectory(prefix="psm-eval-") as tmp:
        # A file-backed log: DataLoader workers are processes, and their in-memory records would be lost.
        skip_log = SkipLog(Path(tmp) / "skipped")
        _, batches = manifest_loaders(
            model,
            manifest,
            split,
            imagery_source=source,
            batch_size=batch_size,
            num_workers=num_workers,
            on_error=on_error,
            skip_log=skip_log,
            pin_memory=device.type == "cuda",
            raster=raster,
        )
        result_info = {"manifest": str(manifest), "split": split, "imagery_source": source, **(info or {})}
        try:
            result = evaluate_model(
                model,
                batches,
                zooms,
                tokenizer=tokenizer,
                metadata=metadata,
                recall_pct=recall_pct,
                device=device,
                expected=expected,
                info=result_info,
                progress=progress,
            )
        except NothingLoadedError as e:  # say why, with the file and row of a skipped sample
            raise NothingLoadedError(nothing_loaded_message(manifest, split, SkipLog.read_all(skip_log.path))) from e
        found = [str(p) for p in SkipLog.read_all(skip_log.path)]
    result["samples"]["problems"] = list(dict.fromkeys(found))[:200]
    result["samples"]["num_problems"] = len(set(found))
    return result
