"""From the user's INPUT arguments (files, folders, globs) to the list of images to analyse.

Output names: a folder's or glob's images keep their path below it; a file named directly keeps
its name. With several folders / globs (camera dumps: dayA/IMG_0001.png, dayB/IMG_0001.png),
each one's images go below its own name (dayA/IMG_0001.png.npz, ...; a second root of the same
name becomes NAME-2), so only a genuine collision is refused.
"""

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from trufor_trt.errors import TruforError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


@dataclass(frozen=True)
class ImageJob:
    path: Path  # the image file; for an upload, only its name in records and errors
    relative: str  # output name below --out, without the output's own suffix
    data: Optional[bytes] = None  # its bytes: an upload's, or the file's read once (hashed, then decoded)


class InputError(TruforError):
    """An INPUT argument that cannot be used at all."""


def _is_image_name(path: Path) -> bool:
    """Anything but a folder named like an image: a file, a link (broken or looping too), a FIFO
    or a device. The decoder reports what is not a regular image file, rather than the entry
    silently vanishing from the batch."""
    return path.suffix.lower() in IMAGE_SUFFIXES and (path.is_symlink() or not path.is_dir())


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


def _glob_relative(match: Path, root: Path) -> str:
    """A match's output name: its path below the glob's root, or its file name where the pattern
    climbed out of the root ('d*/../../x.png'): never a name that leaves the output folder."""
    relative = os.path.relpath(os.path.normpath(match), os.path.normpath(root))
    return match.name if relative.split(os.sep)[0] == ".." else Path(relative).as_posix()


def _glob_jobs(pattern: str):
    root = _glob_root(pattern)
    matches = sorted(Path(match) for match in glob.glob(pattern, recursive=True))
    return [ImageJob(match, _glob_relative(match, root)) for match in matches if match.is_file()]


def _identity(path: Path):
    """What makes two inputs the same file (a looping link has no resolved path)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


def _looping(path: Path) -> bool:
    try:
        path.resolve(strict=True)
    except RuntimeError:
        return True
    except OSError as exc:
        return "loop" in str(exc).lower()
    return False


def _root_label(spec: str, taken: set) -> str:
    base = Path(spec) if Path(spec).is_dir() else _glob_root(spec)
    name = _identity(base).name or "root"
    label, count = name, 1
    while label in taken:
        count += 1
        label = f"{name}-{count}"
    taken.add(label)
    return label


def _expand_one(spec: str):
    """(the spec's jobs, whether it is a root: a folder or a glob)."""
    path = Path(spec)
    if path.is_symlink() and _looping(path):
        raise InputError(f"input {spec}: symbolic link loop")
    if path.is_dir():
        return _folder_jobs(path), True
    if not path.exists() and glob.has_magic(spec):
        return _glob_jobs(spec), True
    return [ImageJob(path, path.name)], False


def expand_inputs(specs) -> list:
    """Every image named by the specs, once each, in a stable order.

    Folders are searched recursively for image suffixes; a glob keeps every file it matches;
    a named file is always tried (a missing one is reported by the decoder, not dropped here).
    InputError for an argument that is a symbolic link loop.
    """
    expanded = [(spec, *_expand_one(spec)) for spec in specs]
    several_roots = sum(is_root for _, _, is_root in expanded) > 1
    jobs, seen, labels = [], set(), set()
    for spec, found, is_root in expanded:
        prefix = f"{_root_label(spec, labels)}/" if is_root and several_roots else ""
        for job in found:
            key = _identity(job.path)
            if key not in seen:
                seen.add(key)
                jobs.append(ImageJob(job.path, prefix + job.relative))
    return jobs


def _searched_folders(specs) -> list:
    """The folders whose whole depth is read for images: INPUT folders, and the roots of
    recursive globs ('**')."""
    folders = []
    for spec in specs:
        if Path(spec).is_dir():
            folders.append(Path(spec))
        elif not Path(spec).exists() and glob.has_magic(spec) and "**" in spec:
            folders.append(_glob_root(spec))
    return folders


def output_folder_problem(out: Path, specs, jobs) -> Optional[str]:
    """Why `out` cannot take the outputs of these INPUTs and their images, or None: outputs never
    go inside a folder searched for images (the next run would read them as images) nor into a
    folder holding an image (an original named like an output would be overwritten)."""
    target = _identity(Path(out))
    for folder in map(_identity, _searched_folders(specs)):
        if target == folder or folder in target.parents:
            return f"--out {out}: inside the input folder {folder}; put the outputs beside it, not among the originals"
    for folder in dict.fromkeys(Path(job.path).parent for job in jobs):
        if _identity(folder) == target:
            return f"--out {out}: holds input images ({folder}); put the outputs beside the originals, not among them"
    return None
