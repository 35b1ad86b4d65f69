"""Mixed precision: the forward pass under torch.autocast in bfloat16 or float16, and for float16 a
GradScaler (its scale is part of the training state, so a resumed run scales as the first did)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """`amp`: none, bf16 or fp16 (config optim.amp) on `device`."""

    def __init__(self, amp: str, device: torch.device):
        self.amp, self.device = amp, device
        self.dtype = DTYPES.get(amp)
        # float16's narrow range underflows small gradients: the loss is scaled up and the
        # gradients back down, and steps whose gradients overflowed are skipped by the scaler.
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    @contextlib.contextmanager
    def quiet_schedule(self) -> Iterator[None]:
        """Around the schedule's step: a step the scaler skipped (its gradients overflowed while it
        calibrates its scale) is meant, so torch's warning about the order of steps is not shown."""
        with warnings.catch_warnings():
            if self.scaler is not None:
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            yield

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None:  # optim.amp cannot change on resume: an fp16 run's states hold its scaler
            self.scaler.load_state_dict(state["scaler"])
