"""Shared fuzzing settings and byte mutations.

The normal suite runs a fixed, derandomised set of examples per reader (the same every run, a few
seconds in all); FUZZ_EXAMPLES=N runs N random examples per reader instead (`make fuzz`).
"""

from __future__ import annotations

import os
import time

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

LONG = "FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
SETTINGS = settings(max_examples=EXAMPLES, derandomize=not LONG, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SECONDS_PER_CALL = 5.0  # a reader given any file answers within this (the bound on time)

INTERESTING = [b"\x00", b"\xff", b"\xff" * 8, b"\x7f\xff\xff\xff", b"\x00" * 8, b"-1", b"1e999", b"nan", b"{",
               b"[", b"\"", b"\n", b"PK\x03\x04", b"\x1f\x8b", b"\x93NUMPY", b"9" * 20]


@st.composite
def mutated(draw, data: bytes, max_edits: int = 4) -> bytes:
    """`data` with 1..max_edits edits: a byte changed, bytes inserted (often magic numbers or huge
    values), a range deleted, or the tail cut off."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, max_edits))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "overwrite"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            out[at:at] = draw(st.sampled_from(INTERESTING) | st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del out[at:at + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del out[at:]
        else:
            piece = draw(st.sampled_from(INTERESTING))
            out[at:at + len(piece)] = piece
    return bytes(out)


def returns_or_refuses(call, *allowed: type[BaseException]):
    """Call `call()`: it returns, or raises TransferKitError (one line) or one of `allowed`; in bounded time."""
    from transferkit.errors import TransferKitError

    start = time.perf_counter()
    try:
        return call()
    except TransferKitError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 2000, str(exc)[:3000]
    except allowed:
        pass
    finally:
        assert time.perf_counter() - start < SECONDS_PER_CALL
