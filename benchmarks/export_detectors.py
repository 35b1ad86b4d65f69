"""Every detector through `transferkit export`, ONNX and TorchScript: each is trained for one epoch
on synthetic shapes (test_efficientnet backbone, 96 px; SSDlite as torchvision builds it) and
exported; the export's own check (same boxes within 1e-3 px on 4 validation images) decides.
Prints one line per detector and format: the largest box-corner difference and the agreement, or
why the file was refused.

    python benchmarks/export_detectors.py [fcos retinanet fasterrcnn maskrcnn ssdlite320_mobilenet_v3_large]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from transferkit.config import load_config
from transferkit.data.synthetic import make_synthetic_detection
from transferkit.deploy import export
from transferkit.errors import TransferKitError
from transferkit.run import train

DETECTORS = ("fcos", "retinanet", "fasterrcnn", "maskrcnn", "ssdlite320_mobilenet_v3_large")


def overrides(root: Path, detector: str) -> list[str]:
    values = {
        "task": "detection", "model.name": "test_efficientnet", "pretrained.source": "null",
        "data.root": root, "data.format": "coco", "data.batch_size": 4,
        "data.train_ann": root / "annotations" / "train.json", "data.train_images": root / "images" / "train",
        "data.val_ann": root / "annotations" / "val.json", "data.val_images": root / "images" / "val",
        "optim.name": "adamw", "optim.lr": 0.001, "detection.min_size": "[96]", "detection.max_size": 96,
        "detection.fpn_channels": 64, "schedule.epochs": 1,
        # one epoch scores low: a low threshold leaves boxes to compare
        "detection.score_threshold": 0.01, "detection.detections_per_image": 20,
        ("detection.torchvision_model" if "_" in detector else "detection.arch"): detector,
    }
    return [f"{k}={v}" for k, v in values.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("detectors", nargs="*", metavar="DETECTOR", help=f"default: all of {', '.join(DETECTORS)}")
    args = parser.parse_args()
    unknown = set(args.detectors) - set(DETECTORS)
    if unknown:
        parser.error(f"unknown detector {sorted(unknown)[0]}; choose from {', '.join(DETECTORS)}")
    with tempfile.TemporaryDirectory() as tmp:
        root = make_synthetic_detection(Path(tmp) / "shapes", 8, 4, 96, seed=0)
        for detector in args.detectors or DETECTORS:
            run = Path(tmp) / detector
            train(load_config(None, overrides(root, detector)), out=run, quiet=True)
            for fmt in ("onnx", "torchscript"):
                try:
                    a = export(run, fmt).agreement
                    print(f"{detector:<32} {fmt:<12} max difference {a.max_diff:.2e} px, boxes agree on "
                          f"{a.agreed}/{a.inputs}")
                except TransferKitError as exc:
                    print(f"{detector:<32} {fmt:<12} refused: {str(exc).split(' (wrote')[0].split(': ')[-1]}")


if __name__ == "__main__":
    main()
