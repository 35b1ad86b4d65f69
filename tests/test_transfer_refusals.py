"""What the transfer must refuse, flag or still find: table-driven, on a model small enough to
write every tensor's shape by hand.

Small's state_dict, in order (position: name shape numel):
  0 stem.weight (4, 3, 3, 3) 108    1 stem.bias (4,) 4
  2 bn.weight (4,) 4    3 bn.bias (4,) 4    4 bn.running_mean (4,) 4    5 bn.running_var (4,) 4
  6 bn.num_batches_tracked () 1
  7 body.weight (6, 4) 24    8 body.bias (6,) 6
  9 head.weight (3, 6) 18    10 head.bias (3,) 3                                  total 180
"""

from __future__ import annotations

import json
import locale
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from transferkit.errors import TransferKitError
from transferkit.weights.formats import WeightFile
from transferkit.weights.matching import match_names, strip_wrappers
from transferkit.weights.name_maps import MAX_MAP_BYTES, as_rename_rules, read_name_map
from transferkit.weights.targets import factory_target, from_factory, template_target, unrestored
from transferkit.weights.transfer import transfer

HEAD = ("head.*",)
NAMES = ["stem.weight", "stem.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
         "bn.num_batches_tracked", "body.weight", "body.bias", "head.weight", "head.bias"]
NUMEL = dict(zip(NAMES, [108, 4, 4, 4, 4, 4, 1, 24, 6, 18, 3], strict=True))


class Small(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, classes)


def source_state(seed: int = 1, classes: int = 3) -> dict[str, torch.Tensor]:
    """Small's tensors with values a fresh Small does not have, so a load is visible."""
    torch.manual_seed(seed)
    state = Small(classes).state_dict()
    return {k: v + 10 if v.is_floating_point() else v + 7 for k, v in state.items()}


def save(tmp_path, state, name="src.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_the_docstring_table_is_small():
    state = Small().state_dict()
    assert list(state) == NAMES
    assert {k: v.numel() for k, v in state.items()} == NUMEL and sum(NUMEL.values()) == 180


# --- refused: names never agree and the orders part at position k -----------------------------

def renamed(state):
    """Another implementation's names: nothing agrees but the last part (BatchNorm counters stay counters)."""
    return {f"p{i}.{n.rsplit('.', 1)[1]}": v for i, (n, v) in enumerate(state.items())}


def reshape_at(k):
    def edit(state):
        items = list(renamed(state).items())
        items[k] = (items[k][0], torch.zeros(5, *items[k][1].shape[1:]) if items[k][1].dim() else torch.zeros(2))
        return dict(items)
    return edit


def insert_at(k):
    def edit(state):
        items = list(renamed(state).items())
        items.insert(k, ("extra", torch.zeros(7, 7, 7)))
        return dict(items)
    return edit


def drop_at(k):
    def edit(state):
        items = list(renamed(state).items())
        del items[k]
        return dict(items)
    return edit


@pytest.mark.parametrize("edit, k, source_at", [
    (reshape_at(0), 0, r"p0.weight \(5, 3, 3, 3\)"),      # equal lengths, first tensor differs
    (reshape_at(3), 3, r"p3.bias \(5,\)"),
    (reshape_at(7), 7, r"p7.weight \(5, 4\)"),
    (reshape_at(8), 8, r"p8.bias \(5,\)"),              # last non-head tensor
    (insert_at(2), 2, r"extra \(7, 7, 7\)"),       # source longer: it must still line up with the start
    (insert_at(9), 9, r"extra \(7, 7, 7\)"),
    (drop_at(7), 7, r"p8.bias \(6,\)"),                 # source shorter
    (lambda state: dict(list(renamed(state).items())[:7]), 7, r"\(end\)"),  # source is the target's start
], ids=["reshape0", "reshape3", "reshape7", "reshape8", "insert2", "insert9", "drop7", "source-ends"])
def test_orders_that_part_are_refused_showing_where(tmp_path, edit, k, source_at):
    path = save(tmp_path, edit(source_state()))
    model = Small()
    before = {n: v.clone() for n, v in model.state_dict().items()}
    target_at = re.escape(f"target {NAMES[k]} {tuple(model.state_dict()[NAMES[k]].shape)}")
    with pytest.raises(TransferKitError, match=rf"they part at position {k}: source {source_at} vs {target_at}"):
        transfer(model, path, "all-but-head", HEAD)
    assert all(torch.equal(before[n], v) for n, v in model.state_dict().items()), "a refused source wrote tensors"


def test_reshaped_head_is_the_one_difference_structure_accepts(tmp_path):
    """The control for the table above: only the declared head differs, so the pairing holds."""
    src = source_state(classes=5)
    path = save(tmp_path, renamed(src))
    model = Small()
    report = transfer(model, path, "all-but-head", HEAD)
    assert {e.target: (e.status, e.source, e.how) for e in report.entries} == {
        n: ("loaded" if i < 9 else "out-of-scope", f"p{i}.{n.rsplit('.', 1)[1]}", "structure")
        for i, n in enumerate(NAMES)}
    assert torch.equal(model.body.weight, src["body.weight"])
    # Without the head declared, the same source is misaligned at the head.
    with pytest.raises(TransferKitError, match=r"part at position 9: source p9.weight \(5, 6\) vs target head.weight"):
        transfer(Small(), path, "all-but-head", ())


def test_a_backbone_lines_up_with_the_start_only_when_shapes_agree():
    """Target shorter than the source: accepted by order only if every pair has one shape."""
    src = {k: tuple(v.shape) for k, v in renamed(source_state()).items()}
    tgt = {n: tuple(v.shape) for n, v in Small().state_dict().items() if not n.startswith("head.")}
    m = match_names(src, tgt)
    assert {t: (x.source, x.how) for t, x in m.items()} == {n: (s, "structure") for n, s in zip(tgt, src, strict=False)}
    grey = {**tgt, "stem.weight": (4, 1, 3, 3)}  # a 1-channel first conv still lines up: it is adapted
    assert match_names(src, grey)["stem.weight"] == match_names(src, tgt)["stem.weight"]
    src["p7.weight"] = (6, 5)
    with pytest.raises(TransferKitError, match=r"part at position 7: source p7.weight \(6, 5\) vs target body.weight"):
        match_names(src, tgt)


def test_partial_name_agreement_leaves_the_misaligned_rest_unloaded(tmp_path):
    """Where some names agree, a misaligned rest is not paired by order: it is reported."""
    src = source_state()
    state = {("body.weight" if n == "body.weight" else f"x.{n}"): v for n, v in src.items()}
    state["x.stem.weight"] = torch.zeros(5, 3, 3, 3)
    report = transfer(Small(), save(tmp_path, state), "all-but-head", HEAD)
    assert [e.target for e in report.by_status("loaded")] == ["body.weight"]
    assert {e.status for e in report.entries if e.target != "body.weight"} == {"missing", "out-of-scope"}


def test_counters_only_on_one_side_are_left_out_of_the_pairing(tmp_path):
    # A frozen BatchNorm keeps no step counter.
    src = {k: v for k, v in renamed(source_state()).items() if k != "p6.num_batches_tracked"}
    report = transfer(Small(), save(tmp_path, src), "all-but-head", HEAD)
    assert report.counts() == {"loaded": 8, "missing": 1, "out-of-scope": 2}
    assert report.by_status("missing")[0].target == "bn.num_batches_tracked"


# --- refused: scope full with a reshaped tensor ------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.module."])
@pytest.mark.parametrize("name, shape", [("stem.bias", (5,)), ("body.weight", (6, 5)), ("bn.running_var", (8,))])
def test_full_scope_stops_at_a_reshaped_non_head_tensor(tmp_path, prefix, name, shape):
    state = source_state()
    state[name] = torch.zeros(shape)
    path = save(tmp_path, {prefix + k: v for k, v in state.items()})
    model = Small()
    before = model.stem.weight.clone()
    target_shape = tuple(model.state_dict()[name].shape)
    with pytest.raises(TransferKitError, match=re.escape(f"shape mismatch for {name} (source {shape} vs target "
                                                         f"{target_shape})")):
        transfer(model, path, "full", HEAD)
    assert torch.equal(model.stem.weight, before)
    # The same source, all-but-head: skipped for its shape, with both shapes, and not restored.
    report = transfer(Small(), path, "all-but-head", HEAD)
    entry = next(e for e in report.entries if e.target == name)
    assert (entry.status, entry.reason) == ("skipped-shape", f"source {shape} vs target {target_shape}")
    assert report.fraction_restored() == pytest.approx((159 - NUMEL[name]) / 180)
    with pytest.raises(TransferKitError, match=re.escape(
            f"shape mismatch for {name} (source {shape} vs target {target_shape}); set "
            "pretrained.on_shape_mismatch=skip to leave it initialised, or exclude it")):
        transfer(Small(), path, "all-but-head", HEAD, on_shape_mismatch="error")


def test_full_scope_refuses_another_class_count(tmp_path):
    path = save(tmp_path, source_state(classes=5))
    with pytest.raises(TransferKitError, match=re.escape(
            "scope full restores every tensor, but head tensor head.weight differs in shape (source (5, 6) vs "
            "target (3, 6)): the class count changed; use scope all-but-head to get a new head")):
        transfer(Small(), path, "full", HEAD)


def test_full_scope_loads_everything_of_the_same_model(tmp_path):
    src = source_state()
    model = Small()
    report = transfer(model, save(tmp_path, src), "full", HEAD)
    assert report.counts() == {"loaded": 11} and report.fraction_restored() == 1.0
    assert all(torch.equal(v, src[n]) for n, v in model.state_dict().items())


# --- flagged: require below its threshold ------------------------------------------------------

@pytest.mark.parametrize("opts, group, got, first, listed", [
    ({"exclude": ["bn.*"]}, "all", "78.9%", "bn.weight (excluded: by pattern 'bn.*')", "7 of 11"),  # 142/180
    ({"exclude": ["bn.*"]}, "backbone", "89.3%", "bn.weight (excluded", "5 of 9"),  # 142/159
    ({"exclude": ["body.bias"]}, "body.*", "80.0%", "body.bias (excluded", "1 of 2"),  # 24/30
    ({}, "all", "88.3%", "head.weight (out-of-scope", "2 of 11"),  # 159/180: the head is not restored
], ids=["exclude-all", "exclude-backbone", "pattern-group", "head-out-of-scope"])
def test_require_below_threshold_names_the_tensors(tmp_path, opts, group, got, first, listed):
    path = save(tmp_path, source_state())
    with pytest.raises(TransferKitError) as err:
        transfer(Small(), path, "all-but-head", HEAD, require={group: 1.0}, **opts)
    msg = str(err.value)
    assert f"only {got} of {group} was restored" in msg and "(required 100%)" in msg
    assert f"first not restored: {first}" in msg and f"{listed} tensors not restored" in msg
    assert "\n" not in msg


def test_require_lists_the_first_five_not_restored(tmp_path):
    path = save(tmp_path, source_state())
    with pytest.raises(TransferKitError, match=r"7 of 11 tensors not restored: bn.weight, bn.bias, bn.running_mean, "
                                               r"bn.running_var, bn.num_batches_tracked \(\+2 more\); check the"):
        transfer(Small(), path, "all-but-head", HEAD, exclude=["bn.*"], require={"all": 1.0})
    with pytest.raises(TransferKitError, match=r"2 of 11 tensors not restored: head.weight, head.bias; check the"):
        transfer(Small(), path, "all-but-head", HEAD, require={"all": 1.0})
    with pytest.raises(TransferKitError, match=r"\(required 90%\); .* 5 of 9 tensors not restored: bn.weight, bn.bias, "
                                               r"bn.running_mean, bn.running_var, bn.num_batches_tracked; check the "
                                               r"source, scope and patterns with --dry-run$"):
        transfer(Small(), path, "all-but-head", HEAD, exclude=["bn.*"], require={"backbone": 0.9})
    with pytest.raises(TransferKitError, match=r"6 of 9 tensors not restored: stem.bias, bn.weight, bn.bias, "
                                               r"bn.running_mean, bn.running_var \(\+1 more\); check"):
        transfer(Small(), path, "all-but-head", HEAD, exclude=["bn.*", "stem.bias"], require={"backbone": 0.9})
    with pytest.raises(TransferKitError, match=r"\(required 99.5%\)"):
        transfer(Small(), path, "all-but-head", HEAD, exclude=["bn.*"], require={"backbone": 0.995})


def test_require_head_is_the_declared_head(tmp_path):
    path = save(tmp_path, source_state())
    with pytest.raises(TransferKitError, match=r"only 0.0% of head was restored .*2 of 2 tensors not restored"):
        transfer(Small(), path, "all-but-head", HEAD, require={"head": 0.5})
    report = transfer(Small(), path, "full", HEAD, require={"head": 1.0, "backbone": 1.0})
    assert report.fraction_restored() == 1.0


def test_require_counts_a_shape_skip_as_not_restored(tmp_path):
    state = source_state()
    state["stem.bias"] = torch.zeros(5)
    path = save(tmp_path, state)
    with pytest.raises(TransferKitError, match=r"first not restored: stem.bias \(skipped-shape: source \(5,\)"):
        transfer(Small(), path, "all-but-head", HEAD, require={"backbone": 1.0})
    with pytest.raises(TransferKitError, match="stem.bias"):
        transfer(Small(), path, "all-but-head", HEAD, require={"stem.*": 0.99})


def test_require_at_exactly_the_fraction_passes_and_just_above_fails(tmp_path):
    path = save(tmp_path, source_state())
    report = transfer(Small(), path, "all-but-head", HEAD, exclude=["body.*"], require={"all": 129 / 180})
    assert report.fraction_restored() == 129 / 180
    with pytest.raises(TransferKitError, match=r"only 71.7% of all .*\(required 72.2%\)"):
        transfer(Small(), path, "all-but-head", HEAD, exclude=["body.*"], require={"all": 130 / 180})


def test_require_group_that_matches_nothing_is_an_error(tmp_path):
    path = save(tmp_path, source_state())
    with pytest.raises(TransferKitError, match="require: group 'neck.*' matches no tensor of the model"):
        transfer(Small(), path, "all-but-head", HEAD, require={"neck.*": 0.5})
    with pytest.raises(TransferKitError, match="require: group 'head' matches no tensor"):
        transfer(Small(), path, "all-but-head", (), require={"head": 0.5})


# --- loaded: nested wrapper prefixes, with a tensor the target lacks ---------------------------

@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module.",
                                    "model.module._orig_mod.", "module.module."])
def test_nested_wrapper_prefixes_load_by_prefix(tmp_path, prefix):
    src = source_state()
    items = list(src.items())
    items.insert(4, ("aux.weight", torch.ones(4)))  # a tensor the target lacks, among the others
    path = save(tmp_path, {prefix + k: v for k, v in items})
    model = Small()
    report = transfer(model, path, "full", HEAD)
    assert {e.target: (e.status, e.source, e.how) for e in report.entries} == {
        n: ("loaded", prefix + n, "prefix") for n in NAMES}
    assert report.unused_source == [prefix + "aux.weight"]
    assert all(torch.equal(v, src[n]) for n, v in model.state_dict().items())


def test_strip_wrappers_removes_every_level_and_only_leading_ones():
    assert strip_wrappers("module._orig_mod.module.body.weight") == "body.weight"
    assert strip_wrappers("body.module.weight") == "body.module.weight"
    assert strip_wrappers("modules.x") == "modules.x"


def test_target_wrapped_source_plain(tmp_path):
    src = source_state()
    model = nn.DataParallel(Small())
    report = transfer(model, save(tmp_path, src), "full", ("module.head.*",))
    assert {e.how for e in report.entries} == {"prefix"} and report.fraction_restored() == 1.0
    assert torch.equal(model.module.body.bias, src["body.bias"])


# --- fraction_restored: loaded elements over all elements ---------------------------------------

def test_fraction_restored_is_loaded_elements_over_total(tmp_path):
    state = source_state()
    del state["stem.bias"]                      # missing
    state["body.weight"] = torch.zeros(7, 4)    # skipped-shape
    model = Small()
    report = transfer(model, save(tmp_path, state), "all-but-head", HEAD, exclude=["bn.running_*"])
    statuses = {e.target: e.status for e in report.entries}
    assert statuses == {
        "stem.weight": "loaded", "stem.bias": "missing", "bn.weight": "loaded", "bn.bias": "loaded",
        "bn.running_mean": "excluded", "bn.running_var": "excluded", "bn.num_batches_tracked": "loaded",
        "body.weight": "skipped-shape", "body.bias": "loaded", "head.weight": "out-of-scope",
        "head.bias": "out-of-scope"}
    numel = {n: v.numel() for n, v in model.state_dict().items()}
    loaded = [n for n, s in statuses.items() if s == "loaded"]
    assert report.fraction_restored() == sum(numel[n] for n in loaded) / sum(numel.values()) == 123 / 180
    assert report.fraction_restored(["body.weight", "body.bias"]) == 6 / 30
    assert report.fraction_restored(["head.weight"]) == 0.0
    assert report.fraction_restored([]) == 0.0
    per = report.per_module()
    assert per["stem"] == {"tensors": 2, "loaded": 1, "fraction_restored": 108 / 112}
    assert per["bn"] == {"tensors": 5, "loaded": 3, "fraction_restored": 9 / 17}
    assert per["head"] == {"tensors": 2, "loaded": 0, "fraction_restored": 0.0}
    assert report.counts() == {"loaded": 5, "missing": 1, "excluded": 2, "skipped-shape": 1, "out-of-scope": 2}
    assert report.to_dict()["fraction_restored"] == 123 / 180
    assert report.unused_source == ["bn.running_mean", "bn.running_var", "body.weight", "head.weight", "head.bias"]
    assert "68.3% of target values restored" in report.summary_lines()[0]


# --- refused: options that cannot mean anything -------------------------------------------------

@pytest.mark.parametrize("opts, message", [
    ({"scope": "most"}, "unknown scope 'most'; use one of backbone, all-but-head, full"),
    ({"on_shape_mismatch": "warn"}, "on_shape_mismatch must be skip or error, not 'warn'"),
    ({"rename": [("(", "x")]}, "bad rename rule '\\('"),
])
def test_meaningless_options_are_refused(tmp_path, opts, message):
    path = save(tmp_path, source_state())
    scope = opts.pop("scope", "all-but-head")
    with pytest.raises(TransferKitError, match=message):
        transfer(Small(), path, scope, HEAD, **opts)


def test_summary_lines_name_every_tensor_not_loaded(tmp_path):
    state = source_state()
    del state["stem.bias"]
    state["body.weight"] = torch.zeros(7, 4)
    path = save(tmp_path, state)
    report = transfer(Small(), path, "all-but-head", HEAD, exclude=["bn.running_*"])
    report.note_init(["head.weight"], "xavier")
    report.head_rows = [{"row": 0, "class": "ant", "from": ["ant (310)", "-bee (309)"]},
                        {"row": 1, "class": "tree", "from": None, "init": "zeros"}]
    assert report.summary_lines(limit=4) == [
        f"transfer from {path} (pytorch, scope all-but-head): excluded 2, loaded 5, missing 1, out-of-scope 2, "
        "skipped-shape 1; 68.3% of target values restored; 5 source tensors unused",
        "  missing       stem.bias (4,) no matching source tensor; keeps its initialisation",
        "  excluded      bn.running_mean (4,) by pattern 'bn.running_*'",
        "  excluded      bn.running_var (4,) by pattern 'bn.running_*'",
        "  skipped-shape body.weight (6, 4) source (7, 4) vs target (6, 4)",
        "  ... 2 more not loaded (see transfer_report.json)",
        "  head row 0 'ant' <- ant (310) + -bee (309)",
        "  head row 1 'tree' <- no source class; initialised zeros",
    ]
    assert report.summary_lines()[5:7] == [
        "  out-of-scope  head.weight (3, 6) not restored with scope all-but-head; initialised xavier",
        "  out-of-scope  head.bias (3,) not restored with scope all-but-head"]
    assert report.to_dict()["head_rows"] == report.head_rows
    assert not any("more not loaded" in line for line in report.summary_lines(limit=6))  # exactly 6 not loaded
    nothing = transfer(Small(), path, "all-but-head", HEAD, exclude=["*"])
    assert nothing.summary_lines()[-1] == "  ... 3 more not loaded (see transfer_report.json)"  # 8 shown of 11


def test_the_table_has_a_row_per_module(tmp_path):
    state = source_state()
    state["body.weight"] = torch.zeros(7, 4)
    report = transfer(Small(), save(tmp_path, state), "all-but-head", HEAD)
    table = report.table()
    assert table.title == f"transfer from {save(tmp_path, state)} (scope all-but-head)"
    assert [c.header for c in table.columns] == ["module", "tensors", "loaded", "restored"]
    assert [c.justify for c in table.columns] == ["left", "right", "right", "right"]
    assert [list(c.cells) for c in table.columns] == [
        ["stem", "bn", "body", "head"], ["2", "5", "2", "2"], ["2", "5", "1", "0"],
        ["100.0%", "100.0%", "20.0%", "0.0%"]]
    assert table.caption == "loaded 8, out-of-scope 2, skipped-shape 1; 3 source tensors unused"


@pytest.mark.parametrize("name, module", [
    ("backbone.body.blocks.0.conv.weight", "backbone.body"), ("backbone.fpn.inner.0.weight", "backbone.fpn"),
    ("backbone.weight", "backbone"), ("backbone.body.weight", "backbone.body"),
    ("blocks.0.0.conv_dw.weight", "blocks"), ("classifier.bias", "classifier")])
def test_a_detectors_backbone_is_split_into_its_parts_in_the_table(name, module):
    from transferkit.weights.transfer import module_of

    assert module_of(name) == module


def test_report_dict_and_empty_groups(tmp_path):
    from transferkit.weights.transfer import TensorEntry, TransferReport

    path = save(tmp_path, source_state())
    data = transfer(Small(), path, "backbone", HEAD).to_dict()
    assert (data["source"], data["format"], data["scope"]) == (str(path), "pytorch", "backbone")
    assert data["unused_source"] == ["head.weight", "head.bias"] and data["head_rows"] == []
    assert data["counts"] == {"loaded": 9, "out-of-scope": 2}
    empty = TransferReport("x.pth", "pytorch", "full", [TensorEntry("scale.weight", "missing", [0], 0)])
    assert empty.fraction_restored() == 0.0 and empty.per_module()["scale"]["fraction_restored"] == 0.0


def test_adapted_input_conv_keeps_the_source_dtype():
    from transferkit.weights.transfer import adapt_input_channels

    rgb = torch.ones(4, 3, 3, 3, dtype=torch.float16)
    grey = adapt_input_channels(rgb, 1)
    assert grey.dtype == torch.float16 and grey.shape == (4, 1, 3, 3) and torch.all(grey == 3.0)


def test_one_tensor_lining_up_is_not_a_structure():
    """A single leftover target tensor that fits the source's first is too little to pair by order;
    two are enough."""
    with pytest.raises(TransferKitError, match=r"part at position 1: source b.w \(3,\) vs target \(end\); "
                                               r"check that the source is for this architecture$"):
        match_names({"a.w": (2,), "b.w": (3,)}, {"x.w": (2,)})
    m = match_names({"a.w": (2,), "b.w": (3,), "c.w": (4,)}, {"x.w": (2,), "y.w": (3,)})
    assert {t: (x.source, x.how) for t, x in m.items()} == {"x.w": ("a.w", "structure"), "y.w": ("b.w", "structure")}


@pytest.mark.parametrize("source, target, expected", [
    ((8, 3, 3, 3), (8, 1, 3, 3), True), ((8, 3, 5, 5), (8, 4, 5, 5), True),
    ((8, 4, 3, 3), (8, 1, 3, 3), False),   # the source is not RGB
    ((8, 3, 3, 3), (8, 3, 3, 3), False),   # nothing to adapt
    ((8, 3, 3, 3), (4, 1, 3, 3), False), ((8, 3, 3, 3), (8, 1, 5, 5), False), ((8, 3), (8, 1), False)])
def test_which_convs_are_input_adaptable(source, target, expected):
    from transferkit.weights.matching import input_adaptable

    assert input_adaptable(source, target) is expected


def test_backbone_scope_restores_only_the_backbone_patterns(tmp_path):
    path = save(tmp_path, source_state())
    report = transfer(Small(), path, "backbone", HEAD, backbone_patterns=("stem.*", "bn.*"))
    assert {e.target: e.status for e in report.entries} == {
        **{n: "loaded" for n in NAMES[:7]}, **{n: "out-of-scope" for n in NAMES[7:]}}
    assert report.by_status("out-of-scope")[0].reason == "not restored with scope backbone"
    # The backbone patterns only narrow scope backbone; without them it is everything but the head.
    assert transfer(Small(), path, "all-but-head", HEAD, backbone_patterns=("stem.*",)).counts() == {
        "loaded": 9, "out-of-scope": 2}
    assert transfer(Small(), path, "backbone", HEAD).counts() == {"loaded": 9, "out-of-scope": 2}


def test_backbone_scope_with_a_prefix_matches_the_classifier_under_it(tmp_path):
    """A detector-like model holds the classifier under `body.`: scope backbone with that prefix
    matches the source's own names below it (TF OD API's classification checkpoints)."""
    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Small()
            self.neck = nn.Linear(6, 2)

    src = source_state()
    path = save(tmp_path, src)
    model = Detector()
    report = transfer(model, path, "backbone", ("body.head.*",), ("body.*",), backbone_prefix="body.")
    assert {e.target: (e.status, e.how) for e in report.entries if e.status == "loaded"} == {
        f"body.{n}": ("loaded", "exact") for n in NAMES[:9]}
    assert {e.target for e in report.by_status("out-of-scope")} == {
        "body.head.weight", "body.head.bias", "neck.weight", "neck.bias"}
    assert torch.equal(model.body.body.weight, src["body.weight"])
    renamed_source = save(tmp_path, {f"features.{k}": v for k, v in src.items()}, "features.pth")
    report = transfer(Detector(), renamed_source, "backbone", ("body.head.*",), ("body.*",), backbone_prefix="body.",
                      rename=[(r"^features\.", "")])
    assert {e.how for e in report.by_status("loaded")} == {"renamed"} and len(report.by_status("loaded")) == 9


# --- transfer.py, mutation survivors ---------------------------------------------------------------
#
# ConvBN's state_dict (position: name shape numel), its BatchNorm built with eps 1e-3:
#   0 0.weight (4, 3, 3, 3) 108    1 1.weight (4,) 4    2 1.bias (4,) 4    3 1.running_mean (4,) 4
#   4 1.running_var (4,) 4    5 1.num_batches_tracked () 1    6 3.weight (2, 4, 1, 1) 8    7 3.bias (2,) 2   total 135
# A deployment export of it folds the BatchNorm into the first convolution: a filter and a bias each.

class ConvBN(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, eps=1e-3), nn.ReLU(), nn.Conv2d(4, 2, 1))


def deploy_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"conv1.weight": torch.randn(4, 3, 3, 3, generator=g), "conv1.bias": torch.randn(4, generator=g),
            "conv2.weight": torch.randn(2, 4, 1, 1, generator=g), "conv2.bias": torch.randn(2, generator=g)}


FOLDED_REASON = "BatchNorm 1 folded into 0 in the source; identity here, eps 0.001"


def test_a_folded_source_marks_the_pair_folded_and_resets_the_step_counter(tmp_path):
    from transferkit.weights.formats import read_weights
    from transferkit.weights.transfer import TransferOptions, plan_transfer

    src = deploy_state()
    path = save(tmp_path, src)
    model = ConvBN()
    model[1].num_batches_tracked.fill_(100)  # a model trained before: the identity BatchNorm has seen no batches
    report = transfer(model, path, "full")
    assert {e.target: (e.status, e.source, e.how, e.reason) for e in report.entries} == {
        "0.weight": ("folded", "conv1.weight", "folded", FOLDED_REASON),
        **{f"1.{leaf}": ("folded", None, "folded", FOLDED_REASON)
           for leaf in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")},
        "3.weight": ("loaded", "conv2.weight", "structure", None),
        "3.bias": ("loaded", "conv2.bias", "structure", None)}
    assert report.fraction_restored() == 1.0 and report.unused_source == []
    bn = model[1]
    assert torch.equal(model[0].weight, src["conv1.weight"]) and torch.equal(bn.bias, src["conv1.bias"])
    assert torch.equal(bn.weight, torch.ones(4)) and torch.equal(bn.running_mean, torch.zeros(4))
    assert torch.equal(bn.running_var, torch.full((4,), 1 - 1e-3)) and bn.num_batches_tracked.item() == 0
    _, to_load = plan_transfer(ConvBN(), read_weights(path), TransferOptions(scope="full"))
    counter = to_load["1.num_batches_tracked"]
    assert counter.dtype == torch.long and counter.shape == () and counter.item() == 0  # as the model holds it


def test_a_batchnorm_out_of_scope_is_not_folded(tmp_path):
    """Scope backbone leaves the BatchNorm out: the user's say wins, it is neither written nor marked folded."""
    src = deploy_state()
    model = ConvBN()
    model[1].num_batches_tracked.fill_(100)
    before = {k: v.clone() for k, v in model[1].state_dict().items()}
    report = transfer(model, save(tmp_path, src), "backbone", backbone_patterns=("0.*", "3.*"))
    assert {e.target: (e.status, e.how) for e in report.entries} == {
        "0.weight": ("loaded", "structure"),
        **{f"1.{leaf}": ("out-of-scope", None)
           for leaf in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")},
        "3.weight": ("loaded", "structure"), "3.bias": ("loaded", "structure")}
    assert report.fraction_restored() == 118 / 135 and report.unused_source == ["conv1.bias"]
    assert all(torch.equal(v, before[k]) for k, v in model[1].state_dict().items())


def test_a_name_map_for_the_bare_model_keeps_a_batchnorm_of_a_wrapped_one(tmp_path):
    """A folded source that kept one BatchNorm as a scale and an offset, named by a map written for the
    bare model: restored into the same model under DataParallel (`module.`), the scale and offset still
    land on the BatchNorm."""
    g = torch.Generator().manual_seed(4)
    src = {"conv/filter": torch.randn(4, 3, 3, 3, generator=g), "conv/bias": torch.zeros(4),
           "bn/mul": torch.rand(4, generator=g) + 0.5, "bn/add": torch.randn(4, generator=g)}
    rename = [("^conv/filter$", "0.weight"), ("^conv/bias$", "0.bias"), ("^bn/mul$", "1.weight"),
              ("^bn/add$", "1.bias")]
    model = nn.DataParallel(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)))
    report = transfer(model, save(tmp_path, src), "full", rename=rename)
    assert {e.target: (e.status, e.source) for e in report.entries} == {
        "module.0.weight": ("folded", "conv/filter"), "module.1.weight": ("folded", "bn/mul"),
        "module.1.bias": ("folded", "bn/add"), "module.1.running_mean": ("folded", None),
        "module.1.running_var": ("folded", None), "module.1.num_batches_tracked": ("folded", None)}
    assert report.unused_source == []
    bn = model.module[1]
    assert torch.equal(bn.weight, src["bn/mul"]) and torch.equal(bn.bias, src["bn/add"])


def test_an_entry_without_a_reason_shows_no_detail():
    from transferkit.weights.transfer import TensorEntry, TransferReport

    report = TransferReport("x.pth", "pytorch", "full", [TensorEntry("scale.weight", "missing", [2], 2),
                                                         TensorEntry("scale.bias", "missing", [2], 2, init="zeros")])
    assert report.summary_lines() == [
        "transfer from x.pth (pytorch, scope full): missing 2; 0.0% of target values restored; 0 source tensors unused",
        "  missing       scale.weight (2,)", "  missing       scale.bias (2,) ; initialised zeros"]


def test_read_source_tensors_resolves_the_source_first(tmp_path):
    """A run directory is resolved to its last checkpoint; the tensors come back under the file's own names."""
    from safetensors.torch import save_file

    from transferkit.weights.transfer import read_source_tensors

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    src = deploy_state()
    save_file(src, tmp_path / "run" / "checkpoints" / "last.safetensors")
    got = read_source_tensors(str(tmp_path / "run"))
    assert list(got) == sorted(src) and all(torch.equal(got[k], src[k]) for k in src)


# --- name maps (`weights transfer --map`) --------------------------------------------------------

def weights_named(names, metadata=None) -> WeightFile:
    return WeightFile({n: torch.zeros(1) for n in names}, "pytorch", Path("src.pth"), metadata or {})


DOTTED = weights_named(["features.0.conv.weight", "features.0.conv.bias", "features.0.bn.weight",
                        "head.fc.weight", "head.fc.bias"])
# A TensorFlow checkpoint: its tensors are named by position, their layers by the variable names.
KERAS = weights_named(
    ["layer_with_weights-0.weight", "layer_with_weights-0.bias", "layer_with_weights-1.weight",
     "layer_with_weights-1.running_var"],
    {"variable_names": json.dumps({
        "layer_with_weights-0.weight": "backbone/conv1/kernel", "layer_with_weights-0.bias": "backbone/conv1/bias",
        "layer_with_weights-1.weight": "bn1/gamma", "layer_with_weights-1.running_var": "bn1/moving_variance"})})


def write_map(tmp_path, data) -> Path:
    path = tmp_path / "map.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_a_layer_table_sends_each_layers_tensors_in_order_to_its_targets(tmp_path):
    """A layer table's LAYER is the source name without its last dotted part: that layer's tensors, in
    the file's order, go to the listed targets, in the table's order; layers not listed are left out,
    and a listed layer holding nothing with no targets is no error."""
    path = write_map(tmp_path, [{"name": "head.fc", "weight": ["classifier.weight", "classifier.bias"]},
                                {"name": "relu", "weight": []},
                                {"name": "features.0.conv", "weight": ["stem.weight", "stem.bias"]}])
    assert list(read_name_map(path, DOTTED).items()) == [
        ("head.fc.weight", "classifier.weight"), ("head.fc.bias", "classifier.bias"),
        ("features.0.conv.weight", "stem.weight"), ("features.0.conv.bias", "stem.bias")]


def test_a_layer_table_of_a_tensorflow_checkpoint_goes_by_its_variable_names(tmp_path):
    """With metadata variable_names, a tensor's layer is its variable name without the part after the
    last `/` (a nested layer keeps its scope), not its own dotted name."""
    path = write_map(tmp_path, [{"name": "backbone/conv1", "weight": ["0.weight", "0.bias"]},
                                {"name": "bn1", "weight": ["1.weight", "1.running_var"]}])
    assert list(read_name_map(path, KERAS).items()) == [
        ("layer_with_weights-0.weight", "0.weight"), ("layer_with_weights-0.bias", "0.bias"),
        ("layer_with_weights-1.weight", "1.weight"), ("layer_with_weights-1.running_var", "1.running_var")]


@pytest.mark.parametrize("entry, listed, held", [
    ({"name": "head.fc", "weight": ["classifier.weight"]}, "'head.fc' lists 1", 2),
    ({"name": "neck", "weight": ["neck.weight", "neck.bias"]}, "'neck' lists 2", 0),
])
def test_a_layer_table_for_another_file_is_refused_naming_the_layer(tmp_path, entry, listed, held):
    """A layer whose target count differs from the tensors the source holds in it (none at all for a
    layer the source lacks) stops the transfer with one line naming the map, the layer and both counts."""
    path = write_map(tmp_path, [{"name": "features.0.conv", "weight": ["stem.weight", "stem.bias"]}, entry])
    with pytest.raises(TransferKitError) as exc:
        read_name_map(path, DOTTED)
    assert str(exc.value) == (f"{path}: layer {listed} tensors but the source has {held} in that layer; "
                              "is the map for this file?")


@pytest.mark.parametrize("names", ['{"layer_with_weights-0.weight": "backbone/conv1/kernel"',
                                   '["backbone/conv1/kernel"]', '{"layer_with_weights-0.weight": 3}'],
                         ids=["not-json", "a-list", "not-names"])
def test_damaged_variable_names_with_a_layer_table_are_one_line(tmp_path, names):
    """The metadata comes from the file (a converted checkpoint keeps it): damaged, it was a traceback."""
    weights = weights_named(list(KERAS.tensors), {"variable_names": names})
    path = write_map(tmp_path, [{"name": "backbone/conv1", "weight": ["0.weight", "0.bias"]}])
    with pytest.raises(TransferKitError) as exc:
        read_name_map(path, weights)
    assert str(exc.value) == (f"{weights.path}: its metadata variable_names is not a JSON object of tensor -> "
                              "variable names; convert the checkpoint again, or give an object name map")


def test_an_object_map_is_taken_as_it_is(tmp_path):
    """The object form is source -> target names, whatever the source's layers."""
    path = write_map(tmp_path, {"layer_with_weights-1.weight": "bn.weight", "anything": "else"})
    assert read_name_map(path, KERAS) == {"layer_with_weights-1.weight": "bn.weight", "anything": "else"}


@pytest.mark.parametrize("data", [
    {"head.fc.weight": 1},  # an object whose value is not a name
    [1, 2],
    [{"name": "head.fc", "weight": "classifier.weight"}],  # the targets not a list
    [{"name": 3, "weight": ["classifier.weight"]}],
    "head.fc.weight",
])
def test_a_map_in_neither_form_is_refused_showing_both(tmp_path, data):
    """JSON that is neither form is one line showing the two forms."""
    path = write_map(tmp_path, data)
    with pytest.raises(TransferKitError) as exc:
        read_name_map(path, DOTTED)
    assert str(exc.value) == (f"{path}: a name map is an object of source -> target names, or a list of "
                              '{"name": LAYER, "weight": [TARGET, ...]} entries')


@pytest.mark.parametrize("content, reason", [
    (b"head.fc.weight classifier.weight", "Expecting value: line 1 column 1 (char 0)"),
    (b'{"a": "b"', "Expecting ',' delimiter: line 1 column 10 (char 9)"),
    (b"\xff{}", "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
])
def test_a_map_that_is_not_json_text_is_one_line(tmp_path, content, reason):
    """Not JSON, or not UTF-8: one line with the parser's reason and the forms to give."""
    path = tmp_path / "map.json"
    path.write_bytes(content)
    with pytest.raises(TransferKitError) as exc:
        read_name_map(path, DOTTED)
    assert str(exc.value) == f"{path}: not a JSON name map ({reason}); give an object or a layer table"


def test_a_map_that_cannot_be_read_is_one_line(tmp_path):
    """A missing map file: one line with the system's reason."""
    with pytest.raises(TransferKitError) as exc:
        read_name_map(tmp_path / "missing.json", DOTTED)
    assert str(exc.value) == f"cannot read name map {tmp_path / 'missing.json'}: No such file or directory"


def test_a_map_up_to_16_mib_is_read_and_a_larger_file_refused(tmp_path):
    """16 MiB exactly is still a name map; one byte more is refused before reading, in one line."""
    assert MAX_MAP_BYTES == 16 * 1024 * 1024
    text = '{"head.fc.weight": "classifier.weight"}'
    path = tmp_path / "map.json"
    path.write_text(text + " " * (MAX_MAP_BYTES - len(text)), encoding="utf-8")
    assert path.stat().st_size == MAX_MAP_BYTES
    assert read_name_map(path, DOTTED) == {"head.fc.weight": "classifier.weight"}
    with open(path, "ab") as fh:
        fh.write(b" ")
    with pytest.raises(TransferKitError) as exc:
        read_name_map(path, DOTTED)
    assert str(exc.value) == f"{path}: over 16 MiB, not a name map"


def test_a_map_is_read_as_utf8_whatever_the_locale(tmp_path):
    """Layer names out of ASCII read the same under a locale whose encoding is not UTF-8 (Windows'
    cp1252, a Latin-1 or C locale): the map is UTF-8 text, as JSON is."""
    path = tmp_path / "map.json"
    path.write_bytes('{"bloc_é.poids": "stem.weight"}'.encode())  # as UTF-8 bytes, not JSON's \u escapes
    saved = locale.setlocale(locale.LC_CTYPE)
    try:
        try:
            locale.setlocale(locale.LC_CTYPE, "C")
        except locale.Error:
            pytest.skip("no C locale to switch to")
        assert read_name_map(path, DOTTED) == {"bloc_é.poids": "stem.weight"}
    finally:
        locale.setlocale(locale.LC_CTYPE, saved)


def test_rename_rules_of_a_map_take_both_names_literally():
    """Each entry becomes a whole-name rule; regex characters in the source name and backslashes in the
    target name (which re.sub would read as group references) stand for themselves."""
    rules = as_rename_rules({"blocks.0.w": "a\\1.b", "x+": "y"})
    assert rules == [(r"^blocks\.0\.w$", r"a\\1.b"), (r"^x\+$", "y")]
    assert re.sub(*rules[0], "blocks.0.w") == "a\\1.b"
    assert re.sub(*rules[0], "blocks_0_w") == "blocks_0_w"


# --- targets: `--like REF` and `--model package.module:function` ----------------------------------

def test_a_template_target_is_the_references_tensors_labelled_like_it(tmp_path):
    """`--like REF`: the reference's names, in its order, and values; labelled `like REF`; no head known,
    every tensor restored by default, and a tensor not restored keeps the reference's values."""
    ref = save(tmp_path, source_state(), "ref.pth")
    target = template_target(str(ref), 1e-3)
    assert (target.label, target.initial, target.default_scope, tuple(target.head_patterns)) == (
        f"like {ref}", "the reference's values", "full", ())
    state = target.model.state_dict()
    assert list(state) == NAMES
    assert all(torch.equal(state[k], v) for k, v in source_state().items())
    assert target.model.bn_eps == 1e-3


def test_a_factory_target_is_the_functions_model_labelled_with_its_name():
    """`--model package.module:function` calls the function without arguments (a class is such a
    function too) and labels the written file with the spec as given."""
    target = factory_target("torch.nn:Identity")
    assert type(target.model) is nn.Identity
    assert (target.label, target.initial, target.default_scope, tuple(target.head_patterns)) == (
        "torch.nn:Identity", "the model's initialisation", "full", ())


@pytest.mark.parametrize("spec, message", [
    (":build", "--model ':build': a factory is named as package.module:function"),
    ("torch.nn:", "--model 'torch.nn:': a factory is named as package.module:function"),
    ("torch.nn", "--model 'torch.nn': a factory is named as package.module:function"),
    ("no_such_module_tk:build", "--model 'no_such_module_tk:build': cannot import no_such_module_tk "
                                "(No module named 'no_such_module_tk'); is it on PYTHONPATH or installed?"),
    ("torch.nn:Identity:x", "--model 'torch.nn:Identity:x': torch.nn has no function 'Identity:x'"),
    ("math:pi", "--model 'math:pi': math has no function 'pi'"),
    ("builtins:int", "--model 'builtins:int' returned a int, not a torch nn.Module"),
])
def test_a_factory_that_gives_no_model_is_one_line(spec, message):
    """The module is what comes before the first `:`, the function all after it; each way of not
    getting a model is one line naming the spec."""
    with pytest.raises(TransferKitError) as exc:
        from_factory(spec)
    assert str(exc.value) == message


def test_unrestored_names_every_tensor_the_source_did_not_give_but_step_counters(tmp_path):
    """What a template or a user's model keeps from itself, in the model's order; BatchNorm's
    num_batches_tracked is left out (it carries nothing)."""
    src = {k: v for k, v in source_state().items() if k.startswith(("body.", "head."))}
    report = transfer(Small(), save(tmp_path, src), "full")
    assert {e.target: e.status for e in report.entries}["bn.num_batches_tracked"] == "missing"
    assert unrestored(report) == ["stem.weight", "stem.bias", "bn.weight", "bn.bias", "bn.running_mean",
                                  "bn.running_var"]


# --- restore_pretrained: a run's `pretrained:` section handed to transfer() ---

def test_restore_pretrained_hands_every_option_of_the_section_to_transfer(monkeypatch):
    """Each key of `pretrained:` reaches transfer() as given (none left at transfer's default), with the
    model family's head and backbone; no source, no transfer."""
    from types import SimpleNamespace

    from transferkit.config import PretrainedConfig
    from transferkit.weights import transfer as transfer_module

    calls = []
    monkeypatch.setattr(transfer_module, "transfer", lambda model, source, **kw: calls.append((model, source, kw)))
    cfg = PretrainedConfig(source="w.safetensors", scope="full", sha256="ab" * 32, on_shape_mismatch="error",
                           exclude=["x.*"], include=["y.*"], rename=[("a.", "b.")], require={"backbone": 0.5},
                           adapt_input_conv=False)
    family = SimpleNamespace(head_patterns=["head.*"], backbone_patterns=["stem.*"], backbone_prefix="body.")
    model = nn.Linear(1, 1)
    transfer_module.restore_pretrained(model, family, cfg)
    assert calls == [(model, "w.safetensors", {
        "scope": "full", "head_patterns": ["head.*"], "backbone_patterns": ["stem.*"], "backbone_prefix": "body.",
        "sha256": "ab" * 32, "exclude": ["x.*"], "include": ["y.*"], "rename": [("a.", "b.")],
        "require": {"backbone": 0.5}, "on_shape_mismatch": "error", "adapt_input_conv": False})]
    assert transfer_module.restore_pretrained(model, family, PretrainedConfig(source=None)) is None
    assert len(calls) == 1


def test_transfer_checks_the_sha256_it_is_given(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "w.safetensors"
    save_file({"weight": torch.ones(1, 1), "bias": torch.ones(1)}, str(src))
    model = nn.Linear(1, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = rf"^{re.escape(str(src))} does not match the expected sha256 {'0' * 64}$"
    with pytest.raises(TransferKitError, match=message):
        transfer(model, src, sha256="0" * 64)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing restored
    report = transfer(model, src)  # the default scope, all-but-head: with no head named, every tensor
    assert report.fraction_restored() == 1.0 and model.weight.item() == 1.0 and model.bias.item() == 1.0
