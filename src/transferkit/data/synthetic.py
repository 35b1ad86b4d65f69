"""A deterministic synthetic classification dataset: shapes drawn on cluttered, textured backgrounds.

The class is the shape; colour, size, position, rotation, fill and background vary, and every image
carries distractor strokes, so a model needs real visual features to tell the classes apart.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from transferkit.fileio import atomic_write, write_json
from transferkit.outputs import OutputFolder, output_folder

SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        pts = [(math.cos(angle + k * math.pi / 2 + math.pi / 4), math.sin(angle + k * math.pi / 2 + math.pi / 4))
               for k in range(4)]
    elif kind == "triangle":
        pts = [(math.cos(angle + k * 2 * math.pi / 3), math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
    elif kind == "hexagon":
        pts = [(math.cos(angle + k * math.pi / 3), math.sin(angle + k * math.pi / 3)) for k in range(6)]
    elif kind == "star":
        pts = [((1.0 if k % 2 == 0 else 0.45) * math.cos(angle + k * math.pi / 5),
                (1.0 if k % 2 == 0 else 0.45) * math.sin(angle + k * math.pi / 5)) for k in range(10)]
    elif kind == "cross":
        w = 0.33
        base = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
                (-1, -w), (-w, -w)]
        c, s = math.cos(angle), math.sin(angle)
        pts = [(x * c - y * s, x * s + y * c) for x, y in base]
    else:
        raise ValueError(kind)
    return [(cx + r * x, cy + r * y) for x, y in pts]


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    base = rng.uniform(0, 255, 3)
    kind = rng.integers(3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == 0:  # stripes
        theta, freq = rng.uniform(0, math.pi), rng.uniform(3, 10)
        wave = np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)))
        arr = base + wave[..., None] * rng.uniform(20, 60, 3)
    elif kind == 1:  # gradient
        arr = base + (xx[..., None] - 0.5) * rng.uniform(-120, 120, 3) + (yy[..., None] - 0.5) * rng.uniform(
            -120, 120, 3)
    else:  # blotches
        arr = base + rng.normal(0, 40, (size // 8, size // 8, 3)).repeat(8, 0).repeat(8, 1)[:size, :size]
    arr = arr + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def draw_sample(rng: np.random.Generator, shape: str, size: int) -> Image.Image:
    im = _background(rng, size)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 6))):  # distractor strokes
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        draw.line([(x0, y0), (x1, y1)], fill=tuple(int(v) for v in rng.uniform(0, 255, 3)),
                  width=int(rng.integers(1, 4)))
    r = rng.uniform(0.15, 0.25) * size
    cx, cy = rng.uniform(0.35 * size, 0.65 * size, 2)  # inside the eval centre crop
    colour = tuple(int(v) for v in rng.uniform(0, 255, 3))
    filled = rng.random() < 0.7
    outline_w = max(2, int(size / 24))
    if shape == "circle":
        box = [cx - r, cy - r, cx + r, cy + r]
        if filled:
            draw.ellipse(box, fill=colour)
        else:
            draw.ellipse(box, outline=colour, width=outline_w)
    else:
        pts = _polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi))
        if filled:
            draw.polygon(pts, fill=colour)
        else:
            draw.line([*pts, pts[0]], fill=colour, width=outline_w, joint="curve")
    return im.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.0)))


def make_synthetic_classification(
    out: str | Path,
    train_per_class: int = 50,
    val_per_class: int = 25,
    size: int = 96,
    classes: tuple[str, ...] = SHAPES,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Write out/train/<class>/*.png and out/val/<class>/*.png; the same seed gives the same files.
    Files there that transferkit did not write are not replaced unless `force` (outputs.py)."""
    out = Path(out)
    plan = [("train", train_per_class, 0), ("val", val_per_class, 1)]
    with output_folder(out, force) as written:
        written.claim([out / split / name / f"{name}_{i:04d}.png" for split, count, _ in plan for name in classes
                       for i in range(count)])
        for split, count, offset in plan:
            for ci, name in enumerate(classes):
                folder = out / split / name
                folder.mkdir(parents=True, exist_ok=True)
                rng = np.random.default_rng([seed, offset, ci])
                for i in range(count):
                    im = draw_sample(rng, name, size)
                    path = folder / f"{name}_{i:04d}.png"
                    atomic_write(path, lambda tmp, im=im: im.save(tmp, format="PNG"))
                    written.wrote(path)
    return out


def make_synthetic_detection(
    out: str | Path,
    train_images: int = 60,
    val_images: int = 20,
    size: int = 128,
    classes: tuple[str, ...] = ("circle", "square", "triangle"),
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Write out/images/{train,val}/*.png and out/annotations/{train,val}.json (COCO, with polygon
    segmentations): 1-3 filled shapes per image at random places and sizes on cluttered backgrounds,
    some images empty. Files there that transferkit did not write are not replaced unless `force`."""
    out = Path(out)
    plan = [("train", train_images, 0), ("val", val_images, 1)]
    with output_folder(out, force) as written:
        written.claim([out / "images" / split / f"{split}_{i:04d}.png" for split, count, _ in plan
                       for i in range(count)] + [out / "annotations" / f"{split}.json" for split, _, _ in plan])
        for split, count, offset in plan:
            _detection_split(out, split, count, offset, size, classes, seed, written)
    return out


def _detection_split(out: Path, split: str, count: int, offset: int, size: int, classes: tuple[str, ...],
                     seed: int, written: OutputFolder) -> None:
    rng = np.random.default_rng([seed, offset, 7])
    folder = out / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(count):
        im = _background(rng, size)
        draw = ImageDraw.Draw(im)
        n = 0 if i % 10 == 9 else int(rng.integers(1, 4))  # every tenth image has no objects
        for _ in range(n):
            ci = int(rng.integers(len(classes)))
            r = rng.uniform(0.1, 0.2) * size
            cx, cy = rng.uniform(r, size - r, 2)
            colour = tuple(int(v) for v in rng.uniform(0, 255, 3))
            if classes[ci] == "circle":
                pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 33)]
            else:
                pts = _polygon(classes[ci], cx, cy, r, rng.uniform(0, 2 * math.pi))
            draw.polygon(pts, fill=colour, outline=(0, 0, 0))
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            x0, y0 = max(0.0, min(xs)), max(0.0, min(ys))
            w, h = min(float(size), max(xs)) - x0, min(float(size), max(ys)) - y0
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": ci + 1,
                         "bbox": [round(x0, 2), round(y0, 2), round(w, 2), round(h, 2)],
                         "area": round(w * h, 2), "iscrowd": 0,
                         "segmentation": [[round(v, 2) for pt in pts for v in pt]]})
        name = f"{split}_{i:04d}.png"
        atomic_write(folder / name, lambda tmp, im=im: im.save(tmp, format="PNG"))
        written.wrote(folder / name)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
    write_json(out / "annotations" / f"{split}.json", {
        "images": images, "annotations": anns,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(classes)]})
    written.wrote(out / "annotations" / f"{split}.json")


def _detection_per_class(out: str | Path, train_per_class: int, val_per_class: int, size: int = 128,
                         seed: int = 0, force: bool = False) -> Path:
    """make_synthetic_detection by per-class counts: three shape classes, so three times the images."""
    return make_synthetic_detection(out, 3 * train_per_class, 3 * val_per_class, size, seed=seed, force=force)


# task -> (writer: (out, train_per_class, val_per_class, size, seed=, force=) -> root, the folders it writes)
SYNTHETIC = {
    "classification": (make_synthetic_classification, ("train", "val")),
    "detection": (_detection_per_class, ("images", "annotations")),
}
