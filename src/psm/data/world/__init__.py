"""The embedded offline world: a procedurally generated region with imagery, sounds, captions and truth.

Light on import (the ``psm`` command line imports this package to register ``psm world``); the heavy
modules load on first use::

    from psm.data.world import generate_world, load_world

    info = generate_world("worlds/tiny", size="tiny", seed=0)
    world = load_world("worlds/tiny")
    world.probability("dawn_chorus", 52.45, 12.6, hour=6, month=5)

Modules: ``grid`` (region, CRS, grids), ``noise``, ``landcover``, ``render`` (imagery), ``rules`` (the
truth's definition), ``truth`` (the truth function), ``events`` (sound synthesis), ``mixing`` (clips and
encoding), ``captions``, ``plan`` (per-sample decisions), ``generate``, ``world`` (reading back), ``stream``,
``baseline`` and ``picture``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["generate_world", "load_world"]


def generate_world(*args: Any, **kwargs: Any):
    """See :func:`psm.data.world.generate.generate_world`."""
    from psm.data.world.generate import generate_world as _generate

    return _generate(*args, **kwargs)


def load_world(path):
    """See :func:`psm.data.world.world.load_world`."""
    from psm.data.world.world import load_world as _load

    return _load(path)
