"""File permissions for what we write (the mode a plain `open` would give), writable and locked folders.

safetensors writes through a private temporary file, and so does our own atomic video export
(`tempfile.mkstemp`): both leave mode 0600, so a model folder, a LoRA or a video would be unreadable to
other users (a web server, a shared cache, a colleague). `usual_mode` restores 0666 less the umask.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
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


def write_into_place(path: Path, write: Callable[[str], None]) -> Path:
    """`write(temporary)` on a new private file beside `path`, then the usual mode and a rename onto
    `path`: the file appears complete or not at all, and an earlier one stays until then. `InputError` in
    one line when the folder takes no file (permissions, a read-only or pseudo file system); whatever
    `write` raises comes through, with the temporary file removed."""
    return write_all_into_place([path], lambda temporaries: write(temporaries[0]))[0]


def write_all_into_place(paths: Sequence[Path], write: Callable[[list[str]], None]) -> list[Path]:
    """`write_into_place` for several files written together (the frames of a PNG sequence): `write`
    gets a temporary file beside each path, and only once it has filled them all are they renamed into
    place; on any failure none is, and every temporary file is removed."""
    from cogvideox.errors import InputError

    temporaries: list[str] = []
    try:
        for path in paths:
            try:
                handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.",
                                                     suffix=f"{path.suffix.lower()}.part", dir=path.parent)  # fmt: skip
            except OSError as e:
                raise InputError(f"cannot write {path}: {e.strerror or e}") from None
            os.close(handle)
            temporaries.append(temporary)
        write(temporaries)
        for temporary in temporaries:
            usual_mode(temporary)  # mkstemp made it private
        for temporary, path in zip(temporaries, paths):
            os.replace(temporary, path)
    except BaseException:
        for temporary in temporaries:
            Path(temporary).unlink(missing_ok=True)
        raise
    return list(paths)


def write_or_rescue(path: Path, write: Callable[[Path], object], what: str) -> Path:
    """`write(path)`, but if the folder stopped taking files since it was checked (a full disk, a lost
    mount), `write` into a new temporary folder instead and raise `InputError` saying where the `what`
    ("video", "latents file") went, rather than lose the minutes of work that made it."""
    from cogvideox.errors import InputError

    try:
        write(path)
    except (OSError, InputError) as e:
        rescue = Path(tempfile.mkdtemp(prefix="cogvideox-")) / path.name
        write(rescue)
        raise InputError(f"could not write {path} ({e}); the {what} was saved to {rescue} instead") from None
    return path


def write_all_or_rescue(paths: Sequence[Path], write: Callable[[int, Path], object], what: str) -> list[Path]:
    """`write_or_rescue` for several files made together (the videos of --num-videos): `write(i, path)`
    writes the i-th; one the folder refuses does not stop the others, and the error names every rescue."""
    from cogvideox.errors import InputError

    problems = []
    for i, path in enumerate(paths):
        try:
            write_or_rescue(path, lambda target: write(i, target), what)
        except InputError as e:
            problems.append(str(e))
    if problems:
        raise InputError("; ".join(problems))
    return list(paths)


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


def lock_folder(folder: Path, name: str, holder: str, doing: str, flag: str):
    """An open lock file `folder/name` holding an exclusive lock on the folder (released when closed), or
    `InputError` when another process holds it ("another {holder} is {doing} {folder}; ... give another
    {flag}"): two batches or two training runs in one folder would make everything twice. On a file
    system that has no locks (some network and FUSE mounts) the work goes on with a warning: the lock
    guards against a mistake, and refusing would make such a folder unusable."""
    import fcntl

    from cogvideox.errors import InputError

    try:
        handle = open(folder / name, "a")
    except OSError as e:
        raise InputError(f"cannot open {folder / name}: {e.strerror or e}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise InputError(f"another {holder} is {doing} {folder}; wait for it to finish, or give another {flag}") from None
    except OSError as e:
        warnings.warn(
            f"cannot lock {folder} ({e.strerror or e}): nothing stops another {holder} from writing there too",
            stacklevel=3,
        )
    return handle


def parse_json(text: str | bytes):
    """The JSON value `text` holds. `ValueError` saying why it is not JSON we can read: not valid JSON,
    nested deeper than the parser's recursion reaches ("[[[[..."), or an integer longer than Python
    converts (4300 digits); json.loads alone raises a RecursionError for the second."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("not valid JSON: nested too deep") from None
    except ValueError as e:  # JSONDecodeError, and the integer too long to convert
        raise ValueError(f"not valid JSON: {e}") from None


def read_json(path: Path):
    """The JSON value a file holds. `ValueError` saying why a file is not JSON we can read: not UTF-8
    text, or not JSON `parse_json` reads; `OSError` for a file that cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte {e.start})") from None
    return parse_json(text)
