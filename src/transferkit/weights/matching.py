"""Match source tensor names to target tensor names.

In order: exact names; names equal once wrapper prefixes (`module.`, `model.`, `_orig_mod.`,
`backbone.`) are removed from both sides; then, for what is left, structure: the two remaining
lists paired by order, accepted only when they have the same length and every pair has the same
shape (except tensors the caller allows to differ, such as a head being replaced), or when the
shorter target list lines up with the start of the source (a backbone taken from a classifier,
whose head tensors come last). Anything else
is ambiguous and left unmatched, or, when names disagree everywhere, an error that shows where
the two orders part.

A source whose reader recorded its graph (`formats/origins.py: LayerGraph`; Caffe, TFLite) is not
bound to the one order it was stored in: it runs its layers in execution order, which visits a
detector's heads between backbone stages, or an Inception-style block's branches in turn, where a
model's module order lists them apart. When names disagree everywhere and the stored order does
not line up, its convolution and linear layers are paired with the target's modules in any order
the graph allows: each layer after the layers it reads from, shapes equal at every position, and
among layers that could come next with the same shapes, the one the source runs first. The search
backtracks (a layer that fits here but leaves the next position without one is undone) and
remembers the sets of layers it has already failed from, so it stays short; where no such order
exists, the error names the position it reached and what the source would run there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass

from transferkit.errors import TransferKitError
from transferkit.weights.formats.origins import LayerGraph

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
    graph: LayerGraph | None = None,
) -> dict[str, Match]:
    """Map target names to source names. `may_differ`: target names whose shape may disagree
    in a structural pairing (they are then reported as shape mismatches, not as misalignment);
    so may a first conv that differs only in input channels. `graph`: the source's layers as its
    reader recorded them, for a source whose stored order parts from the target's."""
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
        structural = _pair_by_order(source, target, rest_s, rest_t, set(may_differ), bool(matches), graph)
        matches.update(structural)
    return matches


def _pair_by_order(
    source: Mapping[str, Shape],
    target: Mapping[str, Shape],
    rest_s: list[str],
    rest_t: list[str],
    may_differ: set[str],
    names_agreed_somewhere: bool,
    graph: LayerGraph | None = None,
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
    if graph is not None:
        paired = _pair_by_graph(source, target, rest_s, rest_t, graph, fits)
        if paired is not None:
            return paired
    raise TransferKitError(_parting_message(source, target, rest_s, rest_t, part))


GRAPH_STEPS = 200_000  # layers placed before the graph pairing gives up (a few hundred in practice)


def _pair_by_graph(source, target, rest_s: list[str], rest_t: list[str], graph: LayerGraph,
                   fits: Callable[[str, str], bool]) -> dict[str, Match] | None:
    """The target's convolution and linear modules, in module order, paired with the source's layers
    in an order its graph allows (see the module docstring). None when the target holds anything
    else (the plain order pairing's error stands); an error where no order lines up."""
    units_t = _module_units(rest_t, target)
    if units_t is None:
        return None
    units_s, needs = _layer_units(rest_s, source, graph)

    def unit_fits(c: int, i: int) -> bool:
        return len(units_s[c]) == len(units_t[i]) and all(map(fits, units_s[c], units_t[i]))

    def exact(c: int, i: int) -> bool:
        return [tuple(source[s]) for s in units_s[c]] == [tuple(target[t]) for t in units_t[i]]

    chosen: list[int] = []  # source unit at each target position so far
    done: set[int] = set()
    failed: set[frozenset[int]] = set()  # placed sets already known to lead nowhere
    deepest, offered = -1, None  # the furthest position reached, and what the source runs next there

    def options(i: int) -> Iterator[int]:
        nonlocal deepest, offered
        ready = [c for c in range(len(units_s)) if c not in done and needs[c] <= done]
        if i > deepest:
            deepest, offered = i, (ready[0] if ready else None)
        return iter(sorted((c for c in ready if unit_fits(c, i)), key=lambda c: not exact(c, i)))

    stack = [options(0)]
    steps = 0
    while stack and len(chosen) < len(units_t):
        c = next(stack[-1], None)
        if c is None:  # nothing fits here: back to the previous position
            stack.pop()
            failed.add(frozenset(done))
            if chosen:
                done.discard(chosen.pop())
            continue
        chosen.append(c)
        done.add(c)
        steps += 1
        if steps > GRAPH_STEPS:
            raise TransferKitError(
                f"source and target tensor names differ, and the source's graph allows too many orders of its "
                f"{len(units_s)} layers to pair them with the target's {len(units_t)} modules "
                f"({GRAPH_STEPS:,} tried); give a name map (--map)")
        if len(chosen) < len(units_t):
            if frozenset(done) in failed:
                done.discard(chosen.pop())
            else:
                stack.append(options(len(chosen)))
    if len(chosen) == len(units_t):
        return {t: Match(s, "structure") for i, c in enumerate(chosen)
                for s, t in zip(units_s[c], units_t[i], strict=True)}
    src = (f"{units_s[offered][0]} {tuple(source[units_s[offered][0]])}" if offered is not None
           else "(none left to run)")
    tgt = units_t[deepest][0]
    raise TransferKitError(
        f"source and target tensor names differ and their structures do not line up in any order the "
        f"source's graph allows ({len(units_s)} source layers vs {len(units_t)} target modules, convolution "
        f"and linear); they part at position {deepest}: source {src} vs target {tgt} {tuple(target[tgt])}; "
        "check that the source is for this architecture"
    )


def _module_units(names: list[str], shapes: Mapping[str, Shape]) -> list[list[str]] | None:
    """Target names grouped by module, in module order, when every module is a convolution or linear
    layer: a weight of 2 or more dimensions, and perhaps a bias of its width. None otherwise."""
    units: list[list[str]] = []
    for name in names:
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and len(shapes[name]) >= 2:
            units.append([name])
        elif (leaf == "bias" and units and len(units[-1]) == 1 and units[-1][0] == f"{module}.weight"
              and tuple(shapes[name]) == tuple(shapes[units[-1][0]][:1])):
            units[-1].append(name)
        else:
            return None
    return units


def _layer_units(names: list[str], shapes: Mapping[str, Shape],
                 graph: LayerGraph) -> tuple[list[list[str]], list[frozenset[int]]]:
    """Source tensors grouped by the layer holding them, for the layers with a tensor of 2 or more
    dimensions (convolution, linear), in the order the source runs them; and for each, the others it
    needs first, followed through the layers between them that hold smaller tensors only (an
    unfolded BatchNorm's scale and offset, a constant multiplier)."""
    held: dict[str, list[str]] = {}
    remaining = set(names)
    for name, layer in graph.layer_of.items():  # the reader's order (filter, then bias), whatever the file's
        if name in remaining and layer in graph.inputs:
            held.setdefault(layer, []).append(name)
    layers = [layer for layer in graph.order if any(len(shapes[n]) >= 2 for n in held.get(layer, ()))]
    index = {layer: i for i, layer in enumerate(layers)}
    # In run order a layer's inputs come before it, so one pass finds what each needs (an input
    # recorded later, or not at all, which no reader writes, needs nothing)
    through: dict[str, frozenset[int]] = {}  # layer -> the convolution and linear layers it passes on
    needs: list[frozenset[int]] = []
    for layer in graph.order:
        wanted = frozenset().union(*(through.get(up, frozenset()) for up in graph.inputs.get(layer, ())))
        if layer in index:
            needs.append(wanted)
            wanted = frozenset({index[layer]})
        through[layer] = wanted
    return [held[layer] for layer in layers], needs


def _parting_message(source, target, rest_s, rest_t, i) -> str:
    def at(names, shapes, j):
        return f"{names[j]} {tuple(shapes[names[j]])}" if j < len(names) else "(end)"

    return (
        f"source and target tensor names differ and their structures do not line up "
        f"({len(rest_s)} source vs {len(rest_t)} target tensors); they part at position {i}: "
        f"source {at(rest_s, source, i)} vs target {at(rest_t, target, i)}; "
        "check that the source is for this architecture"
    )
