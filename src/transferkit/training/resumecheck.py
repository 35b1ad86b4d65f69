"""Resume checks what it resumes: the config a training state was trained with (kept inside the
state, under its checksum) against the config the resume is given. The run's own config.yaml is
not trusted for this, because it is a file people edit; an edit shows as a changed key."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from transferkit.config import Config, read_yaml_mapping
from transferkit.errors import TransferKitError
from transferkit.training.resume import KEPT_CONFIG, SAFE_TO_CHANGE, config_changes
from transferkit.weights.sources import sha256_of

# Keys that old configs and runs may hold but that no longer do anything: not compared.
RETIRED = ("optim.max_nonfinite_steps",)


def read_yaml(path: Path) -> dict:
    """A run's config, read as any config is (bounded YAML, one-line errors)."""
    try:
        return read_yaml_mapping(path)
    except TransferKitError as exc:
        raise TransferKitError(f"{exc} (the run's config is damaged)") from None


def trained_with(run_dir: Path, state_dir: Path) -> dict:
    """The resolved config the state was trained with. States written before it was kept with them
    name the sha256 of the run's config.yaml at the time, which must still match."""
    kept = state_dir / KEPT_CONFIG
    if kept.is_file():
        return read_yaml(kept)
    run_config = run_dir / "config.yaml"
    recorded = json.loads((state_dir / "COMPLETE").read_text(encoding="utf-8")).get("config_sha256")
    if recorded and sha256_of(run_config) != recorded:
        raise TransferKitError(
            f"{run_config} was changed after the training state {state_dir.name} was saved (its sha256 is not the "
            "one recorded then); put back the config the run was trained with, then resume"
        )
    return read_yaml(run_config)


def check_resume_config(run_dir: Path, state_dir: Path, cfg: Config, allow: Sequence[str]) -> None:
    """Refuse, naming every changed key, unless each is allowed (--allow-config-change) and may change."""
    saved = trained_with(run_dir, state_dir)
    new = cfg.to_dict()
    new["model"]["num_classes"] = saved["model"]["num_classes"]
    changes = {k: v for k, v in config_changes(saved, new).items() if k != "out" and k not in RETIRED}
    refused = {k: v for k, v in changes.items() if k not in allow}
    if refused:
        diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        kept = state_dir / KEPT_CONFIG
        edited = (f"; {run_dir / 'config.yaml'} was edited after {state_dir.name} was saved"
                  if kept.is_file() and sha256_of(kept) != sha256_of(run_dir / "config.yaml") else "")
        raise TransferKitError(
            f"the config differs from the run's ({diff}){edited}; resume with the config the run was trained with, "
            f"or allow keys with --allow-config-change (only {', '.join(SAFE_TO_CHANGE)})"
        )
    unsafe = sorted(set(allow) - set(SAFE_TO_CHANGE))
    if unsafe:
        raise TransferKitError(f"--allow-config-change: {', '.join(unsafe)} cannot change in a resumed run")
