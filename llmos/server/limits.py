"""Per-key limits: requests per minute, tokens per minute and requests in flight. A request
over a limit gets 429 with Retry-After saying when it would fit."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from llmos.server.errors import APIError
from llmos.server.keys import ApiKey

WINDOW = 60.0


@dataclass
class _Usage:
    requests: deque = field(default_factory=deque)   # admission times
    tokens: deque = field(default_factory=deque)     # (time, tokens) as they are counted
    active: int = 0


class Permit:
    """One admitted request's hold on its key's limits; released when the request ends."""

    def __init__(self, limiter: RateLimiter | None, key_id: str | None) -> None:
        self._limiter, self._key_id, self._released = limiter, key_id, False

    def release(self, completion_tokens: int = 0) -> None:
        if self._released or self._limiter is None:
            return
        self._released = True
        self._limiter._release(self._key_id, completion_tokens)


class RateLimiter:
    def __init__(self) -> None:
        self._usage: dict[str, _Usage] = {}
        self._lock = threading.Lock()

    def admit(self, key: ApiKey | None, prompt_tokens: int) -> Permit:
        """Count a request against its key, or raise 429 if it does not fit now."""
        if key is None or (key.rpm is None and key.tpm is None and key.max_concurrent is None):
            return Permit(None, None)
        now = time.monotonic()
        with self._lock:
            u = self._usage.setdefault(key.id, _Usage())
            while u.requests and u.requests[0] <= now - WINDOW:
                u.requests.popleft()
            while u.tokens and u.tokens[0][0] <= now - WINDOW:
                u.tokens.popleft()
            if key.max_concurrent is not None and u.active >= key.max_concurrent:
                raise _limited(f"this key allows {key.max_concurrent} request(s) at once and has {u.active} "
                               f"in flight", "concurrency_limit_exceeded", 1)
            if key.rpm is not None and len(u.requests) >= key.rpm:
                raise _limited(f"this key allows {key.rpm} request(s) per minute", "rate_limit_exceeded",
                               u.requests[0] + WINDOW - now)
            if key.tpm is not None:
                used = sum(n for _, n in u.tokens)
                if prompt_tokens > key.tpm:
                    raise _limited(f"the prompt's {prompt_tokens} tokens exceed this key's {key.tpm} tokens per "
                                   f"minute", "token_limit_exceeded", WINDOW)
                if used + prompt_tokens > key.tpm:
                    wait, freed = WINDOW, 0
                    for t, n in u.tokens:   # until enough old tokens leave the window
                        freed += n
                        if used - freed + prompt_tokens <= key.tpm:
                            wait = t + WINDOW - now
                            break
                    raise _limited(f"this key allows {key.tpm} tokens per minute and has used {used}",
                                   "token_limit_exceeded", wait)
            u.requests.append(now)
            u.tokens.append((now, prompt_tokens))
            u.active += 1
        return Permit(self, key.id)

    def _release(self, key_id: str, completion_tokens: int) -> None:
        with self._lock:
            u = self._usage[key_id]
            u.active -= 1
            if completion_tokens:
                u.tokens.append((time.monotonic(), completion_tokens))


def _limited(message: str, code: str, retry_after: float) -> APIError:
    return APIError(429, f"rate limited: {message}; retry after {math.ceil(max(retry_after, 1))} s",
                    "rate_limit_error", code=code, retry_after=math.ceil(max(retry_after, 1)))
