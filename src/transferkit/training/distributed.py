"""Training in several processes started by torchrun: the process group from torchrun's environment
(gloo on CPU, NCCL on CUDA), the model in DistributedDataParallel (BatchNorm synchronised on request),
gradients summed over the ranks once per accumulation window, and the few decisions every rank
must take together (stop on a signal, save a state, skip a non-finite step) so that none waits for
the others.

Outside torchrun (no WORLD_SIZE in the environment) a run is one process and nothing here is used.
Only rank 0 evaluates (the whole validation set, once) and writes the run directory.
"""

from __future__ import annotations

import io
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from transferkit.errors import TransferKitError


@dataclass(frozen=True)
class Processes:
    """This process's place among the run's processes; world 1 without torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False  # a process group is up (torchrun, any world size)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int] | None:
        """(rank, world) for the training data's sampler, None for one plain process."""
        return (self.rank, self.world) if self.active else None

    def device(self, device: torch.device) -> torch.device:
        """A CUDA run uses the GPU of its local rank."""
        return torch.device("cuda", self.local_rank) if self.active and device.type == "cuda" else device

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DistributedDataParallel around the model (no device_ids on CPU); the model itself otherwise."""
        if not self.active:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def sync_batchnorm(self, model: nn.Module, sync: bool) -> nn.Module:
        """model.sync_bn: BatchNorm layers as SyncBatchNorm, whose batch statistics are taken over every
        rank's batch; the same parameters and buffers under the same names, so frozen layers stay
        frozen and checkpoints keep their names. One process has nothing to synchronise."""
        if not sync or self.world == 1:
            return model
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def no_sync(self, wrapped: nn.Module | None, ends_window: bool) -> AbstractContextManager:
        """For a batch that does not end its optim.accumulate window: DistributedDataParallel's
        no_sync, so that its gradients are summed on this rank and the window's sum is all-reduced
        once, in the backward pass of its last batch (forward and backward must both be inside)."""
        ddp = getattr(wrapped, "_orig_mod", wrapped)  # torch.compile keeps the module it compiled there
        if ends_window or not isinstance(ddp, nn.parallel.DistributedDataParallel):
            return nullcontext()
        return ddp.no_sync()

    def agree_stop(self, signum: int | None, due: bool = False) -> tuple[int | None, bool]:
        """A stop signal any rank got, and whether any rank finds a state due (checkpoint.every_minutes
        reads each rank's clock), so that every rank stops and saves after the same step."""
        if not self.active:
            return signum, due
        flags = torch.tensor([signum or 0, int(due)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return int(flags[0]) or None, bool(flags[1])

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (what a training state may hold), in rank order, on every rank; [value]
        in one process. Sent as torch.save bytes: all_gather_object pickles, and a pickled uint32
        tensor (NumPy's random state) does not load back (torch 2.14 raises)."""
        if not self.active:
            return [value]
        buffer = io.BytesIO()
        torch.save(value, buffer)
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, buffer.getvalue())
        return [torch.load(io.BytesIO(v), weights_only=True) for v in values]

    def agree_finite(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss, or NaN where any rank's loss was not finite: every rank then skips the step
        (a rank skipping its backward alone would leave the others waiting in the gradient sum)."""
        if not self.active:
            return loss
        finite = torch.isfinite(loss).to(torch.int32).cpu().reshape(1)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return loss if int(finite) else torch.full_like(loss, float("nan"))

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the ranks (on the CPU)."""
        values = values.detach().cpu().clone()
        if self.active:
            dist.all_reduce(values)
        return values

    def check_resume(self, saved_world: int, state_dir) -> None:
        """A state is resumed by as many processes as wrote it: each rank's share of the data order
        depends on the number of ranks."""
        if saved_world != self.world:
            how = f"{saved_world} processes in all (torchrun)" if saved_world > 1 else "one process, without torchrun"
            raise TransferKitError(f"{state_dir} was saved by a run of {saved_world} process(es), this one has "
                                   f"{self.world}; resume it with {how}")

    def effective_batch(self, batch_size: int, accumulate: int) -> int:
        """Images in one optimiser step: every rank's batches of one accumulation window."""
        return self.world * batch_size * accumulate

    def describe_batch(self, batch_size: int, accumulate: int, lr_line: str = "") -> str:
        """The line that says how many images make one optimiser step, and the learning rate they get
        (`lr_line`, from optim.lr_scaling)."""
        processes = f"{self.world} process{'es' if self.world > 1 else ''}"
        parts = [f"{processes} x data.batch_size {batch_size}"] if self.active else [f"data.batch_size {batch_size}"]
        parts += [f"optim.accumulate {accumulate}"] if accumulate > 1 else []
        images, lr = self.effective_batch(batch_size, accumulate), f"; {lr_line}" if lr_line else ""
        return f"effective batch: {' x '.join(parts)} = {images} images a step{lr}"

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def from_environment(device: torch.device, strategy: str = "finetune", sync_bn: bool = False) -> Processes:
    """The process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT), or one plain process. Refused before any process group is made: a
    strategy other than finetune, and model.sync_bn off CUDA with several processes."""
    if "WORLD_SIZE" not in os.environ:
        return Processes()
    if strategy != "finetune":
        # the probe trains a head alone on cached features, and gradual unfreezing changes which
        # parameters train after DistributedDataParallel has fixed them
        raise TransferKitError(f"strategy {strategy} runs in one process; under torchrun use strategy: finetune, "
                               "or start the run without torchrun")
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise TransferKitError("WORLD_SIZE is set but RANK is missing or not a number; start several processes "
                               "with torchrun: torchrun --nproc-per-node N -m transferkit train ...") from None
    if sync_bn and world > 1 and device.type != "cuda":
        # PyTorch's SyncBatchNorm refuses CPU tensors in training: a ValueError at the first step
        raise TransferKitError(f"model.sync_bn needs CUDA (SyncBatchNorm does not run on {device.type}); set "
                               f"model.sync_bn=false to train several processes on {device.type}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Processes(rank, world, local_rank, active=True)
