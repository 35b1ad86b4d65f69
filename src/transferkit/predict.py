"""Predictions from a finished run on image files or folders."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from PIL import Image

from transferkit.config import Config, validate
from transferkit.data.images import BadImage, image_files, load_rgb
from transferkit.data.transforms import eval_transform
from transferkit.errors import TransferKitError
from transferkit.fileio import atomic_write
from transferkit.models.classification import create_classifier
from transferkit.train.checkpoint import load_weights


def run_config(run_dir: str | Path) -> Config:
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise TransferKitError(f"{run_dir} is not a run directory (no config.yaml); give the --out of a train run")
    return validate(yaml.safe_load(cfg_path.read_text()), str(cfg_path))


def _checkpoint(run_dir: str | Path, weights: str) -> Path:
    named = weights in ("best", "last")
    ckpt = Path(run_dir) / "checkpoints" / f"{weights}.safetensors" if named else Path(weights)
    if not ckpt.is_file():
        raise TransferKitError(f"checkpoint not found: {ckpt}; has the run finished an epoch?")
    return ckpt


def load_run(run_dir: str | Path, weights: str = "best"):
    """The trained classifier of a run directory, its class names and its evaluation transform."""
    cfg = run_config(run_dir)
    num_classes = cfg.model.num_classes if cfg.model.num_classes != "auto" else 0
    model, family = create_classifier(cfg.model.name, num_classes)
    meta = load_weights(model, _checkpoint(run_dir, weights))
    classes = meta.get("classes") or [str(i) for i in range(num_classes)]
    model.eval()
    return model, classes, eval_transform(cfg.data.eval_image_size or cfg.data.image_size, family.preprocessing)


def load_detector_run(run_dir: str | Path, weights: str = "best"):
    """The trained detector of a run directory, its class names and its label offset."""
    from transferkit.models.detection import WITH_BACKGROUND, create_detector

    cfg = run_config(run_dir)
    classes = json.loads((Path(run_dir) / "classes.json").read_text())
    model, _ = create_detector(cfg.model.name, len(classes), cfg.detection)
    load_weights(model, _checkpoint(run_dir, weights))
    model.eval()
    return model, classes, 1 if WITH_BACKGROUND[cfg.detection.kind] else 0


@torch.no_grad()
def predict_boxes(model, classes: list[str], offset: int, paths: list[Path], score: float = 0.3,
                  draw_dir: str | Path | None = None, force: bool = False) -> list[dict]:
    """Boxes [x0, y0, x1, y1] in image pixels with class and score, per image; with `draw_dir`, each
    image with its boxes drawn, as DIR/<name>.png (files there that transferkit did not write are
    not replaced unless `force`: DIR may be the folder holding the input images)."""
    from torchvision.transforms.functional import pil_to_tensor, to_tensor
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    from transferkit.outputs import OutputFolder

    drawn_files = None
    if draw_dir is not None:
        drawn_files = OutputFolder(draw_dir, force)
        drawn_files.claim([Path(draw_dir) / f"{path.stem}.png" for path in paths])
    results = []
    for path in paths:
        try:
            im = load_rgb(path)
        except BadImage as exc:
            results.append({"path": str(path), "error": f"cannot decode: {exc}"})
            continue
        out = model([to_tensor(im)])[0]
        keep = out["scores"] >= score
        boxes, labels, scores = out["boxes"][keep], out["labels"][keep] - offset, out["scores"][keep]
        dets = [{"box": [round(v, 1) for v in b], "class": classes[int(c)], "score": round(float(s), 4)}
                for b, c, s in zip(boxes.tolist(), labels.tolist(), scores.tolist(), strict=True)]
        entry = {"path": str(path), "detections": dets}
        if draw_dir is not None:
            names = [f"{d['class']} {d['score']:.2f}" for d in dets]
            canvas = pil_to_tensor(im)
            if "masks" in out:  # Mask R-CNN: the objects' masks under their boxes
                canvas = draw_segmentation_masks(canvas, out["masks"][keep][:, 0] >= 0.5, alpha=0.4, colors="red")
            drawn = draw_bounding_boxes(canvas, boxes, labels=names, colors="red", width=max(2, min(im.size) // 200))
            target = Path(draw_dir) / f"{path.stem}.png"
            atomic_write(target, lambda tmp, d=drawn: Image.fromarray(d.permute(1, 2, 0).numpy()).save(tmp, "PNG"))
            drawn_files.wrote(target)
            entry["drawn"] = str(target)
        results.append(entry)
    if drawn_files is not None and drawn_files.dirty:
        drawn_files.save()
    return results


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += image_files(p)
        elif p.exists():
            paths.append(p)
        else:
            raise TransferKitError(f"not found: {p} (give image files or folders)")
    if not paths:
        raise TransferKitError(f"no images found in {', '.join(map(str, inputs))}")
    return paths


@torch.no_grad()
def predict(model, classes: list[str], transform, paths: list[Path], topk: int = 1, batch_size: int = 16) -> list[dict]:
    results: list[dict] = []
    k = min(topk, len(classes))
    for start in range(0, len(paths), batch_size):
        batch, ok = [], []
        for path in paths[start : start + batch_size]:
            try:
                batch.append(transform(load_rgb(path)))
                ok.append(path)
            except BadImage as exc:
                results.append({"path": str(path), "error": f"cannot decode: {exc}"})
        if not batch:
            continue
        probs = model(torch.stack(batch)).softmax(dim=1)
        top = probs.topk(k, dim=1)
        for path, values, indices in zip(ok, top.values, top.indices, strict=True):
            results.append({
                "path": str(path),
                "predictions": [
                    {"class": classes[int(i)], "index": int(i), "prob": float(v)}
                    for v, i in zip(values, indices, strict=True)
                ],
            })
    order = {str(p): i for i, p in enumerate(paths)}
    return sorted(results, key=lambda r: order[r["path"]])
