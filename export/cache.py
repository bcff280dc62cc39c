"""Model folders exported on demand from a checkpoint, cached by the checkpoint's SHA-256.

`analyze --checkpoint C` with an ONNX backend exports once; later runs reuse the folder. A
cached folder that fails its checks (incomplete, corrupt, another format version) is rebuilt.
"""

import os
from pathlib import Path

from ..engine.model_dir import ModelDir, ModelDirError, sha256_file
from .bundle import export_model_dir

CACHE_ENV = "TRUFOR_TRT_CACHE"


def cache_root() -> Path:
    """$TRUFOR_TRT_CACHE, else $XDG_CACHE_HOME/trufor-trt, else ~/.cache/trufor-trt."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "trufor-trt"


def cached_model_dir(checkpoint, on_step=print) -> ModelDir:
    """The cached model folder for this checkpoint, exported now if missing or unusable."""
    checkpoint_sha256 = sha256_file(checkpoint)
    folder = cache_root() / "models" / checkpoint_sha256[:16]
    try:
        return ModelDir.open(folder, checkpoint_sha256=checkpoint_sha256)
    except ModelDirError as problem:
        if folder.exists():
            on_step(f"rebuilding the cached model: {problem}")
    on_step(f"exporting {Path(checkpoint).name} once into {folder}")
    export_model_dir(checkpoint, folder, checkpoint_sha256=checkpoint_sha256, on_step=on_step)
    return ModelDir.open(folder, checkpoint_sha256=checkpoint_sha256)
