"""Model folders exported on demand from a checkpoint, cached by the checkpoint's SHA-256.

`analyze --checkpoint C` with an ONNX backend exports once; later runs reuse the folder. A
cached folder that fails its checks (incomplete, corrupt, another format version) is rebuilt.
The one seeded random checkpoint that `selftest`, `bench` and `analyze --random-weights` share is
kept here too, so its model is exported once and cached once.
Listing and cleaning the cache (`trufor-trt cache`) needs neither torch nor onnx.
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from trufor_trt.engine.model_dir import ModelDir, ModelDirError
from trufor_trt.errors import TruforError
from trufor_trt.files import remove_stale_staging, sha256_file, temporary_beside

MODELS = "models"
CHECKPOINTS = "checkpoints"

CACHE_ENV = "TRUFOR_TRT_CACHE"
RANDOM_SEED = 0  # of the random checkpoint selftest, bench and --random-weights share


class CacheError(TruforError):
    """The export cache cannot be used."""


def cache_root() -> Path:
    """$TRUFOR_TRT_CACHE, else $XDG_CACHE_HOME/trufor-trt, else ~/.cache/trufor-trt."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "trufor-trt"


def cached_model_dir(checkpoint, on_step=print) -> ModelDir:
    """The cached model folder for this checkpoint, exported now if missing or unusable."""
    checkpoint_sha256 = sha256_file(checkpoint)
    folder = cache_root() / MODELS / checkpoint_sha256[:16]
    if folder.parent.is_dir():
        remove_stale_staging(folder.parent)
    try:
        return ModelDir.open(folder, checkpoint_sha256=checkpoint_sha256)
    except ModelDirError as problem:
        if folder.exists():
            on_step(f"rebuilding the cached model: {problem}")
    from trufor_trt.export.bundle import export_model_dir
    from trufor_trt.model.checkpoint import load_trufor

    # Only what this machine can run: the TensorRT graph (half the folder) where TensorRT is.
    with_tensorrt = importlib.util.find_spec("tensorrt") is not None
    network = load_trufor(checkpoint)  # a file that is no checkpoint is said before any export is announced
    try:
        _check_writable(folder.parent)  # before minutes of export, not after
        on_step(f"exporting {Path(checkpoint).name} once into {folder}")
        export_model_dir(checkpoint, folder, checkpoint_sha256=checkpoint_sha256, on_step=on_step,
                         with_tensorrt=with_tensorrt, network=network)
    except OSError as exc:
        raise CacheError(f"the export cache {cache_root()} cannot be written ({exc.strerror or exc}): "
                         f"set {CACHE_ENV} to a writable folder, or export with `trufor-trt export` "
                         "and pass --model") from None
    return ModelDir.open(folder, checkpoint_sha256=checkpoint_sha256)


def random_checkpoint(seed: int = RANDOM_SEED) -> Path:
    """The seeded random checkpoint (official layout), written once into the cache: torch.save's
    bytes differ from one write to the next, so a fresh file would export the model again."""
    path = cache_root() / CHECKPOINTS / f"random-seed{seed}.pth.tar"
    if not path.is_file():
        from trufor_trt.model.random_weights import write_random_checkpoint

        path.parent.mkdir(parents=True, exist_ok=True)
        partial = temporary_beside(path)
        write_random_checkpoint(partial, seed)
        os.replace(partial, path)
    return path


def _check_writable(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
        pass


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def cache_entries() -> list:
    """Every entry of the cache: {path, kind, bytes, state}, state being 'ok' or why not."""
    entries = []
    for path in sorted((cache_root() / MODELS).glob("*")):
        try:
            model = ModelDir.open(path)
            state = f"ok: checkpoint {model.checkpoint_sha256[:12]}..., {', '.join(sorted(model.manifest['variants']))}"
        except ModelDirError as exc:
            state = str(exc)
        kind = "export in progress or abandoned" if path.name.startswith(".") else "model folder"
        entries.append({"path": str(path), "kind": kind, "bytes": _size(path), "state": state})
    for path in sorted((cache_root() / CHECKPOINTS).glob("*")):
        entries.append({"path": str(path), "kind": "checkpoint", "bytes": _size(path), "state": "ok"})
    return entries


def clean_cache() -> int:
    """Remove every cached model folder and checkpoint; returns the bytes freed."""
    freed = 0
    for entry in cache_entries():
        path = Path(entry["path"])
        freed += entry["bytes"]
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return freed
