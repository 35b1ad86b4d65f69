"""Who may write a run directory. A run is marked the moment its folder is made (`.transferkit-run`,
written first), so telling a run from a folder of the user's own is exact; a new run never goes
into a folder that holds anything else, nor over another run; and one process at a time holds a
run (an advisory lock, `filelock`, that the kernel releases when the process dies, however it dies).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from filelock import FileLock, Timeout

from transferkit.errors import TransferKitError
from transferkit.training.resume import STATES

MARKER = ".transferkit-run"  # {"format": 1}: this folder is a transferkit run
LOCK = ".transferkit-run.lock"  # held (flock) by the one process that writes the run
HOLDER = ".transferkit-run.pid"  # that process's id, for the message a second process gets
FORMAT = 1
OWN = frozenset({MARKER, LOCK, HOLDER})


def is_marked(run_dir: Path) -> bool:
    return (run_dir / MARKER).is_file()


def is_unmarked_run(run_dir: Path) -> bool:
    """A run written before runs were marked: its config and training states."""
    return (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "states").is_dir()


def has_started(run_dir: Path) -> bool:
    """A run has started once it wrote its config (after its data and weights were read)."""
    return (run_dir / "config.yaml").is_file()


def already_a_run(run_dir: Path) -> TransferKitError:
    """The refusal of a new run over a started one: with the command that continues it, or, when it
    stopped before saving a training state, the news that there is nothing to continue."""
    if any((run_dir / STATES).glob("step-*")):
        return TransferKitError(f"{run_dir} already holds a run; continue it with: transferkit train --resume "
                                f"{run_dir} (add --epochs N to extend it), or choose another --out")
    return TransferKitError(f"{run_dir} already holds a run that stopped before it saved a training state, so there "
                            f"is nothing to resume; choose another --out, or remove {run_dir} to start it again")


def refuse_unusable_out(run_dir: Path) -> None:
    """A new run's folder must be new, empty, or a run (which the lock and has_started judge next).
    A run written before runs were marked is refused here. Nothing is written."""
    if run_dir.exists() and not run_dir.is_dir():
        raise TransferKitError(f"--out {run_dir} is a file, not a folder; give a new folder for the run")
    if not run_dir.is_dir() or is_marked(run_dir):
        return
    if is_unmarked_run(run_dir):
        raise already_a_run(run_dir)
    others = sorted(p.name for p in run_dir.iterdir() if p.name not in OWN)
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise TransferKitError(
            f"--out {run_dir} is not empty and is not a transferkit run (it holds {shown}); "
            "give a new or empty folder for the run"
        )


def mark(run_dir: Path) -> bool:
    """Write the marker, first of all files; True when this call made the folder."""
    made = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:  # exclusive create: one writer, with the umask's permissions like any other tool's file
        fd = os.open(run_dir / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return made
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"format": FORMAT}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return made


class RunLock:
    """The advisory lock on a run for as long as this process works on it; its id beside it."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.lock = FileLock(str(run_dir / LOCK))

    def acquire(self) -> RunLock:
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise TransferKitError(
                f"{self.run_dir} is in use by process {self.holder()} (a train or resume of this run); "
                "wait for it to end or stop it, then try again"
            ) from None
        with open(self.run_dir / HOLDER, "w", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()}\n")
        return self

    def holder(self) -> str:
        """The holder's process id; it writes it just after taking the lock, so wait a moment for it."""
        for _ in range(20):
            try:
                pid = (self.run_dir / HOLDER).read_text(encoding="utf-8").strip()
            except OSError:
                pid = ""
            if pid.isdigit():
                return pid
            time.sleep(0.05)
        return "(id not recorded)"

    def release(self) -> None:
        if self.lock.is_locked:
            (self.run_dir / HOLDER).unlink(missing_ok=True)  # before the lock goes: the next holder writes its own
            self.lock.release()


class RunClaim:
    """A run directory held by this process (`with claim:`). A new run that fails before it starts
    (a data or weights error) leaves nothing behind: its marker and lock go, and the folder if it
    made it."""

    def __init__(self, run_dir: Path, lock: RunLock, made: bool = False, new: bool = False):
        self.run_dir, self.lock, self.made, self.new = run_dir, lock, made, new

    def __enter__(self) -> Path:
        return self.run_dir

    def __exit__(self, exc_type, exc, tb) -> None:
        failed_start = exc_type is not None and self.new and not has_started(self.run_dir)
        try:
            if failed_start:  # removed while still held, so no other process can be in between
                for name in (MARKER, HOLDER, LOCK):
                    (self.run_dir / name).unlink(missing_ok=True)
        finally:
            self.lock.release()
        if failed_start and self.made and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()


def claim_new_run(run_dir: Path) -> RunClaim:
    """Refuse a folder that is not ours; mark a new or empty one (first of all files) and lock it; a
    run is refused by its lock while another process holds it, else because it has started."""
    refuse_unusable_out(run_dir)
    made = mark(run_dir)
    lock = RunLock(run_dir).acquire()
    if has_started(run_dir):
        lock.release()
        raise already_a_run(run_dir)
    return RunClaim(run_dir, lock, made, new=True)


def claim_run_to_resume(run_dir: Path) -> RunClaim:
    """Lock a run to continue it; a run from before runs were marked gets its marker once locked."""
    if not run_dir.is_dir() or not (is_marked(run_dir) or is_unmarked_run(run_dir)):
        raise TransferKitError(f"{run_dir} is not a run directory; give the --out of a train run to --resume")
    lock = RunLock(run_dir).acquire()
    mark(run_dir)
    return RunClaim(run_dir, lock)
