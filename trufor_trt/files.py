"""Writing files so that no reader ever sees a half-written one; hashing them."""

import hashlib
import os
import re
import shutil
from pathlib import Path

# write_atomically's temporary names, and the export's staging folders: both end in the pid of
# the process that made them, so what a killed process left behind can be told apart.
_TEMPORARY = re.compile(r"^\..+\.(\d+)\.tmp$")
_STAGING = re.compile(r"^\..+\.partial-(\d+)$")
NAME_MAX = 255  # bytes in one file name: Linux's file systems (ext4, XFS, Btrfs), and macOS's


def temporary_beside(path) -> Path:
    """Where to write `path` before renaming it into place: a hidden name beside it that ends in
    this process's pid; cut short where `path`'s own name is long, so that it fits wherever
    `path`'s does (a 250-byte name must not fail for its temporary's sake)."""
    path, tail = Path(path), f".{os.getpid()}.tmp"
    name = path.name
    while len(os.fsencode(f".{name}{tail}")) > max(NAME_MAX, len(os.fsencode(path.name))):
        name = name[:-1]
    return path.with_name(f".{name}{tail}")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path) -> str:
    with open(path, "rb") as handle:
        return sha256_stream(handle)


def sha256_stream(handle) -> str:
    """The SHA-256 of what is left to read in an open binary file."""
    return _stream_digest(handle, hashlib.sha256())


def md5_file(path) -> str:
    """The MD5 of a file: what some publishers give for their archives (not for our evidence)."""
    with open(path, "rb") as handle:
        return _stream_digest(handle, hashlib.md5(usedforsecurity=False))


def _stream_digest(handle, digest) -> str:
    for block in iter(lambda: handle.read(1 << 22), b""):
        digest.update(block)
    return digest.hexdigest()


def write_atomically(path, data: bytes) -> None:
    """Write beside the target under a temporary name, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_beside(path)
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _stale(name: str, pattern: re.Pattern) -> bool:
    match = pattern.match(name)
    return bool(match) and int(match.group(1)) != os.getpid() and not process_alive(int(match.group(1)))


def remove_stale_temporaries(folder, every_other_writer: bool = False) -> int:
    """Delete the temporary files below `folder` whose writer is gone (killed mid-write);
    `every_other_writer`: every one this process did not write (its writers are known to be done)."""
    removed = 0
    for path in Path(folder).rglob(".*.tmp"):
        match = _TEMPORARY.match(path.name)
        other = bool(match) and int(match.group(1)) != os.getpid()
        if path.is_file() and (other if every_other_writer else _stale(path.name, _TEMPORARY)):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def remove_stale_staging(folder) -> int:
    """Delete the staging folders in `folder` whose exporting process is gone."""
    removed = 0
    for path in Path(folder).glob(".*.partial-*"):
        if path.is_dir() and _stale(path.name, _STAGING):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed
