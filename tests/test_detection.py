"""Detection: a tiny detector learns synthetic shapes; mAP agrees with pycocotools; scoped restores
skip exactly the class-dependent tensors; data, transforms and batching keep boxes right."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, det_overrides, needs_shared

from transferkit.cli import main
from transferkit.config import DetectionConfig, PretrainedConfig, load_config
from transferkit.data.detection import GroupedBatchSampler, load_detection_splits
from transferkit.data.synthetic import make_synthetic_detection
from transferkit.errors import TransferKitError
from transferkit.models.detection import HEAD_PATTERNS, backbone_stages, create_detector
from transferkit.patterns import first_match
from transferkit.run import train
from transferkit.training.checkpoint import save_weights
from transferkit.training.detection_metrics import coco_map, to_coco_results
from transferkit.weights.transfer import restore_pretrained, transfer

SMALL = DetectionConfig(min_size=[64], max_size=64, fpn_channels=32)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_synthetic_detection(tmp_path_factory.mktemp("shapes"), 48, 16, 96, seed=0)


def test_tiny_detector_learns_synthetic_shapes(shapes, tmp_path, capsys):
    result = train(load_config(None, det_overrides(shapes)), out=tmp_path / "run", quiet=True)
    maps = [m["val_map"] for m in result.metrics]
    assert result.best_metric == "val_map" and maps[-1] > 0.03 and maps[-1] > maps[0] * 3, maps
    assert set(result.metrics[-1]["val_ap_per_class"]) == {"circle", "square", "triangle"}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_val_map"] == max(maps)
    # eval reproduces the epoch's mAP from the saved weights and writes COCO results
    capsys.readouterr()
    assert main(["eval", *sum((["-o", o] for o in det_overrides(shapes)), []), "--weights",
                 str(tmp_path / "run" / "checkpoints" / "last.safetensors"), "--json",
                 "--results", str(tmp_path / "dets.json")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["val_map"] == pytest.approx(maps[-1], abs=1e-9)
    dets = json.loads((tmp_path / "dets.json").read_text())
    assert dets and {"image_id", "category_id", "bbox", "score"} <= set(dets[0])
    # predict draws the boxes and lists them
    assert main(["predict", "--run", str(tmp_path / "run"), str(shapes / "images" / "val" / "val_0000.png"),
                 "--draw", str(tmp_path / "drawn"), "--score", "0.2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["drawn"].endswith("val_0000.png") and (tmp_path / "drawn" / "val_0000.png").is_file()
    assert all(d["class"] in {"circle", "square", "triangle"} and d["score"] >= 0.2 for d in out[0]["detections"])
    # a run whose class names were damaged: one line, not a traceback
    (tmp_path / "run" / "classes.json").write_text('{"circle": 0}')
    assert main(["predict", "--run", str(tmp_path / "run"), str(shapes / "images" / "val" / "val_0000.png")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'run' / 'classes.json'}: not a JSON list of class "
                                               "names; the run's class names are damaged")


def _ground_truth():
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(1, 7):
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 150})
        if i == 6:
            continue  # an image without objects
        for _ in range(int(rng.integers(1, 4))):
            x, y = rng.uniform(0, 120), rng.uniform(0, 90)
            w, h = rng.uniform(8, 80), rng.uniform(8, 60)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(rng.integers(1, 3)),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(len(anns) == 3)})
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def _reference(gt, dets, iou_type="bbox"):
    """pycocotools used directly, the documented way (loadRes)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[:6]


def test_map_agrees_with_pycocotools():
    gt = _ground_truth()
    rng = np.random.default_rng(1)
    sets = []
    for noise in (0.0, 3.0, 12.0):
        dets = []
        for a in gt["annotations"]:
            x, y, w, h = (v + rng.normal(0, noise) for v in a["bbox"])
            dets.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [x, y, abs(w), abs(h)],
                         "score": float(rng.uniform(0.1, 1))})
        dets.append({"image_id": 6, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.9})  # on the empty image
        sets.append(dets)
    for dets in sets:
        ours = coco_map(gt, dets)
        ref = _reference(gt, dets)
        keys = ("val_map", "val_ap50", "val_ap75", "val_ap_small", "val_ap_medium", "val_ap_large")
        assert all(abs(ours[k] - r) < 1e-6 for k, r in zip(keys, ref, strict=True)), (ours, ref)
        assert 0 < ours["val_map"] <= 1
    empty = coco_map(gt, [])
    assert empty["val_map"] == 0 and empty["val_ap50"] == 0 and set(empty["val_ap_per_class"].values()) == {0.0}
    perfect = coco_map(gt, [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                             "score": 1.0} for a in gt["annotations"] if not a["iscrowd"]])
    assert perfect["val_map"] == pytest.approx(1.0)


def test_detections_map_back_to_original_pixels_and_category_ids():
    outputs = [{"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]), "labels": torch.tensor([2]),
                "scores": torch.tensor([0.5])}]
    targets = [{"image_id": 7, "scale": 0.5}]
    with_background = to_coco_results(outputs, targets, label_offset=1)  # Faster R-CNN: label 2 is class 1
    assert with_background == [{"image_id": 7, "category_id": 2, "bbox": [20.0, 40.0, 40.0, 80.0], "score": 0.5}]
    assert to_coco_results(outputs, targets, label_offset=0)[0]["category_id"] == 3


@pytest.mark.parametrize("arch", ["fasterrcnn", "maskrcnn", "retinanet", "fcos"])
def test_all_but_head_skips_exactly_the_class_dependent_tensors(arch, tmp_path):
    cfg = SMALL.model_copy(update={"arch": arch})
    source, _ = create_detector("test_efficientnet", 3, cfg)
    save_weights(source, tmp_path / "det.safetensors")
    target, family = create_detector("test_efficientnet", 5, cfg)
    report = transfer(target, tmp_path / "det.safetensors", "all-but-head", family.head_patterns)
    not_loaded = {e.target for e in report.entries if e.status != "loaded"}
    expected = {f"{p[:-2]}.{t}" for p in HEAD_PATTERNS[arch] for t in ("weight", "bias")}
    assert not_loaded == expected
    assert {e.status for e in report.entries if e.target in expected} == {"out-of-scope"}
    state = target.state_dict()
    for name, value in source.state_dict().items():
        if name not in expected:
            assert torch.equal(state[name], value), name
    # the same checkpoint restores everything for the same classes
    same, fam = create_detector("test_efficientnet", 3, cfg)
    assert transfer(same, tmp_path / "det.safetensors", "full", fam.head_patterns).fraction_restored() == 1.0


def test_backbone_restore_from_the_imagenet_classifier():
    model, family = create_detector("tf_efficientnet_lite0", 2, SMALL)
    report = restore_pretrained(model, family, PretrainedConfig(scope="backbone"))
    body = [e for e in report.entries if e.target.startswith("backbone.body.")]
    rest = [e for e in report.entries if not e.target.startswith("backbone.body.")]
    assert body and all(e.status == "loaded" for e in body)
    assert rest and all(e.status == "out-of-scope" for e in rest)
    rows = report.per_module()  # the table splits the restored network from the new FPN
    assert rows["backbone.body"]["fraction_restored"] == 1.0 and rows["backbone.fpn"]["loaded"] == 0
    # the classifier's own head (conv_head, bn, fc) is what is left unused, with the BN step counters
    assert {n.split(".")[0] for n in report.unused_source if not n.endswith("num_batches_tracked")} == {
        "_conv_head", "_bn1", "_fc"}


def test_trainable_backbone_layers_freeze_from_the_bottom():
    for k in (0, 3, 5):
        model, _ = create_detector("test_efficientnet", 2, SMALL.model_copy(update={"trainable_backbone_layers": k}))
        stages = backbone_stages(model.backbone.body)
        params = dict(model.backbone.body.named_parameters())
        frozen = [i for i, stage in enumerate(stages) if not any(params[n].requires_grad for n in stage)]
        assert len(stages) == 5 and frozen == list(range(5 - k))
        assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("backbone.body."))


def test_seeded_split_classes_and_crowd(shapes, tmp_path):
    ann = json.loads((shapes / "annotations" / "train.json").read_text())
    ann["annotations"][0]["iscrowd"] = 1
    (tmp_path / "a.json").write_text(json.dumps(ann))
    cfg = load_config(None, det_overrides(shapes, **{"data.train_ann": str(tmp_path / "a.json"), "data.val_ann": "null",
                                                     "data.val_fraction": 0.25, "data.classes": "[square]"}))
    classes, train_split, val_split = load_detection_splits(cfg.data)
    again = load_detection_splits(cfg.data)[2]
    assert classes == ["square"] and len(val_split.records) == 12 and len(train_split.records) == 36
    assert [r.image_id for r in val_split.records] == [r.image_id for r in again.records]
    assert not {r.image_id for r in val_split.records} & {r.image_id for r in train_split.records}
    assert all(int(label) == 0 for r in train_split.records for label in r.labels)
    from transferkit.tasks.detection import load_detection_data

    data = load_detection_data(load_config(None, det_overrides(shapes, **{"data.train_ann": str(tmp_path / "a.json")})))
    crowd = next(i for i, r in enumerate(data.train.records) if r.crowd.any())
    record = data.train.records[crowd]
    _, target = data.train_set[crowd]
    assert len(target["boxes"]) == int((~record.crowd).sum())  # crowd regions are not training targets
    assert any(a["iscrowd"] for a in data.train.coco_ground_truth()["annotations"])  # but are in the ground truth


def test_flip_moves_the_boxes(shapes):
    cfg = load_config(None, det_overrides(shapes, **{"detection.hflip": 1.0, "detection.color_jitter": 0}))
    from transferkit.tasks.detection import load_detection_data

    data = load_detection_data(cfg)
    index = next(i for i, r in enumerate(data.train.records) if len(r.boxes))
    image, target = data.train_set[index]
    record = data.train.records[index]
    flipped = record.boxes.clone()
    flipped[:, [0, 2]] = record.width - record.boxes[:, [2, 0]]
    assert torch.allclose(target["boxes"], flipped, atol=1e-4)
    plain = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(record.path).convert("RGB"), dtype=np.float32)
    assert np.allclose(image.permute(1, 2, 0).numpy() * 255, plain[:, ::-1], atol=1)


def test_batches_keep_one_aspect_group_and_follow_the_generator():
    groups = [0, 1, 0, 0, 1, 1, 0, 1, 0]
    batches = list(GroupedBatchSampler(groups, 2, True, torch.Generator().manual_seed(3)))
    again = list(GroupedBatchSampler(groups, 2, True, torch.Generator().manual_seed(3)))
    assert batches == again and sorted(i for b in batches for i in b) == list(range(9))
    assert all(len({groups[i] for i in b}) == 1 for b in batches)


@needs_shared
def test_voc_detection_data():
    cfg = load_config(None, det_overrides(SHARED_DATA, **{
        "data.format": "voc", "data.root": str(SHARED_DATA / "voc_mini" / "VOCdevkit" / "VOC2007"),
        "data.train_split": "trainval", "data.val_split": "test", "data.train_images": "null",
        "data.val_images": "null"}))
    classes, train_split, val_split = load_detection_splits(cfg.data)
    assert "person" in classes and train_split.records and val_split.records
    # Every record's boxes against its XML read here: VOC's 1-based inclusive pixels to xyxy from 0.
    from defusedxml import ElementTree

    for record in train_split.records + val_split.records:
        xml = ElementTree.parse(record.path.parent.parent / "Annotations" / f"{record.path.stem}.xml").getroot()
        expected = [[float(o.findtext(f"bndbox/{t}")) - d for t, d in
                     (("xmin", 1), ("ymin", 1), ("xmax", 0), ("ymax", 0))] + [classes.index(o.findtext("name"))]
                    for o in xml.findall("object") if o.findtext("difficult", "0").strip() != "1"]
        got = [[*box, label] for box, label in zip(record.boxes.tolist(), record.labels.tolist(), strict=True)]
        assert got == expected, record.path


def test_data_synth_detection_cli(tmp_path):
    assert main(["data", "synth", "--task", "detection", "--out", str(tmp_path / "s"), "--train-per-class", "5",
                 "--val-per-class", "2", "--size", "64"]) == 0
    train_json = json.loads((tmp_path / "s" / "annotations" / "train.json").read_text())
    assert len(train_json["images"]) == 15 and train_json["annotations"]
    assert [c["name"] for c in train_json["categories"]] == ["circle", "square", "triangle"]
    sizes = {i["id"]: (i["width"], i["height"]) for i in train_json["images"]}
    assert set(sizes.values()) == {(64, 64)}
    assert {a["category_id"] for a in train_json["annotations"]} == {1, 2, 3}
    assert {a["image_id"] for a in train_json["annotations"]} <= set(sizes)
    for a in train_json["annotations"]:  # inside its image, with an area
        x, y, w, h = a["bbox"]
        width, height = sizes[a["image_id"]]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= width and y + h <= height, a


def test_detection_resumes_exactly_from_inside_an_epoch(shapes, tmp_path):
    from safetensors.torch import load_file

    cfg = load_config(None, det_overrides(shapes, **{"schedule.epochs": 2, "checkpoint.every_steps": 4,
                                                     "checkpoint.keep_last": 20}))
    train(cfg, out=tmp_path / "run", quiet=True)
    reference = load_file(tmp_path / "run" / "checkpoints" / "last.safetensors")
    states = sorted((tmp_path / "run" / "checkpoints" / "states").glob("step-*"))
    assert [s.name for s in states] == [f"step-{n:08d}" for n in (4, 6, 8, 12)]  # 6 batches an epoch
    for later in states[2:]:  # back to step 8: inside epoch 2, after two of its batches
        __import__("shutil").rmtree(later)
    train(cfg, resume=tmp_path / "run", quiet=True)
    resumed = load_file(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert reference.keys() == resumed.keys() and all(torch.equal(reference[k], resumed[k]) for k in reference)


@pytest.mark.parametrize("arch", ["fasterrcnn", "maskrcnn", "retinanet", "fcos", "ssdlite320_mobilenet_v3_large"])
def test_head_rows_from_the_source_detectors_classes(arch, tmp_path):
    from transferkit.config import HeadInitConfig
    from transferkit.models.heads import detector_head_rows, has_background, init_detector_head_from_classes

    cfg = SMALL.model_copy(update={"torchvision_model": arch} if "_" in arch else {"arch": arch})
    source, _ = create_detector("test_efficientnet", 3, cfg)  # classes: car, person, dog
    save_weights(source, tmp_path / "det.safetensors")
    target, family = create_detector("test_efficientnet", 2, cfg)  # classes: pedestrian, tree
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = transfer(target, tmp_path / "det.safetensors", "all-but-head", family.head_patterns)
    spec = HeadInitConfig(from_classes={"pedestrian": "person"}).from_classes
    rows = init_detector_head_from_classes(target, report, ["pedestrian", "tree"], ["car", "person", "dog"], spec)
    assert [r["from"] for r in rows] == [["person (1)"], None]
    src, dst = source.state_dict(), target.state_dict()
    tensors = [n for n in dst if first_match(family.head_patterns, n) is not None]
    assert tensors
    for tensor in tensors:
        for s_index, d_index in ((1, 0), *(((-1, -1),) if has_background(tensor) else ())):  # person, background
            s_rows = detector_head_rows(tensor, src[tensor].shape[0], 3, s_index)
            d_rows = detector_head_rows(tensor, dst[tensor].shape[0], 2, d_index)
            assert torch.equal(dst[tensor][d_rows], src[tensor][s_rows]), tensor
        tree = detector_head_rows(tensor, dst[tensor].shape[0], 2, 1)
        assert torch.equal(dst[tensor][tree], before[tensor][tree]), tensor  # no match: left as built


def test_mask_rcnn_gets_polygon_masks_that_move_with_the_image(shapes):
    from transferkit.data.detection import rasterise
    from transferkit.tasks.detection import build_detector, load_detection_data

    cfg = load_config(None, det_overrides(shapes, **{"detection.arch": "maskrcnn", "detection.hflip": 1.0,
                                                     "detection.color_jitter": 0}))
    data = load_detection_data(cfg)
    index = next(i for i, r in enumerate(data.train.records) if len(r.boxes))
    record = data.train.records[index]
    image, target = data.train_set[index]
    assert target["masks"].shape == (len(record.boxes), record.height, record.width)
    upright = rasterise(record.polygons, record.boxes, (record.width, record.height), 1.0)
    assert torch.equal(target["masks"], upright.flip(-1))  # flipped with the image and the boxes
    for mask, box in zip(target["masks"], target["boxes"], strict=True):  # each mask fills most of its box
        x0, y0, x1, y1 = box.round().int().tolist()
        assert mask.sum() > 0.3 * (x1 - x0) * (y1 - y0) and mask[:, :max(0, x0 - 1)].sum() == 0
    model, _, _ = build_detector(cfg, data.classes, restore=False)
    model.train()
    # Mask logits held at +10 everywhere: the mask loss is then ~10 x the share of background pixels
    # in each target mask, and ~0 against full masks, so it shows the polygons reach the loss.
    with torch.no_grad():
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.zero_()
        model.roi_heads.mask_predictor.mask_fcn_logits.bias.fill_(10.0)
    losses = {}
    for name, masks in (("polygons", target["masks"]), ("full", torch.ones_like(target["masks"]))):
        torch.manual_seed(0)  # the same sampled proposals for both
        losses[name] = model([image], [{"boxes": target["boxes"], "labels": target["labels"], "masks": masks}])
    assert all(torch.isfinite(v) for v in losses["polygons"].values())
    assert losses["full"]["loss_mask"] < 0.01 < 0.5 < losses["polygons"]["loss_mask"]


@pytest.mark.parametrize("name", ["fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "retinanet_resnet50_fpn",
                                  "fcos_resnet50_fpn", "ssdlite320_mobilenet_v3_large"])
def test_torchvision_model_zoo_checkpoints_restore_all_but_the_head(name, tmp_path):
    """torchvision's COCO checkpoints are its builders' state dicts, 91 classes, ResNet BatchNorm frozen
    (FrozenBatchNorm2d: no step counters). Saved as a .pth the way the model zoo ships them, they
    restore into transferkit's build of the same detector for 3 classes: every tensor but the
    class-dependent ones."""
    from timm.layers import freeze_batch_norm_2d
    from torchvision.models import detection

    zoo = getattr(detection, name)(weights=None, weights_backbone=None, num_classes=91)
    if hasattr(zoo.backbone, "body"):
        zoo.backbone.body = freeze_batch_norm_2d(zoo.backbone.body)
    torch.save(zoo.state_dict(), tmp_path / "coco.pth")
    model, family = create_detector("unused", 3, DetectionConfig(torchvision_model=name))
    report = transfer(model, tmp_path / "coco.pth", "all-but-head", family.head_patterns)

    def head(n):
        return first_match(family.head_patterns, n) is not None

    not_loaded = {e.target for e in report.entries if e.status != "loaded"}
    assert not_loaded and not_loaded == {n for n in model.state_dict() if head(n)}
    state = model.state_dict()  # and the class-dependent tensors are exactly those whose shape follows the classes
    assert all(state[n].shape != zoo.state_dict()[n].shape for n in not_loaded)
    assert all(head(n) or n.endswith("num_batches_tracked") for n in report.unused_source)  # SSDlite trains its BN


def test_torchvision_backbone_from_an_imagenet_resnet(tmp_path):
    from torchvision.models import resnet50

    torch.save(resnet50(weights=None).state_dict(), tmp_path / "resnet50.pth")
    model, family = create_detector("unused", 2, DetectionConfig(torchvision_model="fasterrcnn_resnet50_fpn"))
    report = transfer(model, tmp_path / "resnet50.pth", "backbone", family.head_patterns, family.backbone_patterns,
                      backbone_prefix=family.backbone_prefix)
    body = [e for e in report.entries if e.target.startswith("backbone.body.")]
    assert body and all(e.status == "loaded" and e.how == "exact" for e in body)
    assert {n for n in report.unused_source if not n.endswith("num_batches_tracked")} == {"fc.weight", "fc.bias"}
    frozen = [n for n, p in model.backbone.body.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("conv1", "layer1.")) for n in frozen)  # trainable_backbone_layers 3


def test_mask_map_agrees_with_pycocotools_and_runs_for_mask_rcnn(shapes):
    from pycocotools import mask as mask_utils

    from transferkit.data.detection import rasterise
    from transferkit.tasks.detection import build_detector, detection_loaders, label_offset, load_detection_data
    from transferkit.training.detection_metrics import evaluate_detection

    cfg = load_config(None, det_overrides(shapes, **{"detection.arch": "maskrcnn", "detection.score_threshold": 0}))
    data = load_detection_data(cfg)
    truth = data.val.coco_ground_truth()
    # predictions: each true object's own mask drawn a little bigger, and a stray one
    results = []
    rng = np.random.default_rng(0)
    for r in data.val.records:
        for k in range(len(r.boxes)):
            mask = rasterise([[[v * 1.02 for v in p] for p in r.polygons[k]]], r.boxes[k:k + 1], (r.width, r.height),
                             1.0)[0].numpy()
            rle = mask_utils.encode(np.asfortranarray(mask))
            x, y, w, h = mask_utils.toBbox(rle).tolist()
            results.append({"image_id": r.image_id, "category_id": int(r.labels[k]) + 1, "bbox": [x, y, w, h],
                            "score": float(rng.uniform(0.2, 1)),
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    ours = coco_map(truth, results, "segm")
    reference = _reference(truth, results, "segm")
    assert abs(ours["val_map"] - reference[0]) < 1e-6 and abs(ours["val_ap50"] - reference[1]) < 1e-6
    assert ours["val_ap50"] > 0.9
    # an untrained Mask R-CNN's detections carry masks, scored as val_mask_*
    model, _, _ = build_detector(cfg, data.classes, restore=False)
    _, loader = detection_loaders(cfg, data)
    metrics, dets = evaluate_detection(model, loader, data.val, torch.device("cpu"), label_offset(cfg))
    assert dets and "segmentation" in dets[0] and "val_mask_map" in metrics and "val_map" in metrics
    from pycocotools import mask as mask_utils

    sizes = {r.image_id: (r.height, r.width) for r in data.val.records}
    for det in dets[:20]:  # each mask is at its image's original size
        rle = {"size": det["segmentation"]["size"], "counts": det["segmentation"]["counts"].encode("ascii")}
        assert mask_utils.decode(rle).shape == sizes[det["image_id"]]


def test_detection_from_packed_shards_equals_detection_from_coco(shapes, tmp_path):
    from transferkit.data.shards import pack

    for split in ("train", "val"):
        pack(shapes / "annotations" / f"{split}.json", tmp_path / "packed" / split, images=shapes / "images" / split)
    runs = {}
    for name, extra in (("coco", {}), ("shards", {"data.format": "shards", "data.root": str(tmp_path / "packed")})):
        cfg = load_config(None, det_overrides(shapes, **{"schedule.epochs": 2, "data.cache": "false", **extra}))
        runs[name] = [{k: v for k, v in m.items() if k != "seconds"} for m in train(cfg, out=tmp_path / name,
                                                                                    quiet=True).metrics]
    assert runs["coco"] == runs["shards"] and runs["shards"][-1]["val_map"] > 0


def test_skip_empty_leaves_out_only_training_images_without_a_box(shapes, tmp_path, capsys):
    """detection.skip_empty: training keeps the images with at least one non-crowd box of the kept
    classes (an image with crowd regions only counts as empty: training ignores crowd regions), and
    evaluation keeps every image."""
    from transferkit.tasks.detection import load_detection_data

    ann = json.loads((shapes / "annotations" / "train.json").read_text())
    by_image: dict[int, list[dict]] = {im["id"]: [] for im in ann["images"]}
    for a in ann["annotations"]:
        by_image[a["image_id"]].append(a)
    crowd_only = next(i for i, anns in by_image.items() if len(anns) == 1)
    by_image[crowd_only][0]["iscrowd"] = 1
    (tmp_path / "train.json").write_text(json.dumps(ann))
    with_boxes = sorted(i for i, anns in by_image.items() if any(not a.get("iscrowd") for a in anns))
    assert 0 < len(with_boxes) < len(by_image) - 1  # empty images and the crowd-only one to leave out

    over = {"data.train_ann": str(tmp_path / "train.json")}
    kept = load_detection_data(load_config(None, det_overrides(shapes, **over, **{"detection.skip_empty": "true"})))
    every = load_detection_data(load_config(None, det_overrides(shapes, **over)))
    assert sorted(r.image_id for r in kept.train.records) == with_boxes
    assert len(kept.train_set) == len(with_boxes) and kept.train.without_boxes == len(by_image) - len(with_boxes)
    assert len(every.train_set) == len(by_image) and every.train.without_boxes == 0
    assert [r.image_id for r in kept.val.records] == [r.image_id for r in every.val.records]

    for a in ann["annotations"]:
        a["iscrowd"] = 1
    (tmp_path / "train.json").write_text(json.dumps(ann))
    assert main(["train", *sum((["-o", o] for o in det_overrides(shapes, **over, **{
        "detection.skip_empty": "true"})), []), "--out", str(tmp_path / "run")]) == 2
    assert "detection.skip_empty: no training image holds a box" in capsys.readouterr().err


@pytest.mark.parametrize("times", [1, 2])
def test_a_large_jpeg_decoded_at_a_fraction_keeps_its_boxes(tmp_path, times):
    """A photo at least twice the detector's size is decoded by the JPEG draft (1/2 to 1/8 scale),
    and is still the image its annotation describes: not skipped as a size mismatch, boxes scaled
    with it. 400x300 (800x600) at min_size 64: drafted at 1/4 (1/8) to 100x75, resized to 85x64."""
    from PIL import Image

    from transferkit.tasks.detection import load_detection_data

    (tmp_path / "images").mkdir()
    Image.new("RGB", (400 * times, 300 * times), (120, 60, 30)).save(tmp_path / "images" / "big.jpg", quality=90)
    ann = {"images": [{"id": 1, "file_name": "big.jpg", "width": 400 * times, "height": 300 * times}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [60 * times, 30 * times, 150 * times,
                                                                               240 * times], "area": 1, "iscrowd": 0}],
           "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    over = {"data.train_ann": str(tmp_path / "ann.json"), "data.train_images": str(tmp_path / "images"),
            "data.val_ann": str(tmp_path / "ann.json"), "data.val_images": str(tmp_path / "images"),
            "data.root": str(tmp_path), "detection.min_size": "[64]", "detection.max_size": 1000,
            "data.on_bad_image": "error", "detection.hflip": 0, "detection.color_jitter": 0}
    data = load_detection_data(load_config(None, det_overrides(tmp_path, **over)))
    image, target = data.val_set[0]
    assert tuple(image.shape) == (3, 64, 85)  # 400 x 64/300 = 85.3
    assert torch.allclose(target["boxes"], torch.tensor([[60, 30, 210, 270]]) * (85 / 400), atol=1e-4)
    assert target["scale"] == 85 / (400 * times)


def test_a_one_pixel_coarsest_level_is_a_one_line_error(shapes, tmp_path, capsys):
    """FCOS on a 32-channel FPN normalises its head in 32 groups of one channel; an image resized to
    64 px makes its stride-128 level one pixel, so in a batch of one image (as the last batch of an
    epoch can be) a group holds one value, which torch refuses with a traceback. The run stops with
    one line that says what to change."""
    over = det_overrides(shapes, **{"detection.fpn_channels": 32, "schedule.epochs": 1, "data.batch_size": 1,
                                    "detection.min_size": "[64]", "detection.max_size": 64})
    assert main(["train", *sum((["-o", o] for o in over), []), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: detection: a normalisation layer got one value per channel"), err
    assert "detection.min_size" in err[-1] and "detection.fpn_channels" in err[-1] and "Traceback" not in err


def test_loader_workers_rebuild_an_epoch_from_the_generator_state(shapes):
    """What a resume restores of the detection loader is its generator: an epoch's order and its
    flips and colour jitter, drawn in 2 workers, come back from the generator's state at the epoch's
    start alone (workers start each epoch, seeded from it; persistent ones would carry their own
    random state over from the epoch before)."""
    from transferkit.tasks.detection import detection_loaders, load_detection_data

    cfg = load_config(None, det_overrides(shapes, **{"data.num_workers": 2, "detection.hflip": 0.5,
                                                     "detection.color_jitter": 0.4}))
    data = load_detection_data(cfg)
    loader, _ = detection_loaders(cfg, data)
    first = list(loader)
    state = loader.generator.get_state()
    second = list(loader)
    fresh, _ = detection_loaders(cfg, data)
    fresh.generator.set_state(state)
    again = list(fresh)

    def same(a, b):
        return len(a) == len(b) and all(
            len(ia) == len(ib) and all(torch.equal(x, y) for x, y in zip(ia, ib, strict=True))
            and all(torch.equal(ta["boxes"], tb["boxes"]) and ta["image_id"] == tb["image_id"]
                    for ta, tb in zip(ja, jb, strict=True))
            for (ia, ja), (ib, jb) in zip(a, b, strict=True))

    assert not same(first, second)  # the epochs differ, so the comparison below can fail
    assert same(second, again)


def test_soft_masks_are_cut_at_one_half_at_the_original_width_and_height():
    from pycocotools import mask as mask_utils

    from transferkit.training.detection_metrics import _rles

    soft = torch.tensor([0.5, 0.49, 0.9]).view(3, 1, 1, 1).expand(3, 1, 2, 4)  # three masks, 2 x 4
    rles = _rles(soft, (6, 3))  # to an image 6 wide and 3 high
    assert [r["size"] for r in rles] == [[3, 6]] * 3
    areas = mask_utils.area([{"size": r["size"], "counts": r["counts"].encode()} for r in rles])
    assert areas.tolist() == [18, 0, 18]  # 0.5 is kept, below it is not
    # resized by pixel centres (as torchvision resizes the image): 2 pixels to 4 samples the first at 1/4
    # of the way from 0.35 to 0.9 (0.4875, cut), the second at 3/4; by corners, at 1/3 (0.533, kept)
    edge = _rles(torch.tensor([[[[0.35, 0.9]]]]), (4, 1))[0]
    assert mask_utils.decode({"size": edge["size"], "counts": edge["counts"].encode()})[0].tolist() == [0, 0, 1, 1]
    assert _rles(torch.zeros(0, 1, 2, 4), (6, 3)) == []


def test_outputs_and_targets_of_other_lengths_are_refused():
    one = {"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.5])}
    target = {"image_id": 1, "scale": 1.0}
    with pytest.raises(ValueError):  # a batch whose outputs were cut short is not scored as if complete
        to_coco_results([one], [target, {"image_id": 2, "scale": 1.0}], label_offset=0)
    with pytest.raises(ValueError):
        to_coco_results([{**one, "scores": torch.tensor([0.5, 0.4])}], [target], label_offset=0)


def _one_image(anns, size=100):
    return {"images": [{"id": 1, "width": size, "height": size}], "annotations": anns,
            "categories": [{"id": 1, "name": "a"}]}


def test_each_ground_truth_box_is_matched_once_and_the_caller_keeps_its_data(capsys):
    gt = _one_image([{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40], "area": 1600, "iscrowd": 0},
                     {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 40, 40], "area": 1600, "iscrowd": 0}])
    dets = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40], "score": 0.8},  # the first box again
            {"image_id": 1, "category_id": 1, "bbox": [50, 50, 40, 40], "score": 0.7}]
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    metrics = coco_map(gt, dets)
    # true, false, true positive: precision 1 up to recall 0.5 (51 of COCO's 101 recall points), then 2/3
    assert metrics["val_ap50"] == pytest.approx((51 + 50 * 2 / 3) / 101)
    assert gt == gt_before and dets == dets_before  # pycocotools marks what it is given; ours are copies
    assert capsys.readouterr().out == ""  # pycocotools' progress lines are not printed


def test_mask_results_are_sized_by_their_mask_not_their_box():
    from pycocotools import mask as mask_utils

    def rle(mask):
        r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": r["size"], "counts": r["counts"].decode("ascii")}

    square = np.zeros((100, 100), bool)
    square[10:20, 10:20] = True  # a small object (area 100)
    corner = np.zeros((100, 100), bool)
    corner[50, 40:] = True  # a stray L: 109 pixels, but a box of 60 x 50
    corner[50:, 40] = True
    gt = _one_image([{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 10, 10], "area": 100,
                      "iscrowd": 0, "segmentation": rle(square)}])
    dets = [{"image_id": 1, "category_id": 1, "bbox": [40, 50, 60, 50], "score": 0.95, "segmentation": rle(corner)},
            {"image_id": 1, "category_id": 1, "bbox": [10, 10, 10, 10], "score": 0.9, "segmentation": rle(square)}]
    metrics = coco_map(gt, dets, "segm")
    # the stray mask is small too, so it is a false positive among the small objects: AP 1/2 from recall 0
    assert metrics["val_ap_small"] == pytest.approx(0.5)
    assert coco_map(gt, dets)["val_ap_small"] == pytest.approx(1.0)  # as boxes, the stray one is medium


def test_mask_map_scores_the_masks_even_for_a_single_detection(shapes):
    from transferkit.tasks.detection import detection_loaders, label_offset, load_detection_data
    from transferkit.training.detection_metrics import evaluate_detection

    cfg = load_config(None, det_overrides(shapes))
    data = load_detection_data(cfg)
    _, loader = detection_loaders(cfg, data)
    first = data.val.records[0]

    class OneBox(torch.nn.Module):
        """The first image's first true box, exactly, with an empty mask; nothing on the other images."""
        def forward(self, images):
            return [{"boxes": first.boxes[:1] * t["scale"], "labels": first.labels[:1] + label_offset(cfg),
                     "scores": torch.ones(1), "masks": torch.zeros(1, 1, 8, 8)} if t["image_id"] == first.image_id
                    else {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                          "scores": torch.zeros(0), "masks": torch.zeros(0, 1, 8, 8)} for t in self.targets]

    model = OneBox()
    batches = [(images, targets) for images, targets in loader]
    model.targets = []

    class Feed:  # the loader, telling the stub which images it is given
        dataset = loader.dataset

        def __iter__(self):
            for images, targets in batches:
                model.targets = targets
                yield images, targets

    metrics, results = evaluate_detection(model, Feed(), data.val, torch.device("cpu"), label_offset(cfg))
    assert len(results) == 1 and results[0]["bbox"] == pytest.approx(
        [first.boxes[0, 0].item(), first.boxes[0, 1].item(), (first.boxes[0, 2] - first.boxes[0, 0]).item(),
         (first.boxes[0, 3] - first.boxes[0, 1]).item()], abs=1e-4)
    assert metrics["val_ap50"] > 0  # the box is right
    assert metrics["val_mask_ap50"] == 0  # its mask is empty


def test_ap_per_class_counts_up_to_100_detections_an_image_and_minus_one_without_ground_truth():
    boxes = [[10.0 * k, 0, 8, 8] for k in range(11)]  # eleven objects in one image, each found exactly
    gt = _one_image([{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": 64, "iscrowd": 0}
                     for k, b in enumerate(boxes)], size=120)
    gt["categories"].append({"id": 2, "name": "never seen"})
    dets = [{"image_id": 1, "category_id": 1, "bbox": b, "score": 1 - k / 100} for k, b in enumerate(boxes)]
    metrics = coco_map(gt, dets)
    # at 10 detections an image recall would stop at 10/11; COCO's AP is at 100
    assert metrics["val_ap_per_class"] == {"a": pytest.approx(1.0), "never seen": -1.0}


def test_the_source_detectors_class_names_come_from_the_config_or_the_source_run(tmp_path, monkeypatch):
    """head_init for a detector: source_classes given, else the classes.json of the run given as the
    source; no source is never a folder of the current directory."""
    from transferkit.tasks.detection import source_classes

    run = tmp_path / "run"
    run.mkdir()
    (run / "classes.json").write_text('["car", "person"]')

    def cfg(**extra):
        return load_config(None, det_overrides(tmp_path, **{"pretrained.head_init": "{from_classes: auto}",
                                                            **extra}))

    assert source_classes(cfg(**{"pretrained.source": str(run)})) == ["car", "person"]
    assert source_classes(cfg(**{"pretrained.source": str(run),
                                 "pretrained.head_init": "{from_classes: auto, source_classes: [dog]}"})) == ["dog"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "None").mkdir()
    (tmp_path / "None" / "classes.json").write_text('["cat"]')
    for source in ("null", str(tmp_path / "None" / "classes.json")):
        with pytest.raises(TransferKitError) as err:
            source_classes(cfg(**{"pretrained.source": source}))
        assert str(err.value) == ("pretrained.head_init for a detector needs the source's class names: give "
                                  "pretrained.head_init.source_classes, a run directory or a torchvision: name as "
                                  "pretrained.source")
