"""The run directory: made for a new run (never over another run), or found again for a resume;
what is written into it before the first step; reading a finished run's config and checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

import yaml

from transferkit.config import Config, validate
from transferkit.errors import TransferKitError
from transferkit.fileio import write_json, write_text
from transferkit.train.resume import SAFE_TO_CHANGE, ResumePoint, config_changes, find_state, load_state
from transferkit.weights.transfer import TransferReport

Say = Callable[..., None]


def default_run_dir(config_path: str | Path | None) -> Path:
    stem = Path(config_path).stem if config_path else "run"
    return Path("runs") / f"{stem}-{datetime.now():%Y%m%d-%H%M%S}"


def refuse_existing_run(run_dir: Path) -> Path:
    if (run_dir / "metrics.jsonl").exists():
        raise TransferKitError(f"{run_dir} already holds a run (metrics.jsonl); choose another --out")
    return run_dir


def prepare_resume(run_dir: Path, cfg: Config, allow: Sequence[str], say: Say) -> ResumePoint:
    """Check that `cfg` may continue the run in `run_dir`; returns the state to continue from."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise TransferKitError(f"{run_dir} is not a run directory (no config.yaml); give the --out of a train run")
    if cfg.strategy in ("linear_probe", "lp_ft"):
        raise TransferKitError(f"resuming strategy {cfg.strategy} is not supported; start the run again")
    saved = yaml.safe_load(saved_path.read_text())
    new = cfg.to_dict()
    new["model"]["num_classes"] = saved["model"]["num_classes"]
    changes = {k: v for k, v in config_changes(saved, new).items() if k != "out"}
    refused = {k: v for k, v in changes.items() if k not in allow}
    if refused:
        diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise TransferKitError(
            f"the config differs from the run's ({diff}); resume with the run's own config, or allow "
            f"keys with --allow-config-change (only {', '.join(SAFE_TO_CHANGE)})"
        )
    unsafe = sorted(set(allow) - set(SAFE_TO_CHANGE))
    if unsafe:
        raise TransferKitError(f"--allow-config-change: {', '.join(unsafe)} cannot change in a resumed run")
    state_dir = find_state(run_dir, say)
    return ResumePoint(state_dir, load_state(state_dir))


def open_run(cfg: Config, out: str | Path | None, config_path: str | Path | None, resume: str | Path | None,
             allow_config_change: Sequence[str], say: Say) -> tuple[Path, ResumePoint | None]:
    """The run directory and, for a resume, the state to continue from. Nothing is written yet."""
    if resume is not None:
        run_dir = Path(resume)
        return run_dir, prepare_resume(run_dir, cfg, list(allow_config_change), say)
    return refuse_existing_run(Path(out or cfg.out or default_run_dir(config_path))), None


def write_run_start(run_dir: Path, cfg: Config, classes: list[str], report: TransferReport | None) -> None:
    """What a run writes before its first step: the resolved config, the class names and the transfer
    report. Called only once data and weights have been read without error."""
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    resolved = cfg.model_copy(deep=True)
    resolved.model.num_classes = len(classes)
    write_text(run_dir / "config.yaml", resolved.to_yaml())
    write_json(run_dir / "classes.json", classes)
    if report is not None:
        write_json(run_dir / "transfer_report.json", report.to_dict())


def run_config(run_dir: str | Path) -> Config:
    """The resolved config a finished (or running) run wrote."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise TransferKitError(f"{run_dir} is not a run directory (no config.yaml); give the --out of a train run")
    return validate(yaml.safe_load(cfg_path.read_text()), str(cfg_path))


def checkpoint_path(run_dir: str | Path, weights: str) -> Path:
    """`best`, `last`, `ema` (a run with optim.ema: the EMA's weights of the last epoch), or a path
    given as it is."""
    named = weights in ("best", "last", "ema")
    ckpt = Path(run_dir) / "checkpoints" / f"{weights}.safetensors" if named else Path(weights)
    if not ckpt.is_file():
        raise TransferKitError(f"checkpoint not found: {ckpt}; has the run finished an epoch?")
    return ckpt
