"""Tools a test server loads through `tools.modules`: typed, slow, crashing, and one that
needs a person's approval and counts its runs in a file (to check it runs exactly once)."""

from __future__ import annotations

import os
import time
from typing import Literal

import llmos


@llmos.tool
def typed(n: int, tags: list[str], mode: Literal["fast", "slow"] = "fast", ratio: float | None = None) -> dict:
    """Echo typed arguments back.

    Args:
        n: a count
        tags: labels to attach
        mode: how to go
        ratio: an optional fraction
    """
    return {"n": n, "tags": tags, "mode": mode, "ratio": ratio}


@llmos.tool(timeout=1.0)
def hang(seconds: float) -> str:
    """Sleep (longer than its 1 s deadline when asked to)."""
    time.sleep(seconds)
    return "woke"


@llmos.tool
def crash(message: str) -> str:
    """Fail with an exception."""
    raise RuntimeError(f"tool crashed: {message}")


@llmos.tool(needs_approval=True)
def transfer(amount: int, to: str) -> dict:
    """Move money (a person must approve each call). Appends a line per run to $LLMOS_TEST_LEDGER."""
    with open(os.environ["LLMOS_TEST_LEDGER"], "a") as f:
        f.write(f"{amount} {to}\n")
    return {"sent": amount, "to": to}
