"""``psm world ...`` sub-commands (registered by psm.cli; heavy imports happen inside the handlers)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``world`` command group."""
