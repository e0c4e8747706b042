"""Files that are whole or absent, and on disk once written: downtime packs, their schedule's status, backups."""
from __future__ import annotations

import os
from pathlib import Path


def replace_durably(written: str | Path, path: str | Path) -> None:
    """Put the complete file `written` at `path`: synced first, then renamed, the rename itself synced."""
    fd = os.open(written, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(written, path)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename survives a power cut
    finally:
        os.close(directory)


def write_atomically(path: Path, content: bytes) -> None:
    """`content` at `path`, all of it or none of it, and on disk when this returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(content)
    replace_durably(temporary, path)
