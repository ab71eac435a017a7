"""psm: probabilistic soundscape mapping (PSM, Khanal et al., ACM MM 2024, and beyond)."""

__version__ = "0.1.0"
