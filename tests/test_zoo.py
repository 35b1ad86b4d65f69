"""torchvision's model-zoo detectors by name: `pretrained.source: torchvision:NAME` (against a loopback mirror)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
from typing import get_args

import pytest
import torch
import torchvision
from test_sources import RangeHandler, server  # noqa: F401 - the loopback server fixture

from transferkit.config import DetectionConfig, load_config
from transferkit.errors import TransferKitError
from transferkit.weights import zoo
from transferkit.weights.sources import resolve_source

# torchvision's own names and files for its COCO detectors (torchvision.models.detection).
ZOO = {
    "fasterrcnn_resnet50_fpn": ("FasterRCNN_ResNet50_FPN_Weights", "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"),
    "fasterrcnn_resnet50_fpn_v2": ("FasterRCNN_ResNet50_FPN_V2_Weights",
                                   "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth"),
    "fasterrcnn_mobilenet_v3_large_fpn": ("FasterRCNN_MobileNet_V3_Large_FPN_Weights",
                                          "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth"),
    "maskrcnn_resnet50_fpn": ("MaskRCNN_ResNet50_FPN_Weights", "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"),
    "retinanet_resnet50_fpn": ("RetinaNet_ResNet50_FPN_Weights", "retinanet_resnet50_fpn_coco-eeacb38b.pth"),
    "fcos_resnet50_fpn": ("FCOS_ResNet50_FPN_Weights", "fcos_resnet50_fpn_coco-99b0c9b7.pth"),
    "ssdlite320_mobilenet_v3_large": ("SSDLite320_MobileNet_V3_Large_Weights",
                                      "ssdlite320_mobilenet_v3_large_coco-a79551df.pth"),
}


def test_the_table_covers_every_detector_transferkit_builds():
    assert set(ZOO) == set(get_args(get_args(DetectionConfig.model_fields["torchvision_model"].annotation)[0]))


def _zoo_layout_file() -> bytes:
    """A small file in the zoo's layout: a torch.save'd state dict under the detector's tensor names."""
    buf = io.BytesIO()
    torch.save({"roi_heads.box_predictor.cls_score.weight": torch.zeros(91, 8)}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("builder", sorted(ZOO))
def test_names_resolve_to_torchvisions_url_and_hash(builder, server, monkeypatch, tmp_path):  # noqa: F811
    base, handler = server
    enum, file = ZOO[builder]
    monkeypatch.setenv(zoo.MIRROR_ENV, f"{base}/mirror/")
    handler.files[f"/mirror/{file}"] = _zoo_layout_file()
    for name in (f"{enum}.COCO_V1", f"{builder}.DEFAULT"):
        found = zoo.torchvision_weights(name)
        assert found.url == f"https://download.pytorch.org/models/{file}" and found.builder == builder
        assert found.sha256_prefix == file.rsplit("-", 1)[1].split(".")[0] and found.categories[1] == "person"
        # the download goes to the mirror, and a file whose sha256 does not start with the zoo's hash is refused
        with pytest.raises(TransferKitError, match=f"expected one starting {found.sha256_prefix}; the file was "
                                                   "removed"):
            resolve_source(f"torchvision:{name}")
        assert handler.requests[-1] == (f"/mirror/{file}", None)
        assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
        # detection.torchvision_model follows the name
        cfg = load_config(None, ["data.root=.", "task=detection", f"pretrained.source=torchvision:{name}"])
        assert cfg.detection.torchvision_model == builder


def test_wrong_names_are_one_line_errors():
    with pytest.raises(TransferKitError, match="has no model 'nosuch'"):
        zoo.torchvision_weights("NoSuch_Weights.COCO_V1")
    with pytest.raises(TransferKitError, match=r"FCOS_ResNet50_FPN_Weights has no 'COCO_V9' \(it has: COCO_V1"):
        zoo.torchvision_weights("fcos_resnet50_fpn.COCO_V9")
    with pytest.raises(TransferKitError, match="give a Weights enum member"):
        zoo.torchvision_weights("FCOS_ResNet50_FPN_Weights")
    with pytest.raises(TransferKitError, match="holds fcos_resnet50_fpn weights, but detection.torchvision_model is "
                                               "retinanet_resnet50_fpn"):
        load_config(None, ["data.root=.", "task=detection", "detection.torchvision_model=retinanet_resnet50_fpn",
                           "pretrained.source=torchvision:FCOS_ResNet50_FPN_Weights.COCO_V1"])
    # classifier weights for a detector's backbone do not choose the detector
    cfg = load_config(None, ["data.root=.", "task=detection", "pretrained.source=torchvision:ResNet50_Weights.DEFAULT"])
    assert cfg.detection.torchvision_model is None


def test_a_coco_detector_by_name_starts_pedestrian_from_person(server, monkeypatch):  # noqa: F811
    """SSDlite from the (mirrored) zoo: downloaded once, restored but for the class rows, and the new
    `pedestrian` rows start from COCO's `person` rows, its background rows carried."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    from transferkit.tasks.detection import build_detector

    base, handler = server
    _, file = ZOO["ssdlite320_mobilenet_v3_large"]
    torch.manual_seed(1)
    source = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=91).state_dict()
    buf = io.BytesIO()
    torch.save(source, buf)
    handler.files[f"/models/{file}"] = buf.getvalue()
    monkeypatch.setenv(zoo.MIRROR_ENV, f"{base}/models")
    # the served stand-in cannot have the real file's sha256: check it against its own
    real = zoo.torchvision_weights
    prefix = hashlib.sha256(buf.getvalue()).hexdigest()[:8]
    monkeypatch.setattr(zoo, "torchvision_weights", lambda n: dataclasses.replace(real(n), sha256_prefix=prefix))
    name = "torchvision:SSDLite320_MobileNet_V3_Large_Weights.COCO_V1"
    cfg = load_config(None, ["data.root=.", "task=detection", f"pretrained.source={name}",
                             "pretrained.head_init={from_classes: {pedestrian: person}}"])
    model, _, report = build_detector(cfg, ["pedestrian", "tree"])
    assert cfg.detection.torchvision_model == "ssdlite320_mobilenet_v3_large"
    assert [r["from"] for r in report.head_rows] == [["person (0)"], None]
    state = model.state_dict()
    heads = [n for n in state if re.fullmatch(r"head\.classification_head\.module_list\.\d+\.1\.(weight|bias)", n)]
    assert len(heads) == 12  # the last 1x1 convolution of each of six levels
    for n in heads:
        anchors = source[n].shape[0] // 91
        for a in range(anchors):  # rows per anchor: background, then the classes (COCO: person is 1)
            assert torch.equal(state[n][a * 3 + 1], source[n][a * 91 + 1]), n  # pedestrian <- person
            assert torch.equal(state[n][a * 3], source[n][a * 91]), n  # background <- background
    assert torch.equal(state["backbone.features.0.0.0.weight"], source["backbone.features.0.0.0.weight"])
    requests = len(handler.requests)
    assert resolve_source(name) == resolve_source(name) and len(handler.requests) == requests  # cached


@pytest.mark.parametrize(("name", "message"), [
    ("FCOS_ResNet50_FPN_Weights", "give a Weights enum member (FasterRCNN_ResNet50_FPN_Weights.COCO_V1) or a "
                                  "builder's default (fasterrcnn_resnet50_fpn.DEFAULT)"),
    (".COCO_V1", "give a Weights enum member (FasterRCNN_ResNet50_FPN_Weights.COCO_V1) or a builder's default "
                 "(fasterrcnn_resnet50_fpn.DEFAULT)"),
    ("NoSuch_Weights.COCO_V1", f"torchvision {torchvision.__version__} has no model 'nosuch' "
                               "(see torchvision.models.list_models())"),
    ("RESNET50_Weights.DEFAULT", "RESNET50_Weights is not a torchvision Weights enum; the one for resnet50 is "
                                 "ResNet50_Weights"),
    ("fcos_resnet50_fpn.COCO_V9", "FCOS_ResNet50_FPN_Weights has no 'COCO_V9' (it has: COCO_V1, DEFAULT)"),
    # the member is all after the first dot
    ("ResNet50_Weights.IMAGENET1K_V1.x", "ResNet50_Weights has no 'IMAGENET1K_V1.x' "
                                         "(it has: IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT)"),
])
def test_each_wrong_name_is_its_own_one_line_error(name, message):
    with pytest.raises(TransferKitError) as err:
        zoo.torchvision_weights(name)
    assert str(err.value) == f"torchvision:{name}: {message}"


def test_a_default_resolves_to_the_member_it_stands_for():
    """`resnet50.DEFAULT` is ResNet50_Weights.IMAGENET1K_V2 in torchvision 0.29 (its name, URL and hash prefix
    written here as torchvision publishes them)."""
    found = zoo.torchvision_weights("resnet50.DEFAULT")
    assert (found.name, found.builder, found.url, found.sha256_prefix) == (
        "ResNet50_Weights.IMAGENET1K_V2", "resnet50", "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
        "11ad3fa6")
    assert len(found.categories) == 1000 and found.categories[:2] == ["tench", "goldfish"]


def test_a_file_name_without_a_hash_has_no_prefix_to_check(monkeypatch):
    monkeypatch.setattr(zoo, "_HASH_IN_NAME", re.compile(r"-(never)\."))
    assert zoo.torchvision_weights("resnet50.DEFAULT").sha256_prefix is None


def test_a_missing_member_lists_at_most_eight_of_the_enums(monkeypatch):
    """No torchvision 0.29 enum has more than eight members; one made here has ten."""
    import enum

    many = enum.Enum("Wide_Weights", {f"V{k}": k for k in range(10)})
    monkeypatch.setattr(zoo.models, "get_model_weights", lambda builder: many)
    with pytest.raises(TransferKitError) as err:
        zoo.torchvision_weights("Wide_Weights.V10")
    assert str(err.value) == ("torchvision:Wide_Weights.V10: Wide_Weights has no 'V10' "
                              "(it has: V0, V1, V2, V3, V4, V5, V6, V7)")
