"""File permissions for what we write: the mode a plain `open` would give.

safetensors writes through a private temporary file, and so does our own atomic video export
(`tempfile.mkstemp`): both leave mode 0600, so a model folder, a LoRA or a video would be unreadable to
other users (a web server, a shared cache, a colleague). `usual_mode` restores 0666 less the umask.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def usual_mode(path: str | os.PathLike) -> None:
    """Give `path` the mode a file created by `open(path, "w")` would have."""
    os.chmod(path, 0o666 & ~umask())


def probe_writable(folder: str | os.PathLike) -> None:
    """Create and remove a file in `folder`: the one sure test that files can be created there
    (permissions, a read-only or pseudo file system, a full disk). Raises the `OSError` if not."""
    handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
    os.close(handle)
    os.unlink(probe)


def prepare_folder(folder: str | os.PathLike) -> None:
    """Create `folder` if missing and check that a file can be written there, so that a folder we cannot
    write to fails in one line before a model loads, not after the first result. `InputError` if not."""
    from cogvideox.errors import InputError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe_writable(folder)
    except OSError as e:
        raise InputError(f"cannot write to {folder}: {e.strerror or e}") from None
