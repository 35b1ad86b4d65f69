"""Archives as weights sources: told apart by their bytes, unpacked safely and within bounds.

The kind is decided by content, magic bytes first: a PyTorch checkpoint is itself a zip, so an
uncompressed tar holding one has a zip's end record near its end, and `zipfile.is_zipfile` alone
would take the tar for a zip. Tar (gzip, bzip2, xz or plain, told by the `ustar` magic) is
therefore tested before zip.

Before a byte is written, the declared sizes are summed: an archive that expands more than
MAX_RATIO times its own size (real weights compress about 1.1:1), holds more than MAX_MEMBERS
members, or would not fit in the free disk space is refused. While copying, no member may yield
more bytes than it declared. Members that escape the destination, links and devices are refused or
skipped. Unpacking goes into a temporary folder that is removed on any failure.

What the standard library would read whole into memory is refused before it is read: zip members
compressed with bzip2 or LZMA (zipfile decompresses each read of them without a bound, so a small
member can expand to any size in memory; weights zips use deflate or no compression), encrypted
zip members (there is no password to give), and tar long-name and pax headers over
MAX_TAR_HEADER_BYTES (tarfile reads their data whole before the member they describe is seen).
"""

from __future__ import annotations

import glob
import lzma
import os
import shutil
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from transferkit.errors import TransferKitError, one_line

MAX_RATIO = 100  # unpacked bytes per archive byte
RATIO_FREE_BYTES = 1 << 20  # an archive unpacking to less than this is never refused for its ratio
MAX_MEMBERS = 10_000
HEAD_BYTES = 512  # enough for the tar header's `ustar` magic at offset 257
MAX_TAR_HEADER_BYTES = 1 << 20  # a long name or pax record; real ones are under a few KiB
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # what zipfile reads with bounded memory

COMPRESSED_TAR_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def archive_kind(path: Path, head: bytes | None = None) -> str | None:
    """'tar', 'zip' or None, from the file's bytes (a zip is only an archive here when named .zip:
    PyTorch checkpoints and .npz files are zips too)."""
    if head is None:
        with open(path, "rb") as fh:
            head = fh.read(HEAD_BYTES)
    if head.startswith(COMPRESSED_TAR_MAGIC) or head[257:262] == b"ustar":
        return "tar"
    if path.name.lower().endswith(".zip") and (head.startswith(ZIP_MAGIC) or zipfile.is_zipfile(path)):
        return "zip"
    if path.name.lower().endswith((".tar", ".tgz", ".tar.gz")) and tarfile.is_tarfile(path):
        return "tar"  # a pre-POSIX tar without the magic
    return None


def safe_member(root: Path, name: str) -> Path:
    target = (root / name).resolve()
    if not target.is_relative_to(root.resolve()):
        raise TransferKitError(f"archive member {name!r} points outside the archive; refusing to unpack it")
    return target


def _free_bytes(folder: Path) -> int:
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


class _Budget:
    """The bounds on what one archive may write, checked against declared sizes as they are read."""

    def __init__(self, archive: Path, dest: Path):
        self.archive = archive
        self.size = max(archive.stat().st_size, 1)
        self.free = _free_bytes(dest)
        self.total = 0
        self.members = 0

    def declare(self, name: str, size: int) -> None:
        self.members += 1
        self.total += max(size, 0)
        if self.members > MAX_MEMBERS:
            raise TransferKitError(f"{self.archive}: refused, more than {MAX_MEMBERS:,} members; "
                                   "a weights archive holds a few files, unpack it yourself")
        if self.total > RATIO_FREE_BYTES and self.total > MAX_RATIO * self.size:
            raise TransferKitError(
                f"{self.archive}: refused, it would unpack to over {self.total / self.size:.0f} times its size "
                f"({self.total:,} bytes by {name!r}; weights compress about 1.1:1, the limit is {MAX_RATIO}:1); "
                "unpack it yourself if you trust it"
            )
        if self.total > self.free:
            raise TransferKitError(
                f"{self.archive}: unpacking needs {self.total / 2**20:,.0f} MiB, only {self.free / 2**20:,.0f} MiB "
                "free in the cache; free space or set TRANSFERKIT_CACHE to a larger disk"
            )


def _copy(src: IO[bytes], target: Path, declared: int, archive: Path, name: str) -> None:
    left = declared
    with open(target, "wb") as out:
        for block in iter(lambda: src.read(1 << 20), b""):
            left -= len(block)
            if left < 0:
                raise TransferKitError(f"{archive}: member {name!r} holds more than the {declared:,} bytes it "
                                       "declares; the archive is damaged or crafted, refusing it")
            out.write(block)


def _zip_members(zf: zipfile.ZipFile, budget: _Budget) -> Iterator[zipfile.ZipInfo]:
    infos = zf.infolist()
    for info in infos:  # every size and method is checked before the first byte is written
        if info.flag_bits & 0x1:
            raise TransferKitError(f"{budget.archive}: member {info.filename!r} is encrypted; unpack the archive "
                                   "yourself and give the weights file")
        if info.compress_type not in ZIP_METHODS and not info.filename.endswith("/"):
            raise TransferKitError(f"{budget.archive}: member {info.filename!r} uses zip compression method "
                                   f"{info.compress_type}, which cannot be read within bounded memory; repack it "
                                   "with deflate (zip's default) or unpack it yourself")
        budget.declare(info.filename, 0 if info.filename.endswith("/") else info.file_size)
    yield from infos


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a GNU long-name or pax header's data whole into memory before the member it
    describes is seen: its size is checked first."""

    def _proc_gnulong(self, tarfile):
        _check_tar_header(self, tarfile)
        return super()._proc_gnulong(tarfile)

    def _proc_pax(self, tarfile):
        _check_tar_header(self, tarfile)
        return super()._proc_pax(tarfile)


def _check_tar_header(info: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
    if info.size > MAX_TAR_HEADER_BYTES:
        raise TransferKitError(f"{tf.name}: a tar header record of {info.size:,} bytes (a long name or pax record; "
                               f"at most {MAX_TAR_HEADER_BYTES:,}); the archive is damaged or crafted, refusing it")


def _tar_members(tf: tarfile.TarFile, budget: _Budget) -> list[tarfile.TarInfo]:
    members = []
    # Iterating reads one header at a time: a member that breaks a bound is refused before the
    # (possibly decompressing) seek past its data. tarfile reads past an unknown type's data as a file's.
    for member in tf:
        counted = member.isfile() or member.type not in tarfile.SUPPORTED_TYPES
        budget.declare(member.name, member.size if counted else 0)
        members.append(member)
    return members


def unpack_into(archive: Path, tmp: Path, kind: str) -> None:
    """Unpack `archive` into the empty folder `tmp` (bounds checked first); raises TransferKitError."""
    budget = _Budget(archive, tmp)
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                for info in list(_zip_members(zf, budget)):
                    target = safe_member(tmp, info.filename)
                    if info.filename.endswith("/") or target == tmp.resolve():  # is_dir() fails on an empty name
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src:
                        _copy(src, target, info.file_size, archive, info.filename)
        else:
            with tarfile.open(archive, tarinfo=_BoundedTarInfo) as tf:
                for member in _tar_members(tf, budget):
                    target = safe_member(tmp, member.name)
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                    elif member.isfile():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        src = tf.extractfile(member)
                        with src:
                            _copy(src, target, member.size, archive, member.name)
                    # links and devices are skipped: a weights archive has no need of them
    except (tarfile.TarError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError,
            ValueError, OSError, zlib.error, lzma.LZMAError, IndexError) as exc:
        what = getattr(exc, "strerror", None) or one_line(exc)
        raise TransferKitError(f"{archive}: damaged or unreadable archive ({what}); re-download it") from None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's
        return True
    return True


def unpack(archive: Path, dest: Path) -> Path:
    """Unpack `archive` into the folder `dest` unless it is there already; nothing stays on failure."""
    kind = archive_kind(archive)
    if kind is None:
        raise TransferKitError(f"{archive}: not a tar or zip archive by its content; give the weights file itself")
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f"{glob.escape(dest.name)}.*.tmp"):  # left by an unpack that was killed
        pid = stale.name[len(dest.name) + 1 : -len(".tmp")]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        unpack_into(archive, tmp, kind)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if dest.is_dir():  # another process unpacked the same archive meanwhile
            return dest
        raise
    return dest
