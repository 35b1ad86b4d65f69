"""Archives unpacked into the cache: nested folders, directory entries in any order, a crashed
earlier unpack, and a second call that finds the first one's result."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest

from transferkit.errors import TransferKitError
from transferkit.weights.sources import unpack

FILES = {"deep/er/w.npz": b"first", "deep/notes.txt": b"second", "top.txt": b"third"}


def make_zip(path):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in FILES.items():
            zf.writestr(name, data)  # files before their folders' own entries
        zf.writestr(zipfile.ZipInfo("deep/er/"), b"")
        zf.writestr(zipfile.ZipInfo("deep/"), b"")
        zf.writestr(zipfile.ZipInfo("empty/inner/"), b"")
    return path


def make_tar(path):
    with tarfile.open(path, "w:gz") as tf:
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for folder in ("deep/er", "deep", "empty/inner"):
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
    return path


@pytest.mark.parametrize("make, name", [(make_zip, "w.zip"), (make_tar, "w.tar.gz")])
def test_nested_members_and_directory_entries_in_any_order(tmp_path, monkeypatch, make, name):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    archive = make(tmp_path / name)
    expected = tmp_path / "cache" / "unpacked" / f"{hashlib.sha256(archive.read_bytes()).hexdigest()[:16]}-{name}"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process that has ended: the unpack it ran was killed half-way
    stale = expected.with_name(f"{expected.name}.{gone.pid}.tmp")
    (stale / "deep").mkdir(parents=True)
    (stale / "deep" / "junk").write_bytes(b"junk")
    dest = unpack(archive)
    assert dest == expected
    got = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == FILES
    assert (dest / "empty" / "inner").is_dir()
    assert sorted(p.name for p in dest.parent.iterdir()) == [expected.name]  # no temporary folder left
    (dest / "top.txt").write_bytes(b"changed")
    assert unpack(archive) == dest and (dest / "top.txt").read_bytes() == b"changed"  # unpacked once


def test_a_damaged_archive_leaves_nothing(tmp_path):
    archive = make_tar(tmp_path / "w.tar.gz")
    archive.write_bytes(archive.read_bytes()[:40])
    with pytest.raises(TransferKitError, match=r"w.tar.gz: damaged or unreadable archive \(.*\); re-download it"):
        unpack(archive, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_npz_without_arrays_or_damaged_is_one_line(tmp_path):
    from transferkit.weights.formats import read_weights

    np.savez(tmp_path / "empty.npz")
    with pytest.raises(TransferKitError, match=r"empty.npz: the .npz file holds no arrays$"):
        read_weights(tmp_path / "empty.npz")
    np.savez(tmp_path / "w.npz", a=np.ones(1000))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "w.npz").read_bytes()[:300])
    with pytest.raises(TransferKitError, match=r"cut.npz: truncated or damaged .npz file \(.*\); re-download"):
        read_weights(tmp_path / "cut.npz")
