"""Per-client-address bookkeeping for the request guards: failures in a sliding window (failed API tokens)
and counts of work in progress (uploads being received). Memory stays bounded by `max_keys`."""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque


class FailureWindow:
    """At most `limit` failures per key within `window_s`; past that, the key waits (Retry-After)."""

    def __init__(self, limit: int, window_s: float, max_keys: int = 10_000):
        self.limit, self.window_s, self.max_keys = limit, window_s, max_keys
        self._fails: dict[str, deque[float]] = {}

    def retry_after(self, key: str) -> int | None:
        """Seconds until `key` may try again, or None if it is under the limit."""
        fails = self._recent(key)
        if len(fails) < self.limit:
            return None
        return max(1, math.ceil(fails[0] + self.window_s - time.monotonic()))

    def fail(self, key: str) -> None:
        if key not in self._fails and len(self._fails) >= self.max_keys:
            self._prune()
        self._fails.setdefault(key, deque()).append(time.monotonic())

    def _recent(self, key: str) -> deque[float]:
        fails = self._fails.get(key, deque())
        horizon = time.monotonic() - self.window_s
        while fails and fails[0] < horizon:
            fails.popleft()
        while len(fails) > self.limit:
            fails.popleft()
        return fails

    def _prune(self) -> None:
        """Forget keys with no recent failure; if still full, the oldest half."""
        for key in [k for k in self._fails if not self._recent(k)]:
            del self._fails[key]
        if len(self._fails) >= self.max_keys:
            oldest = sorted(self._fails, key=lambda k: self._fails[k][-1])[: self.max_keys // 2]
            for key in oldest:
                del self._fails[key]


class PerKeyCount:
    """How many things each key has in progress, each key capped at `limit`."""

    def __init__(self, limit: int):
        self.limit = limit
        self._count: defaultdict[str, int] = defaultdict(int)

    def acquire(self, key: str) -> bool:
        if self._count[key] >= self.limit:
            return False
        self._count[key] += 1
        return True

    def release(self, key: str) -> None:
        self._count[key] -= 1
        if self._count[key] <= 0:
            del self._count[key]
