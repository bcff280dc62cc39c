"""The batch report: one HTML page over an output folder (`analyze --report`, `trufor-trt report`).

Built only from what the folder holds, never by running the model: results.jsonl (each image's
latest record) and each image's outputs (the .npz maps; the input image where it still exists).
Thumbnails (at most THUMBNAIL_SIDE px a side, JPEG) are written into OUT/report_files/ and
linked relatively with lazy loading, so a page over thousands of images opens at once and loads
what is scrolled to; nothing is fetched from elsewhere, the page's own script sorts and filters.
The same folder gives the same page, byte for byte (its date is results.jsonl's).
"""

import base64
import datetime
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from .. import __version__
from ..engine.postprocess import DECISION_THRESHOLD
from ..files import write_atomically
from .outputs import OutputPaths, encoded, heatmap_bgr
from .summary import RESULTS_FILE, latest_records

REPORT_FILE = "report.html"
THUMBNAILS = "report_files"
THUMBNAIL_SIDE = 192
JPEG_QUALITY = 85


@dataclass
class ReportRow:
    """One image as the page shows it."""

    name: str
    status: str
    reason: Optional[str] = None
    score: Optional[float] = None
    size: str = ""
    times_ms: dict = field(default_factory=dict)
    thumbnails: dict = field(default_factory=dict)  # image / map / conf / overlay -> relative link


def _thumbnail(bgr: np.ndarray) -> np.ndarray:
    height, width = bgr.shape[:2]
    scale = min(1.0, THUMBNAIL_SIDE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(bgr, size, interpolation=cv2.INTER_AREA) if scale < 1.0 else bgr


def _write_jpeg(path: Path, bgr: np.ndarray) -> None:
    write_atomically(path, encoded(".jpg", _thumbnail(bgr), cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY))


def _input_bgr(record: dict, out_dir: Path) -> Optional[np.ndarray]:
    """The analysed image, decoded as `analyze` decodes it, where a file with its bytes (its
    SHA-256 in the record's provenance) is still at the recorded path, read from the current
    folder or beside the output folder (a relative path was the run's)."""
    from ..engine.decode import decode_bytes
    from .provenance import input_sha256

    recorded = Path(record["input"])
    expected = (record.get("provenance") or {}).get("input_sha256")
    for candidate in dict.fromkeys([recorded, out_dir.parent / recorded]):
        try:
            data = candidate.read_bytes() if candidate.is_file() else None
            if data is not None and input_sha256(candidate, data) == expected:
                return decode_bytes(data, candidate)[:, :, ::-1]
        except Exception:  # unreadable now: the page says there is no image
            continue
    return None


def _in_folder(recorded: str, out_dir: Path) -> Optional[Path]:
    """A recorded output path, found in the output folder: records keep paths as the run named
    them (relative to its working folder, perhaps), so the first one that exists with leading
    parts dropped is it."""
    parts = Path(recorded).parts
    for first in range(1 if Path(recorded).is_absolute() else 0, len(parts)):
        candidate = out_dir.joinpath(*parts[first:])  # inside out_dir: a copied folder's own files
        if candidate.is_file():
            return candidate
    return None


def _thumbnails(record: dict, npz: Path, out_dir: Path, report_dir: Path) -> dict:
    """Write the record's thumbnails into OUT/report_files; their links relative to the page."""
    relative = npz.relative_to(out_dir).as_posix()
    stem = hashlib.sha256(relative.encode()).hexdigest()[:16]
    with np.load(npz) as saved:
        pictures = {"map": heatmap_bgr(saved["map"]), "conf": heatmap_bgr(saved["conf"])}
    overlay = OutputPaths.below(out_dir, relative.removesuffix(".npz")).overlay
    if overlay.is_file():
        pictures["overlay"] = cv2.imread(str(overlay), cv2.IMREAD_COLOR)
    image = _input_bgr(record, out_dir)
    if image is not None:
        pictures["image"] = image
    links = {}
    for kind, bgr in pictures.items():
        path = out_dir / THUMBNAILS / f"{stem}-{kind}.jpg"
        _write_jpeg(path, bgr)
        links[kind] = Path(os.path.relpath(path, report_dir)).as_posix()
    return links


def _row(record: dict, out_dir: Path, report_dir: Path) -> ReportRow:
    row = ReportRow(name=record["input"], status=record["status"], reason=record.get("reason"),
                    score=record.get("score"), times_ms=record.get("times_ms") or {})
    if record.get("height"):
        row.size = f"{record['width']} x {record['height']}"
    if record["status"] == "error":
        return row
    npz = _in_folder(record["outputs"][0], out_dir) if record.get("outputs") else None
    if npz is None:
        row.status, row.reason = "error", "its outputs are gone from the output folder"
    else:
        row.thumbnails = _thumbnails(record, npz, out_dir, report_dir)
    return row


def _legend_png_base64() -> str:
    bar = heatmap_bgr(np.tile(np.linspace(0.0, 1.0, 256), (12, 1)))
    return base64.b64encode(encoded(".png", bar)).decode("ascii")


def _summary(records: list, rows: list, results: Path) -> dict:
    made_by = [record.get("provenance") or {} for record in records]
    scored = [row.score for row in rows if row.score is not None]
    return {
        "images": len(rows),
        "flagged": sum(score >= DECISION_THRESHOLD for score in scored),
        "threshold": DECISION_THRESHOLD,
        "failed": [row for row in rows if row.status == "error"],
        "backends": sorted({f"{record.get('backend')} {record.get('precision')}" for record in records}),
        "models": sorted({entry["model_sha256"] for entry in made_by if entry.get("model_sha256")}),
        "versions": sorted({entry["trufor_trt"] for entry in made_by if entry.get("trufor_trt")}),
        "when": datetime.datetime.fromtimestamp(results.stat().st_mtime, datetime.timezone.utc)
                .strftime("%Y-%m-%d %H:%M UTC"),
        "report_version": __version__,
    }


def render(rows: list, summary: dict, title: str) -> str:
    from jinja2 import Environment, PackageLoader

    # Autoescaping on: names come from users' files and must show as text, never as markup.
    environment = Environment(loader=PackageLoader("trufor_trt.batch", "templates"), autoescape=True,
                              keep_trailing_newline=True)
    template = environment.get_template("report.html")
    ordered = sorted(rows, key=lambda row: (row.score is None, -(row.score or 0.0), row.name))
    return template.render(rows=ordered, summary=summary, title=title, legend=_legend_png_base64(),
                           stages=("decode", "preprocess", "inference", "postprocess", "write", "total"))


def build_report(out_dir, report_path=None) -> Path:
    """Write the page for the output folder `out_dir` (default OUT/report.html); its path."""
    out_dir = Path(out_dir)
    results = out_dir / RESULTS_FILE
    if not results.is_file():
        raise FileNotFoundError(f"{out_dir} has no {RESULTS_FILE}: analyse into it first")
    report_path = Path(report_path) if report_path else out_dir / REPORT_FILE
    records = list(latest_records(out_dir).values())
    rows = [_row(record, out_dir, report_path.parent) for record in records]
    html = render(rows, _summary(records, rows, results), title=f"TruFor analysis of {out_dir.name}")
    write_atomically(report_path, html.encode("utf-8"))
    return report_path
