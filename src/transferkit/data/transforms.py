"""Classification transforms, with the pretrained model's own normalisation."""

from __future__ import annotations

import math

from PIL import Image
from torchvision import transforms as T

from transferkit.preprocessing import INTERPOLATIONS, Preprocessing

# One entry per name in INTERPOLATIONS (the names an exported file's metadata is checked against).
_PIL_MODES = {name: Image.Resampling[name.upper()] for name in INTERPOLATIONS}
_TV_MODES = {name: T.InterpolationMode[name.upper()] for name in INTERPOLATIONS}


def resize_size(image_size: int, pre: Preprocessing) -> int:
    """The shorter side before the evaluation centre crop (timm's rule)."""
    return math.floor(image_size / pre.crop_pct)


def pil_resample(pre: Preprocessing) -> int:
    return _PIL_MODES.get(pre.interpolation, Image.BILINEAR)


def train_transform(image_size: int, pre: Preprocessing, scale=(0.08, 1.0), hflip: float = 0.5):
    mode = _TV_MODES.get(pre.interpolation, T.InterpolationMode.BILINEAR)
    steps = [T.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=mode)]
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    steps += [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    return T.Compose(steps)


def eval_transform(image_size: int, pre: Preprocessing):
    mode = _TV_MODES.get(pre.interpolation, T.InterpolationMode.BILINEAR)
    return T.Compose([
        T.Resize(resize_size(image_size, pre), interpolation=mode),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(pre.mean, pre.std),
    ])
