"""The run directory: made for a new run (never over another run, nor into a folder of the user's
own), or found again for a resume, and held by this process (training/runguard.py); what is written
into it before the first step; reading a finished run's config, class names and checkpoints."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime
from pathlib import Path

from transferkit.config import Config, load_config
from transferkit.errors import TransferKitError
from transferkit.fileio import write_json, write_text
from transferkit.training.resume import ResumePoint, find_state, load_state
from transferkit.training.resumecheck import check_resume_config
from transferkit.training.runguard import RunClaim, claim_new_run, claim_run_to_resume
from transferkit.weights.transfer import TransferReport

Say = Callable[..., None]


def default_run_dir(config_path: str | Path | None) -> Path:
    stem = Path(config_path).stem if config_path else "run"
    return Path("runs") / f"{stem}-{datetime.now():%Y%m%d-%H%M%S}"


def new_run_dir(out: str | Path | None, cfg: Config, config_path: str | Path | None) -> Path:
    """Where a new run goes: `out` (--out), else the config's `out`, else runs/<config>-<time>."""
    return Path(out or cfg.out or default_run_dir(config_path))


def prepare_resume(run_dir: Path, cfg: Config, allow: Sequence[str], say: Say) -> ResumePoint:
    """Check that `cfg` may continue the run in `run_dir`; returns the state to continue from."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise TransferKitError(f"{run_dir} is not a run directory (no config.yaml); give the --out of a train run")
    if cfg.strategy in ("linear_probe", "lp_ft"):
        raise TransferKitError(f"resuming strategy {cfg.strategy} is not supported; start the run again")
    state_dir = find_state(run_dir, say)
    check_resume_config(run_dir, state_dir, cfg, allow)  # against the config the state was trained with
    return ResumePoint(state_dir, load_state(state_dir))


def open_run(cfg: Config, out: Path, resume: str | Path | None, allow_config_change: Sequence[str], say: Say
             ) -> tuple[RunClaim, ResumePoint | None]:
    """The run directory, held by this process until `with claim as run_dir:` ends: `resume`, else the
    new run's `out` (new_run_dir); for a resume, the state to continue from too. A new run's folder
    holds only its marker and lock so far."""
    if resume is not None:
        claim = claim_run_to_resume(Path(resume))
        try:
            return claim, prepare_resume(claim.run_dir, cfg, list(allow_config_change), say)
        except BaseException:
            claim.lock.release()
            raise
    return claim_new_run(out), None


def follow_run(cfg: Config, out: Path, resume: str | Path | None, allow_config_change: Sequence[str], say: Say
               ) -> tuple[AbstractContextManager[Path], ResumePoint | None]:
    """open_run for torchrun's other ranks: the same directory and state, neither claimed nor checked
    (rank 0 holds the run and checks the config), so `with` gives the directory and holds nothing."""
    if resume is not None:
        state_dir = find_state(Path(resume), say)
        return nullcontext(Path(resume)), ResumePoint(state_dir, load_state(state_dir))
    return nullcontext(out), None


def write_run_start(run_dir: Path, cfg: Config, classes: list[str], report: TransferReport | None) -> None:
    """What a run writes before its first step: the resolved config, the class names and the transfer
    report. Called only once data and weights have been read without error."""
    resolved = cfg.model_copy(deep=True)
    resolved.model.num_classes = len(classes)
    write_text(run_dir / "config.yaml", resolved.to_yaml())
    write_json(run_dir / "classes.json", classes)
    if report is not None:
        write_json(run_dir / "transfer_report.json", report.to_dict())


def run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The resolved config a finished (or running) run wrote, with `key=value` overrides on top."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise TransferKitError(f"{run_dir} is not a run directory (no config.yaml); give the --out of a train run")
    return load_config(cfg_path, list(overrides))  # one line naming the file for any damage (config.read_yaml_mapping)


def run_classes(run_dir: str | Path) -> list[str]:
    """The class names a run wrote (classes.json), in the order of the model's outputs."""
    path = Path(run_dir) / "classes.json"
    if not path.is_file():
        raise TransferKitError(f"{path} not found; give the --out of a train run (it writes its class names there)")
    try:
        classes = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        classes = None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise TransferKitError(f"{path}: not a JSON list of class names; the run's class names are damaged")
    return classes


def checkpoint_path(run_dir: str | Path, weights: str) -> Path:
    """`best`, `last`, `ema` (a run with optim.ema: the EMA's weights of the last epoch), or a path
    given as it is."""
    named = weights in ("best", "last", "ema")
    ckpt = Path(run_dir) / "checkpoints" / f"{weights}.safetensors" if named else Path(weights)
    if not ckpt.is_file():
        why = "only a run with optim.ema writes it" if weights == "ema" else "has the run finished an epoch?"
        raise TransferKitError(f"checkpoint not found: {ckpt}; {why}")
    return ckpt
