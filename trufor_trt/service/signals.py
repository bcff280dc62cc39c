"""Stopping on SIGTERM / SIGINT after the work in hand, not in the middle of it."""

import signal
import threading
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def stop_on_signals(stop: threading.Event):
    """While inside, SIGTERM and SIGINT set `stop` instead of ending the process (main thread
    only, as Python delivers signals there); the previous handlers come back on the way out."""
    previous = {number: signal.signal(number, lambda *_: stop.set()) for number in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
