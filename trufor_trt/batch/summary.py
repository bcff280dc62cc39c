"""Each image's latest state, as results.csv (what most users open) and the report show it.

A row is an input's latest record (or an earlier one of the input that still holds a unit of
outputs), unless its outputs no longer hold that record's evidence:
`superseded` when a later record of another input wrote the same output name (the reason says
whose evidence it holds now), `missing` when an output is gone. With `verify` (the report),
every output is also hashed: `changed` when one differs from the SHA-256 its record gives.
A row whose outputs were reused from an earlier run (its record `skipped`) is `ok` here, with
`reused` true and that run's time and stage times: filtering on status ok keeps all valid
evidence.
"""

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from trufor_trt.files import sha256_file, write_atomically
from trufor_trt.batch.outputs import SUMMARY_FILE
from trufor_trt.batch.records import Record, RecordIndex, output_path

COLUMNS = ("input", "status", "reused", "reason", "score", "height", "width", "backend", "precision", "reduced_precision",
           "reduced_score", "official",
           "analysed_at", "npz", "npz_sha256", "input_sha256", "model_sha256", "model_files_sha256",
           "trufor_trt", "total_ms", "outputs_sha256")


@dataclass(frozen=True)
class ImageRow:
    record: Record  # the input's latest record
    status: str  # the record's, or superseded / missing / changed
    reason: Optional[str]
    made: Record  # the record that wrote its outputs (the record itself unless they were reused)


def _superseded_by(record: Record, index: RecordIndex) -> Optional[Record]:
    holder = index.holders.get(record.npz_file)
    if holder is None or holder is record or holder.outputs["npz"] == record.outputs["npz"]:
        return None
    return holder


def _problem(record: Record, index: RecordIndex, out_dir: Path, verify: bool):
    """(status, reason) when the record's outputs no longer hold its evidence, else None."""
    holder = _superseded_by(record, index)
    if holder is not None:
        return "superseded", (f"its outputs now hold the evidence of {holder.input} "
                              f"(analysed {holder.analysed_at or 'later'})")
    for entry in record.outputs.values():
        path = output_path(out_dir, entry["file"])
        if path is None:
            return "missing", f"{entry['file']} is gone from the output folder"
        if verify and sha256_file(path) != entry["sha256"]:
            return "changed", f"{entry['file']} was changed after the analysis (its SHA-256 is not the record's)"
    return None


def image_row(record: Record, index: RecordIndex, out_dir, verify: bool = False) -> ImageRow:
    if record.status == "error" or not record.outputs:
        return ImageRow(record, record.status, record.reason, record)
    problem = _problem(record, index, Path(out_dir), verify)
    status, reason = problem or (record.status, record.reason)
    return ImageRow(record, status, reason, index.maker(record) or record)


def image_rows(index: RecordIndex, out_dir, verify: bool = False) -> list:
    return [image_row(record, index, out_dir, verify) for record in index.standing()]


def _csv_row(row: ImageRow) -> dict:
    record, made = row.record, row.made
    made_by = record.provenance or {}
    npz = record.outputs.get("npz") or {}
    return {"input": record.input, "score": record.score, "height": record.height, "width": record.width,
            "backend": record.backend, "precision": record.precision,
            **{key: (record.verdict_guard or {}).get(key) for key in ("reduced_precision", "reduced_score")},
            "status": "ok" if row.status == "skipped" else row.status, "reused": row.status == "skipped",
            "reason": row.reason, "official": made_by.get("official"),
            "analysed_at": made.analysed_at, "npz": npz.get("file"), "npz_sha256": npz.get("sha256"),
            **{key: made_by.get(key) for key in ("input_sha256", "model_sha256", "model_files_sha256", "trufor_trt")},
            "total_ms": made.times_ms.get("total"),
            "outputs_sha256": json.dumps({entry["file"]: entry["sha256"] for entry in record.outputs.values()})}


def write_summary_csv(out_dir, index: RecordIndex) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in image_rows(index, out_dir):
        writer.writerow(_csv_row(row))
    write_atomically(Path(out_dir) / SUMMARY_FILE, text.getvalue().encode("utf-8"))
