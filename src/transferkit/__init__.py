"""transferkit: transfer learning for computer vision on PyTorch."""

from transferkit.errors import TransferKitError

__version__ = "0.1.0"
__all__ = ["TransferKitError", "__version__"]
