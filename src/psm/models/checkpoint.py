"""psm's own checkpoint format: a folder with ``model.safetensors`` and ``config.yaml``. No pickles.

Loading never executes code from the file, and nothing in the folder holds an absolute path. Writes are
atomic: the folder is assembled under a temporary name and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor

from psm.models.config import PSMConfig
from psm.models.psm import PSM

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
FORMAT_VERSION = 1
# Extra tensors that are not model weights (e.g. the loss's learnable a, b or τ) live under this prefix.
EXTRA_PREFIX = "extra."


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def save_checkpoint(
    model: PSM,
    out_dir: str | Path,
    extra_tensors: Mapping[str, Tensor] | None = None,
    info: Mapping | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (and optional extra tensors, e.g. the loss scalars) to ``out_dir`` atomically."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    for k, v in (extra_tensors or {}).items():
        tensors[EXTRA_PREFIX + k] = v.detach().contiguous().cpu()
    config = model.config.to_dict()
    # The CLAP weights are in the file (loading ignores `pretrained`); a local folder there would leak a path.
    for tower in ("audio", "text"):
        if config.get(tower) is not None:
            config[tower]["pretrained"] = None
    meta = {
        "format": "psm-checkpoint",
        "format_version": FORMAT_VERSION,
        "model": config,
        "info": dict(info or {}),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))
        for f in (WEIGHTS_FILE, CONFIG_FILE):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        if out_dir.exists():
            old = out_dir.with_name(out_dir.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_checkpoint_config(ckpt_dir: str | Path) -> tuple[PSMConfig, dict]:
    """The model config and the ``info`` block of a psm checkpoint folder."""
    ckpt_dir = Path(ckpt_dir)
    cfg_path = ckpt_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{ckpt_dir}: not a psm checkpoint (no {CONFIG_FILE})")
    meta = yaml.safe_load(cfg_path.read_text())
    if not isinstance(meta, dict) or meta.get("format") != "psm-checkpoint":
        raise CheckpointError(f"{cfg_path}: not a psm checkpoint config")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: format version {meta['format_version']} is newer than this psm")
    return PSMConfig.from_dict(meta["model"]), dict(meta.get("info") or {})


def load_checkpoint(
    ckpt_dir: str | Path, device: str | torch.device = "cpu", strict: bool = True
) -> tuple[PSM, dict[str, Tensor]]:
    """Build the model from the folder's config and load its weights; returns (model, extra tensors)."""
    ckpt_dir = Path(ckpt_dir)
    cfg, _ = read_checkpoint_config(ckpt_dir)
    weights = ckpt_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{ckpt_dir}: missing {WEIGHTS_FILE}")
    # The CLAP towers are rebuilt from config alone: the weights come from the checkpoint, not the hub.
    cfg.audio.pretrained = None
    if cfg.text is not None:
        cfg.text.pretrained = None
    model = PSM(cfg)
    tensors = load_file(str(weights), device=str(device))
    extra = {k[len(EXTRA_PREFIX) :]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
    state = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
    check_state_dict(model, state, source=str(weights), strict=strict)
    model.load_state_dict(state, strict=strict)
    return model.to(device), extra


def check_state_dict(model: torch.nn.Module, state: Mapping[str, Tensor], source: str, strict: bool) -> None:
    """Raise a :class:`CheckpointError` listing missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {shapes[:5]}")
    if strict and missing:
        problems.append(f"{len(missing)} missing keys: {missing[:8]}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {unexpected[:8]}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
