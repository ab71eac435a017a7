"""``psm evaluate`` and ``psm embed`` (registered by psm.cli; heavy imports happen inside the handlers)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``evaluate`` and ``embed`` commands."""
