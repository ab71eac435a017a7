"""One factory: build a PSM model from an architecture name, a YAML file or a psm checkpoint folder."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from psm.models.checkpoint import CONFIG_FILE, load_checkpoint
from psm.models.config import load_model_config
from psm.models.psm import PSM
from psm.models.satellite import load_satmae_pretrained

log = logging.getLogger(__name__)


def create_model(
    name_or_path: str | Path,
    *,
    overrides: Mapping | None = None,
    satmae_checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    seed: int | None = None,
) -> PSM:
    """Build a model: ``psm-paper`` / ``psm-tiny`` / a YAML path (new weights) or a checkpoint folder.

    ``satmae_checkpoint`` loads SatMAE pre-training weights into the ViT (new models only); ``seed`` makes the
    random initialisation reproducible.
    """
    path = Path(name_or_path)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        if overrides or satmae_checkpoint:
            raise ValueError("overrides and satmae_checkpoint apply to new models, not to a checkpoint folder")
        model, _ = load_checkpoint(path, device=device)
        return model
    cfg = load_model_config(name_or_path, overrides)
    if seed is not None:
        torch.manual_seed(seed)
    model = PSM(cfg)
    if satmae_checkpoint is not None:
        report = load_satmae_pretrained(model.image.encoder, satmae_checkpoint)
        log.info("SatMAE weights: %s", report.summary())
    return model.to(device)
