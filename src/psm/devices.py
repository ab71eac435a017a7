"""Which torch device a command-line ``--device`` names: one check for every command."""

from __future__ import annotations


def resolve_device(name: str | None) -> str:
    """The device ``name`` names (``None`` or ``"auto"``: cuda when there is one, else cpu).

    A name torch does not know, or a GPU this machine lacks, is a ``ValueError`` saying so, instead of an error
    from deep inside model loading.
    """
    import torch

    if name is None or name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a torch device (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name
