"""Writing files so that no reader ever sees half of one: a temporary sibling, then a rename.

Every output of psm (manifests, checkpoints, tables, maps, index files, tile caches) is written this way.
The temporary file is created with mode 0o666 and the umask applied, as any new file would be, so the
rename hands on the permissions a user expects (``tempfile.mkstemp`` makes 0600 files: shared outputs would
become private).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def temp_sibling(path: str | os.PathLike[str], suffix: str = ".tmp") -> tuple[int, Path]:
    """A new, exclusive file ``.<name>.<random><suffix>`` next to ``path``: (open fd for writing, its path)."""
    path = Path(path)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = ".tmp", durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for a writer to fill; rename it onto ``path`` if the block succeeds.

    ``suffix`` is for writers that choose a format by it (e.g. ``".tif"``). ``durable`` flushes the file to
    disk before the rename, so a crash cannot leave a complete name over incomplete data. On any error, or
    an interrupt, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_sibling(path, suffix)
    os.close(fd)
    try:
        yield tmp
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    path = Path(path)
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str, durable: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    return write_bytes_atomic(path, text.encode("utf-8"), durable=durable)


def make_shared_dir(parent: str | os.PathLike[str], prefix: str) -> Path:
    """A new, exclusive folder ``<prefix><random>`` in ``parent`` with the umask's mode (``mkdtemp`` makes 0700
    folders, which other users of a shared index could not read)."""
    parent = Path(parent)
    while True:
        folder = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            folder.mkdir(mode=0o777)
            return folder
        except FileExistsError:
            continue
