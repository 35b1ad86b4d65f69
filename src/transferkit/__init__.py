"""transferkit: transfer learning for computer vision on PyTorch.

    import transferkit as tk

    cfg = tk.load_config("configs/classification/hymenoptera_efficientnet_lite0.yaml", ["data.root=mydata"])
    result = tk.train(cfg, out="runs/mine")
    print(tk.predict("runs/mine", ["photo.jpg"], topk=2))
    tk.export("runs/mine", format="onnx")

load_config, train, evaluate, predict, transfer, create_model, load_run, export, TransferReport and
TrainResult are the public API (transferkit/api.py); each has a docstring with an example.
"""

import sys
from types import ModuleType

from transferkit.errors import TransferKitError

__version__ = "0.1.0"
API = ("load_config", "train", "evaluate", "predict", "transfer", "create_model", "load_run", "export",
       "TransferReport", "TrainResult")
__all__ = [*API, "TransferKitError", "__version__"]


def _api_name(name: str) -> property:
    def get(package: ModuleType):
        # Loaded on first use: the API pulls in torch, timm and torchvision (seconds), which
        # `import transferkit` alone, or `transferkit --version`, should not pay for.
        from transferkit import api

        return getattr(api, name)

    def keep_submodule(package: ModuleType, value) -> None:
        # Importing the submodules transferkit.train, .predict and .export sets them as attributes of
        # this package under the API's names; they stay reachable through sys.modules and
        # `from transferkit.train import loop`, while transferkit.train remains the function.
        package.__dict__[name] = value

    return property(get, keep_submodule)


class _Package(ModuleType):
    """The package, with the API names as properties so that submodules of the same name
    (train/, predict.py, export.py) never hide the functions."""


for _name in API:
    setattr(_Package, _name, _api_name(_name))
sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted({*globals(), *API})
