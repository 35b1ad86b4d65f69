"""torchvision's model-zoo weights by name: URL, hash and class names from torchvision's Weights enums.

`torchvision:FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1` names a member of a Weights enum;
`torchvision:fasterrcnn_mobilenet_v3_large_fpn.DEFAULT` the builder's default weights. Everything
comes from the enums torchvision installs (offline); the file is then fetched through the download
cache like any URL. torchvision publishes no full sha256: its file names carry the first hex digits
of it (`...coco-258fb6c6.pth`), which torch.hub checks, and so does the download here.
$TRANSFERKIT_TORCHVISION_MIRROR, when set, replaces https://download.pytorch.org/models/ (a local
mirror of the zoo); the hash is checked all the same.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

import torchvision
from torchvision import models

from transferkit.config import zoo_builder
from transferkit.errors import TransferKitError

ZOO_URL = "https://download.pytorch.org/models/"
MIRROR_ENV = "TRANSFERKIT_TORCHVISION_MIRROR"
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")  # torch.hub's rule: NAME-<sha256 prefix>.EXT


@dataclass(frozen=True)
class ZooWeights:
    name: str  # Enum.MEMBER as torchvision spells it
    builder: str  # the torchvision.models builder these weights are for
    url: str
    sha256_prefix: str | None
    categories: list[str]  # torchvision's meta["categories"], in class-index order

    @property
    def download_url(self) -> str:
        mirror = os.environ.get(MIRROR_ENV)
        if mirror and self.url.startswith(ZOO_URL):
            return mirror.rstrip("/") + "/" + self.url[len(ZOO_URL):]
        return self.url


def torchvision_weights(name: str) -> ZooWeights:
    enum_name, _, member = name.partition(".")
    if not enum_name or not member:
        raise TransferKitError(f"torchvision:{name}: give a Weights enum member "
                               "(FasterRCNN_ResNet50_FPN_Weights.COCO_V1) or a builder's default "
                               "(fasterrcnn_resnet50_fpn.DEFAULT)")
    builder = zoo_builder(enum_name)
    try:
        enum = models.get_model_weights(builder)
    except (ValueError, KeyError):
        raise TransferKitError(f"torchvision:{name}: torchvision {_version()} has no model {builder!r} "
                               "(see torchvision.models.list_models())") from None
    if enum_name != builder and enum.__name__ != enum_name:
        raise TransferKitError(f"torchvision:{name}: {enum_name} is not a torchvision Weights enum; "
                               f"the one for {builder} is {enum.__name__}")
    try:
        weights = enum[member]
    except KeyError:
        options = ", ".join([*enum.__members__][:8])
        raise TransferKitError(f"torchvision:{name}: {enum.__name__} has no {member!r} (it has: {options})") from None
    found = _HASH_IN_NAME.search(PurePosixPath(weights.url).name)
    return ZooWeights(f"{enum.__name__}.{weights.name}", builder, weights.url, found.group(1) if found else None,
                      list(weights.meta.get("categories") or []))


def _version() -> str:
    return torchvision.__version__
