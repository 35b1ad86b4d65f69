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


# --- the PyTorch and safetensors readers, on files written here ------------------------------------

class _Net(torch.nn.Module):
    """A whole pickled module (what `torch.save(model)` writes): a class weights_only refuses."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)


def test_pytorch_files_are_told_by_content_whatever_their_name(tmp_path):
    state = {"b.weight": torch.arange(4.0), "a.weight": torch.ones(2, 2)}
    torch.save(state, tmp_path / "zip.weights")
    torch.save(state, tmp_path / "legacy.weights", _use_new_zipfile_serialization=False)
    for path in (tmp_path / "zip.weights", tmp_path / "legacy.weights"):
        wf = read_weights(path)
        assert (wf.format, wf.path, wf.metadata, list(wf.tensors)) == ("pytorch", path, {}, ["b.weight", "a.weight"])
        assert all(torch.equal(wf.tensors[k], v) for k, v in state.items())
    # other zips are not taken for checkpoints
    import zipfile

    with zipfile.ZipFile(tmp_path / "notes.weights", "w") as zf:
        zf.writestr("notes/readme.txt", "hello")
    with pytest.raises(TransferKitError, match="notes.weights: not a weights file in a supported format"):
        read_weights(tmp_path / "notes.weights")


def test_a_checkpoint_saved_on_a_gpu_loads_on_the_cpu(tmp_path, monkeypatch):
    import torch.serialization

    with monkeypatch.context() as m:  # torch records each storage's device by this tag
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save({"w": torch.ones(2)}, tmp_path / "gpu.pth")
    assert b"cuda:0" in (tmp_path / "gpu.pth").read_bytes()
    assert read_weights(tmp_path / "gpu.pth").tensors["w"].device == torch.device("cpu")


def test_checkpoints_without_a_dictionary_of_tensors_are_one_line(tmp_path):
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    with pytest.raises(TransferKitError) as err:
        read_weights(tmp_path / "list.pth")
    assert str(err.value) == f"{tmp_path / 'list.pth'}: holds a list, not a dictionary of tensors"
    torch.save({f"k{i}": i for i in range(10)}, tmp_path / "numbers.pth")
    with pytest.raises(TransferKitError) as err:
        read_weights(tmp_path / "numbers.pth")
    assert str(err.value) == (f"{tmp_path / 'numbers.pth'}: no tensors found (top-level keys: "
                              "['k0', 'k1', 'k2', 'k3', 'k4', 'k5', 'k6', 'k7'])")  # the first 8


def test_a_legacy_file_of_a_whole_module_is_refused_not_read_through_stand_ins(tmp_path):
    """Stand-ins read zip checkpoints only (tests/test_formats_paddle_pickle.py); a legacy file is refused."""
    torch.save(_Net(), tmp_path / "net.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(TransferKitError, match=r"net.pth: refused, unpickling it would run code outside plain "
                                               rf"tensors \(needs {__name__}._Net\)"):
        read_weights(tmp_path / "net.pth")


def test_a_pickle_of_another_protocol_reads_without_torchs_warning(tmp_path, recwarn):
    torch.save({"w": torch.ones(2)}, tmp_path / "w.pth", _use_new_zipfile_serialization=False)
    data = bytearray((tmp_path / "w.pth").read_bytes())
    second = data.index(b"\x80\x02", 2)  # the legacy format's second pickle: its protocol opcode
    data[second + 1] = 5  # torch.load warns "Detected pickle protocol 5 in the checkpoint"
    (tmp_path / "w.pth").write_bytes(bytes(data))
    assert read_weights(tmp_path / "w.pth").tensors["w"].tolist() == [1.0, 1.0]
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


@pytest.mark.parametrize("text, shown", [
    ("invalid load key, 'x'.", "invalid load key, 'x'."),
    ("Unpickler failed\nwhile reading\ninvalid load key, 'x'.\n", "invalid load key, 'x'."),  # the last line
    ("", ""),
])
def test_unpickling_errors_torch_words_otherwise_are_one_line(tmp_path, monkeypatch, text, shown):
    """torch (2.4 and later) wraps every unpickling failure in its weights_only message; others' wording."""
    def fails(*args, **kwargs):
        raise pickle.UnpicklingError(text)

    torch.save({"w": torch.ones(1)}, tmp_path / "w.pth")
    monkeypatch.setattr(torch, "load", fails)
    with pytest.raises(TransferKitError) as err:
        read_weights(tmp_path / "w.pth")
    assert str(err.value) == f"{tmp_path / 'w.pth'}: not a readable PyTorch checkpoint ({shown})"


def test_damage_is_reported_with_torchs_reason_on_one_line(tmp_path, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("PytorchStreamReader failed reading zip archive:\n  failed finding central directory")

    torch.save({"w": torch.ones(1)}, tmp_path / "w.pth")
    monkeypatch.setattr(torch, "load", fails)
    with pytest.raises(TransferKitError) as err:
        read_weights(tmp_path / "w.pth")
    assert str(err.value) == (f"{tmp_path / 'w.pth'}: truncated or damaged PyTorch checkpoint (PytorchStreamReader "
                              "failed reading zip archive: failed finding central directory); "
                              "re-download or re-save it")


def test_a_refused_global_in_the_older_wording_is_refused(tmp_path, monkeypatch):
    def fails(*args, **kwargs):
        raise pickle.UnpicklingError("Unsupported global: GLOBAL posix.system was not an allowed global")

    torch.save({"w": torch.ones(1)}, tmp_path / "w.pth", _use_new_zipfile_serialization=False)
    monkeypatch.setattr(torch, "load", fails)
    with pytest.raises(TransferKitError, match=r"w.pth: refused, unpickling it would run code outside plain "
                                               r"tensors \(needs posix.system\)"):
        read_weights(tmp_path / "w.pth")


def _safetensors(path, header: object, data: bytes = b"", length: int | None = None) -> None:
    import json
    import struct

    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def test_safetensors_are_read_in_file_order_with_their_metadata(tmp_path):
    import struct

    # `b` is stored before `a`: the reader keeps the file's order, not the header's or the alphabet's
    path = tmp_path / "w.weights"  # told by content
    _safetensors(path, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                        "__metadata__": {"format": "pt", "classes": "x"},
                        "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, struct.pack("<2f", 1.0, 2.0))
    wf = read_weights(path)
    assert (wf.format, wf.path, wf.metadata) == ("safetensors", path, {"format": "pt", "classes": "x"})
    assert list(wf.tensors) == ["b", "a"] and wf.tensors["b"].tolist() == [1.0] and wf.tensors["a"].tolist() == [2.0]
    # a file that is all header (an empty tensor) is whole
    from safetensors.torch import save_file

    save_file({"empty": torch.zeros(0)}, str(tmp_path / "empty.safetensors"))
    assert read_weights(tmp_path / "empty.safetensors").tensors["empty"].shape == (0,)


@pytest.mark.parametrize("length", [2**64 - 1, 2**40, 10_000, 66])
def test_safetensors_header_length_beyond_the_file_is_one_line(tmp_path, length):
    path = tmp_path / "w.safetensors"
    header = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'  # 61 bytes, then 4 of data
    _safetensors(path, header, b"\0" * 4, length)  # 66: one byte more than follows the length
    with pytest.raises(TransferKitError) as err:
        read_weights(path)
    assert str(err.value) == (f"{path}: damaged safetensors file (its header length {length:,} is larger than the "
                              "65 bytes that follow it); re-download or re-save it")


@pytest.mark.parametrize("header, data, reason", [
    (b'{"w": }', b"", "damaged safetensors header (Expecting value: line 1 column 7 (char 6))"),
    (b"[1, 2]", b"", "damaged safetensors header (not a JSON object)"),
    ({"w": {"dtype": "F32", "shape": [1]}}, b"", "damaged safetensors file ('data_offsets')"),
])
def test_damaged_safetensors_are_one_line(tmp_path, header, data, reason):
    path = tmp_path / "w.safetensors"
    _safetensors(path, header, data)
    with pytest.raises(TransferKitError) as err:
        read_weights(path)
    assert str(err.value) == f"{path}: {reason}; re-download or re-save it"
    path.write_bytes(b"\x05\0\0\0\0")
    with pytest.raises(TransferKitError) as err:
        read_weights(path)
    assert str(err.value) == f"{path}: 5 bytes, too short for a safetensors file; re-download or re-save it"


# --- weights convert: the source's tensors under their own names, with the reader's record ---

def test_convert_keeps_names_and_writes_the_readers_record_as_strings(tmp_path, monkeypatch):
    """Every tensor under its own name (tied tensors copied apart), the reader's metadata as safetensors
    strings (non-strings as JSON), then the format and the source as given."""
    import json

    from safetensors import safe_open

    from transferkit.weights import convert as convert_module
    from transferkit.weights.formats import WeightFile

    shared = torch.arange(6.0)
    tensors = {"a.weight": shared.view(2, 3), "b.weight": shared[:3], "c": torch.tensor([7], dtype=torch.int64)}
    read = WeightFile(tensors, "npz", tmp_path / "w.npz", {"converted": "transposed: 2", "counts": {"x": 1}, "n": 3})
    monkeypatch.setattr(convert_module, "read_weights", lambda path: read)
    src = tmp_path / "w.npz"
    src.write_bytes(b"any")
    out = tmp_path / "w.safetensors"
    assert convert_module.convert(src, out) is read
    with safe_open(str(out), "pt") as f:
        assert list(f.keys()) == ["a.weight", "b.weight", "c"]
        assert torch.equal(f.get_tensor("a.weight"), torch.arange(6.0).view(2, 3))
        assert torch.equal(f.get_tensor("b.weight"), torch.tensor([0.0, 1.0, 2.0]))
        assert f.get_tensor("c").dtype == torch.int64
        assert f.metadata() == {"converted": "transposed: 2", "counts": json.dumps({"x": 1}), "n": "3",
                                "format": "npz", "source": str(src)}


def test_convert_checks_the_sha256_given(tmp_path):
    from safetensors.torch import save_file

    from transferkit.weights.convert import convert

    src = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(2)}, str(src))
    with pytest.raises(TransferKitError, match=rf"^{src} does not match the expected sha256 {'0' * 64}$"):
        convert(src, tmp_path / "out.safetensors", sha256="0" * 64)
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(("metadata", "line"), [
    ({}, "none"),
    ({"converted": "transposed: 4; folded BatchNorm: 1"}, "transposed: 4; folded BatchNorm: 1"),
    ({"converted": '{"a": "transposed", "b": "unchanged", "c": "transposed", "d": "HWIO->OIHW"}'},
     "transposed: 2; HWIO->OIHW: 1"),
    ({"converted": '{"a": "unchanged"}'}, "none"),
    ({"converted": '["transposed"]'}, '["transposed"]'),
    ({"converted": "3"}, "3"),
])
def test_conversion_summary_counts_each_conversion(metadata, line):
    from transferkit.weights.convert import conversion_summary

    assert conversion_summary(metadata) == line
