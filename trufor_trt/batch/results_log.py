"""An output folder's results.jsonl, open for a run: the log of every run, one JSON record per
image per run (batch/records.py), and what vouches for the outputs.

One run at a time writes into a folder: the log is locked while it is open (released when it is
closed or the process dies), and a second run is refused with the reason.
"""

import json
from collections import Counter
from pathlib import Path

from trufor_trt.errors import TruforError
from trufor_trt.files import remove_stale_temporaries
from trufor_trt.batch.records import RESULTS_FILE, Record, RecordIndex, read_records
from trufor_trt.batch.summary import write_summary_csv


class OutputFolderBusy(TruforError):
    """Another run is writing into the output folder."""


class ResultsLogError(TruforError):
    """results.jsonl cannot be written: the run cannot record what it does, so it stops."""


class SummaryError(TruforError):
    """results.csv cannot be rewritten (results.jsonl holds every record)."""


def _lock(handle, out_dir: Path) -> None:
    """An exclusive lock on the open log, released when it is closed (or the process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock to take
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputFolderBusy(f"{out_dir}: another trufor-trt run is writing into this folder "
                               f"(its {RESULTS_FILE} is locked); wait for it to end or choose another "
                               "output folder") from None


def check_not_busy(out_dir) -> None:
    """OutputFolderBusy now, before any model loads, if another run holds the folder."""
    path = Path(out_dir) / RESULTS_FILE
    if path.is_file():
        with open(path, "a", encoding="utf-8") as handle:
            _lock(handle, Path(out_dir))


def _ends_mid_line(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as existing:
        existing.seek(-1, 2)
        return existing.read(1) != b"\n"


class ResultsLog:
    """An output folder's results.jsonl, locked and open for appending: one flushed line per
    record, so a killed run loses nothing it finished; results.csv is rewritten when it closes.
    `index` holds every record, earlier runs' and this one's."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.summary = Counter()  # records per status: ok, error, skipped
        self.index = RecordIndex()
        self._file = None

    def __enter__(self) -> "ResultsLog":
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.out_dir / RESULTS_FILE
            self._file = open(path, "a", encoding="utf-8")
        except OSError as exc:
            raise ResultsLogError(f"{self.out_dir / RESULTS_FILE} cannot be opened: {exc.strerror or exc}") from None
        try:
            _lock(self._file, self.out_dir)
        except OutputFolderBusy:
            self._file.close()
            raise
        remove_stale_temporaries(self.out_dir)
        self.index = RecordIndex.of(read_records(self.out_dir)[0])
        if _ends_mid_line(path):  # a run killed while writing a line: the next record starts its own
            self._write("\n")
        return self

    def _write(self, text: str) -> None:
        try:
            self._file.write(text)
            self._file.flush()
        except OSError as exc:
            raise ResultsLogError(f"{self.out_dir / RESULTS_FILE} cannot be written: {exc.strerror or exc}") from None

    def add(self, record: Record) -> None:
        self._write(json.dumps(record.to_json()) + "\n")
        self.index.add(record)
        self.summary[record.status] += 1

    def write_summary(self) -> None:
        try:
            write_summary_csv(self.out_dir, self.index)
        except OSError as exc:
            raise SummaryError(f"results.csv not rewritten ({exc.strerror or exc}); {RESULTS_FILE} "
                               "holds every record") from None

    def __exit__(self, exc_type, *exc_info) -> None:
        try:
            self.write_summary()
        except SummaryError:
            if exc_type is None:  # after a failed run the summary's own failure is not news
                raise
        finally:
            try:
                self._file.close()
            except OSError:
                pass
