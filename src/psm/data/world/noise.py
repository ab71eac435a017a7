"""Deterministic noise: FFT-smoothed random fields, their bilinear upsampling, periodic textures, hashes.

Everything is vectorised numpy; a field is defined on a coarse grid and read at any 10 m window by
bilinear interpolation, so the land cover and the imagery can be made strip by strip with bounded memory.
"""

from __future__ import annotations

import functools
import math

import numpy as np


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma_cells: float) -> np.ndarray:
    """White noise smoothed by a Gaussian of ``sigma_cells`` (FFT), standardised to mean 0, std 1.

    The field is drawn on a grid padded by 3 σ and cropped, so its opposite edges are not correlated. Wide
    kernels are drawn on a coarser grid (≥ 4 cells per σ) and interpolated up, which is just as smooth.
    """
    k = max(1, int(sigma_cells // 4))
    sub = (math.ceil(shape[0] / k) + 2, math.ceil(shape[1] / k) + 2)
    sigma = sigma_cells / k
    pad = int(np.ceil(3 * sigma))
    white = rng.standard_normal((sub[0] + 2 * pad, sub[1] + 2 * pad))
    small = gaussian_fft(white, sigma)[pad : pad + sub[0], pad : pad + sub[1]]
    if k > 1:
        small = CoarseField(small, k).window(0, shape[0], 0, shape[1]).astype(np.float64)
    out = small[: shape[0], : shape[1]]
    out = out - out.mean()
    std = out.std()
    return (out / std if std > 0 else out).astype(np.float32)


def gaussian_fft(a: np.ndarray, sigma_cells: float) -> np.ndarray:
    """Periodic Gaussian blur over the last two axes (σ in cells) by multiplication in the Fourier domain."""
    if sigma_cells <= 0:
        return np.asarray(a, dtype=np.float64).copy()
    import scipy.fft as sfft

    h, w = a.shape[-2:]
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    transfer = np.exp(-2.0 * (np.pi * sigma_cells) ** 2 * (fy**2 + fx**2))
    return sfft.irfft2(sfft.rfft2(a, axes=(-2, -1)) * transfer, s=(h, w), axes=(-2, -1))


def gaussian_reflect(a: np.ndarray, sigma_cells: float) -> np.ndarray:
    """Gaussian blur over the last two axes with reflected edges (no wrap-around), via FFT on a padded copy."""
    a = np.asarray(a, dtype=np.float64)
    if sigma_cells <= 0:
        return a.copy()
    h, w = a.shape[-2:]
    pad = int(np.ceil(3 * sigma_cells))
    lead = [(0, 0)] * (a.ndim - 2)
    padded = a
    while padded.shape[-2] < h + 2 * pad or padded.shape[-1] < w + 2 * pad:  # reflect again if pad > size
        step_r = min(pad, padded.shape[-2])
        step_c = min(pad, padded.shape[-1])
        padded = np.pad(padded, [*lead, (step_r, step_r), (step_c, step_c)], mode="symmetric")
    extra_r = (padded.shape[-2] - h) // 2
    extra_c = (padded.shape[-1] - w) // 2
    out = gaussian_fft(padded, sigma_cells)
    return out[..., extra_r : extra_r + h, extra_c : extra_c + w]


def smooth_1d(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """A 1-D standardised smooth random sequence of length ``n`` (σ in samples)."""
    pad = int(np.ceil(3 * sigma))
    white = rng.standard_normal(n + 2 * pad)
    f = np.fft.rfftfreq(n + 2 * pad)
    out = np.fft.irfft(np.fft.rfft(white) * np.exp(-2.0 * (np.pi * sigma * f) ** 2), n=n + 2 * pad)[pad : pad + n]
    out -= out.mean()
    std = out.std()
    return out / std if std > 0 else out


@functools.lru_cache(maxsize=64)
def _interp_matrix(start: int, stop: int, n: int, factor: float):
    """Sparse (stop - start, n) matrix of linear-interpolation weights from a coarse axis of ``n`` cells to
    fine pixels ``start:stop`` (``factor`` fine pixels per cell, edges clamped). A sparse product is ~10×
    faster than fancy-index gathers for the full-size column pass."""
    import scipy.sparse as sp

    pos = (np.arange(start, stop, dtype=np.float64) + 0.5) / factor - 0.5
    pos = np.clip(pos, 0.0, n - 1.0)
    i0 = np.minimum(np.floor(pos).astype(np.int64), max(n - 2, 0))
    f = pos - i0
    i1 = np.minimum(i0 + 1, n - 1)
    m = stop - start
    rows = np.concatenate([np.arange(m), np.arange(m)])
    cols = np.concatenate([i0, i1])
    vals = np.concatenate([1.0 - f, f]).astype(np.float32)
    return sp.csr_matrix((vals, (rows, cols)), shape=(m, n), dtype=np.float32)


@functools.lru_cache(maxsize=64)
def _interp_matrix_t(start: int, stop: int, n: int, factor: float):
    """The transpose of :func:`_interp_matrix` as CSR (dense @ CSR is the fast product)."""
    return _interp_matrix(start, stop, n, factor).T.tocsr()


class CoarseField:
    """A field on a coarse grid aligned with the raster (``factor`` raster pixels per coarse cell).

    ``window(r0, r1, c0, c1)`` returns the field bilinearly interpolated at the centres of raster pixels
    ``[r0:r1, c0:c1]`` (float32).
    """

    def __init__(self, values: np.ndarray, factor: float) -> None:
        self.values = np.ascontiguousarray(values, dtype=np.float32)
        self.factor = float(factor)

    def window(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        h, w = self.values.shape
        rows = _interp_matrix(r0, r1, h, self.factor) @ self.values  # (r1 - r0, w)
        return np.asarray(rows @ _interp_matrix_t(c0, c1, w, self.factor), dtype=np.float32)

    def at(self, row: np.ndarray, col: np.ndarray) -> np.ndarray:
        """Values at fractional raster pixel positions (pixel centres at integer + 0.5 → use row + 0.5)."""
        from psm.data.world.grid import bilinear

        return bilinear(self.values, np.asarray(row) / self.factor - 0.5, np.asarray(col) / self.factor - 0.5)


class Texture:
    """A periodic noise tile (standardised), read at any window by index wrap-around."""

    def __init__(self, rng: np.random.Generator, size: int, sigma: float) -> None:
        white = rng.standard_normal((size, size))
        t = gaussian_fft(white, sigma) if sigma > 0 else white
        t = (t - t.mean()) / t.std()
        self.values = t.astype(np.float32)
        self.size = size
        self.offset = (int(rng.integers(size)), int(rng.integers(size)))

    def window(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        rows = (np.arange(r0, r1) + self.offset[0]) % self.size
        cols = (np.arange(c0, c1) + self.offset[1]) % self.size
        return self.values[rows][:, cols]


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def hash_u64(*keys: np.ndarray | int) -> np.ndarray:
    """A splitmix64-style hash of integer arrays (broadcast), deterministic across platforms."""
    with np.errstate(over="ignore"):
        h = np.uint64(0x9E3779B97F4A7C15)
        for k in keys:
            v = np.asarray(k).astype(np.int64).astype(np.uint64)
            h = h ^ (v + np.uint64(0x9E3779B97F4A7C15) + (h << np.uint64(6)) + (h >> np.uint64(2)))
            h = (h ^ (h >> np.uint64(30))) * _M1
            h = (h ^ (h >> np.uint64(27))) * _M2
            h = h ^ (h >> np.uint64(31))
    return h


def hash32(key: np.ndarray) -> np.ndarray:
    """A fast avalanche hash of uint32 keys (murmur3 finaliser) → uint32."""
    h = np.asarray(key).astype(np.uint32, copy=True)
    with np.errstate(over="ignore"):
        h *= np.uint32(0x9E3779B1)
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
    return h


def hash_unit(*keys: np.ndarray | int) -> np.ndarray:
    """Hash of integer keys → uniform float in [0, 1)."""
    return (hash_u64(*keys) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
