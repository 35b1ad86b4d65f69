"""Atomic writes: the file appears whole or not at all (a write that fails, at any point, leaves the old file
as it was and no temporary file), with the mode the user's umask gives."""

from __future__ import annotations

import os
import stat

import pytest

from transferkit import fileio
from transferkit.fileio import atomic_path, atomic_write, write_json, write_text


def half_then(exc: BaseException):
    def write(tmp):
        tmp.write_text("half of the new cont")
        raise exc
    return write


@pytest.mark.parametrize("exc", [OSError("disk full"), ValueError("bad value"), KeyboardInterrupt()],
                         ids=["OSError", "ValueError", "KeyboardInterrupt"])
def test_a_failing_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, exc):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(type(exc)):
        atomic_write(target, half_then(exc))
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["report.json"]


def test_a_failing_rename_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "config.yaml"
    target.write_text("old")

    def no_rename(src, dst):
        raise OSError("rename refused")

    monkeypatch.setattr(fileio.os, "replace", no_rename)
    with pytest.raises(OSError, match="rename refused"):
        write_text(target, "new")
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]


def test_a_failing_first_write_leaves_nothing(tmp_path):
    target = tmp_path / "deep" / "new.txt"
    with pytest.raises(OSError):
        atomic_write(target, half_then(OSError("no space")))
    assert os.listdir(tmp_path / "deep") == []


def test_a_successful_write_replaces_the_file_and_leaves_only_it(tmp_path):
    target = tmp_path / "a" / "b" / "metrics.json"
    write_json(target, {"epoch": 1})
    write_json(target, {"epoch": 2, "val_acc": 0.5})
    assert target.read_text() == '{\n  "epoch": 2,\n  "val_acc": 0.5\n}\n'
    assert os.listdir(target.parent) == ["metrics.json"]


def test_the_temporary_file_is_beside_the_target_and_hidden(tmp_path):
    with atomic_path(tmp_path / "w.safetensors") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".w.safetensors.") and tmp.name.endswith(".tmp")
        assert tmp.exists() and not (tmp_path / "w.safetensors").exists()
        tmp.write_bytes(b"x")
    assert (tmp_path / "w.safetensors").read_bytes() == b"x" and not tmp.exists()


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    write_text(tmp_path / "a.txt", "x")
    write_json(tmp_path / "b.json", {"a": 1})
    atomic_write(tmp_path / "c.bin", lambda tmp: tmp.write_bytes(b"\0"))
    for name in ("a.txt", "b.json", "c.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
