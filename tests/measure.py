"""Running the command line in a child process and measuring it: exit code, output, seconds, peak memory."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The child reports its own peak resident set size (getrusage is per process, so earlier tests do not count).
_CHILD = """
import resource, sys, time
start = time.perf_counter()
from transferkit.cli import main
try:
    rc = main(sys.argv[1:])
finally:
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sys.stdout.flush()
    sys.stderr.write(f"\\nMEASURED {time.perf_counter() - start:.3f} {peak_kb}\\n")
sys.exit(rc)
"""


@dataclass
class Measured:
    rc: int
    stdout: str
    stderr: str  # without the measurement line
    seconds: float
    peak_rss: int  # bytes

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def run_cli(*args: object, timeout: float = 120, cwd: Path | None = None, env: dict[str, str] | None = None,
            max_file_bytes: int | None = None) -> Measured:
    """`transferkit ARGS` in a child process. `max_file_bytes`: the child is killed (SIGXFSZ) if it writes
    any file beyond that size, so a test can assert that a refusal came before the writing."""

    def limit() -> None:
        if max_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    proc = subprocess.run([sys.executable, "-c", _CHILD, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO, env={**os.environ, **(env or {})}, preexec_fn=limit)
    err, _, tail = proc.stderr.rpartition("\nMEASURED ")
    assert tail, f"the child died before measuring (exit {proc.returncode}): {proc.stderr[-2000:]}"
    seconds, peak_kb = tail.split()[:2]
    return Measured(proc.returncode, proc.stdout, err, float(seconds), int(peak_kb) * 1024)


def one_line_error(result: Measured, *names: str) -> str:
    """Exit 2, a single `error:` line on stderr naming each of `names`, and no traceback."""
    assert result.rc == 2, (result.rc, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.error_lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines[:5]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]
