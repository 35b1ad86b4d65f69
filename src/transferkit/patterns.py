"""The one pattern language for parameter names (head, exclude, freeze, lr rules).

A pattern is a glob (`*` matches any run of characters, dots included; `?` one character),
or a regular expression when it starts with `re:`. Both are anchored: a pattern must match the
whole name. `classifier.*` therefore matches `classifier.weight` but not `head.classifier.weight`;
write `*classifier.*` for that.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from functools import lru_cache

from transferkit.errors import TransferKitError


@lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as exc:
            raise TransferKitError(f"bad regular expression in pattern {pattern!r}: {exc}") from None
    return re.compile(fnmatch.translate(pattern))


def matches(pattern: str, name: str) -> bool:
    return compile_pattern(pattern).fullmatch(name) is not None


def first_match(patterns: Iterable[str], name: str) -> str | None:
    """The first pattern that matches `name`, or None."""
    for pattern in patterns:
        if matches(pattern, name):
            return pattern
    return None


def select(patterns: Iterable[str], names: Iterable[str]) -> list[str]:
    """The names matched by any of the patterns, in their original order."""
    patterns = list(patterns)
    return [n for n in names if first_match(patterns, n) is not None]
