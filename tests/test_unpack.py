"""Archives unpacked into the cache: nested folders, directory entries in any order, a crashed
earlier unpack, and a second call that finds the first one's result; the bounds on what an archive may
write (free space, expansion ratio, member count, declared sizes), its kind told by content, and the
leftovers of earlier unpacks."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import types
import zipfile

import numpy as np
import pytest

from transferkit.errors import TransferKitError
from transferkit.weights import archives
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


# Safe unpacking, bound by bound (weights/archives.py). Archives are built here, a few hundred bytes
# each; where a bound must be crossed the module's limit is lowered, or a header declares sizes whose
# bytes are not there (every bound is checked on the declared sizes, before any data is read).

MIB = 1 << 20


def tree(folder):
    """Every path under `folder`: a file's bytes, a folder's None."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def write_zip(path, members, comment=b""):
    """A deflated zip of `members` (name: bytes; a name ending in / is a folder entry, bytes and all)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name) if name.endswith("/") else name, data)
        zf.comment = comment
    return path


def zip_of_size(path, size, members):
    """write_zip padded with a comment to exactly `size` bytes on disk."""
    base = write_zip(path, members).stat().st_size
    write_zip(path, members, b"#" * (size - base))
    assert path.stat().st_size == size
    return path


def tar_header(name, size, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = size, kind, linkname
    return info.tobuf(tarfile.USTAR_FORMAT)


def write_tar(path, members):
    """A plain ustar tar of (name, kind, declared size, data) members; data may be shorter than declared
    only for members whose data tarfile does not read (folders, links)."""
    raw = b""
    for name, kind, size, data in members:
        raw += tar_header(name, size, kind, "d/a.bin" if kind == tarfile.SYMTYPE else "")
        raw += data + bytes(-len(data) % 512)
    path.write_bytes(raw + bytes(1024))
    return path


A, B = bytes(range(256)) + bytes(44), b"b" * 200  # 300 and 200 bytes


def fits_500_free_bytes_not_499(archive, tmp_path, monkeypatch):
    """`archive` (files d/a.bin, e.bin, b.bin: 500 bytes) unpacks with 500 bytes free; with 499 it is refused in
    one line and nothing is written."""
    monkeypatch.setattr(archives, "_free_bytes", lambda folder: 500)
    out = archives.unpack(archive, tmp_path / "cache" / "ok")
    assert tree(out) == {"d": None, "d/a.bin": A, "e.bin": b"", "b.bin": B}
    monkeypatch.setattr(archives, "_free_bytes", lambda folder: 499)
    with pytest.raises(TransferKitError) as caught:
        archives.unpack(archive, tmp_path / "cache" / "short")
    assert str(caught.value) == (f"{archive}: unpacking needs 0 MiB, only 0 MiB free in the cache; "
                                 "free space or set TRANSFERKIT_CACHE to a larger disk")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["ok"]


def test_free_space_bounds_the_files_only_and_to_the_byte_zip(tmp_path, monkeypatch):
    """Only files count toward the free space, at their sizes: an archive needing exactly the free bytes
    unpacks (a folder entry counts 0 even when it carries bytes, an empty file 0); one byte less is
    refused before anything is written, with a one-line message naming the archive."""
    archive = write_zip(tmp_path / "w.zip", {"d/": b"xyz", "d/a.bin": A, "e.bin": b"", "b.bin": B})
    fits_500_free_bytes_not_499(archive, tmp_path, monkeypatch)


def test_free_space_bounds_the_files_only_and_to_the_byte_tar(tmp_path, monkeypatch):
    """As for a zip: a folder whose header claims 1000 bytes counts 0, an empty file 0, a symbolic link 0
    (and is not unpacked); the files' 500 bytes fit 500 free bytes and not 499."""
    archive = write_tar(tmp_path / "w.tar", [("d", tarfile.DIRTYPE, 1000, b""), ("d/a.bin", tarfile.REGTYPE, 300, A),
                                             ("e.bin", tarfile.REGTYPE, 0, b""), ("link", tarfile.SYMTYPE, 0, b""),
                                             ("b.bin", tarfile.REGTYPE, 200, B)])
    fits_500_free_bytes_not_499(archive, tmp_path, monkeypatch)


def test_free_space_message_counts_mebibytes(tmp_path, monkeypatch):
    """The free-space refusal gives both amounts in MiB (2**20 bytes), rounded: 5 MiB needed, 3 free."""
    archive = tmp_path / "w.tar"
    archive.write_bytes(tar_header("w.bin", 5 * MIB) + bytes(512))  # the data is never reached
    monkeypatch.setattr(archives, "MAX_RATIO", 10**6)
    monkeypatch.setattr(archives, "_free_bytes", lambda folder: 3 * MIB)
    with pytest.raises(TransferKitError, match=r"^.*/w\.tar: unpacking needs 5 MiB, only 3 MiB free in the cache; "
                                               r"free space or set TRANSFERKIT_CACHE to a larger disk$"):
        archives.unpack(archive, tmp_path / "cache" / "out")
    assert list((tmp_path / "cache").iterdir()) == []


def test_free_space_is_measured_on_the_nearest_existing_folder(tmp_path, monkeypatch):
    """A cache folder not made yet is measured on its nearest existing parent."""
    asked = []

    def disk_usage(folder):
        asked.append(folder)
        return types.SimpleNamespace(total=10_000, used=1_000, free=9_000)

    monkeypatch.setattr(archives.shutil, "disk_usage", disk_usage)
    assert archives._free_bytes(tmp_path / "not" / "yet") == 9_000
    assert asked == [tmp_path]


@pytest.mark.parametrize("size, free_bytes, refused", [(400, 0, False), (399, 0, True), (399, 4000, False),
                                                       (399, 3999, True)])
def test_expansion_ratio_bound_to_the_byte(tmp_path, monkeypatch, size, free_bytes, refused):
    """With the limit at 10:1, 4000 unpacked bytes (two members together; a folder entry counts 0) fit a
    400-byte archive and not a 399-byte one, unless they are within the bytes never refused for their
    ratio (4000 is within 4000, not within 3999). The refusal names the archive, the member that
    crossed, the ratio and the limit."""
    monkeypatch.setattr(archives, "MAX_RATIO", 10)
    monkeypatch.setattr(archives, "RATIO_FREE_BYTES", free_bytes)
    members = {"d/": b"", "a.bin": bytes(2000), "b.bin": bytes(2000)}
    archive = zip_of_size(tmp_path / "w.zip", size, members)
    dest = tmp_path / "cache" / "out"
    if not refused:
        assert tree(archives.unpack(archive, dest)) == {"d": None, "a.bin": bytes(2000), "b.bin": bytes(2000)}
        return
    with pytest.raises(TransferKitError) as caught:
        archives.unpack(archive, dest)
    assert str(caught.value) == (f"{archive}: refused, it would unpack to over 10 times its size (4,000 bytes by "
                                 "'b.bin'; weights compress about 1.1:1, the limit is 10:1); unpack it yourself if "
                                 "you trust it")
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("kind", [tarfile.REGTYPE, tarfile.CONTTYPE, b"Z"], ids=["file", "contiguous", "unknown"])
def test_tar_member_is_refused_at_its_header(tmp_path, kind):
    """A tar member is counted at the size its header declares, and refused before its data is read
    (for a compressed tar, before the data is decompressed): a 1024-byte tar whose first header declares
    2 MiB is over 100:1. Members of a type tarfile does not know count too: tarfile reads past their
    data as it would a file's, so an archive of them would otherwise decompress without bound."""
    archive = tmp_path / "w.tar"
    archive.write_bytes(tar_header("w.bin", 2 * MIB, kind) + bytes(512))
    with pytest.raises(TransferKitError) as caught:
        archives.unpack(archive, tmp_path / "cache" / "out")
    assert str(caught.value) == (f"{archive}: refused, it would unpack to over 2048 times its size (2,097,152 bytes "
                                 "by 'w.bin'; weights compress about 1.1:1, the limit is 100:1); unpack it yourself "
                                 "if you trust it")
    assert list((tmp_path / "cache").iterdir()) == []


def test_tar_member_of_an_unknown_type_is_not_unpacked(tmp_path):
    """A member of a type tarfile does not know is skipped, like links and devices; the files unpack."""
    archive = write_tar(tmp_path / "w.tar", [("odd", b"Z", 4, b"odd!"), ("b.bin", tarfile.REGTYPE, 200, B)])
    assert tree(archives.unpack(archive, tmp_path / "out")) == {"b.bin": B}


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_member_count_bound(tmp_path, monkeypatch, fmt):
    """Every member counts, folders too: with the limit at 3, three members unpack and a fourth is
    refused before anything is written."""
    monkeypatch.setattr(archives, "MAX_MEMBERS", 3)
    names = ["d/", "d/a.bin", "b.bin", "c.bin"]

    def build(path, names):
        if fmt == "zip":
            return write_zip(path, {name: b"" if name.endswith("/") else name.encode() for name in names})
        return write_tar(path, [(name.rstrip("/"), tarfile.DIRTYPE, 0, b"") if name.endswith("/") else
                                (name, tarfile.REGTYPE, len(name), name.encode()) for name in names])

    three = build(tmp_path / f"three.{fmt}", names[:3])
    assert tree(archives.unpack(three, tmp_path / "cache" / "three")) == {"d": None, "d/a.bin": b"d/a.bin",
                                                                          "b.bin": b"b.bin"}
    four = build(tmp_path / f"four.{fmt}", names)
    with pytest.raises(TransferKitError) as caught:
        archives.unpack(four, tmp_path / "cache" / "four")
    assert str(caught.value) == (f"{four}: refused, more than 3 members; "
                                 "a weights archive holds a few files, unpack it yourself")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["three"]


def test_copy_stops_at_the_declared_size(tmp_path):
    """A member that yields more bytes than declared is refused at the read that crosses, and nothing
    past the declared size is written; exactly the declared size is copied whole."""

    class Trickle(io.BytesIO):
        def read(self, size=-1):
            return super().read(3)

    target = tmp_path / "w.bin"
    archives._copy(Trickle(b"0123"), target, 4, tmp_path / "w.zip", "w.bin")
    assert target.read_bytes() == b"0123"
    with pytest.raises(TransferKitError) as caught:
        archives._copy(Trickle(b"0123456789"), target, 4, tmp_path / "w.zip", "w.bin")
    assert str(caught.value) == (f"{tmp_path / 'w.zip'}: member 'w.bin' holds more than the 4 bytes it declares; "
                                 "the archive is damaged or crafted, refusing it")
    assert target.read_bytes() == b"012"


def test_copy_reads_one_mebibyte_at_a_time(tmp_path):
    """A member is copied in reads of 1 MiB: a weights file of gigabytes is never held whole in memory."""
    asked = []

    class Source(io.BytesIO):
        def read(self, size=-1):
            asked.append(size)
            return super().read(size)

    data = bytes(2 * MIB + 5)
    archives._copy(Source(data), tmp_path / "w.bin", len(data), tmp_path / "w.zip", "w.bin")
    assert asked == [MIB] * 4
    assert (tmp_path / "w.bin").stat().st_size == 2 * MIB + 5


def test_damaged_archive_message_gives_the_library_reason(tmp_path):
    """A damaged archive is one line naming the archive and what the library found wrong."""
    archive = tmp_path / "w.zip"
    archive.write_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(TransferKitError) as caught:
        archives.unpack(archive, tmp_path / "cache" / "out")
    assert str(caught.value) == f"{archive}: damaged or unreadable archive (File is not a zip file); re-download it"
    assert list((tmp_path / "cache").iterdir()) == []


def test_unwritable_member_message_gives_the_system_reason_only(tmp_path):
    """An OSError while unpacking (here a file `a` and then a file `a/b`) gives the system's reason alone,
    without its errno and path, and leaves nothing."""
    archive = write_zip(tmp_path / "w.zip", {"a": b"1", "a/b": b"2"})
    with pytest.raises(TransferKitError) as caught:
        archives.unpack(archive, tmp_path / "cache" / "out")
    assert str(caught.value) == f"{archive}: damaged or unreadable archive (File exists); re-download it"
    assert list((tmp_path / "cache").iterdir()) == []


def test_not_an_archive_is_refused_by_its_content(tmp_path):
    """A file that is neither tar nor zip by its bytes is refused whatever its name, in one line."""
    archive = tmp_path / "w.tar.gz"
    archive.write_bytes(b"not an archive\n")
    with pytest.raises(TransferKitError) as caught:
        archives.unpack(archive, tmp_path / "out")
    assert str(caught.value) == f"{archive}: not a tar or zip archive by its content; give the weights file itself"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.tar.gz"]


def test_a_process_is_running_until_it_ends(tmp_path, monkeypatch):
    """_running asks with signal 0 (the process is not disturbed): a live child is running and goes on
    until it is ended here; an ended one is not; one owned by another user (EPERM) is."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert archives._running(child.pid) is True
        try:  # a signal that ends it would have: a child signalled dies within microseconds
            child.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        assert child.returncode is None
    finally:
        child.terminate()
        child.wait()
    assert child.returncode == -15  # ended by this test's SIGTERM, not by a signal from _running
    assert archives._running(child.pid) is False

    def kill(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(archives.os, "kill", kill)
    assert archives._running(child.pid) is True


def test_leftovers_of_earlier_unpacks(tmp_path, monkeypatch):
    """Before unpacking into `out`, a folder `out.PID.tmp` is removed only when PID has ended; one of a
    live process is left alone, a name whose middle is not a pid is left alone, one that cannot be
    removed is left and does not stop the unpack, and one under this process's own pid is cleared."""
    running = {4242: True, 4343: False, 77: False, os.getpid(): True}
    asked = []

    def is_running(pid):
        asked.append(pid)
        return running[pid]

    monkeypatch.setattr(archives, "_running", is_running)
    cache = tmp_path / "cache"
    for name in ("out.4242.tmp", "out.4343.tmp", "out.junk.tmp", f"out.{os.getpid()}.tmp"):
        (cache / name).mkdir(parents=True)
        (cache / name / "junk").write_bytes(b"junk")
    (cache / "out.77.tmp").write_bytes(b"a file, which rmtree cannot remove")
    archive = write_zip(tmp_path / "w.zip", {"b.bin": B})
    assert tree(archives.unpack(archive, cache / "out")) == {"b.bin": B}
    assert sorted(asked) == sorted([4242, 4343, 77, os.getpid()])
    assert sorted(p.name for p in cache.iterdir()) == ["out", "out.4242.tmp", "out.77.tmp", "out.junk.tmp"]


def ustar_without_magic(name, data):
    """A pre-POSIX (v7) tar: a ustar header with its magic and version blanked, checksum recomputed."""
    head = bytearray(tar_header(name, len(data)))
    head[257:265] = bytes(8)
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\0 " % sum(head)
    return bytes(head) + data + bytes(-len(data) % 512) + bytes(1024)


def compressed_tar(mode):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tf:
        info = tarfile.TarInfo("w.bin")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    return buffer.getvalue()


def zip_bytes():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("w.bin", b"abc")
    return buffer.getvalue()


@pytest.mark.parametrize("name, content, kind", [
    ("w.bin", lambda: compressed_tar("w:gz"), "tar"),
    ("w.bin", lambda: compressed_tar("w:bz2"), "tar"),
    ("w.bin", lambda: compressed_tar("w:xz"), "tar"),
    ("w.pth", lambda: compressed_tar("w"), "tar"),  # the ustar magic at 257, whatever the name
    ("w.tar", lambda: ustar_without_magic("w.bin", b"abc"), "tar"),
    ("W.TGZ", lambda: ustar_without_magic("w.bin", b"abc"), "tar"),
    ("w.Tar.Gz", lambda: ustar_without_magic("w.bin", b"abc"), "tar"),
    ("w.pth", lambda: ustar_without_magic("w.bin", b"abc"), None),  # no magic and not named a tar
    ("w.tar", lambda: b"not an archive\n", None),
    ("w.zip", zip_bytes, "zip"),
    ("W.ZIP", zip_bytes, "zip"),
    ("w.zip", lambda: b"#!/bin/sh\n" * 20 + zip_bytes(), "zip"),  # a zip after a prefix: found by its end
    ("w.pth", zip_bytes, None),  # a PyTorch checkpoint is a zip, not an archive
])
def test_archive_kind_by_content(tmp_path, name, content, kind):
    """The kind comes from the bytes: compressed-tar magic or the ustar magic first; a zip only when named
    .zip (by its first bytes or its end record); a tar without magic only when named .tar, .tgz or .tar.gz
    (in any case)."""
    path = tmp_path / name
    path.write_bytes(content())
    assert archives.archive_kind(path) == kind


def test_archive_kind_reads_the_first_512_bytes(tmp_path, monkeypatch):
    """Telling the kind reads one block of 512 bytes: a weights file of gigabytes is not read whole."""
    asked = []

    class Head(io.FileIO):
        def read(self, size=-1):
            asked.append(size)
            return super().read(size)

    path = tmp_path / "w.pth"
    path.write_bytes(bytes(4096))
    monkeypatch.setattr(archives, "open", lambda file, mode: Head(file, mode), raising=False)
    assert archives.archive_kind(path) is None
    assert asked == [512]


# What the standard library would read whole into memory is refused before it is read.


def peak_traced_bytes(action):
    import tracemalloc

    tracemalloc.start()
    try:
        action()
    except TransferKitError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_zip_member_decompressing_past_its_declared_size_is_bounded_in_memory(tmp_path):
    """A bzip2 member declaring 10 bytes whose stream holds 16 MiB of zeros (a hundred bytes of bzip2) must
    not make unpacking hold more than a few MiB: a megabyte of bzip2 holds a terabyte of zeros. zipfile
    decompresses each read of a bzip2 or LZMA member whole, so such members are refused unread."""
    archive = tmp_path / "w.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_BZIP2) as zf:
        zf.writestr("w.bin", bytes(16 * MIB))
    raw = bytearray(archive.read_bytes())
    for size_at in (22, raw.index(b"PK\x01\x02") + 24):  # uncompressed size, local header and directory
        raw[size_at : size_at + 4] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(raw))
    assert peak_traced_bytes(lambda: archives.unpack(archive, tmp_path / "out")) < 8 * MIB
    with pytest.raises(TransferKitError) as err:
        archives.unpack(archive, tmp_path / "out")
    assert str(err.value) == (f"{archive}: member 'w.bin' uses zip compression method 12, which cannot be read "
                              "within bounded memory; repack it with deflate (zip's default) or unpack it yourself")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_stored_and_deflated_zip_members_are_read(tmp_path, method):
    archive = tmp_path / "w.zip"
    with zipfile.ZipFile(archive, "w", method) as zf:
        zf.writestr("d/", b"")
        zf.writestr("d/w.bin", b"weights" * 100)
    out = archives.unpack(archive, tmp_path / "out")
    assert (out / "d" / "w.bin").read_bytes() == b"weights" * 100


def test_a_folder_entry_of_another_method_is_not_refused(tmp_path):
    """Only members with data are read through their method; a folder entry's method is never used."""
    archive = tmp_path / "w.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(zipfile.ZipInfo("d/"), b"", compress_type=zipfile.ZIP_LZMA)
        zf.writestr("d/w.bin", b"abc")
    assert (archives.unpack(archive, tmp_path / "out") / "d" / "w.bin").read_bytes() == b"abc"


def test_tar_long_name_header_is_bounded_in_memory(tmp_path):
    """A 16 MiB long name (16 KiB of gzip) must not make unpacking hold more than a few MiB: tarfile reads
    a long-name or pax record whole, so one over MAX_TAR_HEADER_BYTES is refused unread."""
    import gzip

    long_name = tarfile.TarInfo("././@LongLink")
    long_name.type, long_name.size = tarfile.GNUTYPE_LONGNAME, 16 * MIB
    raw = long_name.tobuf(tarfile.GNU_FORMAT) + b"a" * (16 * MIB) + tar_header("w.bin", 3) + b"abc" + bytes(509 + 1024)
    archive = tmp_path / "w.tar.gz"
    archive.write_bytes(gzip.compress(raw, mtime=0))
    assert peak_traced_bytes(lambda: archives.unpack(archive, tmp_path / "out")) < 8 * MIB
    with pytest.raises(TransferKitError) as err:
        archives.unpack(archive, tmp_path / "out")
    assert str(err.value) == (f"{archive}: a tar header record of 16,777,216 bytes (a long name or pax record; at "
                              "most 1,048,576); the archive is damaged or crafted, refusing it")


def _long_header_tar(path, kind, size):
    """A tar whose first record is a GNU long name or a pax record of `size` bytes, then a member w.bin."""
    if kind == "gnu":
        info = tarfile.TarInfo("././@LongLink")
        info.type, info.size = tarfile.GNUTYPE_LONGNAME, size
        record = b"a" * (size - 1) + b"\0"
        raw = info.tobuf(tarfile.GNU_FORMAT)
    else:  # "<length> comment=<text>\n", `size` bytes in all; a comment sets nothing on the member
        head = f"{size} comment=".encode()
        record = head + b"c" * (size - len(head) - 1) + b"\n"
        info = tarfile.TarInfo("././@PaxHeader")
        info.type, info.size = tarfile.XHDTYPE, size
        raw = info.tobuf(tarfile.USTAR_FORMAT)
    assert len(record) == size
    path.write_bytes(raw + record + bytes(-size % 512) + tar_header("w.bin", 3) + b"abc" + bytes(509 + 1024))
    return path


@pytest.mark.parametrize("kind", ["gnu", "pax"])
def test_tar_header_records_over_the_bound_are_refused(tmp_path, kind):
    archive = _long_header_tar(tmp_path / "w.tar", kind, archives.MAX_TAR_HEADER_BYTES + 1)
    with pytest.raises(TransferKitError) as err:
        archives.unpack(archive, tmp_path / "out")
    assert str(err.value) == (f"{archive}: a tar header record of 1,048,577 bytes (a long name or pax record; at "
                              "most 1,048,576); the archive is damaged or crafted, refusing it")
    assert not (tmp_path / "out").exists()


def test_a_gnu_long_name_under_the_bound_names_its_member(tmp_path):
    name = "w" * 200 + ".bin"
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = tarfile.GNUTYPE_LONGNAME, len(name) + 1
    record = name.encode() + b"\0"
    archive = tmp_path / "w.tar"
    archive.write_bytes(info.tobuf(tarfile.GNU_FORMAT) + record + bytes(-len(record) % 512)
                        + tar_header("short", 3) + b"abc" + bytes(509 + 1024))
    out = archives.unpack(archive, tmp_path / "out")
    assert [(p.name, p.read_bytes()) for p in out.iterdir()] == [(name, b"abc")]


def test_a_pax_record_at_the_bound_is_read(tmp_path):
    archive = _long_header_tar(tmp_path / "w.tar", "pax", archives.MAX_TAR_HEADER_BYTES)
    out = archives.unpack(archive, tmp_path / "out")
    assert [(p.name, p.read_bytes()) for p in out.iterdir()] == [("w.bin", b"abc")]


def test_encrypted_zip_member_is_one_line(tmp_path):
    """An encrypted member (flag bit 0, no password to give) is refused in one line naming the archive."""
    archive = write_zip(tmp_path / "w.zip", {"w.bin": b"abc"})
    raw = bytearray(archive.read_bytes())
    for flags_at in (6, raw.index(b"PK\x01\x02") + 8):  # local header and directory
        raw[flags_at] |= 1
    archive.write_bytes(bytes(raw))
    with pytest.raises(TransferKitError) as err:
        archives.unpack(archive, tmp_path / "cache" / "out")
    assert str(err.value) == (f"{archive}: member 'w.bin' is encrypted; unpack the archive yourself and give the "
                              "weights file")
    assert list((tmp_path / "cache").iterdir()) == []
