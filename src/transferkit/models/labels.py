"""Class names of pretrained label sets, and resolving user class specs against them.

A spec names one source class by index (`713`), WordNet id (`n07697537`) or name (`hotdog`, any
synonym, case- and separator-insensitive); `-NAME` is its negative; a list is the mean of several.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from timm.data import ImageNetInfo

from transferkit.errors import TransferKitError


def _norm(text: str) -> str:
    return re.sub(r"[\s_\-]+", "", text.strip().lower())


@dataclass
class LabelSet:
    names: list[str]  # display name per index
    lookup: dict[str, list[int]]  # normalised synonym or id -> indices

    @classmethod
    def imagenet(cls) -> LabelSet:
        info = ImageNetInfo()
        names, lookup = [], {}
        for i in range(info.num_classes()):
            synonyms = [s.strip() for s in info.index_to_description(i).split(",")]
            names.append(synonyms[0])
            for key in {_norm(s) for s in synonyms} | {info.index_to_label_name(i).lower()}:
                lookup.setdefault(key, []).append(i)
        return cls(names, lookup)

    @classmethod
    def for_count(cls, count: int) -> LabelSet | None:
        return cls.imagenet() if count == 1000 else None

    def find(self, name: str) -> list[int]:
        return self.lookup.get(_norm(name), [])


@dataclass
class Term:
    index: int
    sign: float

    def describe(self, labels: LabelSet | None) -> str:
        name = labels.names[self.index] if labels else str(self.index)
        return f"{'-' if self.sign < 0 else ''}{name} ({self.index})"


def resolve_spec(spec: object, labels: LabelSet | None, count: int, target: str) -> list[Term]:
    """One target class's spec -> the source rows to average (with signs)."""
    if isinstance(spec, list):
        if not spec:
            raise TransferKitError(f"head_init.from_classes: empty list for class {target!r}")
        return [t for item in spec for t in resolve_spec(item, labels, count, target)]
    sign = 1.0
    if isinstance(spec, str) and spec.startswith("-"):
        sign, spec = -1.0, spec[1:]
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        index = int(spec)
        if not 0 <= index < count:
            raise TransferKitError(
                f"head_init.from_classes: index {index} for class {target!r} is outside 0..{count - 1}"
            )
        return [Term(index, sign)]
    if not isinstance(spec, str):
        raise TransferKitError(f"head_init.from_classes: class {target!r} maps to {spec!r}; give a name, index or list")
    if labels is None:
        raise TransferKitError(
            f"head_init.from_classes: the source head has {count} classes, whose names transferkit does not know; "
            f"give indices for class {target!r}"
        )
    found = labels.find(spec)
    if not found:
        raise TransferKitError(f"head_init.from_classes: no source class named {spec!r} (for class {target!r})")
    if len(found) > 1:
        options = ", ".join(f"{labels.names[i]} ({i})" for i in found)
        raise TransferKitError(f"head_init.from_classes: {spec!r} is ambiguous ({options}); give the index")
    return [Term(found[0], sign)]


def auto_match(target: str, labels: LabelSet) -> int | None:
    """A class-folder name to one source class: exact synonym, else without a plural `s`/`es`."""
    for candidate in (target, target[:-1] if target.endswith("s") else None,
                      target[:-2] if target.endswith("es") else None):
        if candidate:
            found = labels.find(candidate)
            if len(found) == 1:
                return found[0]
    return None
