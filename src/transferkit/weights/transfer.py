"""Restore pretrained tensors into a model by scope and pattern, and report on every tensor.

Statuses, per target tensor:
  loaded         restored from a source tensor (`how`: exact, prefix or structure)
  skipped-shape  a source tensor matched but its shape differs (both shapes reported)
  excluded       left out by a user `exclude` pattern
  out-of-scope   outside the scope (the head, for all-but-head and backbone)
  missing        no source tensor matched; keeps the model's own initialisation
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit.errors import TransferKitError
from transferkit.patterns import first_match
from transferkit.weights.formats import WeightFile, read_weights
from transferkit.weights.matching import match_names
from transferkit.weights.sources import resolve_source

SCOPES = ("backbone", "all-but-head", "full")


@dataclass
class TensorEntry:
    target: str
    status: str
    shape: list[int]
    numel: int
    source: str | None = None
    how: str | None = None
    source_shape: list[int] | None = None
    reason: str | None = None
    init: str | None = None  # how it was initialised, when it was not loaded


@dataclass
class TransferReport:
    source: str
    format: str
    scope: str
    entries: list[TensorEntry] = field(default_factory=list)
    unused_source: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for e in self.entries:
            out[e.status] += 1
        return dict(out)

    def fraction_restored(self, names: Sequence[str] | None = None) -> float:
        chosen = [e for e in self.entries if names is None or e.target in names]
        total = sum(e.numel for e in chosen)
        return sum(e.numel for e in chosen if e.status == "loaded") / total if total else 0.0

    def per_module(self) -> dict[str, dict[str, Any]]:
        groups: dict[str, list[TensorEntry]] = defaultdict(list)
        for e in self.entries:
            groups[e.target.split(".", 1)[0]].append(e)
        out = {}
        for module, entries in groups.items():
            total = sum(e.numel for e in entries)
            loaded = sum(e.numel for e in entries if e.status == "loaded")
            out[module] = {
                "tensors": len(entries),
                "loaded": sum(e.status == "loaded" for e in entries),
                "fraction_restored": loaded / total if total else 0.0,
            }
        return out

    def by_status(self, status: str) -> list[TensorEntry]:
        return [e for e in self.entries if e.status == status]

    def note_init(self, names: Sequence[str], how: str) -> None:
        chosen = set(names)
        for e in self.entries:
            if e.target in chosen:
                e.init = how

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "scope": self.scope,
            "counts": self.counts(),
            "fraction_restored": self.fraction_restored(),
            "per_module": self.per_module(),
            "tensors": [asdict(e) for e in self.entries],
            "unused_source": self.unused_source,
        }

    def summary_lines(self, limit: int = 8) -> list[str]:
        """A compact human summary: counts, fraction, and every tensor not loaded (first `limit`)."""
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts().items()))
        lines = [
            f"transfer from {self.source} ({self.format}, scope {self.scope}): {counts}; "
            f"{self.fraction_restored():.1%} of target values restored; "
            f"{len(self.unused_source)} source tensors unused"
        ]
        others = [e for e in self.entries if e.status != "loaded"]
        for e in others[:limit]:
            detail = (e.reason or "") + (f"; initialised {e.init}" if e.init else "")
            lines.append(f"  {e.status:<13} {e.target} {tuple(e.shape)} {detail}".rstrip())
        if len(others) > limit:
            lines.append(f"  ... {len(others) - limit} more not loaded (see transfer_report.json)")
        return lines


def _in_scope(name: str, scope: str, head: Sequence[str], backbone: Sequence[str] | None) -> bool:
    if scope == "full":
        return True
    if first_match(head, name) is not None:
        return False
    if scope == "backbone" and backbone is not None:
        return first_match(backbone, name) is not None
    return True


def plan_transfer(
    model: nn.Module,
    weights: WeightFile,
    scope: str = "all-but-head",
    head_patterns: Sequence[str] = (),
    backbone_patterns: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    on_shape_mismatch: str = "skip",
) -> tuple[TransferReport, dict[str, torch.Tensor]]:
    """Decide, for every target tensor, what to restore. Returns the report and the tensors to load."""
    if scope not in SCOPES:
        raise TransferKitError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    target = model.state_dict()
    src_shapes = {k: tuple(v.shape) for k, v in weights.tensors.items()}
    tgt_shapes = {k: tuple(v.shape) for k, v in target.items()}
    heads = {n for n in target if first_match(head_patterns, n) is not None}
    matches = match_names(src_shapes, tgt_shapes, may_differ=heads)

    report = TransferReport(str(weights.path), weights.format, scope)
    to_load: dict[str, torch.Tensor] = {}
    for name, tensor in target.items():
        entry = TensorEntry(name, "missing", list(tensor.shape), tensor.numel())
        m = matches.get(name)
        if m is not None:
            entry.source, entry.how = m.source, m.how
            entry.source_shape = list(src_shapes[m.source])
        pattern = first_match(exclude, name)
        if pattern is not None:
            entry.status, entry.reason = "excluded", f"by pattern {pattern!r}"
        elif not _in_scope(name, scope, head_patterns, backbone_patterns):
            entry.status, entry.reason = "out-of-scope", f"not restored with scope {scope}"
        elif m is None:
            entry.reason = "no matching source tensor; keeps its initialisation"
        elif tuple(entry.source_shape) != tuple(tensor.shape):
            shapes = f"source {tuple(entry.source_shape)} vs target {tuple(tensor.shape)}"
            if scope == "full" and name in heads:
                raise TransferKitError(
                    f"scope full restores every tensor, but head tensor {name} differs in shape ({shapes}): "
                    "the class count changed; use scope all-but-head to get a new head"
                )
            if on_shape_mismatch == "error" or scope == "full":
                raise TransferKitError(
                    f"shape mismatch for {name} ({shapes}); set pretrained.on_shape_mismatch=skip "
                    "to leave it initialised, or exclude it"
                )
            entry.status, entry.reason = "skipped-shape", shapes
        else:
            entry.status = "loaded"
            to_load[name] = weights.tensors[m.source]
        report.entries.append(entry)
    restored_sources = {e.source for e in report.entries if e.status == "loaded"}
    report.unused_source = [k for k in weights.tensors if k not in restored_sources]
    return report, to_load


@torch.no_grad()
def apply_transfer(model: nn.Module, to_load: dict[str, torch.Tensor]) -> None:
    state = model.state_dict(keep_vars=True)
    for name, value in to_load.items():
        dest = state[name]
        dest.copy_(value.to(dtype=dest.dtype, device=dest.device))


def transfer(
    model: nn.Module,
    source: str | Path,
    scope: str = "all-but-head",
    head_patterns: Sequence[str] = (),
    backbone_patterns: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    on_shape_mismatch: str = "skip",
) -> TransferReport:
    """Read `source`, match it onto `model`, restore what the scope allows, and report."""
    weights = read_weights(resolve_source(source))
    report, to_load = plan_transfer(
        model, weights, scope, head_patterns, backbone_patterns, exclude, on_shape_mismatch
    )
    report.source = str(source)
    apply_transfer(model, to_load)
    return report
