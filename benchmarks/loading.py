"""Images per second through the training transform: the class folders vs packed shards of the same images.

Both sides are built the way training builds them with `data.cache: false` (each image decoded every
epoch) and the tf_efficientnet_lite0 preprocessing: the folder side decodes the original files; the
shard side reads the pack `transferkit data pack --resize` wrote (shorter side = the size training
keeps, image_size / crop_pct), with reduced-size JPEG decoding. Packing time is printed apart, since
it is paid once. Rounds alternate between the two sides so that machine drift hits both alike; the
rate is images / median round time, then the ratio (target: >= 2x for shards).

    python benchmarks/loading.py [--image-size 160] [--rounds 5] [--workers 0]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import timm

from transferkit.config import load_config
from transferkit.data.classification import dataset_classes, load_classification_data, make_loader
from transferkit.data.shards import pack
from transferkit.data.synthetic import make_synthetic_classification
from transferkit.data.transforms import resize_size
from transferkit.models.family import timm_family

HYMENOPTERA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera_data"


def one_round(loader) -> tuple[int, float]:
    start, n = time.perf_counter(), 0
    for images, _ in loader:
        n += images.shape[0]
    return n, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = HYMENOPTERA if HYMENOPTERA.is_dir() else make_synthetic_classification(
            Path(tmp) / "synth", 100, 50, 480)
        pre = timm_family(timm.create_model("tf_efficientnet_lite0", pretrained=False)).preprocessing
        keep = resize_size(args.image_size, pre)
        start = time.perf_counter()
        for split in ("train", "val"):
            pack(root / split, Path(tmp) / "shards" / split, resize=keep, quality=90)
        packing = time.perf_counter() - start

        loaders = {}
        for name, extra in (("folder", [f"data.root={root}"]),
                            ("shards", [f"data.root={Path(tmp) / 'shards'}", "data.format=shards"])):
            cfg = load_config(None, ["model.name=tf_efficientnet_lite0", "pretrained.source=null",
                                     f"data.image_size={args.image_size}", "data.cache=false",
                                     f"data.num_workers={args.workers}", f"data.batch_size={args.batch_size}",
                                     *extra])
            data = load_classification_data(cfg.data, pre, dataset_classes(cfg.data))
            loaders[name] = make_loader(data.train_set, args.batch_size, True, args.workers, seed=0)
            one_round(loaders[name])  # warm the page cache and the workers' imports alike

        times: dict[str, list[float]] = {"folder": [], "shards": []}
        count = 0
        for _ in range(args.rounds):
            for name, loader in loaders.items():
                count, seconds = one_round(loader)
                times[name].append(seconds)
        rate = {name: count / statistics.median(t) for name, t in times.items()}
    print(f"{root.name}: {count} training images per round at {args.image_size} px, {args.workers} worker(s), "
          f"median of {args.rounds} rounds")
    print(f"packing train+val with --resize {keep}: {packing:.1f} s (once)")
    print(f"folder : {rate['folder']:8.1f} images/s")
    print(f"shards : {rate['shards']:8.1f} images/s")
    print(f"ratio shards/folder: {rate['shards'] / rate['folder']:.2f}x (target >= 2x)")


if __name__ == "__main__":
    main()
