"""Property: every reader and parser, given mutated bytes of a real file of its kind, returns or refuses
with the toolkit's one-line error, in bounded time; never another exception (a traceback for the user)."""

import functools
import io
import json
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fuzzing import SETTINGS, mutated, returns_or_refuses
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from transferkit.config import load_config
from transferkit.data.coco import read_coco
from transferkit.data.convert import CONVERTERS
from transferkit.data.images import BadImage
from transferkit.data.lists import read_labelled_list
from transferkit.data.shards import pack, read_index, read_sample
from transferkit.weights.formats import describe_weights, read_weights
from transferkit.weights.sources import resolve_source

REPO = Path(__file__).resolve().parents[1]
STATE = {"conv.weight": torch.arange(24.0).reshape(2, 3, 2, 2), "conv.bias": torch.zeros(2),
         "bn.num_batches_tracked": torch.tensor(3)}


def _bytes(write) -> bytes:
    buf = io.BytesIO()
    write(buf)
    return buf.getvalue()


def _safetensors(tmp: Path) -> bytes:
    save_file(STATE, str(tmp / "real.safetensors"), metadata={"epoch": "1"})
    return (tmp / "real.safetensors").read_bytes()


def _archive(kind: str) -> bytes:
    pth = _bytes(lambda b: torch.save(STATE, b))
    if kind == "zip":
        return _bytes(lambda b: zipfile.ZipFile(b, "w", zipfile.ZIP_DEFLATED).writestr("m/model.pth", pth))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if kind == "tar.gz" else "w") as tf:
        info = tarfile.TarInfo("m/model.pth")
        info.size = len(pth)
        tf.addfile(info, io.BytesIO(pth))
    return buf.getvalue()


@functools.cache
def originals() -> dict[str, bytes]:
    """One real file of each kind (a module-level cache, not a fixture: hypothesis prints fixtures)."""
    tmp = Path(tempfile.mkdtemp())
    return {
        "safetensors": _safetensors(tmp),
        "npz": _bytes(lambda b: np.savez(b, **{k: v.numpy() for k, v in STATE.items()})),
        "npz_compressed": _bytes(lambda b: np.savez_compressed(b, w=np.arange(100, dtype=np.float32))),
        "npy": _bytes(lambda b: np.save(b, np.arange(12, dtype=np.int16).reshape(3, 4))),
        "pth": _bytes(lambda b: torch.save({"state_dict": STATE}, b)),
        "tar": _archive("tar"), "tar.gz": _archive("tar.gz"), "zip": _archive("zip"),
    }


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind, name", [("safetensors", "w.safetensors"), ("npz", "w.npz"),
                                        ("npz_compressed", "w.npz"), ("npy", "w.npy"), ("pth", "w.pth")])
@SETTINGS
@given(data=st.data())
def test_weight_readers(tmp_path, kind, name, data):
    path = _write(tmp_path, name, data.draw(mutated(originals()[kind])))
    returns_or_refuses(lambda: read_weights(path))
    returns_or_refuses(lambda: describe_weights(path))


@pytest.mark.parametrize("kind, name", [("tar", "m.tar"), ("tar.gz", "m.tar.gz"), ("zip", "m.zip")])
@SETTINGS
@given(data=st.data())
def test_archive_sources(tmp_path, cache, kind, name, data):
    path = _write(tmp_path, name, data.draw(mutated(originals()[kind])))
    found = returns_or_refuses(lambda: resolve_source(path))
    if found is not None:
        returns_or_refuses(lambda: read_weights(found))
    leftovers = [p for p in (tmp_path / "cache").rglob("*.tmp")] if (tmp_path / "cache").exists() else []
    assert leftovers == []


CONFIG = (REPO / "configs" / "classification" / "base.yaml").read_bytes() + b"data:\n  root: x\n  crop_scale: [0.1, 1]\n"  # noqa: E501


@SETTINGS
@given(data=st.data())
def test_config_loader(tmp_path, data):
    path = _write(tmp_path, "run.yaml", data.draw(mutated(CONFIG, 6)))
    returns_or_refuses(lambda: load_config(path))


@SETTINGS
@given(value=st.text(max_size=60) | st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
       key=st.sampled_from(["seed", "optim.lr", "data.crop_scale", "model.init", "pretrained.require", "a..b", ""]))
def test_override_values(key, value):
    returns_or_refuses(lambda: load_config(None, ["data.root=x", f"{key}={value}"]))


COCO = json.dumps({
    "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
    "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 12], "iscrowd": 0,
                     "area": 120, "segmentation": [[1, 2, 11, 2, 11, 14]]}],
}).encode()
VOC = (b"<annotation><filename>a.png</filename><size><width>40</width><height>30</height><depth>3</depth></size>"
       b"<object><name>cat</name><difficult>0</difficult><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>20</xmax>"
       b"<ymax>25</ymax></bndbox></object></annotation>")
LABELME = json.dumps({"version": "5.0.1", "imagePath": "a.png", "imageData": None, "imageHeight": 30,
                      "imageWidth": 40, "shapes": [
                          {"label": "cat", "points": [[1, 1], [20, 2], [15, 25]], "shape_type": "polygon",
                           "group_id": None, "flags": {}},
                          {"label": "dog", "points": [[2, 2], [30, 20]], "shape_type": "rectangle",
                           "group_id": None, "flags": {}}]}).encode()


def _image(folder: Path, name: str = "a.png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (9, 9, 9)).save(folder / name)


@SETTINGS
@given(data=st.data())
def test_coco_json(tmp_path, data):
    path = _write(tmp_path, "a.json", data.draw(mutated(COCO)))
    returns_or_refuses(lambda: read_coco(path))


@SETTINGS
@given(data=st.data())
def test_voc_xml(tmp_path, data):
    _image(tmp_path / "JPEGImages")
    (tmp_path / "Annotations").mkdir(exist_ok=True)
    _write(tmp_path / "Annotations", "a.xml", data.draw(mutated(VOC)))
    returns_or_refuses(lambda: CONVERTERS["voc"](tmp_path))


@SETTINGS
@given(data=st.data())
def test_yolo_lines(tmp_path, data):
    _image(tmp_path / "images" / "train")
    (tmp_path / "labels" / "train").mkdir(parents=True, exist_ok=True)
    _write(tmp_path / "labels" / "train", "a.txt", data.draw(mutated(b"0 0.5 0.5 0.2 0.3\n1 0.1 0.2 0.05 0.05\n")))
    _write(tmp_path, "data.yaml", data.draw(mutated(b"names: [cat, dog]\n")))
    result = returns_or_refuses(lambda: CONVERTERS["yolo"](tmp_path))
    for ann in result.annotations if result else []:
        assert all(np.isfinite(ann["bbox"])) and ann["bbox"][2] > 0 and ann["bbox"][3] > 0


@SETTINGS
@given(data=st.data())
def test_labelme(tmp_path, data):
    _image(tmp_path)
    _write(tmp_path, "a.json", data.draw(mutated(LABELME)))
    returns_or_refuses(lambda: CONVERTERS["labelme"](tmp_path))


@SETTINGS
@given(data=st.data())
def test_list_files(tmp_path, data):
    _image(tmp_path / "cat")
    _write(tmp_path, "p_train.lst", data.draw(mutated(b"0\t0\tcat/a.png\n1\t1\tdog/b.png\n")))
    _write(tmp_path, "p_classes.txt", data.draw(mutated(b"cat\ndog\n")))
    returns_or_refuses(lambda: read_labelled_list(tmp_path / "p_train.lst", tmp_path))


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    for name in ("cat", "dog"):
        for i in range(2):
            _image(root / "src" / name, f"{i}.png")
    pack(root / "src", root / "shards")
    return root / "shards"


@SETTINGS
@given(data=st.data())
def test_shard_index(tmp_path, packed, data):
    (tmp_path / "shards").mkdir(exist_ok=True)
    for shard in packed.glob("*.tar"):
        (tmp_path / "shards" / shard.name).write_bytes(shard.read_bytes())
    _write(tmp_path / "shards", "index.json", data.draw(mutated((packed / "index.json").read_bytes())))
    index = returns_or_refuses(lambda: read_index(tmp_path / "shards"))
    for sample in index.samples[:4] if index else []:
        returns_or_refuses(lambda s=sample: read_sample(s), BadImage)
