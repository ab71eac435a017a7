"""Soundscape maps: regions and grids (grid), imagery providers (sources, tiles), the embedding index (index).

Import-light on purpose: ``psm --help`` imports this package; each module imports what it needs itself.
"""
