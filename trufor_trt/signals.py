"""Stopping on SIGTERM / SIGINT after the work in hand, not in the middle of it."""

import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def signals_handled_by(handler):
    """While inside, SIGTERM and SIGINT call `handler` instead of ending the process (main thread
    only, as Python delivers signals there); the previous handlers come back on the way out."""
    previous = {number: signal.signal(number, handler) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, earlier in previous.items():
            signal.signal(number, earlier)


@contextmanager
def stop_on_signals(stop: threading.Event):
    """While inside, SIGTERM and SIGINT set `stop`: the work in hand finishes first."""
    with signals_handled_by(lambda *_: stop.set()):
        yield stop


@contextmanager
def halt_on_signals(halt: threading.Event, on_first: Callable[[int], None]):
    """While inside, the first SIGTERM / SIGINT sets `halt` and calls on_first(signal number): a
    clean stop after the work in hand. A second one ends the process at once (exit 128 + number):
    files are only ever renamed into place, and the next run removes the temporaries."""
    def handle(number, _frame):
        if halt.is_set():
            os._exit(128 + number)
        halt.set()
        on_first(number)

    with signals_handled_by(handle):
        yield halt
