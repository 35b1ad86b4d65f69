import os
import pickle

import pytest
import timm
import torch
from conftest import SHARED_DATA, needs_shared

from transferkit.config import DEFAULT_SOURCE
from transferkit.errors import TransferKitError
from transferkit.models.classification import create_classifier
from transferkit.training.checkpoint import load_weights, save_weights
from transferkit.weights.formats import read_weights
from transferkit.weights.sources import resolve_source
from transferkit.weights.transfer import transfer


def lite0(num_classes):
    return create_classifier("tf_efficientnet_lite0", num_classes)


def test_package_weights_into_timm_names_with_new_head():
    model, family = lite0(2)
    report = transfer(model, DEFAULT_SOURCE, "all-but-head", family.head_patterns)
    assert report.counts() == {"loaded": 294, "out-of-scope": 2}
    assert {e.target for e in report.by_status("out-of-scope")} == {"classifier.weight", "classifier.bias"}
    assert all(e.how == "structure" for e in report.by_status("loaded"))
    backbone = [e.target for e in report.entries if not e.target.startswith("classifier.")]
    assert report.fraction_restored(backbone) == 1.0
    assert report.unused_source == ["_fc.weight", "_fc.bias"]
    src = torch.load(resolve_source(DEFAULT_SOURCE), weights_only=True)
    assert torch.equal(model.state_dict()["blocks.0.0.conv_dw.weight"], src["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(model.state_dict()["bn2.running_var"], src["_bn1.running_var"])


def test_full_scope_equals_hand_made_mapping():
    src = torch.load(resolve_source(DEFAULT_SOURCE), weights_only=True)
    model, family = lite0(1000)
    report = transfer(model, DEFAULT_SOURCE, "full", family.head_patterns)
    assert report.fraction_restored() == 1.0 and report.unused_source == []
    by_hand = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    # The two implementations list their tensors in the same order: pair them one by one.
    by_hand.load_state_dict(dict(zip(by_hand.state_dict(), src.values(), strict=True)))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), by_hand.eval()(x))


def test_full_scope_refuses_class_count_change():
    model, family = lite0(2)
    with pytest.raises(TransferKitError, match="the class count changed; use scope all-but-head"):
        transfer(model, DEFAULT_SOURCE, "full", family.head_patterns)


def test_head_of_another_class_count_is_skipped_by_shape(tmp_path):
    """A 1000-class checkpoint with the model's own names into a 2-class model, head patterns unknown:
    the head is skipped for its shape, everything else loaded, and both shapes reported."""
    imagenet, family = lite0(1000)
    transfer(imagenet, DEFAULT_SOURCE, "full", family.head_patterns)
    save_weights(imagenet, tmp_path / "in1k.safetensors")
    model, _ = lite0(2)
    report = transfer(model, tmp_path / "in1k.safetensors", "all-but-head", head_patterns=())
    assert report.counts() == {"loaded": 294, "skipped-shape": 2}
    skipped = {e.target: e.reason for e in report.by_status("skipped-shape")}
    assert skipped == {"classifier.weight": "source (1000, 1280) vs target (2, 1280)",
                       "classifier.bias": "source (1000,) vs target (2,)"}
    # Names that differ everywhere are paired by structure only when nothing but a declared head
    # disagrees; without head patterns the pairing is refused, showing where the orders part.
    model, _ = lite0(2)
    with pytest.raises(TransferKitError, match="part at position 294: source _fc.weight"):
        transfer(model, DEFAULT_SOURCE, "all-but-head", head_patterns=())


def test_exclude_and_backbone_scope(tmp_path):
    model, family = lite0(2)
    report = transfer(model, DEFAULT_SOURCE, "backbone", family.head_patterns, exclude=["conv_head.*", "bn2.*"])
    excluded = {e.target for e in report.by_status("excluded")}
    assert excluded == {"conv_head.weight"} | {f"bn2.{k}" for k in
                                               ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert report.by_status("excluded")[0].reason == "by pattern 'conv_head.*'"
    assert len(report.by_status("loaded")) == 288


def test_wrapper_prefix_and_shape_skip(tmp_path):
    source, _ = create_classifier("test_efficientnet", 5)
    wrapped = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save(wrapped, tmp_path / "dp.pth")
    target, family = create_classifier("test_efficientnet", 3)
    report = transfer(target, tmp_path / "dp.pth", "all-but-head", family.head_patterns)
    loaded = report.by_status("loaded")
    assert loaded and all(e.how == "prefix" for e in loaded)
    assert len(report.by_status("out-of-scope")) == 2
    # Same checkpoint, head in scope via a pattern that matches nothing: shapes differ, so skipped.
    target2, _ = create_classifier("test_efficientnet", 3)
    report2 = transfer(target2, tmp_path / "dp.pth", "all-but-head", head_patterns=("nothing.*",))
    skipped = report2.by_status("skipped-shape")
    assert [e.target for e in skipped] == ["classifier.weight", "classifier.bias"]
    assert skipped[0].reason == "source (5, 256) vs target (3, 256)"


def test_misaligned_structure_is_an_error_showing_where(tmp_path):
    other, _ = create_classifier("test_efficientnet", 1000)
    model, family = lite0(2)
    path = tmp_path / "other.pth"
    torch.save({f"x{i}": v for i, v in enumerate(other.state_dict().values())}, path)
    with pytest.raises(TransferKitError, match=r"they part at position \d+: source x\d+ .* vs target "):
        transfer(model, path, "all-but-head", family.head_patterns)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"w": torch.zeros(1), "evil": _RunsCode(marker)}, tmp_path / "evil.pth")
    with pytest.raises(TransferKitError, match="refused, unpickling it would run code"):
        read_weights(tmp_path / "evil.pth")
    assert not marker.exists()
    # The same through a legacy (non-zip) file.
    with open(tmp_path / "evil_legacy.pth", "wb") as fh:
        pickle.dump(_RunsCode(marker), fh)
    with pytest.raises(TransferKitError):
        read_weights(tmp_path / "evil_legacy.pth")
    assert not marker.exists()


def test_truncated_and_non_checkpoint_files(tmp_path):
    torch.save({"w": torch.randn(100, 100)}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(TransferKitError, match="truncated or damaged PyTorch checkpoint") as err:
        read_weights(tmp_path / "cut.pth")
    assert "\n" not in str(err.value)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(TransferKitError, match="not a weights file in a supported format"):
        read_weights(tmp_path / "notes.txt")
    with pytest.raises(TransferKitError, match="weights source not found"):
        resolve_source(tmp_path / "missing.pth")


def test_nested_checkpoint_is_unwrapped(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}, "state_dict": {"a.weight": torch.ones(2)}}, tmp_path / "n.pth")
    wf = read_weights(tmp_path / "n.pth")
    assert list(wf.tensors) == ["a.weight"] and wf.metadata == {"nested_key": "state_dict"}


@needs_shared
def test_real_legacy_third_party_checkpoint(capsys):
    import json

    path = SHARED_DATA / "weights" / "pytorch_retinaface_mnet025_widerface" / "mobilenet0.25_Final.pth"
    wf = read_weights(path)
    assert wf.format == "pytorch"
    assert next(iter(wf.tensors)) == "body.stage1.0.0.weight"
    plain = torch.load(path, map_location="cpu", weights_only=True)  # a legacy (non-zip) file of 300 tensors
    assert len(plain) == 300 and list(wf.tensors) == list(plain)
    assert all(torch.equal(wf.tensors[k], v) for k, v in plain.items())
    from transferkit.cli import main

    capsys.readouterr()
    assert main(["weights", "inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["tensors"]) == ("pytorch", 300)
    assert info["parameters"] == sum(v.numel() for v in plain.values())
    assert info["entries"] == [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                               for k, v in plain.items()]


@pytest.mark.parametrize("wrap", [torch.nn.DataParallel, torch.compile], ids=["DataParallel", "compile"])
def test_save_load_round_trip_through_wrappers(tmp_path, wrap):
    """Gluon's prefix failure cannot happen: saved names are the plain module's, whatever the wrapper."""
    model, _ = create_classifier("test_efficientnet", 3)
    save_weights(wrap(model), tmp_path / "w.safetensors", {"classes": ["a", "b", "c"]})
    fresh, _ = create_classifier("test_efficientnet", 3)
    meta = load_weights(fresh, tmp_path / "w.safetensors")
    assert meta == {"classes": ["a", "b", "c"]}
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    wrong, _ = create_classifier("test_efficientnet", 4)
    with pytest.raises(TransferKitError, match="does not fit model"):
        load_weights(wrong, tmp_path / "w.safetensors")


def test_npz_reader(tmp_path):
    import numpy as np

    np.savez(tmp_path / "w.npz", **{"conv.weight": np.ones((2, 3), np.float32), "conv.bias": np.zeros(2)})
    wf = read_weights(tmp_path / "w.npz")
    assert wf.format == "npz" and list(wf.tensors) == ["conv.weight", "conv.bias"]
    assert wf.tensors["conv.weight"].shape == (2, 3)
    np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(TransferKitError, match="refused, an array needs pickle"):
        read_weights(tmp_path / "obj.npz")


def test_match_rename_rules_and_instance_prefixes():
    from transferkit.weights.matching import match_names

    # Gluon: the same network built twice gets different instance prefixes.
    src = {"resnetv20_conv0_weight": (8, 3, 3, 3), "resnetv20_dense0_weight": (10, 8)}
    tgt = {"resnetv22_conv0_weight": (8, 3, 3, 3), "resnetv22_dense0_weight": (10, 8)}
    m = match_names(src, tgt)
    assert {t: (x.source, x.how) for t, x in m.items()} == {
        "resnetv22_conv0_weight": ("resnetv20_conv0_weight", "prefix"),
        "resnetv22_dense0_weight": ("resnetv20_dense0_weight", "prefix"),
    }
    # User rename rules run first (MMEngine revise_keys).
    src = {"features.conv.weight": (4, 3), "features.fc.weight": (2, 4)}
    tgt = {"body.conv.weight": (4, 3), "head.fc.weight": (2, 4)}
    m = match_names(src, tgt, rename=[(r"^features\.conv", "body.conv"), (r"^features\.fc", "head.fc")])
    assert m["body.conv.weight"].how == "renamed" and m["head.fc.weight"].source == "features.fc.weight"


def test_compiled_model_checkpoint_loads_by_prefix(tmp_path):
    source, _ = create_classifier("test_efficientnet", 3)
    compiled = torch.compile(source)  # no forward: only the wrapper's names are wanted
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    torch.save(compiled.state_dict(), tmp_path / "compiled.pth")
    target, family = create_classifier("test_efficientnet", 3)
    report = transfer(target, tmp_path / "compiled.pth", "full", family.head_patterns)
    assert report.fraction_restored() == 1.0
    assert {e.how for e in report.entries} == {"prefix"}


def test_include_and_require():
    model, family = lite0(2)
    report = transfer(model, DEFAULT_SOURCE, "all-but-head", family.head_patterns, include=["blocks.*"])
    assert {e.target.split(".")[0] for e in report.by_status("loaded")} == {"blocks"}
    assert report.by_status("excluded")[0].reason == "not matched by any include pattern"
    model, family = lite0(2)
    with pytest.raises(TransferKitError) as err:
        transfer(model, DEFAULT_SOURCE, "all-but-head", family.head_patterns, exclude=["conv_stem.*"],
                 require={"backbone": 1.0})
    assert "of backbone was restored" in str(err.value) and "required 100%" in str(err.value)
    assert "first not restored: conv_stem.weight (excluded" in str(err.value)
    model, family = lite0(2)
    report = transfer(model, DEFAULT_SOURCE, "all-but-head", family.head_patterns, require={"backbone": 1.0})
    assert report.counts()["loaded"] == 294


@pytest.mark.parametrize("in_chans", [1, 4])
def test_first_conv_adapted_to_other_input_channels(in_chans):
    src = torch.load(resolve_source(DEFAULT_SOURCE), weights_only=True)["_conv_stem.weight"]
    model, family = create_classifier("tf_efficientnet_lite0", 2, in_chans=in_chans)
    report = transfer(model, DEFAULT_SOURCE, "all-but-head", family.head_patterns)
    stem = next(e for e in report.entries if e.target == "conv_stem.weight")
    assert stem.status == "loaded" and stem.how == "structure+adapted"
    got = model.state_dict()["conv_stem.weight"]
    assert got.shape == (32, in_chans, 3, 3)
    if in_chans == 1:
        assert torch.allclose(got[:, 0], src.sum(dim=1))
    else:  # RGB repeated, scaled by 3/N
        assert torch.allclose(got[:, 3], src[:, 0] * 3 / 4) and torch.allclose(got[:, 0], src[:, 0] * 3 / 4)
    model, family = create_classifier("tf_efficientnet_lite0", 2, in_chans=in_chans)
    report = transfer(model, DEFAULT_SOURCE, "all-but-head", family.head_patterns, adapt_input_conv=False)
    assert next(e for e in report.entries if e.target == "conv_stem.weight").status == "skipped-shape"


def test_report_json_and_table(tmp_path):
    model, family = lite0(2)
    report = transfer(model, DEFAULT_SOURCE, "all-but-head", family.head_patterns)
    data = report.to_dict()
    assert data["counts"] == {"loaded": 294, "out-of-scope": 2}
    assert data["per_module"]["blocks"]["fraction_restored"] == 1.0
    assert data["per_module"]["classifier"] == {"tensors": 2, "loaded": 0, "fraction_restored": 0.0}
    entry = next(t for t in data["tensors"] if t["target"] == "blocks.0.0.conv_dw.weight")
    assert entry == {"target": "blocks.0.0.conv_dw.weight", "status": "loaded", "shape": [32, 1, 3, 3],
                     "numel": 288, "source": "_blocks.0._depthwise_conv.weight", "how": "structure",
                     "source_shape": [32, 1, 3, 3], "reason": None, "init": None}
    assert [r[0] for r in [(c.header,) for c in report.table().columns]] == ["module", "tensors", "loaded",
                                                                              "restored"]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc to see mappings")
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_sources_are_memory_mapped_not_copied(tmp_path, suffix):
    from safetensors.torch import save_file

    path = tmp_path / f"w{suffix}"
    state = {"a": torch.randn(256, 256), "b": torch.randn(64)}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    wf = read_weights(path)
    spans = [tuple(int(x, 16) for x in line.split()[0].split("-"))
             for line in open("/proc/self/maps") if str(path) in line]
    for name, tensor in wf.tensors.items():
        assert torch.equal(tensor, state[name])
        assert any(lo <= tensor.data_ptr() < hi for lo, hi in spans), f"{name} was copied, not mapped"


def test_the_reader_itself_asks_for_weights_only(tmp_path, monkeypatch):
    """Not torch's default: with the default turned back to unpickling anything (torch's own switch
    for old code), a code-running checkpoint is still refused and runs nothing."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "ran"
    torch.save({"w": torch.zeros(1), "evil": _RunsCode(marker)}, tmp_path / "evil.pth")
    with pytest.raises(TransferKitError, match=r"evil.pth: refused, unpickling it would run code outside plain "
                       r"tensors \(needs (posix|os)\.system\); re-save the state_dict only, e\.g\. "
                       r"torch\.save\(model\.state_dict\(\), path\)$"):
        read_weights(tmp_path / "evil.pth")
    assert not marker.exists()


@pytest.mark.parametrize("text, expected", [
    ("Weights only load failed. ...\nTrying to load unsupported GLOBAL posix.system whose module posix is blocked.",
     "needs posix.system"),
    ("Weights only load failed. Unsupported global: GLOBAL __main__.Net was not an allowed global",
     "needs __main__.Net"),
    ("Weights only load failed. Unsupported operand 149", "not allowed by weights_only"),
])
def test_the_refusal_names_the_global_in_either_of_torchs_wordings(text, expected):
    from transferkit.weights.formats.torch_file import _global_name

    assert _global_name(pickle.UnpicklingError(text)) == expected
