"""Evaluation: the official retrieval metrics (vectorised), the paper's tables, and embedding export.

``from psm.evaluation import retrieval_metrics`` is the stable entry point. Names are resolved lazily
(PEP 562) so that ``psm --help``, which imports :mod:`psm.evaluation.command`, does not pay for torch;
:mod:`psm.evaluation.retrieval` itself imports only numpy and torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_RETRIEVAL_NAMES = (
    "cosine_scores",
    "csd_scores",
    "diagonal_ranks",
    "fuse_query",
    "metrics_from_ranks",
    "retrieval_metrics",
    "retrieval_ranks",
    "sigma_l1",
)

__all__ = list(_RETRIEVAL_NAMES)


def __getattr__(name: str) -> Any:
    if name in _RETRIEVAL_NAMES:
        return getattr(importlib.import_module("psm.evaluation.retrieval"), name)
    raise AttributeError(f"module 'psm.evaluation' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_RETRIEVAL_NAMES])
