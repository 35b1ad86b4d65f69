"""Weights sources: downloads (against a loopback server), archives, packages."""

import hashlib
import http.server
import io
import re
import tarfile
import threading
import zipfile

import pytest
import torch

from transferkit.errors import TransferKitError
from transferkit.weights.formats import read_weights
from transferkit.weights.sources import download, resolve_source


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves the bytes in `files`, honouring `Range: bytes=N-`; counts requests."""

    files: dict[str, bytes] = {}
    requests: list[tuple[str, str | None]] = []
    ignore_range = False  # a server that answers every request with the whole file (200)

    def do_GET(self):  # noqa: N802
        self.requests.append((self.path, self.headers.get("Range")))
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range") and not self.ignore_range:
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
            if start >= len(body):  # as real servers answer a range past the end
                self.send_error(416)
                return
            self.send_response(206)
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    RangeHandler.files, RangeHandler.requests, RangeHandler.ignore_range = {}, [], False
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", RangeHandler
    httpd.shutdown()
    httpd.server_close()


def checkpoint_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"conv.weight": torch.arange(600.0).reshape(6, 100)}, buf)
    return buf.getvalue()


def test_download_once_with_sha256(server):
    base, handler = server
    data = checkpoint_bytes()
    handler.files["/w.pth"] = data
    digest = hashlib.sha256(data).hexdigest()
    path = resolve_source(f"{base}/w.pth", sha256=digest)
    assert path.read_bytes() == data
    assert torch.equal(read_weights(path).tensors["conv.weight"], torch.arange(600.0).reshape(6, 100))
    assert resolve_source(f"{base}/w.pth", sha256=digest) == path
    assert len(handler.requests) == 1  # cached: the second call did not download


def test_download_sha256_mismatch_leaves_nothing(server, tmp_path):
    base, handler = server
    handler.files["/w.pth"] = checkpoint_bytes()
    with pytest.raises(TransferKitError, match="expected 0+; the file was removed"):
        resolve_source(f"{base}/w.pth", sha256="0" * 64)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_download_resumes_a_partial_file(server, tmp_path):
    base, handler = server
    data = checkpoint_bytes()
    handler.files["/w.pth"] = data
    dest_dir = tmp_path / "dl"
    first = download(f"{base}/w.pth", dest_dir=dest_dir)  # learn the cache name
    part = first.with_name(first.name + ".part")
    first.rename(part)
    part.write_bytes(data[:1000])
    again = download(f"{base}/w.pth", dest_dir=dest_dir)
    assert again.read_bytes() == data
    assert handler.requests[-1] == ("/w.pth", "bytes=1000-")


def test_downloads_land_in_the_cache_one_file_per_url(server, tmp_path):
    """Without dest_dir a download lands in $TRANSFERKIT_CACHE/downloads, named by the URL's last part
    (`weights` when it has none) after a tag of the URL, so two URLs ending in the same name never
    share a file."""
    base, handler = server
    handler.files.update({"/a/w.pth": b"first", "/b/w.pth": b"second", "/": b"bare"})
    a, b = download(f"{base}/a/w.pth"), download(f"{base}/b/w.pth")
    bare = download(f"{base}/")
    assert a.parent == b.parent == bare.parent == tmp_path / "cache" / "downloads"
    assert (a.read_bytes(), b.read_bytes(), bare.read_bytes()) == (b"first", b"second", b"bare")
    assert a.name.endswith("-w.pth") and b.name.endswith("-w.pth") and a != b
    assert bare.name.endswith("-weights")
    assert download(f"{base}/a/w.pth") == a and len(handler.requests) == 3


def test_a_server_that_ignores_the_range_restarts_the_file(server, tmp_path):
    base, handler = server
    data = checkpoint_bytes()
    handler.files["/w.pth"] = data
    handler.ignore_range = True
    first = download(f"{base}/w.pth", dest_dir=tmp_path / "dl")
    part = first.with_name(first.name + ".part")
    first.rename(part)
    part.write_bytes(data[:1000])
    again = download(f"{base}/w.pth", dest_dir=tmp_path / "dl")
    assert handler.requests[-1] == ("/w.pth", "bytes=1000-")  # asked for the rest, got the whole file
    assert again.read_bytes() == data  # written over, not appended to the partial


def test_a_complete_partial_file_is_finished_on_http_416(server, tmp_path):
    """A download stopped after its last byte but before the rename: the server answers the range
    past the end with 416, and the partial file, checked by its sha256, is the download."""
    base, handler = server
    data = checkpoint_bytes()
    handler.files["/w.pth"] = data
    first = download(f"{base}/w.pth", dest_dir=tmp_path / "dl")
    first.rename(first.with_name(first.name + ".part"))
    again = download(f"{base}/w.pth", sha256=hashlib.sha256(data).hexdigest(), dest_dir=tmp_path / "dl")
    assert again == first and again.read_bytes() == data
    assert handler.requests[-1] == ("/w.pth", f"bytes={len(data)}-")


def test_an_http_error_while_resuming_is_not_taken_for_a_finished_file(server, tmp_path):
    base, handler = server
    handler.files["/w.pth"] = checkpoint_bytes()
    first = download(f"{base}/w.pth", dest_dir=tmp_path / "dl")
    part = first.with_name(first.name + ".part")
    first.rename(part)
    part.write_bytes(b"partial")
    del handler.files["/w.pth"]  # gone from the server: 404 on the resume
    with pytest.raises(TransferKitError, match="failed: HTTP 404"):
        download(f"{base}/w.pth", dest_dir=tmp_path / "dl")
    assert not first.exists() and part.read_bytes() == b"partial"


def test_a_server_that_stops_answering_times_out_in_one_line(tmp_path, monkeypatch):
    """A connection that opens and then says nothing ends with a one-line error after
    sources.DOWNLOAD_TIMEOUT_S, instead of waiting for ever."""
    import socket

    from transferkit.weights import sources

    monkeypatch.setattr(sources, "DOWNLOAD_TIMEOUT_S", 0.5)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()  # accepts (the kernel does) and never answers
    result: list = []

    def fetch():
        try:
            download(f"http://127.0.0.1:{listener.getsockname()[1]}/w.pth", dest_dir=tmp_path)
        except TransferKitError as exc:
            result.append(str(exc))

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    thread.join(10)
    listener.close()
    assert not thread.is_alive(), "the download waited for ever"
    assert result and "timed out" in result[0] and "rerun to resume" in result[0], result


def test_hf_hub_sources_try_safetensors_then_bin(tmp_path, monkeypatch):
    """hf-hub:NAME goes through huggingface_hub (its own cache under ours): model.safetensors first,
    pytorch_model.bin when that fails, one line when both fail or the library is missing."""
    import sys

    import huggingface_hub

    calls = []

    def fake_download(repo, filename, cache_dir):
        calls.append((repo, filename, cache_dir))
        if filename in available:
            return str(tmp_path / filename)
        raise OSError("not on the hub")

    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    hub = str(tmp_path / "cache" / "hub")
    available = {"model.safetensors", "pytorch_model.bin"}
    assert resolve_source("hf-hub:org/net") == tmp_path / "model.safetensors"
    assert calls == [("org/net", "model.safetensors", hub)]
    calls.clear()
    available = {"pytorch_model.bin"}
    assert resolve_source("hf-hub:org/net") == tmp_path / "pytorch_model.bin"
    assert calls == [("org/net", "model.safetensors", hub), ("org/net", "pytorch_model.bin", hub)]
    available = set()
    with pytest.raises(TransferKitError, match=r"^could not fetch 'org/net' from the Hugging Face hub"):
        resolve_source("hf-hub:org/net")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(TransferKitError, match=r"^hf-hub sources need huggingface_hub: pip install"):
        resolve_source("hf-hub:org/net")


def test_download_errors_are_one_line(server):
    base, _ = server
    with pytest.raises(TransferKitError, match=r"download of .*/missing.pth failed: HTTP 404"):
        resolve_source(f"{base}/missing.pth")


def _tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_archives(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    data = checkpoint_bytes()
    one = _tar(tmp_path / "model.tar.gz", {"model/README": b"hi", "model/model.pth": data})
    assert resolve_source(one).read_bytes() == data
    two = tmp_path / "two.zip"
    with zipfile.ZipFile(two, "w") as zf:
        zf.writestr("a/first.pth", data)
        zf.writestr("a/second.safetensors", b"x")
    with pytest.raises(TransferKitError, match=re.escape(
            f"archive {two} must hold exactly one weights file to be used as a source (found: a/first.pth, "
            "a/second.safetensors); name one as SOURCE#path/inside")):
        resolve_source(two)
    assert resolve_source(f"{two}#a/first.pth").read_bytes() == data
    with pytest.raises(TransferKitError, match=re.escape(f"'a/none.pth' is not in archive {two}")):
        resolve_source(f"{two}#a/none.pth")
    plain = tmp_path / "plain.pth"
    plain.write_bytes(data)
    with pytest.raises(TransferKitError, match=re.escape(
            f"{plain} is not an archive; '#a/first.pth' names a file inside an archive")):
        resolve_source(f"{plain}#a/first.pth")


def test_archive_path_traversal_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    evil = _tar(tmp_path / "evil.tar.gz", {"../../escaped.pth": checkpoint_bytes()})
    with pytest.raises(TransferKitError, match="points outside the archive"):
        resolve_source(evil)
    assert not list(tmp_path.rglob("escaped.pth"))
    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as tf:
        info = tarfile.TarInfo("w.pth")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(TransferKitError, match="found: none"):  # links are not unpacked
        resolve_source(link)


def test_package_source_errors():
    with pytest.raises(TransferKitError, match="not installed; install it with `pip install no-such-pkg`"):
        resolve_source("package:no_such_pkg")
    with pytest.raises(TransferKitError, match="package 'json' must hold exactly one weights file"):
        resolve_source("package:json")


def test_the_cache_is_under_home_unless_transferkit_cache_is_set(tmp_path, monkeypatch):
    from transferkit.weights.sources import cache_dir

    monkeypatch.delenv("TRANSFERKIT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "transferkit"
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"


def test_an_archive_of_many_weights_files_names_the_first_six(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(8):
            zf.writestr(f"w{i}.pth", b"x")
    with pytest.raises(TransferKitError) as caught:
        resolve_source(many)
    assert "(found: w0.pth, w1.pth, w2.pth, w3.pth, w4.pth, w5.pth); name one as SOURCE#path/inside" in str(
        caught.value)


def test_a_torchvision_source_is_checked_against_the_sha256_given_too(server, monkeypatch):
    """pretrained.sha256 with a torchvision: name: the file must pass the zoo's hash prefix and the
    user's full sha256."""
    import types

    from transferkit.weights import zoo

    base, handler = server
    data = checkpoint_bytes()
    handler.files["/zoo.pth"] = data
    digest = hashlib.sha256(data).hexdigest()
    monkeypatch.setattr(zoo, "torchvision_weights", lambda name: types.SimpleNamespace(
        download_url=f"{base}/zoo.pth", sha256_prefix=digest[:8]))
    with pytest.raises(TransferKitError, match=f"expected {'0' * 64}; the file was removed"):
        resolve_source("torchvision:Any_Weights.COCO_V1", sha256="0" * 64)
    assert resolve_source("torchvision:Any_Weights.COCO_V1", sha256=digest).read_bytes() == data


def test_a_refused_connection_names_the_reason_once(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/w.pth"
    with pytest.raises(TransferKitError) as caught:
        download(url, dest_dir=tmp_path)
    message = str(caught.value)
    assert message.startswith(f"download of {url} failed ([Errno ") and "Connection refused" in message
    assert message.endswith("); rerun to resume, or download it yourself and give the path")
    assert "urlopen error" not in message  # the reason itself, not urllib's wrapper around it


def test_what_a_source_names_a_url_a_run_folder_or_a_folder_of_files(tmp_path, monkeypatch):
    """https:// and http:// go to the download; a transferkit run folder gives its last weights; any
    other folder is refused naming it."""
    from transferkit.weights import sources

    fetched = []
    monkeypatch.setattr(sources, "download", lambda url, sha256=None: fetched.append(url) or tmp_path / "w.pth")
    (tmp_path / "w.pth").write_bytes(checkpoint_bytes())
    for url in ("https://example.org/w.pth", "http://example.org/w.pth"):
        assert resolve_source(url) == tmp_path / "w.pth"
    assert fetched == ["https://example.org/w.pth", "http://example.org/w.pth"]
    run = tmp_path / "runs" / "mine"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.safetensors").write_bytes(b"x")
    assert resolve_source(run) == run / "checkpoints" / "last.safetensors"
    with pytest.raises(TransferKitError) as caught:
        resolve_source(tmp_path / "runs")
    assert str(caught.value) == f"weights source {tmp_path / 'runs'} is a directory; give the weights file inside it"


def test_a_local_file_is_checked_against_the_sha256_given(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(checkpoint_bytes())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert resolve_source(path, sha256=digest.upper()) == path
    with pytest.raises(TransferKitError, match=f"does not match the expected sha256 {'0' * 64}$"):
        resolve_source(path, sha256="0" * 64)
