"""Google Drive helpers for Colaboratory, as in the original: back a run folder up to Drive and
restore it, as one ``checkpoint_<run>.tar`` archive or as a folder copy, and copy single files.

What the original lacked: copies into Drive and back are atomic (an interrupted copy never
replaces a good backup or a good local file with a torn one), restoring an archive writes only
inside ``checkpoint/<run>`` and refuses an archive with any member that would land elsewhere (tar
path traversal), links or devices, on every Python version; a folder copy (``copy_folder=True``)
refuses links in the folder it copies, never following them; and the errors say what to do
instead of a bare ``assert``.

The Drive folder is ``/content/drive/MyDrive`` (where ``mount_gdrive`` mounts it in Colab); the
environment variable ``GPT2S_GDRIVE_ROOT`` points these helpers at another folder (a synced
folder on a desktop, a temporary folder in tests).
"""

from __future__ import annotations

import errno
import os
import shutil
import tarfile
from pathlib import Path

from .fileio import UnsafePathError, atomic_write, confined, run_folder

__all__ = [
    "mount_gdrive",
    "is_mounted",
    "get_tarfile_name",
    "copy_checkpoint_to_gdrive",
    "copy_checkpoint_from_gdrive",
    "copy_file_to_gdrive",
    "copy_file_from_gdrive",
]

MOUNT_POINT = "/content/drive"


class DriveNotAvailable(FileNotFoundError, AssertionError):
    """Drive is not mounted or cannot be mounted here. Also an ``AssertionError``, which is
    what the original raised, so scripts that caught that keep working."""


def drive_root() -> Path:
    """The folder that stands for "My Drive"."""
    return Path(os.environ.get("GPT2S_GDRIVE_ROOT") or os.path.join(MOUNT_POINT, "MyDrive"))


def mount_gdrive() -> None:
    """Mount your Google Drive at /content/drive (Colaboratory only; asks for authorisation)."""
    try:
        from google.colab import drive
    except ImportError:
        raise DriveNotAvailable(
            "mount_gdrive() works only inside Google Colaboratory; elsewhere set GPT2S_GDRIVE_ROOT to a folder "
            "(for example a Drive folder synced to this machine) and use the copy helpers directly"
        ) from None
    drive.mount(MOUNT_POINT)


def is_mounted() -> None:
    """Raise ``DriveNotAvailable`` unless the Drive folder exists (as the original, which
    asserted it)."""
    root = drive_root()
    if not root.is_dir():
        raise DriveNotAvailable(
            f"Google Drive is not mounted ({root} does not exist): call gpt2.mount_gdrive() first in Colab, "
            "or set GPT2S_GDRIVE_ROOT to the folder to use"
        )


def get_tarfile_name(checkpoint_folder: str) -> str:
    """'checkpoint/run1' -> 'checkpoint_run1.tar': the archive's name, locally and on Drive."""
    return checkpoint_folder.replace(os.path.sep, "_") + ".tar"


def _on_drive(relative: str | os.PathLike) -> Path:
    """``relative`` inside the Drive folder, refusing names that climb out of it."""
    root = drive_root()
    target = Path(os.path.normpath(root / str(relative).lstrip("/\\")))
    if os.path.commonpath([target, os.path.normpath(root)]) != os.path.normpath(root):
        raise ValueError(f"{relative!r} points outside the Drive folder {root}; use a path inside the working directory")
    return target


def _copy_file(source: Path, destination: Path, *, follow_links: bool = True) -> None:
    """Copy through a temporary file renamed over ``destination``: a copy cut off half-way (a
    Colab disconnect) leaves the previous ``destination`` intact. Without ``follow_links`` a
    ``source`` that became a link since it was checked is refused (O_NOFOLLOW)."""
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist, so there is nothing to copy")
    try:
        fd = os.open(source, os.O_RDONLY | (0 if follow_links else getattr(os, "O_NOFOLLOW", 0)))
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise UnsafePathError(f"refusing to copy {source}: it is a link; remove it and try again") from None
    with open(fd, "rb") as src, atomic_write(destination) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def copy_checkpoint_to_gdrive(run_name: str = "run1", copy_folder: bool = False) -> None:
    """Back up checkpoint/<run_name> to Drive: as checkpoint_<run_name>.tar (also left in the
    working directory, as the original did), or, with ``copy_folder``, as a folder copy that
    updates an earlier one in place."""
    is_mounted()
    checkpoint_folder = os.fspath(run_folder("checkpoint", run_name))
    if not os.path.isdir(checkpoint_folder):
        raise FileNotFoundError(f"{checkpoint_folder} does not exist: train with run_name={run_name!r} first")
    if copy_folder:
        _copy_folder(Path(checkpoint_folder), _on_drive(checkpoint_folder))
        return
    file_path = get_tarfile_name(checkpoint_folder)
    with atomic_write(file_path) as f, tarfile.open(fileobj=f, mode="w") as tar:
        tar.add(checkpoint_folder)
    _copy_file(Path(file_path), _on_drive(file_path))


def _copy_folder(source: Path, destination: Path) -> None:
    """Copy the tree ``source`` into ``destination``, updating an earlier copy in place, each file
    atomically. A backup of a run folder holds only files and folders: a link anywhere in
    ``source`` (which may come from someone else's Drive) is refused before anything is copied,
    never followed (a link to ~/.ssh would otherwise copy its target's content into the run)."""
    files = []
    for folder, dirs, names in os.walk(source):  # links to folders are listed in dirs, never entered
        for name in dirs + names:
            path = Path(folder, name)
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                kind = "a link" if path.is_symlink() else "a device, FIFO or socket"
                raise UnsafePathError(
                    f"refusing to copy {source}: {path} is {kind}; a backup made by copy_checkpoint_to_gdrive holds only files "
                    "and folders. Remove it (or copy the files you trust by hand) and try again"
                )
        files += [Path(folder, name).relative_to(source) for name in names]
    destination.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(destination)
    for relative in files:
        (destination / relative).parent.mkdir(parents=True, exist_ok=True)
        real = os.path.realpath((destination / relative).parent)
        if os.path.commonpath([root, real]) != root:  # a link already in the destination is not followed out
            raise UnsafePathError(f"refusing to copy {relative} into {destination}: it would be written through a link to {real}; "
                                  "remove that link and try again")
        _copy_file(source / relative, destination / relative, follow_links=False)


def copy_checkpoint_from_gdrive(run_name: str = "run1", copy_folder: bool = False) -> None:
    """Restore checkpoint/<run_name> from the backup ``copy_checkpoint_to_gdrive`` made."""
    is_mounted()
    checkpoint_folder = os.fspath(run_folder("checkpoint", run_name))
    if copy_folder:
        source = _on_drive(checkpoint_folder)
        if not source.is_dir():
            raise FileNotFoundError(f"{source} does not exist: back the run up with copy_checkpoint_to_gdrive(copy_folder=True) first")
        _copy_folder(source, Path(checkpoint_folder))
        return
    file_path = get_tarfile_name(checkpoint_folder)
    _copy_file(_on_drive(file_path), Path(file_path))
    with tarfile.open(file_path, "r") as tar:
        _extract(tar, file_path, Path(checkpoint_folder))


def _extract(tar: tarfile.TarFile, name: str, folder: Path) -> None:
    """Extract the archive of the run folder ``folder`` into it, and nowhere else.

    Checked before anything is written: every member is ``folder`` itself or inside it (no absolute
    name, no '..'), and is a file or a folder (links, devices and FIFOs are refused: a chain of
    links can lead anywhere, and a backup of a run folder holds none). While writing, each file's
    real parent folder must still lie inside ``folder`` (a link already on disk is not followed out).
    The extraction is our own, so this holds on every Python, with or without ``tarfile.data_filter``.
    """
    wanted = folder.parts
    plan = []
    for member in tar.getmembers():
        try:
            parts = confined(".", member.name, what="its name").parts
        except UnsafePathError as e:
            _refuse(name, member, f"would be written outside the working directory ({e})")
        if parts[: len(wanted)] != wanted:
            _refuse(name, member, f"would be written outside {os.fspath(folder)}")
        if not (member.isfile() or member.isdir()):
            kind = "a link" if member.issym() or member.islnk() else "a device or FIFO"
            _refuse(name, member, f"is {kind}" + (f" to {member.linkname!r}" if member.linkname else ""))
        plan.append((member, Path(*parts)))
    folder.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(folder)
    for member, path in plan:
        if member.isdir():
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        real = os.path.realpath(path.parent)
        if os.path.commonpath([root, real]) != root:
            _refuse(name, member, f"would be written through a link to {real}")
        with tar.extractfile(member) as src, atomic_write(path) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.utime(path, (member.mtime, member.mtime))  # as tar does: a cached engine export stays current


def _refuse(name: str, member: tarfile.TarInfo, problem: str):
    raise UnsafePathError(
        f"refusing to extract {name}: member {member.name!r} {problem}. It is not a backup made by "
        "copy_checkpoint_to_gdrive; inspect it with 'tar tvf' before extracting it by hand"
    )


def copy_file_to_gdrive(file_path: str) -> None:
    """Copy a file (path relative to the working directory) to the same path on Drive."""
    is_mounted()
    _copy_file(Path(file_path), _on_drive(file_path))


def copy_file_from_gdrive(file_path: str) -> None:
    """Copy a file from Drive to the same path in the working directory."""
    is_mounted()
    _copy_file(_on_drive(file_path), Path(file_path))
