"""Training state for exact resumes: written atomically, verified by checksum, newest good one found.

A state is a directory checkpoints/states/step-NNNNNNNN/ holding model.safetensors, state.pt
(optimiser, scheduler, counters, random-number states (under torchrun, each rank's, with its share
of the epoch's loss), the data order's generator state at the start of the epoch), config.yaml
(the resolved config it was trained with, which a resume is checked against) and COMPLETE, a
marker with each file's sha256 that is written last. The directory is built under a temporary name
and renamed into place, so a reader never sees half of one; one whose files do not match their
marker is skipped, and the previous one is used.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transferkit.errors import TransferKitError, one_line
from transferkit.fileio import write_json
from transferkit.training.checkpoint import save_weights
from transferkit.weights.formats.torch_file import refused_global
from transferkit.weights.sources import sha256_of

STATES = Path("checkpoints") / "states"
KEPT_CONFIG = "config.yaml"  # inside each state: the run's config when the state was saved
# Keys that may differ between a run and its resume (with --allow-config-change).
SAFE_TO_CHANGE = ("schedule.epochs", "out", "device", "data.num_workers", "checkpoint.keep_last",
                  "checkpoint.every_steps", "checkpoint.every_minutes")


@dataclass
class ResumePoint:
    """A training state found again: its directory and what it holds (load_state)."""

    dir: Path
    state: dict


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def rank_state(state: dict, rank: int) -> dict:
    """One rank's own part of a training state: its random state (its augmentations and dropout go
    on as they would have) and its share of the epoch's loss so far. A state saved before the
    ranks' parts were kept gives rank 0's to every rank."""
    ranks = state.get("ranks") or [{"rng": state["rng"], "loss_sum": state["loss_sum"], "seen": state["seen"]}]
    return ranks[rank] if rank < len(ranks) else ranks[0]


def save_state(run_dir: Path, model, optimizer, scheduler, counters: dict, keep_last: int) -> Path:
    states = run_dir / STATES
    final = states / f"step-{counters['global_step']:08d}"
    tmp = states / f".{final.name}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_weights(model, tmp / "model.safetensors")
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **counters}
        with open(tmp / "state.pt", "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        shutil.copyfile(run_dir / "config.yaml", tmp / KEPT_CONFIG)
        marker = {"files": {n: sha256_of(tmp / n) for n in ("model.safetensors", "state.pt", KEPT_CONFIG)},
                  "epoch": counters["epoch"], "batches_done": counters["batches_done"],
                  "global_step": counters["global_step"], "config_sha256": sha256_of(run_dir / "config.yaml")}
        write_json(tmp / "COMPLETE", marker)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = sorted(p.name for p in states.glob("step-*"))
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise TransferKitError(
            f"could not save a checkpoint in {states}: {exc.strerror or exc}; {kept}; "
            f"free space and resume with: transferkit train --resume {run_dir}"
        ) from None
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(p for p in states.glob("step-*") if p.is_dir())[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _file_name(name: object) -> bool:
    return isinstance(name, str) and name == Path(name).name and name not in ("", "..")  # Path(".").name is ""


def check_state(path: Path) -> str | None:
    """None when the state is complete and intact, else what is wrong with it."""
    marker = path / "COMPLETE"
    if not marker.is_file():
        return "no COMPLETE marker (the write did not finish)"
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        return "unreadable COMPLETE marker"
    # damage can leave any JSON here: only file names of this state, each with its digest, are checked
    if not isinstance(files, dict) or not all(_file_name(n) and isinstance(d, str) for n, d in files.items()):
        return "unreadable COMPLETE marker"
    for name, digest in files.items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if sha256_of(path / name) != digest:
            return f"{name} does not match its checksum"
    return None


def find_state(run_dir: Path, say=print) -> Path:
    """The newest intact state of a run, saying which damaged ones were passed over."""
    candidates = sorted((p for p in (run_dir / STATES).glob("step-*") if p.is_dir()), reverse=True)
    for path in candidates:
        problem = check_state(path)
        if problem is None:
            return path
        say(f"checkpoint {path} is damaged ({problem}); falling back to the previous one")
    raise TransferKitError(f"{run_dir} has no complete checkpoint to resume from; start the run again "
                           f"with another --out (or after removing {run_dir})")


def load_state(path: Path) -> dict:
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's message is pages long and says how to run the code anyway
        raise TransferKitError(f"cannot read {path / 'state.pt'}: refused, unpickling it would run code "
                               f"({refused_global(exc)}); the state is damaged or not a transferkit state") from None
    except Exception as exc:  # noqa: BLE001 - checked by checksum first; anything here is damage
        raise TransferKitError(f"cannot read {path / 'state.pt'}: {one_line(exc)}") from None


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("require",):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_changes(saved: dict, new: dict) -> dict[str, tuple]:
    a, b = flatten(saved), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def carry_optimizer_state(source: str | Path | None, optimizer: torch.optim.Optimizer,
                          say: Callable[..., None]) -> None:
    """pretrained.with_optimizer: the source run's optimiser state (momentum, moments), with this
    run's own learning rates."""
    if not source or not (Path(source) / "config.yaml").is_file():  # no source is not the current folder
        raise TransferKitError(f"pretrained.with_optimizer needs pretrained.source to be a run directory (the --out "
                               f"of a train run); {str(source) if source else 'none'} is not one")
    source = Path(source)
    state_dir = find_state(source, say)
    lrs = [(g["lr"], g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(load_state(state_dir)["optimizer"])
    except ValueError as exc:
        raise TransferKitError(
            f"the optimiser state of {state_dir} does not fit this run ({exc}); keep the same optim "
            "settings, or set pretrained.with_optimizer=false"
        ) from None
    for group, (lr, initial) in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"], group["initial_lr"] = lr, initial
    say(f"optimiser state carried from {state_dir}", highlight=False)
