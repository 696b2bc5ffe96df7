"""Run many requests on one model thread, fairly: round-robin, one token per request per turn.

The models are touched by this thread only. A request is a generator of tokens (the engine's
`steps`); its prefill runs at its first turn. Events go to each request's callback from this
thread (the HTTP layer forwards them to its event loop), so a slow or gone client never blocks
the thread; a cancelled request is closed at its next turn.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)


class Busy(RuntimeError):
    """The waiting queue is full."""


class Ticket:
    def __init__(self, steps: Iterator[int], on_event: Callable[[str, object], None]):
        self.steps, self.on_event = steps, on_event
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    """Events per request: ("token", id)*, then one of ("done", None), ("error", exc), ("cancelled", None)."""

    def __init__(self, max_running: int = 8, max_queued: int = 64):
        if max_running < 1 or max_queued < 1:
            raise ValueError(f"max_running and max_queued must be >= 1, got {max_running}, {max_queued}")
        self.max_running = max_running
        self._waiting: queue.Queue[Ticket | None] = queue.Queue(max_queued)
        self._running: collections.deque[Ticket] = collections.deque()
        self._closed = False
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="scd-model", daemon=True)
        self._thread.start()

    def submit(self, steps: Iterator[int], on_event: Callable[[str, object], None]) -> Ticket:
        if self._closed:
            raise Busy("the server is shutting down")
        ticket = Ticket(steps, on_event)
        try:
            self._waiting.put_nowait(ticket)
        except queue.Full:
            raise Busy(f"{self._waiting.maxsize} requests are already waiting") from None
        return ticket

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        return len(self._running), self._waiting.qsize()

    def close(self, timeout: float = 10.0) -> None:
        self._closed = True
        self._waiting.put(None)
        self._thread.join(timeout)

    def _admit(self) -> bool:
        """Move waiting requests in while there is room; False once closed and idle."""
        while len(self._running) < self.max_running and not self._stopping:
            try:
                ticket = self._waiting.get(block=not self._running)
            except queue.Empty:
                break
            if ticket is None:
                self._stopping = True
                break
            self._running.append(ticket)
        return bool(self._running) or not self._stopping

    def _loop(self) -> None:
        while self._admit():
            ticket = self._running.popleft()
            if ticket.cancelled:
                if hasattr(ticket.steps, "close"):  # a generator's cleanup runs now
                    ticket.steps.close()
                _emit(ticket, "cancelled", None)
                continue
            try:
                tok = next(ticket.steps)
            except StopIteration:
                _emit(ticket, "done", None)
                continue
            except Exception as e:  # this request fails; the others go on
                logger.exception("request failed")
                _emit(ticket, "error", e)
                continue
            _emit(ticket, "token", tok)
            self._running.append(ticket)


def _emit(ticket: Ticket, kind: str, value) -> None:
    try:
        ticket.on_event(kind, value)
    except Exception:  # a listener that is gone (closed event loop) cancels its request
        logger.warning("dropping a request whose listener failed", exc_info=True)
        ticket.cancel()
