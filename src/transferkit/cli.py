"""Command line: a thin layer over the Python API. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from transferkit import __version__
from transferkit.errors import TransferKitError


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

    p = sub.add_parser("eval", help="evaluate a model on the config's validation split")
    _add_config_args(p, required=False)
    p.add_argument("--weights", help="safetensors checkpoint; without it, the model as the config builds it")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")

    p = sub.add_parser("predict", help="classify images with a trained run")
    p.add_argument("--run", required=True, help="run directory written by `transferkit train`")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--topk", type=int, default=1)
    p.add_argument("--weights", default="best", help="best, last, or a checkpoint path")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", help="fine-tune vs scratch on synthetic data, no data or network needed")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="write a synthetic class-per-folder dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--train-per-class", type=int, default=50)
    p.add_argument("--val-per-class", type=int, default=25)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    return parser


def cmd_train(args) -> int:
    from transferkit.config import load_config
    from transferkit.train.loop import train

    cfg = load_config(args.config, args.override)
    train(cfg, out=args.out, config_path=args.config)
    return 0


def cmd_eval(args) -> int:
    from transferkit.config import load_config
    from transferkit.progress import console
    from transferkit.train.evaluate import evaluate_config

    metrics, report = evaluate_config(load_config(args.config, args.override), args.weights)
    if args.json:
        print(json.dumps(metrics))
    else:
        if report is not None:
            for line in report.summary_lines():
                console.print(line, highlight=False)
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return 0


def cmd_predict(args) -> int:
    from transferkit.predict import expand_inputs, load_run, predict

    if args.topk < 1:
        raise TransferKitError("--topk must be at least 1")
    model, classes, transform = load_run(args.run, args.weights)
    results = predict(model, classes, transform, expand_inputs(args.inputs), args.topk)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['path']}: error: {r['error']}")
            else:
                preds = ", ".join(f"{p['class']} {p['prob']:.3f}" for p in r["predictions"])
                print(f"{r['path']}: {preds}")
    return 1 if any("error" in r for r in results) else 0


def cmd_demo(args) -> int:
    from transferkit.demo import run_demo

    run_demo(args.out, epochs=args.epochs, seed=args.seed)
    return 0


def cmd_data(args) -> int:
    from transferkit.data.synthetic import make_synthetic_classification

    root = make_synthetic_classification(args.out, args.train_per_class, args.val_per_class, args.size,
                                         seed=args.seed)
    print(f"wrote {Path(root) / 'train'} and {Path(root) / 'val'}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "demo": cmd_demo, "data": cmd_data}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except TransferKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
