"""Atomic, symlink-safe file writes: the one way every room writes a result, pin, cache or table file.

A file is written to ``<name>.tmp-<pid><suffix>`` in its own folder, created with O_CREAT|O_EXCL|O_NOFOLLOW
(a leftover or planted entry of that name is unlinked first: unlinking removes a link, never its target),
fsync'd and moved onto the final name with ``os.replace``, which replaces a symlink planted there instead of
writing through it (issue 10 items 4 and 9). Readers see the old file or the new one, never a partial one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _open_new(path: Path) -> int:
    """Create ``path`` for writing; never through a symlink or file planted there (O_CREAT|O_EXCL|O_NOFOLLOW)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    if path.is_symlink() or path.exists():
        path.unlink()
    return os.open(path, flags, 0o644)


@contextlib.contextmanager
def atomic_writer(path, suffix: str = ""):
    """Yield a binary file object whose contents replace ``path`` atomically when the block ends.

    ``suffix`` extends the temporary name (e.g. a thread id where threads of one process may write the
    same file). On error the temporary is removed and ``path`` is untouched; the folder is fsync'd after
    the rename."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}{suffix}")
    f = os.fdopen(_open_new(tmp), "wb")
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def write_bytes_atomic(path, data: bytes, suffix: str = "") -> None:
    with atomic_writer(path, suffix) as f:
        f.write(data)
