"""Stopping on SIGTERM / SIGINT after the work in hand, not in the middle of it."""

import signal
import threading
from contextlib import contextmanager

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
