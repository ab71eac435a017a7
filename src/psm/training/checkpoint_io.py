"""Training-state checkpoints without pickle: one safetensors file holding every tensor, with the rest of
Lightning's checkpoint (loop counters, optimiser hyper-parameters, callback state) as JSON in its header.

Writes go to a temporary file in the same folder, are fsynced and then renamed: a job killed mid-write
never leaves a truncated checkpoint under the final name. Absolute paths inside callback state are
stored relative to the checkpoint's folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import CheckpointIO
from safetensors import safe_open
from safetensors.torch import save_file

from psm.atomic import atomic_path

HEADER_KEY = "psm_training_state"
FORMAT = "psm-training-state/1"


def _encode(obj: Any, tensors: dict[str, torch.Tensor], root: Path, path: str) -> Any:
    """JSON-able form of ``obj``; tensors are moved to ``tensors`` and referenced by name."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        t = obj.detach().cpu().contiguous()
        if t.numel() and any(
            t.untyped_storage().data_ptr() == o.untyped_storage().data_ptr() for o in tensors.values()
        ):
            t = t.clone()  # safetensors refuses tensors sharing storage (views, tied buffers)
        tensors[name] = t
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _encode(v, tensors, root, f"{path}.{k}") for k, v in obj.items()}}
        # Optimiser state is keyed by int parameter ids: keep the key types.
        return {
            "__items__": [[_encode(k, tensors, root, path), _encode(v, tensors, root, path)] for k, v in obj.items()]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, root, path) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, root, path) for v in obj]
    if isinstance(obj, Path):
        obj = str(obj)
    if isinstance(obj, str) and os.path.isabs(obj):
        # Paths of the training machine (best-model path, dirpath) become relative to the checkpoint folder.
        return {"__relpath__": os.path.relpath(obj, root)}
    if obj is None or isinstance(obj, bool | int | float | str):
        if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
            return {"__float__": repr(obj)}
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a training checkpoint without pickle")


def _decode(obj: Any, tensors: Any, root: Path) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, root) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors.get_tensor(obj["__tensor__"])
    if "__dict__" in obj:
        return {k: _decode(v, tensors, root) for k, v in obj["__dict__"].items()}
    if "__items__" in obj:
        return {_decode(k, tensors, root): _decode(v, tensors, root) for k, v in obj["__items__"]}
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, root) for v in obj["__tuple__"])
    if "__relpath__" in obj:
        return str((root / obj["__relpath__"]).resolve())
    if "__float__" in obj:
        return float(obj["__float__"])
    raise ValueError(f"unknown entry in training checkpoint: {sorted(obj)}")


def save_training_state(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a Lightning checkpoint dict to ``path`` atomically, without pickle."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(checkpoint, tensors, path.parent.resolve(), "checkpoint")
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a job killed mid-write
        stale.unlink(missing_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, HEADER_KEY: json.dumps(tree)})


def load_training_state(path: str | os.PathLike[str], device: str = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_training_state` (no code is executed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: not a psm training checkpoint (format {meta.get('format')!r})")
            return _decode(json.loads(meta[HEADER_KEY]), f, path.parent.resolve())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable training checkpoint: {e}") from e


class SafeCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` that stores training state with :func:`save_training_state`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        save_training_state(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        return load_training_state(path)

    def remove_checkpoint(self, path: Any) -> None:
        Path(path).unlink(missing_ok=True)
