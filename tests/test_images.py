import io

import numpy as np
import pytest
from conftest import HYMENOPTERA, SHARED_DATA, needs_shared
from PIL import Image

from transferkit.data.classification import decode_all
from transferkit.data.folders import scan_split
from transferkit.data.images import BadImage, load_rgb
from transferkit.errors import TransferKitError


def save(im: Image.Image, path, **kw):
    im.save(path, **kw)
    return path


def test_modes_become_rgb(tmp_path):
    gray = save(Image.new("L", (8, 6), 100), tmp_path / "g.png")
    pal = Image.new("P", (8, 6), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette = save(pal, tmp_path / "p.png")
    cmyk = save(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), tmp_path / "c.jpg")
    rgba = Image.new("RGBA", (8, 6), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    alpha = save(rgba, tmp_path / "a.png")
    deep = save(Image.fromarray(np.full((6, 8), 65535, dtype=np.uint16)), tmp_path / "d16.png")
    for path in (gray, palette, cmyk, alpha, deep):
        im = load_rgb(path)
        assert im.mode == "RGB" and im.size == (8, 6), path
    assert load_rgb(gray).getpixel((0, 0)) == (100, 100, 100)
    assert load_rgb(palette).getpixel((0, 0)) == (10, 200, 30)
    r, g, b = load_rgb(cmyk).getpixel((3, 3))
    assert r > 200 and g < 60 and b < 60  # CMYK (0,255,255,0) is red
    # Transparent pixels are laid on white, opaque ones keep their colour.
    assert load_rgb(alpha).getpixel((5, 5)) == (255, 255, 255)
    assert load_rgb(alpha).getpixel((0, 0)) == (0, 0, 255)
    assert load_rgb(deep).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 10, 20))  # white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(im, tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    out = load_rgb(path)
    assert out.size == (20, 40)
    assert sum(out.getpixel((10, 2))) > 600  # the band is now on top
    assert sum(out.getpixel((10, 38))) < 100


def test_truncated_and_garbage_files_are_bad(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="JPEG")
    (tmp_path / "t.jpg").write_bytes(buf.getvalue()[:200])
    (tmp_path / "x.jpg").write_bytes(b"not an image at all")
    for name in ("t.jpg", "x.jpg"):
        with pytest.raises(BadImage):
            load_rgb(tmp_path / name)


@needs_shared
def test_real_gif_and_truncated_voc_jpegs():
    gif = load_rgb(HYMENOPTERA / "train" / "ants" / "imageNotFound.gif")
    assert gif.mode == "RGB"
    with pytest.raises(BadImage, match="truncated"):
        load_rgb(SHARED_DATA / "voc_mini" / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000001.jpg")


def _dataset_with_bad_file(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(3):
            save(Image.new("RGB", (20, 20), (i * 40, 0, 0)), tmp_path / "train" / cls / f"{i}.png")
    bad = tmp_path / "train" / "b" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0garbage")
    return bad


def test_bad_image_policy_skip_counts_and_error_names_path(tmp_path):
    bad = _dataset_with_bad_file(tmp_path)
    split = scan_split(tmp_path / "train", ["a", "b"])
    assert len(split.samples) == 7
    decode_all(split, "skip", keep_size=16, resample=Image.BILINEAR)
    assert len(split.samples) == 6
    assert [p for p, _ in split.bad] == [bad]
    split = scan_split(tmp_path / "train", ["a", "b"])
    with pytest.raises(TransferKitError, match=f"cannot decode image {bad}"):
        decode_all(split, "error", keep_size=None, resample=Image.BILINEAR)


def test_split_class_mismatch_and_empty_errors(tmp_path):
    (tmp_path / "val" / "c").mkdir(parents=True)
    with pytest.raises(TransferKitError, match="training split lacks: c"):
        scan_split(tmp_path / "val", ["a", "b"])
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(TransferKitError, match="holds no image files"):
        scan_split(tmp_path / "empty", ["a"])
