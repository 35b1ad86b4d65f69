"""Match source tensor names to target tensor names.

In order: exact names; names equal once wrapper prefixes (`module.`, `model.`, `_orig_mod.`,
`backbone.`) are removed from both sides; then, for what is left, structure: the two remaining
lists paired by order, accepted only when they have the same length and every pair has the same
shape (except tensors the caller allows to differ, such as a head being replaced). Anything else
is ambiguous and left unmatched, or, when names disagree everywhere, an error that shows where
the two orders part.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from transferkit.errors import TransferKitError

WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.", "backbone.")

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Match:
    source: str
    how: str  # "exact", "prefix" or "structure"


def strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                changed = True
    return name


def match_names(
    source: Mapping[str, Shape],
    target: Mapping[str, Shape],
    may_differ: Collection[str] = (),
) -> dict[str, Match]:
    """Map target names to source names. `may_differ`: target names whose shape may disagree
    in a structural pairing (they are then reported as shape mismatches, not as misalignment)."""
    matches: dict[str, Match] = {}
    used: set[str] = set()
    for name in target:
        if name in source:
            matches[name] = Match(name, "exact")
            used.add(name)

    stripped: dict[str, str | None] = {}
    for name in source:
        if name not in used:
            key = strip_wrappers(name)
            stripped[key] = None if key in stripped else name  # None marks a collision
    for name in target:
        if name in matches:
            continue
        src = stripped.get(strip_wrappers(name))
        if src is not None and src not in used:
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
    if len(rest_s) == len(rest_t):
        part = next(
            (i for i, (s, t) in enumerate(zip(rest_s, rest_t, strict=True))
             if tuple(source[s]) != tuple(target[t]) and t not in may_differ),
            None,
        )
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
