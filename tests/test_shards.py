"""Packed shards: WebDataset-compatible tars, an index that points at the right bytes, training from them."""

import json
import tarfile

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from PIL import Image
from torch.utils.data import DataLoader

from transferkit.cli import main
from transferkit.config import load_config
from transferkit.data.check import check_dataset
from transferkit.data.shards import pack, read_index, read_sample
from transferkit.errors import TransferKitError
from transferkit.run import train


def test_pack_writes_webdataset_tars_and_an_exact_index(synth_root, tmp_path):
    assert main(["data", "pack", str(synth_root), "--out", str(tmp_path / "p"), "--shard-size", "0.05"]) == 0
    index = read_index(tmp_path / "p" / "train")
    assert index.classes == ["circle", "cross", "square"] and len(index.samples) == 72
    shards = sorted((tmp_path / "p" / "train").glob("shard-*.tar"))
    assert len(shards) > 1 and not list((tmp_path / "p" / "train").glob("*.part"))
    members = {}
    for shard in shards:
        with tarfile.open(shard) as tar:  # plain tar readers see key.png + key.cls per sample
            for m in tar.getmembers():
                members[m.name] = (shard, m.offset_data, m.size, tar.extractfile(m).read())
    originals = sorted((synth_root / "train").rglob("*.png"))
    for sample, record, original in zip(index.samples, index.records, originals, strict=True):
        shard, offset, size, data = members[f"{sample.key}.png"]
        assert (shard, offset, size) == (sample.shard, sample.offset, sample.size)
        assert data == original.read_bytes()  # no --resize: the file's own bytes
        assert int(members[f"{sample.key}.cls"][3]) == record["label"]
        assert index.classes[record["label"]] == original.parent.name


def test_training_from_shards_equals_training_from_folders(synth_root, tmp_path):
    pack(synth_root / "train", tmp_path / "s" / "train")
    pack(synth_root / "val", tmp_path / "s" / "val")
    runs = {}
    for name, extra in (("folder", {"data.root": str(synth_root)}),
                        ("shards", {"data.root": str(tmp_path / "s"), "data.format": "shards"})):
        cfg = load_config(None, tiny_overrides(synth_root, **{"data.cache": "false", "schedule.epochs": 2, **extra}))
        runs[name] = train(cfg, out=tmp_path / name, quiet=True)
    def timeless(metrics):
        return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]

    # same bytes, same pixels, same random crops: the same losses to the last bit
    assert timeless(runs["folder"].metrics) == timeless(runs["shards"].metrics)
    assert len(runs["shards"].metrics) == 2


def test_dataloader_workers_split_the_samples(synth_root, tmp_path):
    from transferkit.data.classification import ImageDataset
    from transferkit.data.folders import FolderSplit

    pack(synth_root / "val", tmp_path / "v")
    index = read_index(tmp_path / "v")
    split = FolderSplit(tmp_path / "v", index.classes, list(zip(index.samples, index.labels(), strict=True)),
                        load=read_sample)
    ds = ImageDataset(split, lambda im: torch.from_numpy(np.array(im)))
    seen = [x for xb, _ in DataLoader(ds, batch_size=4, num_workers=2) for x in xb]
    direct = [ds[i][0] for i in range(len(ds))]
    assert len(seen) == len(direct) == 30 and all(torch.equal(a, b) for a, b in zip(seen, direct, strict=True))


def test_resize_and_detection_boxes_scale_together(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (400, 200), (200, 10, 10)).save(tmp_path / "img" / "a.jpg")
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 400, "height": 200}],
            "categories": [{"id": 3, "name": "car"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [100, 50, 200, 100]}]}
    (tmp_path / "a.json").write_text(json.dumps(coco))
    result = pack(tmp_path / "a.json", tmp_path / "p", resize=50, images=tmp_path / "img")
    assert result.samples == 1
    record = read_index(tmp_path / "p").records[0]
    assert (record["width"], record["height"]) == (100, 50)
    assert record["annotations"] == [{"bbox": [25.0, 12.5, 50.0, 25.0], "label": 0, "iscrowd": 0}]
    assert read_sample(read_index(tmp_path / "p").samples[0]).size == (100, 50)
    assert check_dataset(tmp_path / "p").class_counts == {"car": 1}


def test_damaged_packs_are_reported(synth_root, tmp_path):
    pack(synth_root / "val", tmp_path / "v")
    shard = next((tmp_path / "v").glob("shard-*.tar"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    report = check_dataset(tmp_path / "v")
    assert report.errors and {f.kind for f in report.errors} == {"undecodable image"}
    shard.unlink()
    with pytest.raises(TransferKitError, match="shard-000000.tar is missing"):
        read_index(tmp_path / "v")
    with pytest.raises(TransferKitError, match="not a finished pack"):
        read_index(tmp_path)
    with pytest.raises(TransferKitError, match="already holds a pack"):
        pack(synth_root / "val", tmp_path / "v")
