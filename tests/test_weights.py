import os
import pickle

import pytest
import timm
import torch
from conftest import SHARED_DATA, RunsCode, needs_shared

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


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"w": torch.zeros(1), "evil": RunsCode(marker)}, tmp_path / "evil.pth")
    with pytest.raises(TransferKitError, match="refused, unpickling it would run code"):
        read_weights(tmp_path / "evil.pth")
    assert not marker.exists()
    # The same through a legacy (non-zip) file.
    with open(tmp_path / "evil_legacy.pth", "wb") as fh:
        pickle.dump(RunsCode(marker), fh)
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
             for line in open("/proc/self/maps", encoding="utf-8") if str(path) in line]
    for name, tensor in wf.tensors.items():
        assert torch.equal(tensor, state[name])
        assert any(lo <= tensor.data_ptr() < hi for lo, hi in spans), f"{name} was copied, not mapped"


def test_the_reader_itself_asks_for_weights_only(tmp_path, monkeypatch):
    """Not torch's default: with the default turned back to unpickling anything (torch's own switch
    for old code), a code-running checkpoint is still refused and runs nothing."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "ran"
    torch.save({"w": torch.zeros(1), "evil": RunsCode(marker)}, tmp_path / "evil.pth")
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
    from transferkit.weights.formats.torch_file import refused_global

    assert refused_global(pickle.UnpicklingError(text)) == expected


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


@pytest.mark.parametrize("content, seen", [
    (b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>\n",
     "it is text, starting '<!DOCTYPE html> <html><head><title>404 N': an HTML page, a failed download?"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\n",
     "it is text, starting 'version https://git-lfs.github.com/spec/'"),
    (pickle.dumps({"w": [1.0, 2.0]}, protocol=4),
     "a pickle of protocol 4, as pickle.dump writes; torch.save writes protocol 2"),
    (pickle.dumps(b"abc", protocol=3), "a pickle of protocol 3, as pickle.dump writes; torch.save writes protocol 2"),
    (b"\x80\x02C\x03abc.", "the unpickler stopped at once: Unsupported operand 67"),  # protocol 2, not torch.save's
    (b"\x01\x02\x03\xff\xfe", "the unpickler stopped at once: Unsupported operand 1"),
    (b"x" * 64 + b"\x00\x01", f"it is text, starting '{'x' * 40}'"),  # only the first 64 bytes are read
    (b"y" * 63 + "\u00e9".encode(), f"it is text, starting '{'y' * 40}'"),  # the 64 bytes end inside a character
    (b"x" * 60 + b"\xff" * 4, "the unpickler stopped at once: Unsupported operand 120"),  # not a character cut short
], ids=["html", "lfs-pointer", "protocol-4", "protocol-3", "protocol-2", "bytes", "text-then-bytes", "cut-character",
        "bad-end"])
def test_a_file_that_is_not_torch_saves_is_told_for_what_it_is_not_as_code(tmp_path, content, seen):
    """A .pth that torch's safe unpickler stops on at once, before any global: a page saved by a failed
    download, a Git LFS pointer, a plain pickle.dump, noise. None of them is "code that would run"."""
    (tmp_path / "w.pth").write_bytes(content)
    with pytest.raises(TransferKitError) as err:
        read_weights(tmp_path / "w.pth")
    assert str(err.value) == (f"{tmp_path / 'w.pth'}: not a PyTorch checkpoint torch.load reads safely ({seen}); "
                              "re-download it, or re-save the state_dict with torch.save(model.state_dict(), path)")


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


def test_describe_weights_lists_names_shapes_and_dtypes_in_file_order(tmp_path):
    """`weights inspect`: (format, tensors, metadata). A format with a describer (npz) is described from its
    headers; any other is read, its dtypes named as torch names them without `torch.`, its metadata kept."""
    import numpy as np
    from safetensors.torch import save_file

    from transferkit.weights.formats import TensorInfo, describe_weights

    np.savez(tmp_path / "a.npz", w=np.zeros((2, 3), np.float16), n=np.array(5))
    assert describe_weights(str(tmp_path / "a.npz")) == (
        "npz", [TensorInfo("w", (2, 3), "float16"), TensorInfo("n", (), "int64")], {})
    torch.save({"x.weight": torch.zeros(4, 2), "bn.num_batches_tracked": torch.tensor(0)}, tmp_path / "a.pth")
    assert describe_weights(str(tmp_path / "a.pth")) == (
        "pytorch", [TensorInfo("x.weight", (4, 2), "float32"), TensorInfo("bn.num_batches_tracked", (), "int64")], {})
    save_file({"b.w": torch.zeros(3, dtype=torch.bfloat16)}, str(tmp_path / "a.safetensors"), metadata={"k": "v"})
    assert describe_weights(tmp_path / "a.safetensors") == (
        "safetensors", [TensorInfo("b.w", (3,), "bfloat16")], {"k": "v"})


@pytest.mark.parametrize("call", ["read_weights", "describe_weights"])
def test_a_file_of_no_known_format_is_refused_listing_the_formats(tmp_path, call):
    """Neither content nor suffix tells a format: one line naming the file and every format read."""
    from transferkit.weights import formats

    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(TransferKitError) as exc:
        getattr(formats, call)(tmp_path / "notes.txt")
    assert str(exc.value) == (
        f"{tmp_path / 'notes.txt'}: not a weights file in a supported format (safetensors, npz, pytorch, tflite, "
        "mxnet, keras-h5, tensorflow, paddle, onnx, caffe); convert it or give another file")


def test_a_registered_reader_plugs_in_beside_the_built_in_ones(tmp_path, monkeypatch):
    """register(name, sniff, read, suffixes, describe): the new format is told by its content test, given
    the file's first HEAD_BYTES bytes (none for a folder, told by what it holds), or by its suffix in any
    case when no content test knows the file; read_weights reads it with its reader, describe_weights with
    its describer where it has one, else through its reader."""
    from transferkit.weights import formats
    from transferkit.weights.formats import TensorInfo, WeightFile, describe_weights, detect_format

    monkeypatch.setattr(formats, "_READERS", list(formats._READERS))  # the registry as it was, afterwards
    monkeypatch.setattr(formats, "_DESCRIBERS", dict(formats._DESCRIBERS))
    heads = {}

    def sniff(path, head):
        heads[path.name] = head
        return head.startswith(b"TOY1") or (path / "toy.json").is_file()

    def read(path):
        return WeightFile({"w": torch.ones(2)}, "toy", path, {"read": path.name})

    formats.register("toy", sniff, read, (".toy",))
    formats.register("toy2", lambda path, head: head.startswith(b"TOY2"), read,
                     describe=lambda path: [TensorInfo("d", (3,), "float16")])
    content = b"TOY1" + bytes(range(256)) * 4
    (tmp_path / "by_content.bin").write_bytes(content)
    (tmp_path / "by_suffix.TOY").write_bytes(b"toy weights")
    (tmp_path / "described.toy").write_bytes(b"TOY2 weights")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "toy.json").write_text("{}")
    assert [detect_format(tmp_path / n) for n in ("by_content.bin", "by_suffix.TOY", "described.toy", "folder")] == [
        "toy", "toy", "toy2", "toy"]
    assert (heads["by_content.bin"], heads["folder"]) == (content[:512], b"")
    wf = read_weights(tmp_path / "by_suffix.TOY")
    assert (wf.format, wf.metadata, list(wf.tensors)) == ("toy", {"read": "by_suffix.TOY"}, ["w"])
    assert describe_weights(tmp_path / "by_content.bin") == (
        "toy", [TensorInfo("w", (2,), "float32")], {"read": "by_content.bin"})
    assert describe_weights(tmp_path / "described.toy") == ("toy2", [TensorInfo("d", (3,), "float16")], {})


def test_an_archive_or_an_unreadable_path_given_as_a_weights_file_is_one_line(tmp_path):
    """A tar (whatever its name) is refused pointing to the ways archives are given; a path that cannot be
    opened is one line with the system's reason."""
    import io
    import tarfile

    path = tmp_path / "weights.pth"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(tarfile.TarInfo("model.pth"), io.BytesIO(b""))
    with pytest.raises(TransferKitError) as exc:
        read_weights(path)
    assert str(exc.value) == (f"{path}: a tar or zip archive, not a weights file; give it as the source (archives "
                              "are unpacked) or name the file inside with SOURCE#path/inside")
    with pytest.raises(TransferKitError) as exc:
        read_weights(tmp_path / "missing.pth")
    assert str(exc.value) == f"cannot read weights file {tmp_path / 'missing.pth'}: No such file or directory"


def test_zip_names_reads_up_to_10000_member_names_and_nothing_from_other_files(tmp_path):
    """The member names of a zip, the first 10,000 of a larger one (a bound on what a central directory
    may ask); [] for a file that is not a zip or a damaged one."""
    import zipfile

    from transferkit.weights.formats import HEAD_BYTES, zip_names

    def names(path):
        return zip_names(path, path.read_bytes()[:HEAD_BYTES])

    with zipfile.ZipFile(tmp_path / "small.zip", "w") as zf:
        zf.writestr("archive/data.pkl", b"")
        zf.writestr("archive/data/0", b"")
    assert names(tmp_path / "small.zip") == ["archive/data.pkl", "archive/data/0"]
    with zipfile.ZipFile(tmp_path / "many.zip", "w") as zf:
        for i in range(10_001):
            zf.writestr(f"m{i}", b"")
    many = names(tmp_path / "many.zip")
    assert (len(many), many[0], many[-1]) == (10_000, "m0", "m9999")
    (tmp_path / "cut.zip").write_bytes((tmp_path / "small.zip").read_bytes()[:40])
    (tmp_path / "other.bin").write_bytes(b"not a zip")
    assert names(tmp_path / "cut.zip") == names(tmp_path / "other.bin") == []


@pytest.mark.parametrize("need, available, refused", [
    (0, 0, None), (0, 10, None), (10, 10, None),
    (1, 0, "declares 1 bytes but only 0 remain"),
    (2_000_000, 1_999_999, "declares 2,000,000 bytes but only 1,999,999 remain"),
    (-1, 10, "declares -1 bytes but only 10 remain"),
])
def test_check_fits_allows_up_to_what_remains_and_refuses_more_or_a_negative_size(tmp_path, need, available, refused):
    """A declared size from 0 up to the bytes remaining fits (an empty blob included); more, or a negative
    one, is one line giving both sizes with thousands separators."""
    from transferkit.weights.formats.origins import check_fits

    path = tmp_path / "net.caffemodel"
    if refused is None:
        assert check_fits(path, need, available, "blob 'conv1'") is None
        return
    with pytest.raises(TransferKitError) as exc:
        check_fits(path, need, available, "blob 'conv1'")
    assert str(exc.value) == f"{path}: damaged or truncated file: blob 'conv1' {refused}; re-download or re-export it"


def test_a_readers_origins_record_is_json_text_under_fixed_keys_and_reads_back_as_its_graph():
    """Origins -> metadata strings (source_format, layers in first-seen order, once each, tensors'
    records, a count per conversion, inputs where wired, the reader's extras); layer_graph reads them
    back: each tensor's layer, each layer's type, the wired layers in the source's order, and who reads whom."""
    import json

    from transferkit.weights.formats.origins import LayerGraph, Origins, layer_graph

    origins = Origins("caffe")
    origins.tensor("conv.weight", "conv/0", "conv", "Convolution", "float32")
    origins.tensor("conv.bias", "conv/1", "conv", "Convolution", "float32")
    origins.tensor("bn.running_var", "bn/1", "bn", "BatchNorm", "float32", "divided by the scale factor", blob="1")
    origins.tensor("bn.running_mean", "bn/0", "bn", "BatchNorm", "float32", "divided by the scale factor")
    origins.tensor("scale.weight", "scale/0", "scale", "Scale", "float32")  # a layer the reader did not wire
    origins.tensor("fc.weight", "fc/0", "fc", "InnerProduct", "float16", "float16 to float32")
    origins.layer("conv", "Convolution")
    origins.inputs("conv", [])
    origins.inputs("fc", ["bn", "conv"])
    origins.inputs("bn", ["conv"])
    meta = origins.metadata(batchnorm_eps="1e-05")
    assert {k: v for k, v in meta.items() if k != "tensors"} == {
        "source_format": "caffe",
        "layers": '[["conv", "Convolution"], ["bn", "BatchNorm"], ["scale", "Scale"], ["fc", "InnerProduct"]]',
        "converted": "divided by the scale factor: 2; float16 to float32: 1",
        "inputs": '{"conv": [], "fc": ["bn", "conv"], "bn": ["conv"]}',
        "batchnorm_eps": "1e-05",
    }
    assert json.loads(meta["tensors"]) == {
        "conv.weight": {"source": "conv/0", "layer": "conv", "type": "Convolution", "dtype": "float32"},
        "conv.bias": {"source": "conv/1", "layer": "conv", "type": "Convolution", "dtype": "float32"},
        "bn.running_var": {"source": "bn/1", "layer": "bn", "type": "BatchNorm", "dtype": "float32",
                           "converted": "divided by the scale factor", "blob": "1"},
        "bn.running_mean": {"source": "bn/0", "layer": "bn", "type": "BatchNorm", "dtype": "float32",
                            "converted": "divided by the scale factor"},
        "scale.weight": {"source": "scale/0", "layer": "scale", "type": "Scale", "dtype": "float32"},
        "fc.weight": {"source": "fc/0", "layer": "fc", "type": "InnerProduct", "dtype": "float16",
                      "converted": "float16 to float32"},
    }
    graph = layer_graph(meta)
    assert graph == LayerGraph(
        {"conv.weight": "conv", "conv.bias": "conv", "bn.running_var": "bn", "bn.running_mean": "bn",
         "scale.weight": "scale", "fc.weight": "fc"},
        {"conv": "Convolution", "bn": "BatchNorm", "scale": "Scale", "fc": "InnerProduct"},
        ["conv", "bn", "fc"],
        {"conv": [], "fc": ["bn", "conv"], "bn": ["conv"]})
    assert (graph.readers("conv"), graph.readers("bn"), graph.readers("fc")) == (["bn", "fc"], ["fc"], [])
    assert graph.tensors("bn") == ["bn.running_var", "bn.running_mean"]
    assert Origins("onnx").metadata() == {"source_format": "onnx", "layers": "[]", "tensors": "{}", "converted": "none"}
    assert layer_graph(Origins("onnx").metadata()) is None  # no inputs recorded: no graph


@pytest.mark.parametrize("value, shown", [("conv1", "conv1"), (b"conv1", "conv1"), (b"conv\xff1", "conv\ufffd1"),
                                          (b"r\xc3\xa9seau", "réseau"), (bytearray(b"fc\xfe"), "fc\ufffd")])
def test_a_protobuf_string_that_is_not_utf8_is_shown_with_replacements(value, shown):
    """text(): a str as it is; bytes (a string field that is not UTF-8) decoded as UTF-8, each bad byte
    shown as U+FFFD rather than refusing the file."""
    from transferkit.weights.formats.origins import text

    assert text(value) == shown


T = torch.zeros(1)


@pytest.mark.parametrize("mapping, expected", [
    ({}, False),                          # nothing to load
    ({"w": T}, True),
    ({"w": T, "epoch": 3}, True),         # half the values tensors: still the weights
    ({"w": T, "epoch": 3, "lr": 0.1}, False),  # a third: a checkpoint holding them somewhere else
])
def test_a_state_dict_is_a_mapping_of_at_least_half_tensors(mapping, expected):
    from transferkit.weights.formats.state_dict import is_state_dict

    assert is_state_dict(mapping) is expected


def test_the_weights_are_found_under_nested_keys_with_the_trail_taken():
    from transferkit.weights.formats.state_dict import find_state_dict

    inner = {"w": T, "b": T}
    assert find_state_dict({"model": {"state_dict": inner}, "epoch": 3}) == (inner, "model.state_dict")
    top = {"w": T, "b": T, "model": {"x": T}}  # weights at the top: a nested mapping is not followed
    assert find_state_dict(top) == (top, "")
    assert find_state_dict({"epoch": 3, "notes": {}}) == ({"epoch": 3, "notes": {}}, "")
