"""Import the authors' released Lightning checkpoints (mvrl/PSM) into psm's safetensors + YAML format.

The official ``GeoCLAPModel`` keeps the image tower under ``sat_encoder.encoder``, the CLAP towers under
``{audio,text}_encoder.model.model`` and the loss scalars under ``criterion``. Every key is mapped by an
explicit prefix rule below; anything unmapped is reported and the conversion refuses a partial map unless
asked. The official file is a pickle: it is read with ``weights_only=True`` and a short allow-list of the
harmless globals Lightning checkpoints contain, so no code from the file runs.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from psm.data.imagery_sources import get_imagery_source
from psm.data.metadata import parse_official_metadata_type
from psm.models.checkpoint import check_state_dict, save_checkpoint
from psm.models.config import load_model_config
from psm.models.psm import PSM

log = logging.getLogger(__name__)

# (official prefix, our prefix); the first matching rule wins, so longer prefixes come first.
KEY_RULES: tuple[tuple[str, str], ...] = (
    ("sat_encoder.encoder.backbone.", "image.encoder.backbone."),
    ("sat_encoder.encoder.projector.", "image.encoder.projector."),
    ("sat_encoder.encoder.meta_fuser.cls_token", "image.fusion.cls_token"),
    ("sat_encoder.encoder.meta_fuser.transformer_encoder.", "image.fusion.transformer."),
    (
        "sat_encoder.encoder.meta_fuser.meta_embed.audio_source_fc.source_embed.",
        "image.fusion.tokens.audio_source.",
    ),
    (
        "sat_encoder.encoder.meta_fuser.meta_embed.caption_source_fc.source_embed.",
        "image.fusion.tokens.caption_source.",
    ),
    ("sat_encoder.encoder.meta_fuser.meta_embed.location_fc.", "image.fusion.tokens.location."),
    ("sat_encoder.encoder.meta_fuser.meta_embed.month_fc.", "image.fusion.tokens.month."),
    ("sat_encoder.encoder.meta_fuser.meta_embed.time_fc.", "image.fusion.tokens.hour."),
    ("sat_encoder.encoder.mean_head.", "image.head.mean_head."),
    ("sat_encoder.encoder.std_head.", "image.head.logvar_head."),
    ("audio_encoder.model.model.", "audio.tower.clap."),
    ("audio_encoder.mean_head.", "audio.head.mean_head."),
    ("audio_encoder.std_head.", "audio.head.logvar_head."),
    ("audio_encoder.head.", "audio.head.head."),
    ("text_encoder.model.model.", "text.tower.clap."),
    ("text_encoder.mean_head.", "text.head.mean_head."),
    ("text_encoder.std_head.", "text.head.logvar_head."),
    ("text_encoder.head.", "text.head.head."),
    # PCME++ shift / negative_scale or InfoNCE tau, kept as extra tensors in the layout training exports
    # (``loss.`` + the TriModalLoss state-dict key), so both load into TriModalLoss the same way.
    ("criterion.", "loss.criterion."),
)

# Buffers that older transformers saved and newer ones rebuild themselves; dropping them loses nothing.
RECREATED_BUFFER_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")


class ConversionError(ValueError):
    """An official checkpoint that cannot be mapped completely onto a psm model."""


@dataclass
class ConversionReport:
    """What the conversion did with every key."""

    mapped: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    dropped_buffers: list[str] = field(default_factory=list)
    recreated_buffers: list[str] = field(default_factory=list)
    missing_in_file: list[str] = field(default_factory=list)
    shape_mismatches: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.unmapped or self.missing_in_file or self.shape_mismatches)

    def summary(self) -> str:
        lines = [
            f"mapped {len(self.mapped)} tensors",
            f"index buffers (position/token-type ids) dropped {len(self.dropped_buffers)}, "
            f"recreated {len(self.recreated_buffers)}",
            f"unmapped keys in the file: {len(self.unmapped)}",
            *(f"  {k}" for k in self.unmapped[:20]),
            f"model keys the file lacks: {len(self.missing_in_file)}",
            *(f"  {k}" for k in self.missing_in_file[:20]),
            f"shape mismatches: {len(self.shape_mismatches)}",
            *(f"  {k}" for k in self.shape_mismatches[:20]),
        ]
        return "\n".join(lines)


def map_official_key(key: str) -> str | None:
    """Our key for an official state-dict key, or None when no rule covers it."""
    for old, new in KEY_RULES:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def _allowed_globals() -> list:
    # Lightning stores hyper-parameters in an AttributeDict (a dict subclass) and argparse Namespaces
    # may appear; both are rebuilt as plain containers. Paths appear in callback state.
    allowed: list[Any] = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath]
    for name in (
        "lightning_fabric.utilities.data.AttributeDict",
        "lightning.fabric.utilities.data.AttributeDict",
        "pytorch_lightning.utilities.parsing.AttributeDict",
        "lightning.pytorch.utilities.parsing.AttributeDict",
    ):
        allowed.append((dict, name))
    return allowed


def read_official_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a Lightning ``.ckpt`` safely (``weights_only=True`` plus an allow-list of harmless globals)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConversionError(
            f"{path}: cannot be read safely ({type(e).__name__}: {str(e).splitlines()[-1][:300]})"
        ) from e
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise ConversionError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    return dict(ckpt)


def _flag(value: Any, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, str):  # the official CLI passes booleans as 'true'/'false' strings
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def config_from_official_hparams(hparams: Mapping[str, Any], base: str | Path = "psm-paper"):
    """Our model config for an official run: the paper architecture plus the run's choices."""
    probabilistic = _flag(hparams.get("probabilistic"), hparams.get("loss_type", "pcmepp") == "pcmepp")
    sat_type = hparams.get("sat_type", "sentinel")
    if hparams.get("dataset_type", "") == "SoundingEarth":
        sat_type = "googleEarth"
    metadata_types = parse_official_metadata_type(str(hparams.get("metadata_type", "none")))
    cfg = load_model_config(base)
    cfg.name = (
        f"official-{hparams.get('dataset_type', 'GeoSound')}-{sat_type}-"
        + ("pcmepp" if probabilistic else "infonce")
        + ("-metadata" if metadata_types else "")
    )
    cfg.embed_dim = int(hparams.get("fc_dim", cfg.embed_dim))
    cfg.probabilistic = probabilistic
    source = get_imagery_source(sat_type)
    cfg.image.imagery_source = source.name
    cfg.image.zoom_levels = source.zoom_levels
    cfg.metadata = type(cfg.metadata).from_dict({**cfg.metadata.to_dict(), "types": list(metadata_types)})
    cfg.fusion.metadata_dropout = float(hparams.get("meta_droprate", cfg.fusion.metadata_dropout))
    if "text" not in str(hparams.get("modality_type", "sat_audio_text")):
        cfg.text = None
    freeze = _flag(hparams.get("freeze"), False)
    cfg.audio.freeze = freeze
    if cfg.text is not None:
        cfg.text.freeze = freeze
    return cfg


def _portable_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The run's scalar hyper-parameters, without absolute paths (which would leak the authors' disks)."""
    out = {}
    for k, v in hparams.items():
        if (
            isinstance(v, bool | int | float)
            or v is None
            or (isinstance(v, str) and not (v.startswith("/") or "\\" in v or ":/" in v))
        ):
            out[k] = v
    return out


def convert_official_state_dict(
    state: Mapping[str, Tensor], model: PSM
) -> tuple[dict[str, Tensor], dict[str, Tensor], ConversionReport]:
    """Map official tensors onto ``model``'s keys; returns (model state, loss tensors, report)."""
    report = ConversionReport()
    ours: dict[str, Tensor] = {}
    extra: dict[str, Tensor] = {}
    for key, tensor in state.items():
        new = map_official_key(key)
        if new is None:
            report.unmapped.append(key)
            continue
        report.mapped[key] = new
        (extra if new.startswith("loss.") else ours)[new] = tensor
    expected = model.state_dict()
    for key in list(ours):
        if key not in expected and key.endswith(RECREATED_BUFFER_SUFFIXES):
            # saved by the authors' transformers, not part of this version's state dict
            report.dropped_buffers.append(key)
            del report.mapped[next(k for k, v in report.mapped.items() if v == key)]
            del ours[key]
        elif key not in expected:
            source = next(k for k, v in report.mapped.items() if v == key)
            report.unmapped.append(f"{source} (mapped to {key}, which this model lacks)")
            del report.mapped[source]
            del ours[key]
        elif tuple(ours[key].shape) != tuple(expected[key].shape):
            report.shape_mismatches.append(
                f"{key}: file {tuple(ours[key].shape)} vs model {tuple(expected[key].shape)}"
            )
    for key in sorted(set(expected) - set(ours)):
        if key.endswith(RECREATED_BUFFER_SUFFIXES):
            ours[key] = expected[key]  # constant index buffers: this transformers version's own values
            report.recreated_buffers.append(key)
        else:
            report.missing_in_file.append(key)
    return ours, extra, report


def convert_official_checkpoint(
    src: str | Path,
    out_dir: str | Path,
    *,
    base_config: str | Path = "psm-paper",
    allow_partial: bool = False,
    overwrite: bool = False,
) -> ConversionReport:
    """Convert an official ``.ckpt`` to a psm checkpoint folder; refuses a partial map unless allowed."""
    src = Path(src)
    ckpt = read_official_checkpoint(src)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    cfg = config_from_official_hparams(hparams, base_config)
    model = PSM(cfg)
    state, extra, report = convert_official_state_dict(ckpt["state_dict"], model)
    if not report.complete and not allow_partial:
        raise ConversionError(f"{src}: incomplete mapping (use allow_partial to accept)\n{report.summary()}")
    check_state_dict(model, state, source=str(src), strict=False)
    model.load_state_dict(state, strict=False)
    info = {
        "converted_from": src.name,  # the file name only: no absolute paths in our checkpoints
        "official_hparams": _portable_hparams(hparams),
        "epoch": ckpt.get("epoch"),
        "global_step": ckpt.get("global_step"),
        "partial": not report.complete,
    }
    save_checkpoint(model, out_dir, extra_tensors=extra, info=info, overwrite=overwrite)
    return report
