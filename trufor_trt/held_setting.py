"""A process-wide setting that must hold while any thread needs it (TF32 off while a runner
computes, the codecs silenced while a file decodes): the first user applies it, the last one
restores what was there, and threads in between neither wait for each other nor restore early."""

import threading
from contextlib import contextmanager


class HeldSetting:
    """`apply()` sets the setting and returns what it replaced; `restore(saved)` puts that back."""

    def __init__(self, apply, restore):
        self._apply, self._restore = apply, restore
        self._lock = threading.Lock()
        self._users, self._saved = 0, None

    @contextmanager
    def held(self):
        with self._lock:
            if self._users == 0:
                self._saved = self._apply()
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._restore(self._saved)
