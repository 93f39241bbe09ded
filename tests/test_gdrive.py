"""gdrive.py: the original's Colab backup helpers, run against a temporary "Drive" folder."""

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest

import gpt_2_simple as gpt2
from gpt_2_simple import gdrive
from gpt_2_simple.fileio import UnsafePathError


@pytest.fixture
def drive(tmp_path, monkeypatch):
    """Working directory tmp/work with a run folder; the Drive folder is tmp/drive."""
    work, root = tmp_path / "work", tmp_path / "drive"
    run = work / "checkpoint" / "run1"
    run.mkdir(parents=True)
    (run / "model-5.safetensors").write_bytes(os.urandom(5000))
    (run / "counter").write_text("5\n")
    (run / "logs").mkdir()
    (run / "logs" / "log.jsonl").write_text('{"step": 5}\n')
    root.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("GPT2S_GDRIVE_ROOT", str(root))
    return work, root


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_not_mounted_and_not_colab(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2S_GDRIVE_ROOT", str(tmp_path / "absent"))
    for call in (gpt2.is_mounted, gpt2.copy_checkpoint_to_gdrive, lambda: gpt2.copy_file_to_gdrive("x.txt")):
        with pytest.raises(FileNotFoundError, match="Google Drive is not mounted .* call gpt2.mount_gdrive\\(\\) first"):
            call()
    with pytest.raises(AssertionError):  # what the original raised: scripts catching it still work
        gpt2.is_mounted()
    with pytest.raises(gdrive.DriveNotAvailable, match="works only inside Google Colaboratory"):
        gpt2.mount_gdrive()
    monkeypatch.delenv("GPT2S_GDRIVE_ROOT")
    assert gdrive.drive_root() == Path("/content/drive/MyDrive")


def test_tarfile_name():
    assert gpt2.get_tarfile_name(os.path.join("checkpoint", "run1")) == "checkpoint_run1.tar"


def test_archive_round_trip(drive):
    work, root = drive
    before = _tree(work / "checkpoint")
    gpt2.copy_checkpoint_to_gdrive()
    assert (work / "checkpoint_run1.tar").is_file()  # left locally too, as the original did
    with tarfile.open(root / "checkpoint_run1.tar") as tar:  # the layout the original's archives have
        assert {m.name for m in tar.getmembers() if m.isfile()} == {
            "checkpoint/run1/model-5.safetensors", "checkpoint/run1/counter", "checkpoint/run1/logs/log.jsonl"
        }
    shutil.rmtree(work / "checkpoint")
    os.remove(work / "checkpoint_run1.tar")
    gpt2.copy_checkpoint_from_gdrive()
    assert _tree(work / "checkpoint") == before


def test_folder_copy_round_trip_updates_in_place(drive):
    work, root = drive
    gpt2.copy_checkpoint_to_gdrive(copy_folder=True)
    (work / "checkpoint" / "run1" / "counter").write_text("9\n")
    gpt2.copy_checkpoint_to_gdrive(copy_folder=True)  # a second backup over the first (the original failed here)
    assert (root / "checkpoint" / "run1" / "counter").read_text() == "9\n"
    before = _tree(work / "checkpoint")
    shutil.rmtree(work / "checkpoint")
    gpt2.copy_checkpoint_from_gdrive(copy_folder=True)
    assert _tree(work / "checkpoint") == before
    with pytest.raises(FileNotFoundError, match="checkpoint/run2 does not exist"):
        gpt2.copy_checkpoint_from_gdrive(run_name="run2", copy_folder=True)
    with pytest.raises(FileNotFoundError, match="train with run_name='run2' first"):
        gpt2.copy_checkpoint_to_gdrive(run_name="run2")


def test_single_files(drive):
    work, root = drive
    (work / "gen").mkdir()
    (work / "gen" / "out.txt").write_text("héllo\n", encoding="utf-8")
    gpt2.copy_file_to_gdrive("gen/out.txt")
    assert (root / "gen" / "out.txt").read_text(encoding="utf-8") == "héllo\n"
    os.remove(work / "gen" / "out.txt")
    gpt2.copy_file_from_gdrive("gen/out.txt")
    assert (work / "gen" / "out.txt").read_text(encoding="utf-8") == "héllo\n"
    with pytest.raises(ValueError, match="points outside the Drive folder"):
        gpt2.copy_file_to_gdrive("../escape.txt")
    with pytest.raises(FileNotFoundError, match="nothing to copy"):
        gpt2.copy_file_from_gdrive("absent.txt")


def test_interrupted_copy_keeps_the_previous_backup(drive, monkeypatch):
    work, root = drive
    gpt2.copy_file_to_gdrive("checkpoint/run1/model-5.safetensors")
    good = (root / "checkpoint" / "run1" / "model-5.safetensors").read_bytes()
    (work / "checkpoint" / "run1" / "model-5.safetensors").write_bytes(os.urandom(5000))

    def cut(src, dst, length=0):
        dst.write(src.read(100))
        raise OSError("transport endpoint is not connected")

    monkeypatch.setattr(shutil, "copyfileobj", cut)
    with pytest.raises(OSError, match="not connected"):
        gpt2.copy_file_to_gdrive("checkpoint/run1/model-5.safetensors")
    assert (root / "checkpoint" / "run1" / "model-5.safetensors").read_bytes() == good
    assert os.listdir(root / "checkpoint" / "run1") == ["model-5.safetensors"]  # no temporary left


def _malicious_tar(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> None:
    with tarfile.open(path, "w") as tar:
        ok = tarfile.TarInfo("checkpoint/run1/counter")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"5\n"))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)


@pytest.mark.parametrize(
    "name, kind, link",
    [
        ("../escaped.txt", tarfile.REGTYPE, ""),
        ("checkpoint/../../escaped.txt", tarfile.REGTYPE, ""),
        ("/tmp/gpt2s-absolute-escape.txt", tarfile.REGTYPE, ""),
        ("checkpoint/run1/link", tarfile.SYMTYPE, "../../../outside"),
        ("checkpoint/run1/abs-link", tarfile.SYMTYPE, "/etc/passwd"),
        ("checkpoint/run1/hard", tarfile.LNKTYPE, "../outside"),
        ("checkpoint/run1/dev", tarfile.CHRTYPE, ""),
    ],
)
def test_archive_that_escapes_is_refused(drive, name, kind, link):
    work, root = drive
    member = tarfile.TarInfo(name)
    member.type = kind
    member.linkname = link
    _malicious_tar(root / "checkpoint_run1.tar", member, b"pwned")
    before = _tree(work.parent)
    with pytest.raises(ValueError, match=f"refusing to extract checkpoint_run1.tar: member '{name}'"):
        gpt2.copy_checkpoint_from_gdrive()
    after = _tree(work.parent)
    assert set(after) - set(before) == {"work/checkpoint_run1.tar"}  # only the downloaded archive
    assert not Path("/tmp/gpt2s-absolute-escape.txt").exists()


def _archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            member.size = len(data) if member.isfile() else 0
            tar.addfile(member, io.BytesIO(data) if member.isfile() else None)


def _info(name: str, kind=tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type, member.linkname = kind, link
    return member


@pytest.mark.parametrize("name", ["checkpoint/run2/model-9.safetensors", "models/124M/hparams.json", "train.py", "checkpoint/counter"])
def test_archive_writes_only_into_its_own_run_folder(drive, name):
    """A restored tar may write checkpoint/run1 only, not other runs, models or the working directory."""
    work, root = drive
    _archive(root / "checkpoint_run1.tar", [(_info("checkpoint/run1/counter"), b"5\n"), (_info(name), b"pwned")])
    before = _tree(work.parent)
    with pytest.raises(UnsafePathError, match=f"member '{name}' would be written outside checkpoint/run1"):
        gpt2.copy_checkpoint_from_gdrive()
    assert set(_tree(work.parent)) - set(before) == {"work/checkpoint_run1.tar"}


def test_a_chain_of_links_cannot_escape_even_without_data_filter(drive, monkeypatch):
    """Links that each look harmless (a -> ., a/b -> ..) reach outside together; tarfile's own guard
    exists only on newer Pythons. Restoring is ours on every Python: links are refused outright."""
    work, root = drive
    monkeypatch.delattr(tarfile, "data_filter", raising=False)  # as on Python < 3.10.12 / 3.11.4
    _archive(root / "checkpoint_run1.tar", [
        (_info("checkpoint/run1/a", tarfile.SYMTYPE, "."), b""),
        (_info("checkpoint/run1/a/b", tarfile.SYMTYPE, ".."), b""),
        (_info("checkpoint/run1/a/b/b/b/escaped.txt"), b"pwned"),
    ])
    with pytest.raises(UnsafePathError, match=r"member 'checkpoint/run1/a' is a link to '\.'"):
        gpt2.copy_checkpoint_from_gdrive()
    assert not (work.parent / "escaped.txt").exists() and not (work / "escaped.txt").exists()
    assert not (work / "checkpoint" / "run1" / "a").exists()


def test_a_link_already_on_disk_is_not_followed_out(drive, tmp_path):
    work, root = drive
    outside = tmp_path / "outside"
    outside.mkdir()
    (work / "checkpoint" / "run1" / "sub").symlink_to(outside)  # left by something else
    _archive(root / "checkpoint_run1.tar", [(_info("checkpoint/run1/sub/x.txt"), b"pwned")])
    with pytest.raises(UnsafePathError, match="would be written through a link to"):
        gpt2.copy_checkpoint_from_gdrive()
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("run_name", ["../x", "/abs", ""])
def test_run_names_are_confined(drive, run_name):
    for call in (gpt2.copy_checkpoint_to_gdrive, gpt2.copy_checkpoint_from_gdrive):
        with pytest.raises(UnsafePathError, match="run_name .* must stay inside checkpoint"):
            call(run_name=run_name)


def test_restored_files_keep_their_times(drive):
    work, root = drive
    model = work / "checkpoint" / "run1" / "model-5.safetensors"
    os.utime(model, (1_600_000_000, 1_600_000_000))
    gpt2.copy_checkpoint_to_gdrive()
    shutil.rmtree(work / "checkpoint")
    gpt2.copy_checkpoint_from_gdrive()
    assert model.stat().st_mtime == 1_600_000_000


@pytest.mark.parametrize("target", ["file", "folder"])
def test_folder_copy_refuses_links_and_never_follows_them(drive, tmp_path, target):
    """A Drive folder from someone else may hold a link to a secret (a file or a folder); copy_folder
    would copy its content into the run. Refused before anything is copied."""
    work, root = drive
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("PRIVATE KEY")
    backup = root / "checkpoint" / "run1"
    backup.mkdir(parents=True)
    (backup / "counter").write_text("7\n")
    (backup / "model-7.safetensors").write_bytes(b"weights")
    (backup / "key").symlink_to(secret / "id_rsa" if target == "file" else secret)
    shutil.rmtree(work / "checkpoint")
    with pytest.raises(UnsafePathError, match=r"refusing to copy .*key is a link; .*holds only files and folders"):
        gpt2.copy_checkpoint_from_gdrive(copy_folder=True)
    assert not (work / "checkpoint").exists()  # nothing copied, not even the good files
    # the same for a backup: a link in the local run folder is not followed into Drive
    (work / "checkpoint" / "run1").mkdir(parents=True)
    (work / "checkpoint" / "run1" / "key").symlink_to(secret / "id_rsa")
    shutil.rmtree(root / "checkpoint")
    with pytest.raises(UnsafePathError, match="is a link"):
        gpt2.copy_checkpoint_to_gdrive(copy_folder=True)
    assert not any(p.name == "id_rsa" or p.read_bytes() == b"PRIVATE KEY" for p in root.rglob("*") if p.is_file())


def test_folder_copy_is_not_written_through_a_link_on_disk(drive, tmp_path):
    work, root = drive
    gpt2.copy_checkpoint_to_gdrive(copy_folder=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(work / "checkpoint" / "run1" / "logs")
    (work / "checkpoint" / "run1" / "logs").symlink_to(outside)  # left by something else
    with pytest.raises(UnsafePathError, match="would be written through a link to"):
        gpt2.copy_checkpoint_from_gdrive(copy_folder=True)
    assert list(outside.iterdir()) == []


def test_folder_copy_refuses_a_file_swapped_for_a_link(drive, tmp_path):
    """The check and the copy are apart in time: a file that becomes a link in between is still refused."""
    (tmp_path / "secret").write_text("PRIVATE KEY")
    source = drive[0] / "checkpoint" / "run1" / "counter"
    source.unlink()
    source.symlink_to(tmp_path / "secret")
    with pytest.raises(UnsafePathError, match="is a link"):
        gdrive._copy_file(source, tmp_path / "copy", follow_links=False)
    assert not (tmp_path / "copy").exists()
