"""timm classifiers sized for the user's classes, with pretrained weights restored."""

from __future__ import annotations

import difflib

import timm
from torch import nn

from transferkit.config import PretrainedConfig
from transferkit.errors import TransferKitError
from transferkit.models.registry import Family, timm_family
from transferkit.weights.transfer import TransferReport, transfer


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


def restore_pretrained(model: nn.Module, family: Family, cfg: PretrainedConfig) -> TransferReport | None:
    """Restore `cfg.source` into `model` (None when there is no source)."""
    if cfg.source is None:
        return None
    return transfer(
        model,
        cfg.source,
        scope=cfg.scope,
        head_patterns=family.head_patterns,
        backbone_patterns=family.backbone_patterns,
        backbone_prefix=family.backbone_prefix,
        sha256=cfg.sha256,
        exclude=cfg.exclude,
        include=cfg.include,
        rename=cfg.rename,
        require=cfg.require,
        on_shape_mismatch=cfg.on_shape_mismatch,
        adapt_input_conv=cfg.adapt_input_conv,
    )
