"""Google Drive helpers for Colaboratory, as in the original: back a run folder up to Drive and
restore it, as one ``checkpoint_<run>.tar`` archive or as a folder copy, and copy single files.

What the original lacked: copies into Drive and back are atomic (an interrupted copy never
replaces a good backup or a good local file with a torn one), restoring an archive refuses any
member that would land outside the working directory (tar path traversal, links pointing out,
devices), and the errors say what to do instead of a bare ``assert``.

The Drive folder is ``/content/drive/MyDrive`` (where ``mount_gdrive`` mounts it in Colab); the
environment variable ``GPT2S_GDRIVE_ROOT`` points these helpers at another folder (a synced
folder on a desktop, a temporary folder in tests).
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

from .fileio import atomic_write

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


def _copy_file(source: Path, destination: Path) -> None:
    """Copy through a temporary file renamed over ``destination``: a copy cut off half-way (a
    Colab disconnect) leaves the previous ``destination`` intact."""
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist, so there is nothing to copy")
    with open(source, "rb") as src, atomic_write(destination) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def copy_checkpoint_to_gdrive(run_name: str = "run1", copy_folder: bool = False) -> None:
    """Back up checkpoint/<run_name> to Drive: as checkpoint_<run_name>.tar (also left in the
    working directory, as the original did), or, with ``copy_folder``, as a folder copy that
    updates an earlier one in place."""
    is_mounted()
    checkpoint_folder = os.path.join("checkpoint", run_name)
    if not os.path.isdir(checkpoint_folder):
        raise FileNotFoundError(f"{checkpoint_folder} does not exist: train with run_name={run_name!r} first")
    if copy_folder:
        shutil.copytree(checkpoint_folder, _on_drive(checkpoint_folder), dirs_exist_ok=True, copy_function=_copy_entry)
        return
    file_path = get_tarfile_name(checkpoint_folder)
    with atomic_write(file_path) as f, tarfile.open(fileobj=f, mode="w") as tar:
        tar.add(checkpoint_folder)
    _copy_file(Path(file_path), _on_drive(file_path))


def _copy_entry(source: str, destination: str) -> str:
    _copy_file(Path(source), Path(destination))
    return destination


def copy_checkpoint_from_gdrive(run_name: str = "run1", copy_folder: bool = False) -> None:
    """Restore checkpoint/<run_name> from the backup ``copy_checkpoint_to_gdrive`` made."""
    is_mounted()
    checkpoint_folder = os.path.join("checkpoint", run_name)
    if copy_folder:
        source = _on_drive(checkpoint_folder)
        if not source.is_dir():
            raise FileNotFoundError(f"{source} does not exist: back the run up with copy_checkpoint_to_gdrive(copy_folder=True) first")
        shutil.copytree(source, checkpoint_folder, dirs_exist_ok=True, copy_function=_copy_entry)
        return
    file_path = get_tarfile_name(checkpoint_folder)
    _copy_file(_on_drive(file_path), Path(file_path))
    with tarfile.open(file_path, "r") as tar:
        _check_members(tar, file_path)
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: the library's own guard too
            tar.extractall(filter="data")
        else:
            tar.extractall()


def _check_members(tar: tarfile.TarFile, name: str) -> None:
    """Refuse an archive any member of which would be written, or link, outside the working
    directory, or is a device or FIFO."""
    here = os.path.realpath(os.getcwd())

    def inside(path: str) -> bool:
        return os.path.commonpath([here, os.path.realpath(os.path.join(here, path))]) == here

    for member in tar.getmembers():
        problem = None
        if os.path.isabs(member.name) or not inside(member.name):
            problem = "would be written outside the working directory"
        elif member.issym() and not inside(os.path.join(os.path.dirname(member.name), member.linkname)):
            problem = f"is a link to {member.linkname}, outside the working directory"
        elif member.islnk() and not inside(member.linkname):
            problem = f"is a hard link to {member.linkname}, outside the working directory"
        elif not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
            problem = "is a device or FIFO"
        if problem:
            raise ValueError(
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
