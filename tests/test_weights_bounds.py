"""Hostile weights sources: archives that expand, headers that lie, formats in disguise."""

import io
import struct
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from bombs import MIB, npy_header, zip_with_zeros
from measure import one_line_error, run_cli

from transferkit.errors import TransferKitError
from transferkit.weights.formats import describe_weights, read_weights
from transferkit.weights.sources import resolve_source


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(path))
    return path


def files_under(folder):
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_zip_bomb_is_refused_before_writing_and_leaves_nothing(tmp_path, cache):
    bomb = zip_with_zeros(tmp_path / "model.zip", "model.pth", 2048)  # 2 GiB of zeros
    assert bomb.stat().st_size < 2.5 * MIB
    result = run_cli("weights", "inspect", bomb, env={"TRANSFERKIT_CACHE": str(cache)},
                     max_file_bytes=100 * MIB, timeout=60)  # killed (SIGXFSZ) on writing a 100 MB file
    one_line_error(result, str(bomb), "100:1")
    assert files_under(cache) == []
    assert result.seconds < 10


def test_archive_beyond_the_free_disk_is_refused(tmp_path, cache, monkeypatch):
    from transferkit.weights import archives

    data = io.BytesIO()
    torch.save({"w": torch.randn(300, 300)}, data)
    source = tmp_path / "model.tar"
    with tarfile.open(source, "w") as tf:
        info = tarfile.TarInfo("model.pth")
        info.size = len(data.getvalue())
        tf.addfile(info, io.BytesIO(data.getvalue()))
    monkeypatch.setattr(archives, "_free_bytes", lambda folder: 1000)
    with pytest.raises(TransferKitError, match=r"model\.tar: unpacking needs .* free in the cache"):
        resolve_source(source)
    assert files_under(cache) == []


def test_compressed_tar_bomb_is_refused_at_its_first_member(tmp_path, cache):
    path = tmp_path / "model.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("zeros.bin")
        info.size = 64 * MIB

        class Zeros(io.RawIOBase):
            left = info.size

            def readinto(self, buf):
                n = min(len(buf), self.left)
                buf[:n] = bytes(n)
                self.left -= n
                return n

        tf.addfile(info, Zeros())
    assert path.stat().st_size < MIB // 4
    with pytest.raises(TransferKitError, match="refused, it would unpack to over"):
        resolve_source(path)
    assert files_under(cache) == []


def test_member_larger_than_it_declares_is_refused(tmp_path, cache):
    from transferkit.weights.archives import unpack_into

    path = tmp_path / "lie.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("w.pth", bytes(5000))
    raw = bytearray(path.read_bytes())
    central = raw.index(b"PK\x01\x02")
    struct.pack_into("<I", raw, central + 24, 100)  # the directory now says 100 bytes
    path.write_bytes(bytes(raw))
    (tmp_path / "out").mkdir()
    with pytest.raises(TransferKitError, match="lie.zip"):
        unpack_into(path, tmp_path / "out", "zip")
    assert all(p.stat().st_size <= 100 for p in files_under(tmp_path / "out"))


def test_uncompressed_tar_holding_a_checkpoint_is_a_tar(tmp_path, cache):
    data = io.BytesIO()
    torch.save({"w": torch.arange(6.0)}, data)
    for name in ("model.tar", "model.pth"):  # by content: even under a weights name, a tar is a tar
        path = tmp_path / name
        with tarfile.open(path, "w") as tf:
            info = tarfile.TarInfo("inner/real.pth")
            info.size = len(data.getvalue())
            tf.addfile(info, io.BytesIO(data.getvalue()))
        assert zipfile.is_zipfile(path)  # what fooled the old sniffing
        inner = resolve_source(path)
        assert inner.name == "real.pth"
        assert torch.equal(read_weights(inner).tensors["w"], torch.arange(6.0))


def test_tar_given_to_the_reader_is_named_as_an_archive(tmp_path):
    path = tmp_path / "weights.pth"
    with tarfile.open(path, "w") as tf:
        tf.addfile(tarfile.TarInfo("empty"), io.BytesIO())
    with pytest.raises(TransferKitError, match="a tar or zip archive, not a weights file"):
        read_weights(path)


def test_formats_are_told_by_content_before_suffix(tmp_path):
    np.savez(tmp_path / "arrays.bin", w=np.ones(3, np.float32))  # an npz under a PyTorch suffix
    assert read_weights(tmp_path / "arrays.bin.npz").format == "npz"
    (tmp_path / "arrays.bin.npz").rename(tmp_path / "arrays.bin")
    assert read_weights(tmp_path / "arrays.bin").format == "npz"
    torch.save({"w": torch.ones(2)}, tmp_path / "model.npz")  # a checkpoint under the npz suffix
    assert read_weights(tmp_path / "model.npz").format == "pytorch"
    np.save(tmp_path / "single.npy", np.arange(4, dtype=np.int64))
    wf = read_weights(tmp_path / "single.npy")
    assert wf.format == "npz" and wf.tensors["single"].tolist() == [0, 1, 2, 3]


def test_inspect_of_a_small_npz_holding_a_huge_array_reads_headers_only(tmp_path):
    big = zip_with_zeros(tmp_path / "big.npz", "w.npy", 1024, npy_header((256 * MIB,)))  # 1 GiB float32
    small = tmp_path / "small.npz"
    np.savez(small, w=np.zeros(4, np.float32))
    assert big.stat().st_size < 1.5 * MIB
    base = run_cli("weights", "inspect", small, "--json")
    result = run_cli("weights", "inspect", big, "--json", timeout=60)
    assert result.rc == 0, result.stderr
    assert '"shape": [\n        268435456\n      ]' in result.stdout and '"dtype": "float32"' in result.stdout
    assert result.peak_rss < base.peak_rss + 100 * MIB, (result.peak_rss, base.peak_rss)
    assert result.seconds < base.seconds + 5
    info = describe_weights(big)[1]
    assert [(t.name, t.shape, t.dtype) for t in info] == [("w", (256 * MIB,), "float32")]


@pytest.mark.parametrize("kind", ["npz", "npy"])
def test_npy_header_declaring_more_than_the_data_is_refused_before_allocating(tmp_path, kind):
    header = npy_header((10**12,))  # 4 TB declared
    if kind == "npz":
        path = tmp_path / "lie.npz"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("w.npy", header + bytes(64))
    else:
        path = tmp_path / "lie.npy"
        path.write_bytes(header + bytes(64))
    result = run_cli("weights", "inspect", path, timeout=60)
    one_line_error(result, str(path), "declares")
    with pytest.raises(TransferKitError, match="declares"):
        read_weights(path)


def test_npz_arrays_round_trip_with_order_and_byte_order(tmp_path):
    arrays = {"f": np.asfortranarray(np.arange(12.0).reshape(3, 4)), "b": np.arange(5, dtype=">i4"),
              "e": np.zeros((0, 3), np.float16)}
    np.savez_compressed(tmp_path / "w.npz", **arrays)
    wf = read_weights(tmp_path / "w.npz")
    assert list(wf.tensors) == ["f", "b", "e"]
    for name, array in arrays.items():
        assert np.array_equal(wf.tensors[name].numpy(), array), name
    assert wf.tensors["b"].dtype == torch.int32


@pytest.mark.parametrize("length", [2**64 - 1, 2**40, 10_000])
def test_safetensors_header_length_beyond_the_file_is_one_line(tmp_path, length):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", length) + b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}')
    result = run_cli("weights", "inspect", path, timeout=60)
    one_line_error(result, str(path), "header length")


def test_compressed_member_whose_directory_overstates_its_size_is_read_as_far_as_data_goes(tmp_path):
    path = zip_with_zeros(tmp_path / "lie.npz", "w.npy", 1, npy_header((1 << 30,)))  # header: 4 GiB of float32
    raw = bytearray(path.read_bytes())
    for signature, field in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # uncompressed size, local and central
        at = raw.index(signature)
        struct.pack_into("<I", raw, at + field, 0xFFFFFFF0)
    path.write_bytes(bytes(raw))
    result = run_cli("weights", "transfer", "--model", "test_efficientnet", "--num-classes", "2", "--from", path,
                     "--dry-run", timeout=120)
    one_line_error(result, str(path))
    assert result.peak_rss < 2 * 2**30, result.peak_rss  # never the 4 GiB the directory claims


def test_zip_member_with_an_empty_name_is_one_line(tmp_path, cache):
    for name in ("w.npz", "w.zip"):  # found by the fuzzer: zipfile's is_dir() fails on an empty name
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("a.npy", npy_header((2,)) + bytes(8))
            zf.writestr(zipfile.ZipInfo(""), b"x")
        with pytest.raises(TransferKitError, match=name):
            read_weights(resolve_source(path))
