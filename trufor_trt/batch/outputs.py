"""What `analyze` writes per image: one unit of outputs, named after the image, written together.

A unit is the .npz (the official keys and the provenance) and, unless --no-png, the pictures:
the localization and confidence heatmaps, the overlay and a small thumbnail of the image (what
the report shows, so that it never has to read the original). Every file is written under a
temporary name and renamed into place; the record in results.jsonl, written after the last
rename, names each file with its SHA-256: that record is what vouches for the unit.
"""

import errno
import io
import os
import posixpath
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trufor_trt.engine.postprocess import Analysis
from trufor_trt.errors import OutputsUnwritable, TruforError
from trufor_trt.files import NAME_MAX, sha256_bytes, write_atomically
from trufor_trt.batch.pictures import pictures
from trufor_trt.batch.provenance import PROVENANCE_KEY, provenance_array

NPZ_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip member can carry

# Each output of a unit: its kind and the suffix added to the image's name.
SUFFIXES = {"npz": ".npz", "heatmap": ".heatmap.png", "conf": ".conf.png", "overlay": ".overlay.png",
            "thumbnail": ".thumb.jpg"}
PICTURES = ("heatmap", "conf", "overlay", "thumbnail")
# The output folder's own files, beside the units: no unit may be named into them (an input
# folder called results.csv would otherwise make the summary's place a folder).
RESULTS_FILE, SUMMARY_FILE, REPORT_FILE = "results.jsonl", "results.csv", "report.html"
BATCH_FILES = (RESULTS_FILE, SUMMARY_FILE, REPORT_FILE)


class OutputNameError(TruforError):
    """An output name that would not stay inside the output folder."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def safe_relative_name(name: str) -> str:
    """`name` as a normalized relative POSIX path that stays inside the folder it is joined to;
    OutputNameError for an absolute name, an empty one, or one that climbs out with '..'."""
    normal = posixpath.normpath(str(name).replace(os.sep, "/"))
    if not name or normal.startswith("/") or normal == "." or normal.split("/")[0] == "..":
        raise OutputNameError(f"output name {name!r} would fall outside the output folder")
    return normal


@dataclass(frozen=True)
class OutputPaths:
    """The files of one image's unit below an output folder."""

    out_dir: Path
    name: str  # the image's output name, relative to out_dir (safe_relative_name)

    @classmethod
    def below(cls, out_dir: Path, relative: str) -> "OutputPaths":
        """OutputNameError where the unit cannot be written as named: outside the folder, in
        place of the folder's own files, or with a file name longer than file systems take."""
        paths = cls(Path(out_dir), safe_relative_name(relative))
        top = paths.name.split("/")[0]
        if top.lower() in BATCH_FILES:
            raise OutputNameError(f"output name {relative!r} would put its outputs where the batch's {top} "
                                  "is: rename the input folder, or analyse it into another --out")
        longest = max(len(os.fsencode(posixpath.basename(paths.file(kind)))) for kind in SUFFIXES)
        if longest > NAME_MAX:
            raise OutputNameError(f"output name {relative!r} gives a file name of {longest} bytes, more than "
                                  f"the {NAME_MAX} file systems take: rename the input")
        return paths

    def file(self, kind: str) -> str:
        """The output's name relative to the output folder (what records keep)."""
        return self.name + SUFFIXES[kind]

    def path(self, kind: str) -> Path:
        return self.out_dir / self.file(kind)

    @property
    def npz(self) -> Path:
        return self.path("npz")

    @staticmethod
    def kinds(with_pictures: bool) -> tuple:
        return ("npz", *PICTURES) if with_pictures else ("npz",)


def npz_bytes(analysis: Analysis, save_noiseprint: bool, made_by: dict) -> bytes:
    """The official test script's keys: map, conf, score, imgsize (and np++ on request), and
    the provenance as one extra key."""
    arrays = {
        "map": analysis.localization_map,
        "conf": analysis.confidence_map,
        "score": np.float64(analysis.score),
        "imgsize": np.array(analysis.localization_map.shape, dtype=np.int64),
        PROVENANCE_KEY: provenance_array(made_by),
    }
    if save_noiseprint:
        arrays["np++"] = analysis.noiseprint
    return _npz(arrays)


def _npz(arrays: dict) -> bytes:
    """np.savez's layout with a fixed member date, so the same analysis gives the same bytes
    whichever way in wrote it, and whenever (np.savez stamps the current time)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, value in arrays.items():
            with archive.open(zipfile.ZipInfo(f"{name}.npy", date_time=NPZ_DATE), "w",
                              force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
    return buffer.getvalue()


# The errors that say the folder takes no more files, whichever file is next.
FOLDER_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _write(path: Path, data: bytes) -> None:
    try:
        write_atomically(path, data)
    except OSError as exc:
        if exc.errno in FOLDER_FULL:
            raise OutputsUnwritable(f"the output folder takes no more files ({exc.strerror}: {path})") from None
        raise


def write_unit(paths: OutputPaths, rgb: np.ndarray, analysis: Analysis, made_by: dict,
               save_noiseprint: bool, with_pictures: bool) -> dict:
    """Write the image's unit, the .npz last; pictures an earlier analysis left under this name
    are removed when this one has none (they are not this analysis'). Returns the record's
    outputs: kind -> {"file": name relative to the output folder, "sha256": ...}."""
    contents = pictures(rgb, analysis.localization_map, analysis.confidence_map) if with_pictures else {}
    contents["npz"] = npz_bytes(analysis, save_noiseprint, made_by)
    if not with_pictures:
        for kind in PICTURES:
            paths.path(kind).unlink(missing_ok=True)
    for kind in (*PICTURES, "npz") if with_pictures else ("npz",):
        _write(paths.path(kind), contents[kind])
    return {kind: {"file": paths.file(kind), "sha256": sha256_bytes(contents[kind])}
            for kind in OutputPaths.kinds(with_pictures)}
