"""The batch report: one HTML page over an output folder (`analyze --report`, `trufor-trt report`).

Built only from what the folder holds, never by running the model: results.jsonl (each image's
latest record, and every record still holding a unit of outputs) and the files those records
name, each hashed against its record first: a row whose outputs no longer hold its evidence
(superseded by another input's, missing, changed) shows why, and no picture. Nothing outside
the output folder is read into the page: the image's thumbnail is the one `analyze` wrote beside
its outputs; the original is only linked, where a file with the analysed SHA-256 is still at
the recorded place (or where `watch --done` filed it).

Thumbnails (JPEG, at most THUMBNAIL_SIDE px a side) are written into OUT/report_files/, named
after the .npz's SHA-256, linked relatively and loaded lazily, so a page over thousands of
images opens at once; each links to its full-size file. The same folder gives the same page,
byte for byte (its date is that of the latest record).
"""

import base64
import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import quote

import cv2
import numpy as np

from trufor_trt import __version__
from trufor_trt.engine.postprocess import DECISION_THRESHOLD
from trufor_trt.errors import printable
from trufor_trt.files import write_atomically
from trufor_trt.batch.outputs import REPORT_FILE
from trufor_trt.batch.pictures import encoded, heatmap_bgr, thumbnail_jpeg
from trufor_trt.batch.provenance import input_sha256
from trufor_trt.batch.records import RESULTS_FILE, Record, RecordIndex, output_path, read_records
from trufor_trt.batch.summary import ImageRow, image_rows

THUMBNAILS = "report_files"
# The thumbnails of a row, and the full-size output each links to (the first the record has).
PICTURE_LINKS = {"image": ("thumbnail",), "map": ("heatmap", "npz"), "conf": ("conf", "npz"),
                 "overlay": ("overlay",)}


@dataclass
class ReportRow:
    """One image as the page shows it."""

    name: str
    status: str  # ok, skipped, error, superseded, missing, changed
    reason: Optional[str] = None
    score: Optional[float] = None
    size: str = ""
    analysed_at: str = ""
    times_ms: dict = field(default_factory=dict)
    thumbnails: dict = field(default_factory=dict)  # image / map / conf / overlay -> relative link
    links: dict = field(default_factory=dict)  # the same kinds, and npz -> the full-size file
    hashes: dict = field(default_factory=dict)  # the same kinds -> the SHA-256 its record gives
    original: Optional[str] = None  # a link to the analysed original, where it still is
    guard: str = ""  # where the verdict guard recomputed it in FP32: what the reduced precision said

    @property
    def holds_evidence(self) -> bool:
        return self.status in ("ok", "skipped")


def _link(path: Path, report_dir: Path) -> str:
    """A relative link, percent-encoded and starting with ./ : a name like `javascript:x.png` or
    `http:host.png` stays a file beside the page."""
    return "./" + quote(Path(os.path.relpath(path.resolve(), report_dir.resolve())).as_posix())


def _original(record: Record, out_dir: Path) -> Optional[str]:
    """A link to the analysed original where a file with its SHA-256 still is: where watch
    filed it, or at the recorded path (from the current folder, or beside the output folder
    for a relative one). The file is only hashed, never read into the page."""
    expected = (record.provenance or {}).get("input_sha256")
    recorded = [name for name in (record.filed_to, record.input) if name]
    candidates = [Path(name) for name in recorded] + [out_dir.parent / name for name in recorded
                                                      if not Path(name).is_absolute()]
    for candidate in dict.fromkeys(candidates):
        if expected and candidate.is_file() and input_sha256(candidate) == expected:
            return candidate.resolve().as_uri()
    return None


def _pictures(files: dict) -> dict:
    """kind -> BGR picture of each map the row has, from its checked outputs."""
    with np.load(files["npz"], allow_pickle=False) as saved:
        pictures = {"map": heatmap_bgr(saved["map"]), "conf": heatmap_bgr(saved["conf"])}
    if "overlay" in files:
        pictures["overlay"] = cv2.imread(str(files["overlay"]), cv2.IMREAD_COLOR)
    return pictures


def _thumbnails(row: ReportRow, record: Record, out_dir: Path, report_dir: Path) -> None:
    """Write the row's thumbnails into OUT/report_files, and link each to its full-size file."""
    files = {kind: output_path(out_dir, entry["file"]) for kind, entry in record.outputs.items()}
    stem = record.outputs["npz"]["sha256"][:16]
    folder = out_dir / THUMBNAILS
    for kind, bgr in _pictures(files).items():
        write_atomically(folder / f"{stem}-{kind}.jpg", thumbnail_jpeg(bgr))
    if "thumbnail" in files:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files["thumbnail"], folder / f"{stem}-image.jpg")
    for kind, sources in PICTURE_LINKS.items():
        thumbnail = folder / f"{stem}-{kind}.jpg"
        source = next((name for name in sources if name in files), None)
        if source is not None and thumbnail.is_file():
            row.thumbnails[kind] = _link(thumbnail, report_dir)
            row.links[kind] = _link(files[source], report_dir)
            row.hashes[kind] = record.outputs[source]["sha256"]
    row.links["npz"] = _link(files["npz"], report_dir)
    row.hashes["npz"] = record.outputs["npz"]["sha256"]


def _row(image: ImageRow, out_dir: Path, report_dir: Path) -> ReportRow:
    record, made = image.record, image.made
    row = ReportRow(name=printable(record.input), status=image.status, reason=image.reason, score=record.score,
                    analysed_at=made.analysed_at or "", times_ms=made.times_ms)
    if record.height:
        row.size = f"{record.height} x {record.width}"  # HxW, as the CLI and the .npz's imgsize say it
    if record.verdict_guard:
        row.guard = f"{record.precision}; verdict guard: {record.reduced_said()}"
    if row.holds_evidence:
        _thumbnails(row, record, out_dir, report_dir)
        row.original = _original(record, out_dir)
    return row


def _legend_png_base64() -> str:
    bar = heatmap_bgr(np.tile(np.linspace(0.0, 1.0, 256), (12, 1)))
    return base64.b64encode(encoded(".png", bar)).decode("ascii")


def _models(records: list) -> list:
    """Each checkpoint SHA-256 the records name, with whether it is the official checkpoint."""
    made_by = {(entry.get("model_sha256"), entry.get("official")) for entry in
               (record.provenance or {} for record in records) if entry.get("model_sha256")}
    return [f"{sha} ({'the official checkpoint' if official else 'not the official checkpoint'})"
            for sha, official in sorted(made_by, key=str)]


def _summary(records: list, rows: list, passed_over: int) -> dict:
    holding = [row for row in rows if row.holds_evidence]
    return {
        "images": len(rows),
        "flagged": sum(row.score >= DECISION_THRESHOLD for row in holding if row.score is not None),
        "threshold": DECISION_THRESHOLD,
        "failed": [row for row in rows if row.status == "error"],
        "stale": [row for row in rows if row.status not in ("ok", "skipped", "error")],
        "backends": sorted({f"{record.backend} {record.precision}" for record in records}),
        "models": _models(records),
        "official": all((record.provenance or {}).get("official") for record in records if record.status != "error"),
        "versions": sorted({entry["trufor_trt"] for entry in (record.provenance or {} for record in records)
                            if entry.get("trufor_trt")}),
        "when": max((record.analysed_at or "" for record in records), default="") or "unknown",
        "passed_over": passed_over,
        "report_version": __version__,
    }


# Where the template leaves room for the policy, which hashes the script of the rendered page.
CSP_PLACE = "<!-- content security policy -->"


def render(rows: list, summary: dict, title: str) -> str:
    from jinja2 import Environment, PackageLoader

    # Autoescaping on: names come from users' files and must show as text, never as markup.
    environment = Environment(loader=PackageLoader("trufor_trt.batch", "templates"), autoescape=True,
                              keep_trailing_newline=True)
    template = environment.get_template("report.html")
    ordered = sorted(rows, key=lambda row: (not row.holds_evidence, -(row.score or 0.0), row.name))
    page = template.render(rows=ordered, summary=summary, title=title, legend=_legend_png_base64(),
                           stages=("decode", "preprocess", "inference", "postprocess", "write", "total"))
    return page.replace(CSP_PLACE, _content_security_policy(page), 1)


def _content_security_policy(page: str) -> str:
    """The page may run its own script alone (by its hash), show images from data: and the
    files beside it, and load nothing else."""
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    policy = (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
              "img-src data: file: 'self'; base-uri 'none'; form-action 'none'")
    return f'<meta http-equiv="Content-Security-Policy" content="{policy}">'


def build_report(out_dir, report_path=None) -> Path:
    """Write the page for the output folder `out_dir` (default OUT/report.html); its path."""
    out_dir = Path(out_dir)
    if not (out_dir / RESULTS_FILE).is_file():
        raise FileNotFoundError(f"{out_dir} has no {RESULTS_FILE}: analyse into it first")
    report_path = Path(report_path) if report_path else out_dir / REPORT_FILE
    records, passed_over = read_records(out_dir)
    images = image_rows(RecordIndex.of(records), out_dir, verify=True)
    rows = [_row(image, out_dir, report_path.parent) for image in images]
    html = render(rows, _summary([image.record for image in images], rows, passed_over),
                  title=f"TruFor analysis of {out_dir.name}")
    write_atomically(report_path, html.encode("utf-8"))
    return report_path
