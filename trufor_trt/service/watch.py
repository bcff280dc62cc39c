"""`trufor-trt watch`: analyse every image that lands in a folder, with one runner kept loaded.

The outputs on disk and results.jsonl are the record: an image whose latest record says it was
analysed (same input bytes, model, backend, precision, version) and whose outputs are still the
ones recorded is not analysed again, so a restart after a crash or `kill -9` neither loses nor
repeats an image. Originals move to --done / --failed only after their record is written, and
only if their bytes are still those analysed; the record says where they went (`filed_to`).
With --done, an image's outputs are named as its original will be there, so a camera that
reuses a file name after the first one was filed away never replaces the first one's evidence.
Symbolic links in the inbox are refused (the link goes to --failed); special files get the
decoder's reason.
"""

import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from trufor_trt.batch.analyze import AnalyzeOptions, complete_job, open_job
from trufor_trt.batch.inputs import ImageJob
from trufor_trt.batch.provenance import input_sha256
from trufor_trt.batch.records import Record, utc_now
from trufor_trt.batch.results_log import ResultsLog, SummaryError
from trufor_trt.engine.runner import Runner
from trufor_trt.errors import IncompleteImage, one_line
from trufor_trt.files import remove_stale_temporaries
from trufor_trt.service.inbox import SETTLE_SECONDS, Inbox, OriginalChanged, file_away, free_place

POLL_SECONDS = 5.0
# How long a file that reads as truncated may stay unchanged and still be taken for one its
# writer has paused in (a camera flushing its buffer late), before it is filed as failed.
RETRY_TRUNCATED_SECONDS = 30.0
LINK_REASON = ("a symbolic link: watch analyses regular files only (its target may change or vanish, and "
               "could not be filed away with its evidence); put the file itself in the inbox")
WAIT_SLICE = 0.2  # how often a wait looks at the stop flag


@dataclass(frozen=True)
class WatchOptions:
    analyze: AnalyzeOptions
    done_dir: Optional[Path] = None
    failed_dir: Optional[Path] = None
    poll: float = POLL_SECONDS  # full rescan interval, for file systems without change events
    settle: float = SETTLE_SECONDS
    retry_truncated: float = RETRY_TRUNCATED_SECONDS


class WakeUps:
    """wait(timeout) returns early when the folder changes (file-system events through
    watchfiles, in a thread of its own) or when `stop` is set; without events it just waits."""

    def __init__(self, folder: Path, stop: threading.Event, on_notice: Callable[[str], None]):
        self._changed = threading.Event()
        self._stop = stop
        self._on_notice = on_notice
        try:
            import watchfiles
        except ImportError:
            on_notice("watchfiles is not installed: polling the folder only")
            return
        threading.Thread(target=self._follow, args=(watchfiles, folder), daemon=True,
                         name="trufor-watch-events").start()

    def _follow(self, watchfiles, folder: Path) -> None:
        try:
            for _ in watchfiles.watch(folder, stop_event=self._stop, debounce=100, step=50,
                                      raise_interrupt=False):
                self._changed.set()
        except Exception as exc:  # e.g. the inotify watch limit: polling still works
            self._on_notice(f"file-system events stopped ({one_line(exc)}): polling the folder only")

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._stop.is_set() and not self._changed.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._changed.wait(min(left, WAIT_SLICE))
        self._changed.clear()


def _analysed_sha256(record: Record) -> Optional[str]:
    return (record.provenance or {}).get("input_sha256")


class Watch:
    """The loop: scan, analyse what has settled (one image at a time), file the originals
    away, wait for a change or the next poll; until `stop` is set."""

    def __init__(self, inbox: Path, runner: Runner, options: WatchOptions, stop: threading.Event,
                 on_record: Callable[[Record], None], on_notice: Callable[[str], None], guard=None):
        self.runner, self.options, self.stop, self.guard = runner, options, stop, guard
        self.on_record, self.on_notice = on_record, on_notice
        out_dir = options.analyze.out_dir
        self.inbox = Inbox(inbox, options.settle,
                           exclude=[folder for folder in (out_dir, options.done_dir, options.failed_dir) if folder])
        self.handled = {}  # path -> (size, mtime_ns) when this run handled it

    def run(self) -> dict:
        """Counts of this run's records per status."""
        for folder in (self.options.done_dir, self.options.failed_dir):
            if folder is not None and folder.is_dir():  # copies a killed watch left half-made
                remove_stale_temporaries(folder)
        with ResultsLog(self.options.analyze.out_dir) as log:
            wake_ups = WakeUps(self.inbox.folder, self.stop, self.on_notice)
            while not self.stop.is_set():
                if self._pass(log):
                    self._rewrite_summary(log)
                wake_ups.wait(self.options.settle / 2 if self.inbox.settling() else self.options.poll)
        return log.summary

    def _rewrite_summary(self, log: ResultsLog) -> None:
        try:
            log.write_summary()
        except SummaryError as exc:  # a full disk: the watch goes on, results.jsonl has it all
            self.on_notice(str(exc))

    def _pass(self, log: ResultsLog) -> bool:
        """Handle every settled image not handled yet; whether any record was written."""
        wrote = False
        for job, key in self.inbox.scan():
            if self.stop.is_set():
                break
            if self.handled.get(job.path) == key:
                continue
            self.handled[job.path] = key
            wrote |= self._handle(job, log)
        return wrote

    def _named_as_filed(self, job: ImageJob, earlier: Optional[dict]) -> ImageJob:
        """With --done: the job, its output name that of the place its original will take."""
        if self.options.done_dir is None:
            return job
        place = self._place(self.options.done_dir, job.relative, earlier)
        return replace(job, relative=place.relative_to(self.options.done_dir).as_posix())

    @staticmethod
    def _place(folder: Path, relative: str, earlier: Optional[Record]) -> Path:
        """Where the original goes in `folder`: where its record says, after a restart that came
        between the record and the move; else the first free name."""
        recorded = Path(earlier.filed_to) if earlier and earlier.filed_to else None
        if recorded is not None and recorded.parent.is_relative_to(folder) and not recorded.exists():
            return recorded
        return free_place(Path(folder) / relative)

    def _refuse_link(self, job: ImageJob, log: ResultsLog) -> bool:
        """A symbolic link is not analysed: what it points to may change or vanish, and the
        original could not be filed away with its evidence. The link itself goes to --failed."""
        record = Record(str(job.path), status="error", reason=LINK_REASON, backend=self.runner.backend,
                        precision=self.runner.precision, analysed_at=utc_now())
        place = self._destination(job.relative, record)
        if place is not None:
            try:
                place.parent.mkdir(parents=True, exist_ok=True)
                os.rename(job.path, place)
                record.filed_to = str(place)
            except OSError as exc:
                self.on_notice(f"could not move the link {job.path} to {place}: {one_line(exc)}")
        log.add(record)
        self.on_record(record)
        return True

    def _handle(self, job: ImageJob, log: ResultsLog) -> bool:
        """Analyse the image unless its record stands already; file its original away. Whether
        a record was written."""
        if job.path.is_symlink():
            return self._refuse_link(job, log)
        earlier = log.index.latest.get(str(job.path))
        inbox_name, job = job.relative, self._named_as_filed(job, earlier)
        holder = log.index.holder(job.relative)
        flight = open_job(job, self.runner, self.options.analyze, holder)
        analysed = not (earlier is not None and earlier is holder and flight.result.record.status == "skipped")
        result = complete_job(flight, self.runner, self.options.analyze, self.guard) if analysed else None
        if result is not None and self._may_be_unfinished(job.path, result.error):
            self.handled.pop(job.path, None)  # tried again on a later pass; no record yet
            return False
        record = result.record if analysed else earlier
        place = self._destination(inbox_name if record.status == "error" else job.relative, record)
        if place is not None and input_sha256(job.path) != _analysed_sha256(record):
            self._changed_since(job)
            place = None
        if analysed:
            record.filed_to = str(place) if place is not None else None
            log.add(record)
            self.on_record(record)
        if place is not None:
            self._file_away(job, record, place)
        return analysed

    def _may_be_unfinished(self, path: Path, error) -> bool:
        """Whether a file that reads as truncated was changed recently enough that its writer
        may only have paused (it is then tried again, not filed as failed)."""
        if not isinstance(error, IncompleteImage):
            return False
        try:
            return time.time() - path.stat().st_mtime < self.options.retry_truncated
        except OSError:  # gone meanwhile
            return False

    def _changed_since(self, job: ImageJob) -> None:
        self.handled.pop(job.path, None)  # its new bytes are analysed on a later pass
        self.on_notice(f"{job.path} changed after it was analysed: left in place, to be analysed again")

    def _destination(self, relative: str, record: Record) -> Optional[Path]:
        folder = self.options.failed_dir if record.status == "error" else self.options.done_dir
        return None if folder is None else self._place(folder, relative, record)

    def _file_away(self, job: ImageJob, record: Record, place: Path) -> None:
        try:
            filed = file_away(job.path, place, _analysed_sha256(record))
        except OriginalChanged:  # in the instant since it was checked
            self._changed_since(job)
            return
        except OSError as exc:
            self.on_notice(f"could not move {job.path} to {place}: {one_line(exc)}")
            return
        if filed != place:
            self.on_notice(f"{job.path} filed as {filed}: {place} was taken meanwhile")
