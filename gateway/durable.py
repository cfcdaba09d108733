"""Write files so that after a crash they are either complete or absent."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (created, renamed, removed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, *, temp: Path | None = None, exclusive: bool = False) -> None:
    """Write `data` to `temp`, fsync it, rename it over `path`, then fsync the directory.

    Args:
        path: the final file.
        temp: the temporary name (default `<path>.tmp`), removed if anything fails.
        exclusive: refuse to reuse an existing temporary file (O_EXCL), and never replace `path`.
    """
    temp = path.with_name(path.name + ".tmp") if temp is None else temp
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(temp, flags, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.rename(temp, path)
        else:
            os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
