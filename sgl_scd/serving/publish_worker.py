"""Encode + publish off the request path: one worker thread behind a bounded queue.

The producer's request hands its prefill states over and goes on decoding; when the queue is
full the job is dropped and counted (the pages are simply not shared), never waited for.
"""

from __future__ import annotations

import logging
import queue
import threading

from sgl_scd.codec.states import ProducerStates
from sgl_scd.reuse import Publisher

logger = logging.getLogger(__name__)


class PublishWorker:
    def __init__(self, publisher: Publisher, max_queued: int = 64, on_done=None):
        if max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {max_queued}")
        self.publisher = publisher
        # on_done(pages, bytes, error) once per job: error None, "queue_full" or the exception's type
        self.on_done = on_done or (lambda pages, nbytes, error: None)
        self._jobs: queue.Queue = queue.Queue(max_queued)
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="scd-publish", daemon=True)
        self._thread.start()

    def submit(self, ids: list[int], states: ProducerStates) -> bool:
        """Queue one prompt's publication; False (and counted) when the queue is full."""
        try:
            self._jobs.put_nowait((ids, states))
            return True
        except queue.Full:
            self.dropped += 1
            self.on_done(0, 0, "queue_full")
            return False

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued job is done (True) or the timeout passes (False)."""
        done = threading.Event()
        threading.Thread(target=lambda: (self._jobs.join(), done.set()), daemon=True).start()
        return done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        self.drain(timeout)
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                ids, states = job
                try:
                    blobs = self.publisher.encode(states)
                    pages = self.publisher.publish(ids, states, blobs=blobs) if blobs else 0
                    self.on_done(pages, sum(len(b) for b in blobs[:pages]), None)
                except Exception as e:  # a failed publication is a lost share, never a lost request
                    logger.exception("publishing %d tokens failed", len(ids))
                    self.on_done(0, 0, type(e).__name__)
            finally:
                self._jobs.task_done()
