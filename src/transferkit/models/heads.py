"""Initialise the new, class-dependent head.

timm initialises some classifiers with a range that grows as the class count shrinks (for
EfficientNets, uniform with bound 1/sqrt(num_classes)): with 2 classes the first logits are around
+-7 and the first epochs are spent undoing it. A new head therefore gets a plain, class-count
independent initialiser here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from transferkit.patterns import first_match

HEAD_INITS = ("xavier", "zeros", "normal", "timm")


@torch.no_grad()
def init_head(model: nn.Module, head_patterns: Sequence[str], how: str, skip: Sequence[str] = ()) -> list[str]:
    """Re-initialise head parameters (those not in `skip`, i.e. not restored). Returns their names.

    xavier: weights Xavier-uniform, biases 0 (Gluon's choice for a new output layer);
    zeros: weights and biases 0 (as BiT); normal: weights N(0, 0.01), biases 0; timm: leave as built.
    """
    if how == "timm":
        return []
    done = []
    for name, p in model.named_parameters():
        if name in skip or first_match(head_patterns, name) is None:
            continue
        if p.dim() >= 2 and how == "xavier":
            nn.init.xavier_uniform_(p)
        elif p.dim() >= 2 and how == "normal":
            nn.init.normal_(p, std=0.01)
        else:
            nn.init.zeros_(p)
        done.append(name)
    return done
