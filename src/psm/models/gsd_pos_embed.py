"""Ground-sample-distance-aware 2-D sin-cos position embedding (Scale-MAE, as used by PSM).

Each sample's patch grid is scaled by its resolution ``res = zoom × base GSD`` before the sin-cos
encoding, so one embedding tells the ViT how much ground a patch covers and zoom levels mix in a batch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """[sin(p·ω_k), cos(p·ω_k)] with ω_k = 10000^(−k/(dim/2)), k < dim/2 → (..., dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float32, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float32)[..., None] * omega
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def gsd_pos_embed(res: Tensor, grid_size: int, dim: int) -> Tensor:
    """Per-sample position embedding (B, grid², dim) for resolutions ``res`` (B,) in metres per pixel.

    Token t = row·grid + col gets [emb(col·res), emb(row·res)]: the first half encodes the column, the
    second half the row, as in the official code (meshgrid with ``indexing="xy"``). No CLS slot: PSM pools.
    """
    if dim % 4:
        raise ValueError(f"GSD position embedding width must be divisible by 4, got {dim}")
    res = torch.as_tensor(res, dtype=torch.float32)
    if res.ndim != 1:
        raise ValueError(f"res must have shape (B,), got {tuple(res.shape)}")
    idx = torch.arange(grid_size, dtype=torch.float32, device=res.device)
    cols = idx.repeat(grid_size)  # token order is row-major: col varies fastest
    rows = idx.repeat_interleave(grid_size)
    scaled_cols = res[:, None] * cols[None, :]  # (B, grid²)
    scaled_rows = res[:, None] * rows[None, :]
    return torch.cat([sincos_1d(scaled_cols, dim // 2), sincos_1d(scaled_rows, dim // 2)], dim=-1)
