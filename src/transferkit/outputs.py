"""Output folders of the data commands: nothing is replaced that the toolkit did not write.

Each folder a data command writes into keeps a manifest, `.transferkit-outputs.json`, naming every
file the toolkit wrote there with its size and modification time. Before writing anything, a
command passes the files it would replace to `OutputFolder.claim`: any that exists and is not in the
manifest, or has changed since it was written (size or time differ: the user edited or replaced
it), is the user's, and the command stops naming it, with nothing touched, unless `--force`. Files
the toolkit wrote itself are replaced on a rerun without asking. A damaged manifest counts as
empty (every file is then the user's), so the guard errs towards refusing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from transferkit.errors import TransferKitError
from transferkit.fileio import write_json

MANIFEST = ".transferkit-outputs.json"
MAX_MANIFEST_BYTES = 64 << 20


class OutputFolder:
    def __init__(self, root: str | Path, force: bool = False):
        self.root = Path(root)
        self.force = force
        self.files: dict[str, list[int]] = self._load()
        self.dirty = False

    def _load(self) -> dict[str, list[int]]:
        path = self.root / MANIFEST
        try:
            if path.stat().st_size > MAX_MANIFEST_BYTES:
                return {}
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return {}
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(files, dict):
            return {}
        return {k: v for k, v in files.items() if isinstance(v, list) and len(v) == 2}

    def _key(self, path: Path) -> str:
        return Path(os.path.relpath(path, self.root)).as_posix()

    def is_ours(self, path: Path) -> bool:
        """Written by the toolkit into this folder and unchanged since."""
        try:
            st = path.lstat()
        except OSError:
            return False
        return self.files.get(self._key(path)) == [st.st_size, st.st_mtime_ns]

    def claim(self, paths: Iterable[Path], flag: str = "--force") -> None:
        """Stop, before anything is written, if any of `paths` exists and is not the toolkit's own."""
        theirs, folders = [], []
        for path in paths:
            if path.is_dir() and not path.is_symlink():
                folders.append(path)
            elif (path.exists() or path.is_symlink()) and not self.is_ours(path):
                theirs.append(path)
        if folders:
            raise TransferKitError(f"{folders[0]} is a folder where this command writes a file; "
                                   "choose another --out or move it")
        if theirs and not self.force:
            more = f" and {len(theirs) - 1} more" if len(theirs) > 1 else ""
            raise TransferKitError(
                f"{self.root} holds files this command would replace and did not write ({theirs[0]}{more}); "
                f"nothing was changed: choose another --out, or add {flag} to replace them"
            )

    def stale(self, folder: Path, pattern: str, keep: set[Path]) -> list[Path]:
        """Files of ours under `folder` matching `pattern` that this run does not write again."""
        keep = {p.resolve() for p in keep}
        return [p for p in sorted(folder.glob(pattern)) if p.resolve() not in keep and self.is_ours(p)]

    def wrote(self, path: Path) -> None:
        st = path.lstat()
        self.files[self._key(path)] = [st.st_size, st.st_mtime_ns]
        self.dirty = True

    def forget(self, path: Path) -> None:
        self.files.pop(self._key(path), None)
        self.dirty = True

    def save(self) -> None:
        live = {k: v for k, v in self.files.items() if (self.root / k).exists()}
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.root / MANIFEST, {"about": "files transferkit wrote here (size, mtime_ns)", "files": live})


@contextmanager
def output_folder(root: str | Path, force: bool = False) -> Iterator[OutputFolder]:
    """An OutputFolder whose manifest is saved on the way out, even when the command fails half-way:
    what it did write is then known as the toolkit's own and a rerun may replace it."""
    folder = OutputFolder(root, force)
    try:
        yield folder
    finally:
        if folder.dirty:
            folder.save()
