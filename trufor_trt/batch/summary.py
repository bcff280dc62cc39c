"""results.jsonl is the log of every run; results.csv, rewritten at the end of each run, is
what most users open: one row per image, its latest state."""

import csv
import io
import json
from pathlib import Path

from ..files import write_atomically

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "results.csv"
COLUMNS = ("input", "status", "reason", "score", "height", "width", "backend", "precision",
           "npz", "input_sha256", "model_sha256", "trufor_trt", "total_ms")


def _row(record: dict) -> dict:
    made_by = record.get("provenance") or {}
    outputs = record.get("outputs") or []
    return {**{key: record.get(key) for key in COLUMNS[:8]},
            "npz": outputs[0] if outputs else None,
            **{key: made_by.get(key) for key in ("input_sha256", "model_sha256", "trufor_trt")},
            "total_ms": (record.get("times_ms") or {}).get("total")}


def latest_records(out_dir) -> dict:
    """input -> its latest record in results.jsonl (lines that cannot be read are passed over)."""
    latest = {}
    path = Path(out_dir) / RESULTS_FILE
    if not path.is_file():
        return latest
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        latest[record["input"]] = record
    return latest


def write_summary_csv(out_dir) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for record in latest_records(out_dir).values():
        writer.writerow(_row(record))
    write_atomically(Path(out_dir) / SUMMARY_FILE, text.getvalue().encode("utf-8"))
