"""Atomic writes, one-line disk errors, and names that cannot escape their directory."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tunelab import paths
from tunelab.errors import TunelabError
from tunelab.paths import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    check_writable_dir,
    recover_directory,
    safe_child,
)


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_atomic_write_replaces_the_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "result.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert target.read_text() == '{\n  "a": 2\n}\n' and _listing(target.parent) == ["result.json"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_disk_full_mid_write_keeps_the_old_file_and_says_so_in_one_line(tmp_path, monkeypatch):
    target = tmp_path / "predictions.jsonl"
    atomic_write_bytes(target, b"old\n")

    def full(_fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(paths.os, "fsync", full)
    with pytest.raises(TunelabError) as info:
        atomic_write_bytes(target, b"new" * 1000)
    assert str(info.value) == f"cannot write {target}: No space left on device"
    assert target.read_bytes() == b"old\n" and _listing(tmp_path) == ["predictions.jsonl"]


def test_atomic_directory_is_all_or_nothing(tmp_path):
    target = tmp_path / "adapter"
    with atomic_directory(target) as tmp:
        (tmp / "w.txt").write_text("v1")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "w.txt").write_text("half")
        raise RuntimeError("killed while saving")
    assert (target / "w.txt").read_text() == "v1" and _listing(tmp_path) == ["adapter"]
    with atomic_directory(target) as tmp:
        (tmp / "w.txt").write_text("v2")
    assert (target / "w.txt").read_text() == "v2" and _listing(tmp_path) == ["adapter"]


def test_a_crash_between_the_two_renames_is_undone(tmp_path):
    target = tmp_path / "adapter"
    with atomic_directory(target) as tmp:
        (tmp / "w.txt").write_text("v1")
    os.replace(target, tmp_path / ".adapter.old")  # what a SIGKILL after the first rename leaves
    recover_directory(target)
    assert (target / "w.txt").read_text() == "v1"
    os.replace(target, tmp_path / ".adapter.old")
    with atomic_directory(target) as tmp:  # the next write recovers first, then replaces
        (tmp / "w.txt").write_text("v2")
    assert (target / "w.txt").read_text() == "v2" and _listing(tmp_path) == ["adapter"]


def test_safetensors_io_errors_become_one_line(tmp_path):
    pattern = r"^cannot write .*: (Not a directory|No such file or directory)$"
    with pytest.raises(TunelabError, match=pattern), paths._reported(tmp_path / "state.safetensors"):
        save_file({"a": torch.zeros(2)}, str(tmp_path / "missing" / "state.safetensors"))


def test_a_file_where_the_out_directory_should_be(tmp_path):
    (tmp_path / "runs").write_text("not a directory")
    with pytest.raises(TunelabError) as info:
        check_writable_dir(tmp_path / "runs" / "pt")
    assert str(info.value).startswith(f"cannot write {tmp_path / 'runs' / 'pt'}: ") and "\n" not in str(info.value)
    assert "a file is where a directory should be" in str(info.value)


def test_permission_denied_even_as_root():
    # chmod does not stop root; sysfs refuses new entries to everyone
    probe = Path("/sys/tunelab-probe")
    try:
        probe.mkdir()
    except PermissionError:
        pass
    except OSError as exc:
        pytest.skip(f"/sys here does not refuse writes with EPERM ({exc.strerror})")
    else:
        probe.rmdir()
        pytest.skip("/sys is writable here")
    with pytest.raises(TunelabError, match=r"^cannot write /sys/tunelab-probe/run: Operation not permitted$"):
        check_writable_dir(probe / "run")


def test_cli_reports_an_unwritable_out_in_one_line_exit_2(tmp_path):
    (tmp_path / "runs").write_text("")
    out = tmp_path / "runs" / "pt"
    proc = subprocess.run([sys.executable, "-m", "tunelab.cli", "run", "--model", "tiny", "--task", "date_format",
                           "--steps", "1", "--out", str(out), "-q"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    output = (proc.stdout + proc.stderr).strip()
    assert output.startswith(f"error: cannot write {out}: ") and "Traceback" not in output
    assert len(output.splitlines()) == 1, output


@pytest.mark.parametrize("name", ["..", ".", "", "../x", "a/../../b", "/etc/passwd", "a/b", "a\\b", "x\x00y"])
def test_safe_child_refuses_names_that_leave_the_root(tmp_path, name):
    with pytest.raises(TunelabError, match="invalid name|escapes"):
        safe_child(tmp_path, name)


def test_safe_child_refuses_a_symlink_pointing_outside(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "sneaky").symlink_to(tmp_path)
    with pytest.raises(TunelabError, match="escapes"):
        safe_child(tmp_path / "root", "sneaky")
    assert safe_child(tmp_path / "root", "task-1.v2") == (tmp_path / "root" / "task-1.v2").resolve()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs: a real full disk. Needs root and mount rights; skipped otherwise."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_is_one_line_and_leaves_nothing_behind(tiny_disk):
    from tunelab.checkpoint import latest_checkpoint, save_checkpoint

    with pytest.raises(TunelabError, match=f"^cannot write {tiny_disk / 'big.json'}: No space left on device$"):
        atomic_write_bytes(tiny_disk / "big.json", b"x" * 1_000_000)
    params = {"w": torch.nn.Parameter(torch.zeros(200_000))}  # 800 KB of weights, 1.6 MB of Adam moments
    optimizer = torch.optim.AdamW(params.values())
    params["w"].grad = torch.ones(200_000)
    optimizer.step()
    with pytest.raises(TunelabError, match="^cannot write .*step-00000001: No space left on device$"):
        save_checkpoint(tiny_disk / "checkpoint", 1, params, optimizer)
    assert latest_checkpoint(tiny_disk / "checkpoint") is None
    assert [p for p in tiny_disk.rglob("*") if p.is_file()] == []
