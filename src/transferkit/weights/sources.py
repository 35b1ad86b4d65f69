"""Resolve a weights source to a local file.

Forms:
  PATH                  a local weights file, or an archive (tar, tar.gz/bz2/xz, .zip) holding one
  PATH_OR_URL#MEMBER    one file inside an archive
  https://...           downloaded once into the cache (resumable, atomic, sha256-checked)
  package:NAME          an installed Python package that ships exactly one weights file
  RUN_DIR               a transferkit run directory: its checkpoints/last.safetensors
  hf-hub:ORG/NAME       a Hugging Face hub model (needs network; through huggingface_hub)
  torchvision:NAME      torchvision's model zoo by Weights enum name (weights/zoo.py), downloaded as a URL

The cache is $TRANSFERKIT_CACHE, else ~/.cache/transferkit.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

from transferkit.errors import TransferKitError
from transferkit.weights import archives, zoo
from transferkit.weights.formats.tf_checkpoint import checkpoint_index

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".npz")
# Seconds a download waits for the server to answer or send the next bytes before it gives up.
DOWNLOAD_TIMEOUT_S = 60


def cache_dir() -> Path:
    return Path(os.environ.get("TRANSFERKIT_CACHE") or Path.home() / ".cache" / "transferkit")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _single_weights_file(root: Path, what: str) -> Path:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if len(files) != 1:
        found = ", ".join(str(p.relative_to(root)) for p in files[:6]) or "none"
        raise TransferKitError(
            f"{what} must hold exactly one weights file to be used as a source (found: {found}); "
            f"name one as SOURCE#path/inside"
        )
    return files[0]


def package_weights(package: str) -> Path:
    """The single weights file shipped inside an installed package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise TransferKitError(
            f"weights package {package!r} is not installed; install it with `pip install {pip_name}`"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    return _single_weights_file(root, f"package {package!r}")


def download(url: str, sha256: str | None = None, dest_dir: Path | None = None,
             sha256_prefix: str | None = None) -> Path:
    """Fetch `url` into the cache once. A partial download resumes; the file appears only when
    complete (and, with `sha256` or the `sha256_prefix` torch.hub checks, verified)."""
    dest_dir = dest_dir or cache_dir() / "downloads"
    name = PurePosixPath(urllib.parse.urlparse(url).path).name or "weights"
    tag = hashlib.sha256(url.encode()).hexdigest()[:12]
    dest = dest_dir / f"{tag}-{name}"
    expected = (sha256 or sha256_prefix or "").lower()
    if dest.exists():
        if expected and not sha256_of(dest).startswith(expected):
            dest.unlink()  # a cached file that no longer verifies is fetched again
        else:
            return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            if have and resp.status != 206:  # the server ignored Range: start over
                have = 0
            with open(part, "ab" if have else "wb") as fh:
                shutil.copyfileobj(resp, fh, 1 << 20)
                fh.flush()
                os.fsync(fh.fileno())
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # already complete
            pass
        else:
            raise TransferKitError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TransferKitError(
            f"download of {url} failed ({reason}); rerun to resume, or download it yourself and give the path"
        ) from None
    if expected:
        got = sha256_of(part)
        if not got.startswith(expected):
            part.unlink()
            what = f"expected {sha256}" if sha256 else f"expected one starting {sha256_prefix}"
            raise TransferKitError(
                f"download of {url} has sha256 {got}, {what}; the file was removed, check the URL"
            )
    os.replace(part, dest)
    return dest


def unpack(archive: Path, dest_root: Path | None = None) -> Path:
    """Unpack an archive once into the cache (weights/archives.py: bounded, no escaping members, no links)."""
    dest_root = dest_root or cache_dir() / "unpacked"
    return archives.unpack(archive, dest_root / f"{sha256_of(archive)[:16]}-{archive.name}")


def _is_archive(path: Path) -> bool:
    return path.is_file() and archives.archive_kind(path) is not None


def hub_weights(name: str) -> Path:
    try:  # deferred on purpose: an optional dependency, needed only for hf-hub: sources
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise TransferKitError("hf-hub sources need huggingface_hub: pip install huggingface_hub") from None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            return Path(hf_hub_download(name, filename, cache_dir=str(cache_dir() / "hub")))
        except Exception:  # noqa: BLE001 - any hub failure: try the next file name, then report
            continue
    raise TransferKitError(f"could not fetch {name!r} from the Hugging Face hub (no network, or no weights file)")


def resolve_source(source: str | Path, sha256: str | None = None) -> Path:
    text = str(source)
    if text.startswith("package:"):
        return package_weights(text[len("package:") :])
    if text.startswith("hf-hub:"):
        return hub_weights(text[len("hf-hub:") :])
    if text.startswith("torchvision:"):
        weights = zoo.torchvision_weights(text[len("torchvision:") :])
        return download(weights.download_url, sha256, sha256_prefix=weights.sha256_prefix)
    text, _, member = text.partition("#")
    if text.startswith(("https://", "http://")):
        path = download(text, sha256)
    else:
        path = Path(text).expanduser()
        if not path.exists() or path.is_dir():
            if (path / "checkpoints" / "last.safetensors").is_file():  # a transferkit run directory
                return path / "checkpoints" / "last.safetensors"
            index = checkpoint_index(path)  # a TF checkpoint prefix, variables/ or SavedModel folder
            if index is not None:
                return index
        if not path.exists():
            raise TransferKitError(f"weights source not found: {path} (give a file path, URL or package:NAME)")
        if path.is_dir():
            raise TransferKitError(f"weights source {path} is a directory; give the weights file inside it")
        if sha256 and sha256_of(path) != sha256.lower():
            raise TransferKitError(f"{path} does not match the expected sha256 {sha256}")
    if _is_archive(path):
        root = unpack(path)
        if member:
            inner = archives.safe_member(root, member)
            if not inner.is_file():
                raise TransferKitError(f"{member!r} is not in archive {path}")
            return inner
        return _single_weights_file(root, f"archive {path}")
    if member:
        raise TransferKitError(f"{path} is not an archive; '#{member}' names a file inside an archive")
    return path
