"""transferkit: transfer learning for computer vision on PyTorch.

    import transferkit as tk

    cfg = tk.load_config("configs/classification/hymenoptera_efficientnet_lite0.yaml", ["data.root=mydata"])
    result = tk.train(cfg, out="runs/mine")
    print(tk.predict("runs/mine", ["photo.jpg"], topk=2))
    tk.export("runs/mine", format="onnx")

load_config, train, evaluate, predict, transfer, create_model, load_run, export, TransferReport and
TrainResult are the public API (transferkit/api.py); each has a docstring with an example.
"""

from __future__ import annotations

from transferkit.errors import TransferKitError

__version__ = "0.1.0"
API = ("load_config", "train", "evaluate", "predict", "transfer", "create_model", "load_run", "export",
       "TransferReport", "TrainResult")
__all__ = [*API, "TransferKitError", "__version__"]


def __getattr__(name: str):
    # The API is loaded on first use (PEP 562): it pulls in torch, timm and torchvision (seconds),
    # which `import transferkit` alone, or `transferkit --version`, should not pay for.
    if name in API:
        from transferkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'transferkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *API})
