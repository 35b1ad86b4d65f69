"""Match source tensor names to target tensor names.

In order: exact names; names equal once wrapper prefixes (`module.`, `model.`, `_orig_mod.`,
`backbone.`) are removed from both sides; then, for what is left, structure: the two remaining
lists paired by order, accepted only when they have the same length and every pair has the same
shape (except tensors the caller allows to differ, such as a head being replaced), or when the
shorter target list lines up with the start of the source (a backbone taken from a classifier,
whose head tensors come last). Anything else
is ambiguous and left unmatched, or, when names disagree everywhere, an error that shows where
the two orders part.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from transferkit.errors import TransferKitError

WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.", "backbone.")
COUNTER = "num_batches_tracked"

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Match:
    source: str
    how: str  # "exact", "renamed", "prefix" or "structure"


def input_adaptable(source_shape: Shape, target_shape: Shape) -> bool:
    """A conv weight that differs only in input channels, from an RGB source (see transfer.py)."""
    return (len(source_shape) == 4 and len(target_shape) == 4 and source_shape[1] == 3
            and source_shape[0] == target_shape[0] and tuple(source_shape[2:]) == tuple(target_shape[2:])
            and target_shape[1] != 3)


def strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                changed = True
    return name


def instance_prefix(names: Collection[str]) -> str:
    """The prefix all names share, cut back to its last `.` or `_`; it must start with a letter or
    digit ('' when there is none: a bare `_` is a naming style, not an instance)."""
    if len(names) < 2:
        return ""
    common = os.path.commonprefix(list(names))
    cut = max(common.rfind("."), common.rfind("_"))
    prefix = common[: cut + 1]
    return prefix if prefix[:1].isalnum() else ""


def apply_renames(names: Sequence[str], rules: Sequence[tuple[str, str]]) -> dict[str, str]:
    """source name -> renamed name, for the names a rule changes."""
    compiled = []
    for pattern, replacement in rules:
        try:
            compiled.append((re.compile(pattern), replacement))
        except re.error as exc:
            raise TransferKitError(f"bad rename rule {pattern!r}: {exc}") from None
    out = {}
    for name in names:
        new = name
        for regex, replacement in compiled:
            new = regex.sub(replacement, new)
        if new != name:
            out[name] = new
    return out


def match_names(
    source: Mapping[str, Shape],
    target: Mapping[str, Shape],
    may_differ: Collection[str] = (),
    rename: Sequence[tuple[str, str]] = (),
) -> dict[str, Match]:
    """Map target names to source names. `may_differ`: target names whose shape may disagree
    in a structural pairing (they are then reported as shape mismatches, not as misalignment);
    so may a first conv that differs only in input channels."""
    matches: dict[str, Match] = {}
    used: set[str] = set()
    renamed = apply_renames(list(source), rename)
    by_new_name = {new: old for old, new in renamed.items()}
    for name in target:
        if name in by_new_name:
            matches[name] = Match(by_new_name[name], "renamed")
            used.add(by_new_name[name])
        elif name in source and name not in renamed:
            matches[name] = Match(name, "exact")
            used.add(name)

    src_plain = {n: strip_wrappers(renamed.get(n, n)) for n in source}
    tgt_plain = {n: strip_wrappers(n) for n in target}
    src_prefix = instance_prefix(list(src_plain.values()))
    tgt_prefix = instance_prefix(list(tgt_plain.values()))
    # Known wrappers are certain; a name equal only once instance prefixes are removed is a
    # guess, and must agree in shape too.
    guessed = src_prefix != tgt_prefix
    stripped: dict[str, str | None] = {}
    for name in source:
        if name not in used:
            key = src_plain[name][len(src_prefix):]
            stripped[key] = None if key in stripped else name  # None marks a collision
    for name in target:
        if name in matches:
            continue
        src = stripped.get(tgt_plain[name][len(tgt_prefix):])
        if src is not None and src not in used and (
                not guessed or tuple(source[src]) == tuple(target[name]) or name in may_differ):
            matches[name] = Match(src, "prefix")
            used.add(src)

    rest_t = [n for n in target if n not in matches]
    rest_s = [n for n in source if n not in used]
    if rest_t and rest_s:
        structural = _pair_by_order(source, target, rest_s, rest_t, set(may_differ), bool(matches))
        matches.update(structural)
    return matches


def _pair_by_order(
    source: Mapping[str, Shape],
    target: Mapping[str, Shape],
    rest_s: list[str],
    rest_t: list[str],
    may_differ: set[str],
    names_agreed_somewhere: bool,
) -> dict[str, Match]:
    def fits(s: str, t: str) -> bool:
        return (tuple(source[s]) == tuple(target[t]) or t in may_differ
                or input_adaptable(source[s], target[t]))

    # BatchNorm step counters carry nothing to transfer, and frozen BatchNorm layers have none:
    # when one side has no counters, the other side's are left out of the pairing.
    for mine, other in ((rest_s, rest_t), (rest_t, rest_s)):
        if not any(n.endswith(COUNTER) for n in other):
            mine[:] = [n for n in mine if not n.endswith(COUNTER)]
    if 1 < len(rest_t) < len(rest_s) and all(
            tuple(source[s]) == tuple(target[t]) or input_adaptable(source[s], target[t])
            for s, t in zip(rest_s, rest_t, strict=False)):
        # A backbone is the first part of a classifier: the target lines up with the start of the source.
        return {t: Match(s, "structure") for s, t in zip(rest_s, rest_t, strict=False)}
    if len(rest_s) == len(rest_t):
        part = next((i for i, (s, t) in enumerate(zip(rest_s, rest_t, strict=True)) if not fits(s, t)), None)
        if part is None:
            return {t: Match(s, "structure") for s, t in zip(rest_s, rest_t, strict=True)}
    else:
        part = next(
            (i for i, (s, t) in enumerate(zip(rest_s, rest_t, strict=False))
             if tuple(source[s]) != tuple(target[t])),
            min(len(rest_s), len(rest_t)),
        )
    if names_agreed_somewhere:
        return {}  # a partial load by name; the report lists what is missing and unused
    raise TransferKitError(_parting_message(source, target, rest_s, rest_t, part))


def _parting_message(source, target, rest_s, rest_t, i) -> str:
    def at(names, shapes, j):
        return f"{names[j]} {tuple(shapes[names[j]])}" if j < len(names) else "(end)"

    return (
        f"source and target tensor names differ and their structures do not line up "
        f"({len(rest_s)} source vs {len(rest_t)} target tensors); they part at position {i}: "
        f"source {at(rest_s, source, i)} vs target {at(rest_t, target, i)}; "
        "check that the source is for this architecture"
    )
