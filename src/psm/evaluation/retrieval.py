"""Retrieval metrics exactly as the official PSM evaluation defines them, vectorised, and the scores they rank.

Official definitions (``geoclap/metrics.py``; see ../shared/reference/pcmepp-loss-and-metrics.md §9):

* row i of the score matrix is query i, its ground truth is column i, higher = better;
* rank_i = pandas ``Series.rank(ascending=False)`` of entry (i, i): 1-based, ties share the average rank,
  i.e. rank = #(strictly greater) + (#equal including itself + 1) / 2; NaN scores take no part and a NaN
  diagonal has no rank;
* R@10 % = mean_i [rank_i < k] with k = 10/100 · N as a float (strict ``<``; a NaN rank is a miss);
* median rank = median of the ranks, NaN skipped (x.5 or x.25 values are normal).

Scores: −CSD in float64 on re-normalised μ (PCME++ models) or the cosine (deterministic models). Only numpy
and torch are imported here so that ``psm.evaluation.retrieval_metrics`` stays cheap to import.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor

STABLE_KEYS = ("recall_at_10pct", "median_rank")
# Query rows scored and ranked at once: bounds the float64 score block and the boolean comparison
# temporaries to a few hundred MB even for galleries of 10^5 items.
DEFAULT_CHUNK_ROWS = 1024


class GaussianLike(Protocol):
    """What scoring needs from an embedding (``psm.models.heads.GaussianEmbedding`` fits)."""

    mean: Tensor
    logvar: Tensor | None
    unnormalized_mean: Tensor


G = TypeVar("G", bound=GaussianLike)


# --- ranks and metrics ----------------------------------------------------------------------------------


def _as_tensor(scores: Any) -> Tensor:
    """Scores as a tensor; numpy layouts torch refuses (reversed views, big-endian, uint16+) are converted."""
    if isinstance(scores, Tensor):
        t = scores.detach()
    else:
        a = np.asarray(scores)
        if a.dtype.kind in "iuf" and not a.dtype.isnative:  # e.g. read from a big-endian file
            a = a.astype(a.dtype.newbyteorder("="))
        if a.dtype.kind == "u" and a.dtype.itemsize > 1:  # torch cannot compare uint16/32/64
            if a.dtype.itemsize == 8 and a.size and a.max() > np.iinfo(np.int64).max:
                raise TypeError("uint64 scores above 2**63 - 1 are not supported")
            a = a.astype(np.int64)
        t = torch.as_tensor(np.ascontiguousarray(a))  # negative strides (a[::-1]) are refused by torch
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"scores must be real numbers, got {t.dtype}")
    return t


def diagonal_ranks(scores: Tensor, positives: Tensor | None = None) -> Tensor:
    """Tie-averaged 1-based rank (float64) of each row's positive entry; NaN where that entry is NaN.

    ``positives`` (R,) gives the ground-truth column of each row (default: the diagonal, row i → column i).
    One vectorised pass over the block: no loop over rows.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (queries × gallery), got shape {tuple(scores.shape)}")
    if positives is None:
        positives = torch.arange(scores.shape[0], device=scores.device)
    target = scores.gather(1, positives.to(scores.device).reshape(-1, 1))
    # Comparisons with NaN are False, so NaN gallery scores are neither better than nor tied with anything:
    # exactly pandas' "NaN gets no rank".
    greater = (scores > target).sum(1, dtype=torch.int64)
    equal = (scores == target).sum(1, dtype=torch.int64)  # includes the positive itself
    ranks = greater.double() + (equal.double() + 1.0) / 2.0
    return torch.where(target.squeeze(1).isnan(), torch.full_like(ranks, math.nan), ranks)


def recall_key(recall_pct: float) -> str:
    """Name of the recall entry: ``recall_at_10pct`` for the official 10 %."""
    return f"recall_at_{recall_pct:g}pct"


def check_recall_pct(recall_pct: float) -> float:
    """``recall_pct`` if it is a percentage in (0, 100]; R@0 % or R@NaN % would be 0 whatever the model."""
    if not (isinstance(recall_pct, int | float) and 0 < recall_pct <= 100):
        raise ValueError(f"recall_pct must be a percentage in (0, 100], got {recall_pct!r}")
    return float(recall_pct)


def _check_chunk_rows(chunk_rows: int) -> None:
    if not (isinstance(chunk_rows, int) and chunk_rows >= 1):
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")


def metrics_from_ranks(ranks: Any, num_items: int | None = None, recall_pct: float = 10.0) -> dict[str, float]:
    """R@``recall_pct``% and median rank from 1-based ranks (NaN = no rank), with the official k = pct/100 · N.

    ``num_items`` is N (defaults to the number of ranks: one query per gallery item).
    """
    r = np.asarray(ranks.cpu() if isinstance(ranks, Tensor) else ranks, dtype=np.float64).reshape(-1)
    n = len(r) if num_items is None else int(num_items)
    if len(r) == 0 or n <= 0:
        raise ValueError("no queries to evaluate")
    check_recall_pct(recall_pct)
    k = recall_pct / 100 * n  # the official expression: a float, e.g. 33 → 3.3000000000000003
    finite = r[~np.isnan(r)]
    return {
        # NaN < k is False: a query without a rank is a miss, and it stays in the denominator.
        recall_key(recall_pct): float(np.mean(r < k)),
        "median_rank": float(np.median(finite)) if len(finite) else math.nan,
    }


def retrieval_metrics(
    scores: Any,
    *,
    recall_pct: float = 10.0,
    return_ranks: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> dict[str, Any]:
    """Official PSM R@10 % and median rank of an N×N score matrix (queries as rows, truth on the diagonal).

    Accepts a numpy array, a torch tensor (any device) or nested lists; returns
    ``{"recall_at_10pct": float, "median_rank": float}``. ``return_ranks=True`` adds ``ranks`` (float64
    numpy, 1-based, NaN = no rank), ``k`` and ``n``.
    """
    s = _as_tensor(scores)
    if s.dim() != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"scores must be a square N×N matrix, got shape {tuple(s.shape)}")
    n = s.shape[0]
    if n == 0:
        raise ValueError("scores is empty")
    _check_chunk_rows(chunk_rows)
    rows = torch.arange(n, device=s.device)
    parts = [diagonal_ranks(s[i : i + chunk_rows], rows[i : i + chunk_rows]) for i in range(0, n, chunk_rows)]
    ranks = torch.cat(parts).cpu().numpy()
    out: dict[str, Any] = metrics_from_ranks(ranks, n, recall_pct)
    if return_ranks:
        out.update(ranks=ranks, k=recall_pct / 100 * n, n=n)
    return out


# --- scores ---------------------------------------------------------------------------------------------


def _unit64(mu: Tensor) -> Tensor:
    # Re-normalise in float64, as the official evaluation's numpy code works on float64 unit means.
    mu = mu.double()
    return mu / mu.norm(dim=-1, keepdim=True)


def csd_scores(q_mu: Tensor, q_logvar: Tensor, g_mu: Tensor, g_logvar: Tensor) -> Tensor:
    """−CSD (queries × gallery, float64): −(2 − 2 μ̂_q·μ̂_g + Σσ²_q + Σσ²_g) with μ̂ = μ/‖μ‖ recomputed.

    ``q_mu``/``g_mu`` may be unnormalised. The query's Σσ² is constant per row (it never changes a
    ranking), but is kept so the values equal the official ones.
    """
    if q_mu.shape != q_logvar.shape or g_mu.shape != g_logvar.shape or q_mu.shape[-1] != g_mu.shape[-1]:
        raise ValueError(
            f"shape mismatch: q_mu {tuple(q_mu.shape)}, q_logvar {tuple(q_logvar.shape)}, "
            f"g_mu {tuple(g_mu.shape)}, g_logvar {tuple(g_logvar.shape)}"
        )
    g_mu = g_mu.to(q_mu.device)
    dist = 2 - 2 * (_unit64(q_mu) @ _unit64(g_mu).T)
    dist = dist + q_logvar.double().exp().sum(-1, keepdim=True)
    dist = dist + g_logvar.to(q_mu.device).double().exp().sum(-1)[None, :]
    return -dist


def cosine_scores(q_mu: Tensor, g_mu: Tensor) -> Tensor:
    """Cosine similarity (queries × gallery, float64) of re-normalised μ: the deterministic models' score."""
    return _unit64(q_mu) @ _unit64(g_mu.to(q_mu.device)).T


def pair_scores(query: GaussianLike, gallery: GaussianLike) -> Tensor:
    """−CSD when both sides carry log σ², else the cosine (the official choice by loss type)."""
    if query.logvar is not None and gallery.logvar is not None:
        return csd_scores(query.unnormalized_mean, query.logvar, gallery.unnormalized_mean, gallery.logvar)
    if (query.logvar is None) != (gallery.logvar is None):
        raise ValueError("query and gallery must both be probabilistic or both deterministic")
    return cosine_scores(query.unnormalized_mean, gallery.unnormalized_mean)


def fuse_query(emb_a: G, emb_b: G) -> G:
    """Query with added text (official ``add_text``): μ = l2n(μ_a,raw + μ_b,raw), log σ² = lv_a + lv_b.

    The raw (unnormalised) means are summed; variances multiply. Returns the same type as ``emb_a``.
    """
    raw = emb_a.unnormalized_mean + emb_b.unnormalized_mean.to(emb_a.unnormalized_mean.device)
    logvar = None
    if emb_a.logvar is not None and emb_b.logvar is not None:
        logvar = emb_a.logvar + emb_b.logvar.to(emb_a.logvar.device)
    elif (emb_a.logvar is None) != (emb_b.logvar is None):
        raise ValueError("cannot fuse a probabilistic and a deterministic embedding")
    return type(emb_a)(raw / raw.norm(dim=-1, keepdim=True), logvar, raw)


def retrieval_ranks(
    query: GaussianLike,
    gallery: GaussianLike,
    *,
    positives: Tensor | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Tensor:
    """Ranks (float64, on the query's device) of each query's positive among the gallery, never forming N×N.

    Scores blocks of ``chunk_rows`` queries at a time (−CSD or cosine, see :func:`pair_scores`); query i's
    positive is gallery item ``positives[i]`` (default i).
    """
    _check_chunk_rows(chunk_rows)
    n = query.unnormalized_mean.shape[0]
    device = query.unnormalized_mean.device
    if positives is None:
        if gallery.unnormalized_mean.shape[0] != n:
            raise ValueError("without positives, query and gallery must have the same number of items")
        positives = torch.arange(n, device=device)
    parts = []
    for i in range(0, n, chunk_rows):
        block = _rows(query, slice(i, i + chunk_rows))
        parts.append(diagonal_ranks(pair_scores(block, gallery), positives[i : i + chunk_rows]))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)


class _Rows:
    # A row block of an embedding, so scoring works on any GaussianLike without constructing its type.
    def __init__(self, mean: Tensor, logvar: Tensor | None, unnormalized_mean: Tensor) -> None:
        self.mean, self.logvar, self.unnormalized_mean = mean, logvar, unnormalized_mean


def _rows(emb: GaussianLike, index: slice) -> _Rows:
    return _Rows(emb.mean[index], None if emb.logvar is None else emb.logvar[index], emb.unnormalized_mean[index])


def sigma_l1(logvar: Tensor) -> Tensor:
    """Per-sample uncertainty ‖σ‖₁ = Σ_k exp(log σ²_k / 2) in float64 (PSM's ``std_norm``)."""
    return (logvar.double() / 2).exp().sum(-1)
