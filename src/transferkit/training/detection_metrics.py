"""COCO box mAP through pycocotools, from a detector's outputs; per-class AP; COCO results JSON.

Detections are turned into COCO results (xywh in the original image's pixels, category ids 1..C in
class order) and scored by pycocotools' COCOeval against the split's ground truth, so the numbers
are COCO's own. The results are loaded the way COCO.loadRes loads them (area = w * h, iscrowd 0),
built directly so that an empty result list is scored too (all AP 0) rather than refused.
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRIC_KEYS = ("val_map", "val_ap50", "val_ap75", "val_ap_small", "val_ap_medium", "val_ap_large")


def to_coco_results(outputs: list[dict], targets: list[dict], label_offset: int,
                    sizes: list[tuple[int, int]] | None = None) -> list[dict]:
    """COCO results in the original images' pixels. With `sizes` (width, height of each original
    image) and masks in the outputs (Mask R-CNN), each result also gets its mask as RLE."""
    results = []
    for n, (out, target) in enumerate(zip(outputs, targets, strict=True)):
        boxes = out["boxes"].detach().cpu().double() / target["scale"]
        rles = _rles(out["masks"], sizes[n]) if sizes is not None and "masks" in out else None
        for k, ((x0, y0, x1, y1), label, score) in enumerate(zip(boxes.tolist(), out["labels"].tolist(),
                                                                  out["scores"].tolist(), strict=True)):
            result = {"image_id": int(target["image_id"]), "category_id": int(label) - label_offset + 1,
                      "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)}
            if rles is not None:
                result["segmentation"] = rles[k]
            results.append(result)
    return results


def _rles(masks: torch.Tensor, size: tuple[int, int]) -> list[dict]:
    """Mask R-CNN's soft masks [N, 1, h, w] at the original size, cut at 0.5, as COCO RLE (JSON-ready)."""
    if not len(masks):
        return []
    full = torch.nn.functional.interpolate(masks.detach().cpu().float(), size=(size[1], size[0]), mode="bilinear",
                                           align_corners=False)[:, 0] >= 0.5
    rles = mask_utils.encode(np.asfortranarray(full.permute(1, 2, 0).numpy().astype(np.uint8)))
    return [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in rles]


def _coco(dataset: dict):
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_map(ground_truth: dict, results: list[dict], iou_type: str = "bbox") -> dict:
    """AP@[.5:.95], AP50, AP75, AP small/medium/large and AP per category name (COCO's definitions;
    -1 where the ground truth has nothing to score, as pycocotools reports it). iou_type `segm`
    scores the results' masks against the ground truth's polygons."""
    gt = _coco(ground_truth)
    dets = []
    for i, r in enumerate(results):
        x, y, w, h = r["bbox"]
        area = float(mask_utils.area(r["segmentation"])) if iou_type == "segm" else w * h
        dets.append({**r, "id": i + 1, "area": area, "iscrowd": 0})
    dt = _coco({"images": ground_truth["images"], "categories": ground_truth["categories"], "annotations": dets})
    evaluator = COCOeval(gt, dt, iou_type)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {k: float(v) for k, v in zip(METRIC_KEYS, evaluator.stats[:6], strict=True)}
    # precision: [IoU thresholds, recall points, categories, area ranges, max detections]
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k]
        p = p[p > -1]
        per_class[gt.cats[cat_id]["name"]] = float(np.mean(p)) if p.size else -1.0
    metrics["val_ap_per_class"] = per_class
    return metrics


@torch.no_grad()
def detect(model, loader, device, label_offset: int) -> list[dict]:
    """Every image of `loader` through the detector in eval mode: COCO results."""
    model.eval()
    sizes = {r.image_id: (r.width, r.height) for r in loader.dataset.split.records}
    results = []
    for images, targets in loader:
        outputs = model([im.to(device) for im in images])
        results += to_coco_results(outputs, list(targets), label_offset, [sizes[t["image_id"]] for t in targets])
    return results


def evaluate_detection(model, loader, split, device, label_offset: int) -> tuple[dict, list[dict]]:
    """Box mAP (val_map, ...) and, for detectors with masks, mask mAP (val_mask_map, val_mask_ap50, ...)."""
    results = detect(model, loader, device, label_offset)
    truth = split.coco_ground_truth()
    metrics = coco_map(truth, results)
    if results and "segmentation" in results[0]:
        masks = coco_map(truth, results, "segm")
        metrics.update({k.replace("val_", "val_mask_"): v for k, v in masks.items() if k in METRIC_KEYS})
    return metrics, results
