"""Writing files so that no reader ever sees a half-written one."""

import os
from pathlib import Path


def write_atomically(path, data: bytes) -> None:
    """Write beside the target under a temporary name, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
