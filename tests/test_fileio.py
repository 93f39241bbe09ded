import os
import stat

import pytest

from gpt_2_simple.fileio import UnsafePathError, atomic_write, confined


def test_atomic_write_replaces_and_keeps_permissions(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    with atomic_write(target, "w") as f:
        f.write("first\nline")
    assert target.read_bytes() == b"first\nline"
    with atomic_write(target, "w") as f:
        f.write("second")
    assert target.read_text() == "second"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


def test_atomic_write_failure_leaves_old_file(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write(b"partial new content")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_rewritten_file_keeps_its_permissions(tmp_path):
    target = tmp_path / "secret.txt"
    target.write_text("old")
    os.chmod(target, 0o600)  # e.g. a run folder's files made private by their owner
    with atomic_write(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o600
    os.chmod(target, 0o640)
    with atomic_write(target) as f:
        f.write(b"newer")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_atomic_write_never_sets_the_process_umask(tmp_path, monkeypatch):
    """The umask is process-wide: setting it even for a moment (to read it) let another thread
    create files with mode 0666 under umask 077. Spy on os.umask (the real one still runs)."""
    calls = []
    real = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real(mask))
    old = real(0o077)
    try:
        with atomic_write(tmp_path / "new.bin") as f:
            f.write(b"x")
        # A new file still gets the usual permissions, from the kernel applying the umask.
        assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o600
    finally:
        real(old)
    assert calls == []


@pytest.mark.parametrize("name, problem", [
    ("../x", "climbs out"), ("a/../../x", "climbs out"), ("..\\x", "climbs out"), ("/etc/passwd", "absolute"),
    ("C:\\x", "absolute"), ("\\\\server\\share", "absolute"), ("", "empty"), ("a\x00b", "control character"),
    ("./.", "names no file"),
])
def test_confined_refuses_names_that_leave_the_folder(tmp_path, name, problem):
    with pytest.raises(UnsafePathError, match=f"run_name .* {problem}.* must stay inside .*; use another"):
        confined(tmp_path, name, what="run_name", fix="use another")
    assert issubclass(UnsafePathError, ValueError)


def test_confined_accepts_relative_names(tmp_path):
    assert confined(tmp_path, "run1", what="run_name") == tmp_path / "run1"
    assert confined(tmp_path, "a/b", what="run_name") == tmp_path / "a" / "b"
    assert confined(tmp_path, "a..b", what="run_name") == tmp_path / "a..b"  # dots inside a name are fine
    with pytest.raises(UnsafePathError, match="is a path, not a plain name"):
        confined(tmp_path, "a/b", what="file_name", single=True)
