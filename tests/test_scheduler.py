"""The model thread's scheduler with plain generators (no model needed): fair turns, cancel,
capacity, failures isolated."""

import threading
import time

import pytest

from sgl_scd.serving.scheduler import Busy, Scheduler


class Listener:
    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, kind, value):
        self.events.append((kind, value))
        if kind != "token":
            self.done.set()

    def tokens(self):
        return [v for k, v in self.events if k == "token"]


def _run(scheduler, steps):
    listener = Listener()
    return scheduler.submit(steps, listener), listener


def test_running_requests_take_turns_one_token_each():
    order = []

    def steps(tag, n):
        for i in range(n):
            order.append(tag)
            yield i

    s = Scheduler(max_running=2)
    gate = threading.Event()

    def first():  # holds the thread until both requests are queued, so both run from turn one
        gate.wait(5)
        yield from steps("a", 3)

    (_, la), (_, lb) = _run(s, first()), _run(s, steps("b", 3))
    gate.set()
    assert la.done.wait(5) and lb.done.wait(5)
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert la.tokens() == [0, 1, 2] and la.events[-1] == ("done", None)
    s.close()


def test_cancel_closes_the_generator_at_its_next_turn():
    closed = threading.Event()

    def endless():
        try:
            while True:
                time.sleep(0.01)
                yield 1
        finally:
            closed.set()

    s = Scheduler()
    ticket, listener = _run(s, endless())
    time.sleep(0.1)
    ticket.cancel()
    assert listener.done.wait(5) and closed.wait(5)
    assert listener.events[-1] == ("cancelled", None)
    s.close()


def test_a_failing_request_fails_alone():
    def bad():
        yield 1
        raise RuntimeError("boom")

    s = Scheduler()
    (_, lbad), (_, lok) = _run(s, bad()), _run(s, iter(range(4)))
    assert lbad.done.wait(5) and lok.done.wait(5)
    assert lbad.events[-1][0] == "error" and "boom" in str(lbad.events[-1][1])
    assert lok.tokens() == [0, 1, 2, 3]
    s.close()


def test_a_full_queue_refuses_naming_its_size():
    gate = threading.Event()

    def blocked():
        gate.wait(5)
        yield 0

    s = Scheduler(max_running=1, max_queued=1)
    _run(s, blocked())
    time.sleep(0.1)  # the first is running, holding the thread
    _run(s, iter(()))  # waits
    with pytest.raises(Busy, match="1 requests"):
        _run(s, iter(()))
    gate.set()
    s.close()


def test_a_listener_that_fails_cancels_only_its_request():
    def broken(kind, value):
        raise RuntimeError("listener gone")

    s = Scheduler()
    s.submit(iter(range(100)), broken)
    _, ok = _run(s, iter(range(3)))
    assert ok.done.wait(5) and ok.tokens() == [0, 1, 2]
    s.close()


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="0"):
        Scheduler(max_running=0)
