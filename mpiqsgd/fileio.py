"""Atomic file writes: readers see the old file or the new one, never a torn mix.

Every writer puts the bytes in a temporary file beside the target (same directory, so the
rename stays on one filesystem), flushes and fsyncs it, then renames it over the target.
The temporary file is private (mode 0600, from :func:`tempfile.mkstemp`); ``plain_mode``
gives the result the permissions a plainly created file would have (0666 less the umask),
for files that others share (dataset caches, reports).
"""

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text"]


def atomic_write_bytes(path, data, plain_mode=False):
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix.

    Args:
        path: the file to write (its directory must exist).
        data: a bytes-like object.
        plain_mode: give the file the mode of a plainly created one (0666 less the umask)
            instead of the temporary file's 0600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if plain_mode:
        umask = os.umask(0)  # reading the umask means setting it; put it back at once
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)


def atomic_write_text(path, text, plain_mode=False):
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"), plain_mode=plain_mode)
