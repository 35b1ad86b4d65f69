"""What a model family declares: its head (class-dependent) patterns, where its backbone sits, and
its preprocessing; and the layer order of a timm model (for layer-wise rules)."""

from __future__ import annotations

from dataclasses import dataclass

from timm.models import group_parameters
from torch import nn

from transferkit.errors import TransferKitError
from transferkit.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing


@dataclass(frozen=True)
class Family:
    head_patterns: tuple[str, ...]
    # None: the backbone is everything that is not head.
    backbone_patterns: tuple[str, ...] | None
    preprocessing: Preprocessing
    # Where the backbone sits inside a larger model (a detector): `scope: backbone` matches a
    # classifier checkpoint against the names under it.
    backbone_prefix: str | None = None


def timm_family(model: nn.Module) -> Family:
    """A timm classifier names its head in pretrained_cfg['classifier'] (one name or several)."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    heads = cfg.get("classifier") or "classifier"
    if isinstance(heads, str):
        heads = (heads,)
    pre = Preprocessing(
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        interpolation=cfg.get("interpolation", "bilinear"),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
    )
    return Family(tuple(f"{h}.*" for h in heads), None, pre)


def layer_ids(model: nn.Module, coarse: bool) -> dict[str, int]:
    """Parameter name -> layer index from the bottom (timm's group_matcher; coarse: whole stages)."""
    if not hasattr(model, "group_matcher"):
        raise TransferKitError(f"{type(model).__name__} does not declare its layers (a timm group_matcher); "
                               "layer-wise rules need a timm model")
    return group_parameters(model, model.group_matcher(coarse=coarse), reverse=True)
