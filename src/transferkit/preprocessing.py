"""What a pretrained network expects of its input images: normalisation, interpolation, crop.

Both the data layer (transforms) and the model layer (each family's constants) read this, so it
sits below both.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The resampling filters the transforms know (timm's pretrained configs use these names).
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class Preprocessing:
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
