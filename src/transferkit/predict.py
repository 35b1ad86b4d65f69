"""Predictions from a finished run on image files or folders."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from transferkit.config import validate
from transferkit.data.images import IMAGE_SUFFIXES, BadImage, load_rgb
from transferkit.data.transforms import eval_transform
from transferkit.errors import TransferKitError
from transferkit.models.classification import create_classifier
from transferkit.train.checkpoint import load_weights


def load_run(run_dir: str | Path, weights: str = "best"):
    """The trained model of a run directory, its class names and its evaluation transform."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise TransferKitError(f"{run_dir} is not a run directory (no config.yaml); give the --out of a train run")
    cfg = validate(yaml.safe_load(cfg_path.read_text()), str(cfg_path))
    ckpt = Path(weights) if weights not in ("best", "last") else run_dir / "checkpoints" / f"{weights}.safetensors"
    if not ckpt.is_file():
        raise TransferKitError(f"checkpoint not found: {ckpt}; has the run finished an epoch?")
    num_classes = cfg.model.num_classes if cfg.model.num_classes != "auto" else 0
    model, family = create_classifier(cfg.model.name, num_classes)
    meta = load_weights(model, ckpt)
    classes = meta.get("classes") or [str(i) for i in range(num_classes)]
    model.eval()
    return model, classes, eval_transform(cfg.data.eval_image_size or cfg.data.image_size, family.preprocessing)


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
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
