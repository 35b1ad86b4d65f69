"""timm classifiers sized for the user's classes."""

from __future__ import annotations

import difflib

import timm
from torch import nn

from transferkit.errors import TransferKitError
from transferkit.models.family import Family, timm_family


def create_classifier(name: str, num_classes: int, drop_rate: float = 0.0, in_chans: int = 3
                      ) -> tuple[nn.Module, Family]:
    """A randomly initialised timm model with a `num_classes` head."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise TransferKitError(f"unknown model.name {name!r}{hint}")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate,
                              in_chans=in_chans)
    return model, timm_family(model)

