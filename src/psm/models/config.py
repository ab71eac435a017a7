"""Model configuration: architectures are YAML data files (configs/model/*.yaml), read into these dataclasses."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from psm.data.imagery_sources import get_imagery_source
from psm.data.metadata import MetadataSpec

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"


class ConfigError(ValueError):
    """A model configuration that cannot be built."""


def _from_mapping(cls, d: Mapping | None, where: str):
    d = dict(d or {})
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)


@dataclass
class ImageTowerConfig:
    """SatMAE-style ViT with the GSD position embedding, mean pooling + fc_norm, then a 2-layer projector."""

    img_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    imagery_source: str = "sentinel2"
    zoom_levels: tuple[int, ...] = (1, 3, 5)

    def __post_init__(self) -> None:
        self.zoom_levels = tuple(int(z) for z in self.zoom_levels)
        get_imagery_source(self.imagery_source)  # raises on an unknown name


@dataclass
class ClapTowerConfig:
    """A CLAP tower from transformers: ``pretrained`` (local folder or hub id) or ``hf_config`` (random init)."""

    pretrained: str | None = None
    hf_config: dict[str, Any] = field(default_factory=dict)
    freeze: bool = False
    # Audio only. The official training and evaluation set is_longer=True for every clip (their loader
    # forced it), so short, repeat-padded clips also take the fusion path; False uses each clip's own flag.
    force_is_longer: bool = True


@dataclass
class FusionConfig:
    """Metadata-fusion transformer (official: 3 post-LN layers, 512 wide, 8 heads, FFN 2048, dropout 0.1)."""

    layers: int = 3
    heads: int = 8
    ffn: int = 2048
    dropout: float = 0.1
    token_hidden: int = 64  # hidden width of the lat/lon, month, hour token MLPs
    metadata_dropout: float = 0.5  # per type, exact count per batch, training only


@dataclass
class PSMConfig:
    """Everything needed to build a PSM model; the YAML files in configs/model/ are this, serialised."""

    name: str = "psm"
    embed_dim: int = 512
    probabilistic: bool = True
    logvar_bias_init: float = -4.0
    # Bias of the σ head's hidden layer; None = logvar_bias_init (official: both −4, where the hidden GELU is
    # flat, so per-sample σ barely trains from random weights; 0.0 keeps the GELU in its active range).
    logvar_hidden_bias_init: float | None = None
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    audio: ClapTowerConfig = field(default_factory=ClapTowerConfig)
    text: ClapTowerConfig | None = field(default_factory=ClapTowerConfig)
    metadata: MetadataSpec = field(default_factory=lambda: MetadataSpec(types=()))
    fusion: FusionConfig = field(default_factory=FusionConfig)

    @classmethod
    def from_dict(cls, d: Mapping) -> PSMConfig:
        """Build from a parsed YAML mapping, rejecting unknown keys."""
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"model config: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        if "image" in d:
            d["image"] = _from_mapping(ImageTowerConfig, d["image"], "image")
        if "audio" in d:
            d["audio"] = _from_mapping(ClapTowerConfig, d["audio"], "audio")
        if "text" in d and d["text"] is not None:
            d["text"] = _from_mapping(ClapTowerConfig, d["text"], "text")
        if "fusion" in d:
            d["fusion"] = _from_mapping(FusionConfig, d["fusion"], "fusion")
        if "metadata" in d:
            d["metadata"] = MetadataSpec.from_dict(d["metadata"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe mapping (tuples become lists)."""
        out = asdict(self)
        out["metadata"] = self.metadata.to_dict()
        out["image"]["zoom_levels"] = list(self.image.zoom_levels)
        return out

    def to_yaml(self) -> str:
        """YAML text of this config."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def list_model_configs() -> list[str]:
    """Names of the architectures shipped with psm."""
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))


def load_model_config(name_or_path: str | Path, overrides: Mapping | None = None) -> PSMConfig:
    """Read a shipped architecture by name (``psm-paper``) or any YAML file by path, then apply overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        path = MODEL_CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(
                f"no model config named {str(name_or_path)!r}; shipped: {', '.join(list_model_configs())}"
            )
    if not path.exists():
        raise ConfigError(f"model config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    raw = _deep_merge(raw, overrides or {})
    try:
        return PSMConfig.from_dict(raw)
    except (ConfigError, ValueError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from e


def _deep_merge(base: Mapping, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out
