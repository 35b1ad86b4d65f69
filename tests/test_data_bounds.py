"""Hostile data files: images claiming too many pixels, label lines holding nan or inf."""

import json
import struct
import zlib

import pytest
from measure import one_line_error, run_cli
from PIL import Image

from transferkit.data.classification import decode_all, scan_split
from transferkit.data.convert import CONVERTERS
from transferkit.data.images import BadImage, load_rgb
from transferkit.errors import TransferKitError


def png_claiming(path, width, height):
    """A PNG of a few dozen bytes whose header claims width x height pixels (no pixel data)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("width, height", [(30000, 30000), (10000, 9500)])  # PIL raises / PIL warns
def test_image_over_the_pixel_limit_is_a_bad_image(tmp_path, width, height):
    path = png_claiming(tmp_path / "big.png", width, height)
    with pytest.raises(BadImage, match="too many pixels"):
        load_rgb(path)


def _classes_with_bomb(root):
    for name in ("a", "b"):
        (root / "train" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (40 * i, 90, 9)).save(root / "train" / name / f"{i}.png")
    return png_claiming(root / "train" / "a" / "huge.png", 30000, 30000)


def test_bomb_follows_on_bad_image(tmp_path):
    bomb = _classes_with_bomb(tmp_path)
    split = scan_split(tmp_path / "train", ["a", "b"])
    decode_all(split, "skip", keep_size=16, resample=Image.BILINEAR)
    assert [p for p, _ in split.bad] == [bomb] and len(split.samples) == 6
    split = scan_split(tmp_path / "train", ["a", "b"])
    with pytest.raises(TransferKitError, match="huge.png.*too many pixels"):
        decode_all(split, "error", keep_size=None, resample=Image.BILINEAR)


def test_data_check_reports_the_bomb_without_a_traceback(tmp_path):
    bomb = _classes_with_bomb(tmp_path)
    result = run_cli("data", "check", tmp_path, timeout=120)
    assert result.rc == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if str(bomb) in line]
    assert len(lines) == 1 and "too many pixels" in lines[0], result.stdout


def test_voc_convert_with_a_bomb_image_is_one_line(tmp_path):
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "JPEGImages").mkdir()
    png_claiming(tmp_path / "JPEGImages" / "a.png", 30000, 30000)
    (tmp_path / "Annotations" / "a.xml").write_text(  # no <size>: read from the image
        "<annotation><filename>a.png</filename><object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
        "<xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>")
    out = tmp_path / "out.json"
    result = run_cli("data", "convert", "--from", "voc", tmp_path, "--out", out, timeout=120)
    one_line_error(result, "a.png", "too many pixels")
    assert not out.exists()


def test_yolo_lines_with_nan_or_inf_are_skipped_naming_file_and_line(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    Image.new("RGB", (100, 80)).save(tmp_path / "images" / "train" / "a.png")
    (tmp_path / "data.yaml").write_text("names: [cat]\n")
    label = tmp_path / "labels" / "train" / "a.txt"
    label.write_text("0 nan 0.5 0.2 0.2\n0 0.5 0.5 inf 0.2\n0 0.5 0.5 0.2 -inf\n0 0.5 0.5 0.2 0.2\n")
    data = CONVERTERS["yolo"](tmp_path)
    assert [a["bbox"] for a in data.annotations] == [[40.0, 32.0, 20.0, 16.0]]
    assert [s["file"] for s in data.skipped] == [f"{label}:1", f"{label}:2", f"{label}:3"]
    assert all("finite" in s["reason"] for s in data.skipped)
    out = tmp_path / "out.json"
    result = run_cli("data", "convert", "--from", "yolo", tmp_path, "--out", out, timeout=120)
    assert result.rc == 0 and f"{label}:2" in result.stdout, result.stderr
    assert len(json.loads(out.read_text())["annotations"]) == 1


def test_shard_index_claiming_a_huge_sample_is_refused_before_reading(tmp_path):
    from transferkit.data.shards import pack, read_index, read_sample

    for i in range(2):
        (tmp_path / "src" / "a").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (9 * i, 0, 0)).save(tmp_path / "src" / "a" / f"{i}.png")
    pack(tmp_path / "src", tmp_path / "shards")
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    index["samples"][0]["size"] = 10**15  # a petabyte: the read must not be attempted
    index["samples"][1]["shard"] = -1  # would silently read the last shard
    (tmp_path / "shards" / "index.json").write_text(json.dumps(index))
    with pytest.raises(TransferKitError, match="names no place in a shard"):
        read_index(tmp_path / "shards")
    index["samples"][1]["shard"] = 0
    (tmp_path / "shards" / "index.json").write_text(json.dumps(index))
    sample = read_index(tmp_path / "shards").samples[0]
    with pytest.raises(BadImage, match="shard ends early"):
        read_sample(sample)
