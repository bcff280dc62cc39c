"""From the user's INPUT arguments (files, folders, globs) to the list of images to analyse."""

import glob
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".tif", ".tiff", ".webp"})


@dataclass(frozen=True)
class ImageJob:
    path: Path
    relative: str  # output name below --out, without the output's own suffix


def _is_image_name(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _folder_jobs(folder: Path):
    return [ImageJob(path, path.relative_to(folder).as_posix())
            for path in sorted(folder.rglob("*")) if _is_image_name(path)]


def _glob_root(pattern: str) -> Path:
    """The deepest folder of a glob pattern that has no wildcard in it."""
    root = Path()
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        root = root / part
    return root


def _glob_jobs(pattern: str):
    root = _glob_root(pattern)
    matches = sorted(Path(match) for match in glob.glob(pattern, recursive=True))
    return [ImageJob(match, match.relative_to(root).as_posix()) for match in matches if match.is_file()]


def expand_inputs(specs) -> list:
    """Every image named by the specs, once each, in a stable order.

    Folders are searched recursively for image suffixes; a glob keeps every file it matches;
    a named file is always tried (a missing one is reported by the decoder, not dropped here).
    """
    jobs, seen = [], set()
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = _folder_jobs(path)
        elif not path.exists() and glob.has_magic(spec):
            found = _glob_jobs(spec)
        else:
            found = [ImageJob(path, path.name)]
        for job in found:
            key = job.path.resolve()
            if key not in seen:
                seen.add(key)
                jobs.append(job)
    return jobs
