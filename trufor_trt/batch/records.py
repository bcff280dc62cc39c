"""The records of results.jsonl, read defensively, and what they say about each output.

Each record names the files it made (or found and reused) with their SHA-256, so the latest
record naming a unit's .npz says whose evidence the unit should hold. A line that is not a record
of this shape (hand-edited, truncated, from another version) is passed over and counted, never
trusted; an output name in a record is used only if it stays inside the output folder.
"""

import datetime
import json
import numbers
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from trufor_trt.batch.outputs import RESULTS_FILE, OutputNameError, safe_relative_name

STATUSES = ("ok", "skipped", "error")


@dataclass
class Record:
    """One line of results.jsonl: what one run did with one input. Every line has every field,
    in this order (null where it does not apply)."""

    input: str
    outputs: dict = field(default_factory=dict)  # kind -> {"file": name in the output folder, "sha256"}
    status: str = "ok"  # one of STATUSES
    reason: Optional[str] = None
    score: Optional[float] = None
    height: Optional[int] = None
    width: Optional[int] = None
    backend: Optional[str] = None
    precision: Optional[str] = None  # the precision that made the outputs
    # The verdict guard's (batch/verdict_guard.py), where it recomputed the image in FP32:
    # {"reduced_precision", "reduced_score", "margin"}
    verdict_guard: Optional[dict] = None
    times_ms: dict = field(default_factory=dict)  # stage -> ms, and "total"
    analysed_at: Optional[str] = None  # UTC, ISO 8601
    provenance: Optional[dict] = None  # what made the outputs (batch/provenance.py)
    filed_to: Optional[str] = None  # watch --done / --failed: where the original went

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict) -> "Record":
        """A parsed line that is_record accepted (lines of older versions may lack fields)."""
        return cls(**{item.name: value[item.name] for item in fields(cls) if value.get(item.name) is not None})

    def reduced_said(self) -> str:
        """Where the verdict guard recomputed the image: what the reduced precision said, e.g.
        "fp16 said 0.4931" (read from a log line: any type may be there)."""
        reduced = self.verdict_guard.get("reduced_score")
        said = f"{reduced:.4f}" if isinstance(reduced, (int, float)) else "?"
        return f"{self.verdict_guard.get('reduced_precision')} said {said}"

    @property
    def npz_file(self) -> Optional[str]:
        """The .npz this record names (relative to the output folder), or None."""
        return (self.outputs.get("npz") or {}).get("file")


def utc_now() -> str:
    """Now, as a record's `analysed_at`: UTC, ISO 8601, milliseconds."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _optional(value, kind) -> bool:
    return value is None or (isinstance(value, kind) and not isinstance(value, bool))


def _number(value) -> bool:
    return value is not None and _optional(value, numbers.Real)


def _outputs_ok(outputs) -> bool:
    """A unit's files, each inside the output folder, the .npz among them (or no files)."""
    if not isinstance(outputs, dict) or (outputs and "npz" not in outputs):
        return False
    for entry in outputs.values():
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                and isinstance(entry.get("sha256"), str)):
            return False
        try:
            if safe_relative_name(entry["file"]) != entry["file"]:
                return False
        except OutputNameError:
            return False
    return True


def _times_ok(times) -> bool:
    return isinstance(times, dict) and all(_number(value) for value in times.values())


def is_record(value) -> bool:
    """Whether a parsed line has the shape of a record this version writes (an image done, or
    skipped, has a score and a unit of outputs)."""
    if not (isinstance(value, dict) and isinstance(value.get("input"), str) and value.get("status") in STATUSES):
        return False
    if value["status"] != "error" and not (_number(value.get("score")) and value.get("outputs")):
        return False
    return (_optional(value.get("reason"), str) and _optional(value.get("score"), numbers.Real)
            and _optional(value.get("height"), int) and _optional(value.get("width"), int)
            and _optional(value.get("analysed_at"), str) and _optional(value.get("filed_to"), str)
            and _times_ok(value.get("times_ms", {})) and _optional(value.get("provenance"), dict)
            and _optional(value.get("verdict_guard"), dict)
            and _outputs_ok(value.get("outputs", {})))


def read_records(out_dir) -> tuple:
    """(the records of results.jsonl in order, how many lines were passed over)."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.is_file():
        return [], 0
    records, passed_over = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            value = None
        if is_record(value):
            records.append(Record.from_json(value))
        else:
            passed_over += 1
    return records, passed_over


def output_path(out_dir, name: str) -> Optional[Path]:
    """The output `name` of a record as a file inside `out_dir`, or None where there is no such
    regular file, or where it (or a link on the way) leads out of the folder."""
    folder = Path(out_dir).resolve()
    try:
        path = (folder / safe_relative_name(name)).resolve(strict=True)
    except (OutputNameError, OSError, RuntimeError):
        return None
    return path if folder in path.parents and path.is_file() else None


@dataclass
class RecordIndex:
    """What a log says, record by record: each input's latest record, and for each output name
    the latest record naming it (the one whose evidence the unit should hold)."""

    records: list = field(default_factory=list)  # all of them, in the log's order
    latest: dict = field(default_factory=dict)  # input -> its latest record
    holders: dict = field(default_factory=dict)  # .npz name -> the latest record naming it
    makers: dict = field(default_factory=dict)  # (.npz name, sha256) -> the latest record that wrote it

    @classmethod
    def of(cls, records) -> "RecordIndex":
        index = cls()
        for record in records:
            index.add(record)
        return index

    def add(self, record: Record) -> None:
        self.records.append(record)
        self.latest[record.input] = record
        name = record.npz_file
        if name is not None:
            self.holders[name] = record
            if record.status == "ok":
                self.makers[(name, record.outputs["npz"]["sha256"])] = record

    def standing(self) -> list:
        """The records that say an image's state now, in the log's order: each input's latest,
        and every earlier one still holding its unit (an input can have several units: `watch
        --done` names a file that reuses a filed-away name afresh)."""
        return [record for record in self.records if self.latest[record.input] is record
                or self.holders.get(record.npz_file) is record]

    def holder(self, relative: str) -> Optional[Record]:
        """The latest record naming the unit of this output name (the image's, without suffix)."""
        return self.holders.get(relative + ".npz")

    def maker(self, record: Record) -> Optional[Record]:
        """The record that wrote the outputs `record` names (itself when it wrote them)."""
        name = record.npz_file
        return self.makers.get((name, record.outputs["npz"]["sha256"])) if name else None
