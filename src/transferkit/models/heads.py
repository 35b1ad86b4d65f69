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

from transferkit.errors import TransferKitError
from transferkit.models.labels import LabelSet, Term, _norm, auto_match, resolve_spec
from transferkit.patterns import first_match
from transferkit.weights.transfer import TransferReport

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


@torch.no_grad()
def init_head_from_classes(model: nn.Module, report: TransferReport, classes: list[str], spec,
                           fallback: str) -> list[dict]:
    """Start each head row from source classes (Gluon's hotdog trick): `spec` is `auto` (class-folder
    names matched to source names) or {target class: name | index | -name | [several, averaged]}.
    Rows with no match keep `fallback`'s initialisation. Recorded in report.head_rows."""
    params = dict(model.named_parameters())
    pairs = {t: src for t, src in report.head_sources.items() if t in params}
    if not pairs:
        raise TransferKitError(
            "head_init.from_classes needs the source's own head, but no source tensor was matched to the "
            f"model's head in {report.source}; is it a classifier checkpoint?"
        )
    count = next(iter(pairs.values())).shape[0]
    labels = LabelSet.for_count(count)
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(classes))
        if unknown:
            raise TransferKitError(
                f"head_init.from_classes names classes the dataset lacks: {', '.join(unknown)} "
                f"(dataset classes: {', '.join(classes)})"
            )
    elif labels is None:
        raise TransferKitError(
            f"head_init.from_classes=auto needs source class names; the source head has {count} classes, "
            "which transferkit cannot name: map classes to indices instead"
        )
    rows = []
    for row, name in enumerate(classes):
        if isinstance(spec, dict):
            terms = resolve_spec(spec[name], labels, count, name) if name in spec else None
        else:
            index = auto_match(name, labels)
            terms = [Term(index, 1.0)] if index is not None else None
        if terms is None:
            rows.append({"row": row, "class": name, "from": None, "init": fallback})
            continue
        for target, src in pairs.items():
            if tuple(src.shape[1:]) != tuple(params[target].shape[1:]):
                raise TransferKitError(
                    f"head_init: source head {tuple(src.shape)} does not fit {target} {tuple(params[target].shape)}"
                )
            value = sum(term.sign * src[term.index].float() for term in terms) / len(terms)
            params[target][row] = value.to(params[target].dtype)
        rows.append({"row": row, "class": name, "from": [t.describe(labels) for t in terms],
                     "how": "auto" if spec == "auto" else "mapped"})
    report.head_rows = rows
    matched = sum(r["from"] is not None for r in rows)
    report.note_init(list(pairs), "from source classes" if matched == len(rows)
                     else f"from source classes ({matched} rows), {fallback} (the rest)")
    return rows


def detector_head_rows(name: str, rows: int, num_classes: int, index: int) -> list[int]:
    """The rows of a detector's class-dependent tensor that belong to class `index` (0-based; -1:
    the background, where there is one): Faster and Mask R-CNN put the background first, with 4 box
    deltas per class; RetinaNet's outputs are anchor-major (anchor * classes + class), SSDlite's too
    with the background as class 0 of each anchor; FCOS has one output per class."""
    if name.startswith("roi_heads.box_predictor.bbox_pred"):
        return [4 * (index + 1) + j for j in range(4)]
    if name.startswith(("roi_heads.box_predictor.cls_score", "roi_heads.mask_predictor.mask_fcn_logits")):
        return [index + 1]
    if name.startswith("head.classification_head.module_list"):  # SSDlite
        return [a * (num_classes + 1) + index + 1 for a in range(rows // (num_classes + 1))]
    return [a * num_classes + index for a in range(rows // num_classes)]


def has_background(name: str) -> bool:
    return name.startswith(("roi_heads.", "head.classification_head.module_list"))


@torch.no_grad()
def init_detector_head_from_classes(model: nn.Module, report: TransferReport, classes: list[str],
                                    source_classes: list[str], spec) -> list[dict]:
    """Start a detector's class rows from a source detector's rows of the same (or mapped) class:
    target 'pedestrian' <- source 'person'. Faster R-CNN's background rows are carried as well."""
    params = dict(model.named_parameters())
    pairs = {t: src for t, src in report.head_sources.items() if t in params}
    if not pairs:
        raise TransferKitError(f"head_init.from_classes needs a source detector's class-dependent tensors; none "
                               f"were matched in {report.source}")
    labels = LabelSet(list(source_classes), {})
    for i, n in enumerate(source_classes):
        labels.lookup.setdefault(_norm(n), []).append(i)
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(classes))
        if unknown:
            raise TransferKitError(f"head_init.from_classes names classes the dataset lacks: {', '.join(unknown)}")
    rows = []
    for row, name in enumerate(classes):
        if isinstance(spec, dict):
            terms = resolve_spec(spec[name], labels, len(source_classes), name) if name in spec else None
        else:
            found = auto_match(name, labels)
            terms = [Term(found, 1.0)] if found is not None else None
        if terms is None:
            rows.append({"row": row, "class": name, "from": None, "init": "torchvision default"})
            continue
        for target, src in pairs.items():
            dest = detector_head_rows(target, params[target].shape[0], len(classes), row)
            sources = [detector_head_rows(target, src.shape[0], len(source_classes), t.index) for t in terms]
            for k, d in enumerate(dest):
                value = sum(t.sign * src[s[k]].float() for t, s in zip(terms, sources, strict=True)) / len(terms)
                params[target][d] = value.to(params[target].dtype)
        rows.append({"row": row, "class": name, "from": [t.describe(labels) for t in terms],
                     "how": "auto" if spec == "auto" else "mapped"})
    for target, src in pairs.items():  # the background rows (Faster and Mask R-CNN, SSDlite)
        if has_background(target):
            dest = detector_head_rows(target, params[target].shape[0], len(classes), -1)
            for d, r in zip(dest, detector_head_rows(target, src.shape[0], len(source_classes), -1), strict=True):
                params[target][d] = src[r].to(params[target].dtype)
    report.head_rows = rows
    report.note_init(list(pairs), "from source classes")
    return rows
