"""One inference at a time on a runner, with a bounded line of requests waiting behind it."""

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional


class InferenceQueue:
    """A single worker thread owns the runner (runners are not safe to call concurrently); at
    most `max_queue` jobs wait behind the one in hand, beyond that submit() refuses, so latency
    stays bounded and the caller can say "busy, retry" instead."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trufor-inference")
        self._lock = threading.Lock()
        self._admitted = 0  # waiting + in hand

    @property
    def waiting(self) -> int:
        with self._lock:
            return max(self._admitted - 1, 0)

    def reserve(self) -> bool:
        """Take a place in the line (False when it is full): a request asks before its body is
        read, so that a full line never holds request bodies in memory."""
        with self._lock:
            if self._admitted > self.max_queue:
                return False
            self._admitted += 1
            return True

    def give_back(self) -> None:
        """Return a reserved place unused (the request failed before it had an image)."""
        self._release(None)

    def run_reserved(self, work: Callable, *args) -> Future:
        """The future of work(*args), in a place reserve() took."""
        future = self._executor.submit(work, *args)
        future.add_done_callback(self._release)
        return future

    def submit(self, work: Callable, *args) -> Optional[Future]:
        """The future of work(*args), or None when the queue is full."""
        return self.run_reserved(work, *args) if self.reserve() else None

    def _release(self, _future) -> None:
        with self._lock:
            self._admitted -= 1

    def close(self, cancel_waiting: bool = False) -> None:
        """Finish the job in hand and (unless `cancel_waiting`) those waiting, then stop the worker."""
        self._executor.shutdown(wait=True, cancel_futures=cancel_waiting)
