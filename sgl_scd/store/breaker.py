"""Circuit breaker: after the backend fails, skip it for a growing while instead of paying
a connect/op timeout on every request. The first call after the pause probes the
backend again (half-open); success closes the breaker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Breaker:
    """Thread-safe. ``allow()`` reads; ``success()`` / ``failure()`` mutate the state."""

    def __init__(
        self,
        base_s: float = 0.5,
        max_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= base_s <= max_s:
            raise ValueError(f"Breaker: need 0 <= base_s ({base_s}) <= max_s ({max_s})")
        self._base_s, self._max_s, self._clock = base_s, max_s, clock
        self._lock = threading.Lock()
        self._failures = 0
        self._open_until = 0.0

    def allow(self) -> bool:
        """True unless a recent failure's pause is still running."""
        with self._lock:
            return self._clock() >= self._open_until

    def success(self) -> None:
        with self._lock:
            self._failures = 0
            self._open_until = 0.0

    def failure(self) -> None:
        """Open for base_s * 2**(consecutive failures - 1), capped at max_s."""
        with self._lock:
            pause = min(self._base_s * 2 ** min(self._failures, 30), self._max_s)
            self._failures += 1
            self._open_until = self._clock() + pause

    @property
    def consecutive_failures(self) -> int:
        with self._lock:
            return self._failures
