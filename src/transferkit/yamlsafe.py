"""YAML parsing with bounded size: the node graph is measured before any Python object is built.

PyYAML's SafeLoader builds plain data only, but an alias (`*a`) is a reference, so a file of a few
hundred bytes can name 10^9 nodes ("billion laughs"); whatever walks the result afterwards (a
validator, an error message echoing the value, a deep copy) then takes the machine. Here the
composed node graph is walked once, each shared node measured once, and a document that would
expand beyond MAX_NODES nodes or nest deeper than MAX_DEPTH levels is refused before construction.
A run config is a few hundred nodes; a data yaml a few thousand at most.
"""

from __future__ import annotations

from typing import Any

import yaml

from transferkit.errors import TransferKitError

MAX_NODES = 100_000  # after aliases are expanded
MAX_DEPTH = 64  # mappings and lists inside each other


class YamlTooLarge(TransferKitError):
    """A document beyond the bounds; the message says which bound and by how much."""


class _BoundedLoader(yaml.SafeLoader):
    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        # Depth is counted while composing, so a deeply nested file never reaches Python's recursion limit.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise YamlTooLarge(f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node)
        return node


def _check_expanded_size(root: yaml.Node) -> None:
    """Nodes of the document with every alias expanded, counted without expanding: sizes are memoised
    per node object, so a node shared by a thousand aliases is measured once."""
    sizes: dict[int, int] = {}
    heights: dict[int, int] = {}
    visiting: set[int] = set()

    def measure(node: yaml.Node, level: int) -> tuple[int, int]:
        # `level` is checked on the way down, so this recursion never goes deeper than MAX_DEPTH.
        key = id(node)
        if key in sizes:
            if level + heights[key] - 1 > MAX_DEPTH:
                raise YamlTooLarge(f"nested deeper than {MAX_DEPTH} levels once its aliases are expanded")
            return sizes[key], heights[key]
        if key in visiting:
            raise YamlTooLarge("an alias refers to the node that holds it (a recursive structure)")
        if level > MAX_DEPTH:
            raise YamlTooLarge(f"nested deeper than {MAX_DEPTH} levels once its aliases are expanded")
        visiting.add(key)
        size, height = 1, 1
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        for child in children:
            child_size, child_height = measure(child, level + 1)
            size += child_size
            height = max(height, child_height + 1)
            if size > MAX_NODES:
                raise YamlTooLarge(f"expands to more than {MAX_NODES:,} values once its aliases (*name) are expanded")
        visiting.discard(key)
        sizes[key], heights[key] = size, height
        return size, height

    measure(root, 1)


def load_yaml(text: str) -> Any:
    """yaml.safe_load with the bounds above. Raises yaml.YAMLError for syntax, YamlTooLarge for size."""
    return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
