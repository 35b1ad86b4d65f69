"""What a model family declares: its head (class-dependent) patterns and its preprocessing."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Preprocessing:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float = 0.875


@dataclass(frozen=True)
class Family:
    head_patterns: tuple[str, ...]
    # None: the backbone is everything that is not head.
    backbone_patterns: tuple[str, ...] | None
    preprocessing: Preprocessing
    # Where the backbone sits inside a larger model (a detector): `scope: backbone` matches a
    # classifier checkpoint against the names under it.
    backbone_prefix: str | None = None


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    from timm.models import group_parameters

    from transferkit.errors import TransferKitError

    if not hasattr(model, "group_matcher"):
        raise TransferKitError(f"{type(model).__name__} does not declare its layers (a timm group_matcher); "
                               "layer-wise rules need a timm model")
    return group_parameters(model, model.group_matcher(coarse=coarse), reverse=True)
