"""Crash-safe file writes and confined paths.

``atomic_write``: a reader (or a process restarted after kill -9) sees the old file or the complete
new one, never a torn write. Used for checkpoints, exported engines, downloads, counters and outputs.

``confined``: every name that becomes a path (a run or model name, a file name a server or a
``checkpoint`` file or an archive supplies) goes through it, so a name from a stranger cannot reach
outside the folder it belongs in.
"""

from __future__ import annotations

import contextlib
import errno
import ntpath
import os
import secrets
import stat
from pathlib import Path, PurePosixPath
from typing import IO, Iterator

__all__ = ["atomic_write", "fsync_dir", "confined", "run_folder", "model_folder", "UnsafePathError"]


class UnsafePathError(ValueError):
    """A name would make a path outside the folder it belongs in (absolute, '..', a drive, NUL)."""


def _parts(name: str) -> list[str]:
    """The parts of a relative name, split at '/' and (on every OS: a Windows name reaches a Linux
    machine in a tar or a Drive copy) at '\\'."""
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def confined(folder: str | os.PathLike, name: str | os.PathLike, *, what: str, fix: str = "", single: bool = False) -> Path:
    """``folder / name``, refusing a ``name`` that could point outside ``folder``.

    The check is on the name itself, not on what the file system holds: refused are an empty name,
    an absolute one ('/x', 'C:\\x', '\\\\server\\x'), any '..' part, NUL and other control characters.
    ``single`` also refuses several parts ('a/b'): for file names. Links a user made inside
    ``folder`` (a run folder on another disk) are followed as usual. ``what`` names the argument
    and ``fix`` what to do, for the error (an ``UnsafePathError``, a ValueError).
    """
    text = os.fspath(name)
    problem = None
    if not isinstance(text, str) or not text.strip():
        problem = "is empty"
    elif any(ord(c) < 32 for c in text):
        problem = "holds a control character"
    elif PurePosixPath(text).is_absolute() or ntpath.isabs(text) or ntpath.splitdrive(text)[0]:
        problem = "is an absolute path"
    elif ".." in _parts(text):
        problem = "climbs out of its folder with '..'"
    elif not _parts(text):
        problem = "names no file or folder"
    elif single and len(_parts(text)) > 1:
        problem = "is a path, not a plain name"
    if problem:
        raise UnsafePathError(
            f"{what} {text!r} {problem}: it must stay inside {os.fspath(folder)}"
            + (f"; {fix}" if fix else "; use a plain name such as 'run1'")
        )
    return Path(folder).joinpath(*_parts(text))


def run_folder(checkpoint_dir: str | os.PathLike, run_name: str) -> Path:
    """``checkpoint_dir/run_name``, the run folder every function that takes a ``run_name`` uses."""
    return confined(checkpoint_dir, run_name, what="run_name",
                    fix="name the run with a plain name such as 'run1' (or 'project/run1'), and choose its base folder with checkpoint_dir")


def model_folder(model_dir: str | os.PathLike, model_name: str) -> Path:
    """``model_dir/model_name``, the folder of a downloaded model."""
    return confined(model_dir, model_name, what="model_name", fix="give a model name such as '124M', and its base folder with model_dir")


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new file beside ``path``, named ``.<name>.<random>.tmp``. Created with mode 0666 so the
    kernel applies this process's umask, as for any new file: reading the umask would mean setting
    it, for a moment, for every thread of the process."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path.parent))


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was. A new file gets
    the usual permissions (0666 less the umask); a rewritten one keeps those it had.
    Text mode defaults to UTF-8 and '\\n' line endings on every OS.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        if "b" in mode:
            f = os.fdopen(fd, mode)
        else:
            f = os.fdopen(fd, mode, encoding=encoding or "utf-8", newline="\n")
        with f:
            with contextlib.suppress(FileNotFoundError):
                if hasattr(os, "fchmod"):
                    os.fchmod(f.fileno(), stat.S_IMODE(os.stat(path).st_mode))
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
