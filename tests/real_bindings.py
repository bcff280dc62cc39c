"""TensorRT's and CUDA's real Python bindings, brought here for the tests (tests/test_real_bindings.py).

NVIDIA's binding wheels hold the real compiled modules: `tensorrt-cu12/cu13-bindings` (the
pybind11 module `tensorrt_bindings`; pip's `tensorrt` meta package adds a two-line `tensorrt`
package that re-exports it) and `cuda-bindings` (Cython; its driver module imports without a
driver and raises when a function first needs libcuda). TensorRT's module needs nine C
functions from libnvinfer / libnvinfer_plugin / libnvonnxparser, whose wheels cannot be had
here: they are compiled as stubs that return NULL, under each release's sonames, so the real
module imports with its real classes, enums and overloads, and its factories fail as on a
machine where TensorRT cannot start CUDA.

The wheels are downloaded by exact version on first use into a cache outside the checkout
($TRUFOR_TRT_BINDINGS_CACHE, else ~/.cache/trufor-trt-tests/bindings); a run that finds them
there downloads nothing. Where no package index answers, the tests that need them skip, saying so.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO
CACHE = Path(os.environ.get("TRUFOR_TRT_BINDINGS_CACHE",
                            Path.home() / ".cache" / "trufor-trt-tests" / "bindings"))
DOWNLOAD_TIMEOUT_S = 120

# What the bindings import from TensorRT's libraries, as C symbols (their signatures do not
# matter to the loader; each stub returns NULL or 0).
STUB_SOURCE = """\
#include <stddef.h>
void *createInferBuilder_INTERNAL(void *logger, int version) { return NULL; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int version) { return NULL; }
void *createInferRuntime_INTERNAL(void *logger, int version) { return NULL; }
void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int version) { return NULL; }
void *createNvOnnxParser_INTERNAL(void *network, void *logger, int version) { return NULL; }
void *getBuilderPluginRegistry(int capability) { return NULL; }
int getNvOnnxParserVersion(void) { return 0; }
void *getPluginRegistry(void) { return NULL; }
int initLibNvInferPlugins(void *logger, const char *namespace_) { return 0; }
"""
STUB_LIBRARIES = ("libnvinfer", "libnvinfer_plugin", "libnvonnxparser")
# pip's `tensorrt` package is this re-export of the bindings' module.
TENSORRT_FRONT = "from tensorrt_bindings import *\nfrom tensorrt_bindings import __version__\n"


@dataclass(frozen=True)
class Wheel:
    distribution: str
    version: str

    @property
    def label(self) -> str:
        return f"{self.distribution}=={self.version}"

    def folder(self) -> Path:
        return CACHE / f"{self.distribution}-{self.version}"


# The oldest supported TensorRT (10.0), JetPack 6.1 / 6.2's (10.3), the last 10.x and the newest
# 11.x; NVIDIA publishes CUDA 13 builds from 10.13 on.
TENSORRT = {f"{cuda}-{version}": Wheel(f"tensorrt-{cuda}-bindings", version)
            for cuda, version in [("cu12", "10.0.1"), ("cu12", "10.3.0"), ("cu12", "10.16.1.11"),
                                  ("cu12", "11.4.0.106"), ("cu13", "10.16.1.11"), ("cu13", "11.4.0.106")]}
CUDA_BINDINGS = {version: Wheel("cuda-bindings", version) for version in ("12.8.0", "12.9.10", "13.5.0")}
# cuda-bindings >= 12.9 finds libcuda through cuda-pathfinder (every release above needs ~= 1.1 / >= 1.4.2).
PATHFINDER = Wheel("cuda-pathfinder", "1.9.1")


def _download(wheel: Wheel) -> str:
    """'' once the wheel is unpacked in the cache, else why it could not be had."""
    if wheel.folder().is_dir():
        return ""
    with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
        try:
            result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                                     "--only-binary=:all:", "--disable-pip-version-check", "--dest", scratch,
                                     wheel.label], capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"{wheel.label}: no package index answered within {DOWNLOAD_TIMEOUT_S} s"
        files = list(Path(scratch).glob("*.whl"))
        if result.returncode != 0 or len(files) != 1:
            lines = (result.stderr or result.stdout).strip().splitlines()
            return f"{wheel.label}: pip download failed ({lines[-1] if lines else result.returncode})"
        unpacked = Path(scratch) / "unpacked"
        with zipfile.ZipFile(files[0]) as archive:
            archive.extractall(unpacked)
        _move_into_place(unpacked, wheel.folder())
    return ""


def _move_into_place(made: Path, target: Path) -> None:
    """Whole or not at all; another run that put it there first is as good."""
    try:
        made.rename(target)
    except OSError:
        if not target.is_dir():
            raise


def _stubs(soname_major: str) -> Path:
    """The stub libraries with TensorRT's sonames of one major release, compiled once."""
    digest = hashlib.sha256(STUB_SOURCE.encode()).hexdigest()[:12]
    folder = CACHE / f"stubs-{soname_major}-{digest}"
    if folder.is_dir():
        return folder
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler here to build the stub TensorRT libraries")
    with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
        source = Path(scratch) / "stub.c"
        source.write_text(STUB_SOURCE)
        built = Path(scratch) / "libs"
        built.mkdir()
        for library in STUB_LIBRARIES:
            name = f"{library}.so.{soname_major}"
            subprocess.run([compiler, "-shared", "-fPIC", f"-Wl,-soname,{name}", "-o", str(built / name),
                            str(source)], check=True, capture_output=True, timeout=120)
        _move_into_place(built, folder)
    return folder


def fetch_all() -> str:
    """Every wheel above in the cache ('' when they are), fetched side by side; else why not."""
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = [*TENSORRT.values(), *CUDA_BINDINGS.values(), PATHFINDER]
    with ThreadPoolExecutor(len(wheels)) as pool:
        problems = [problem for problem in pool.map(_download, wheels) if problem]
    return "; ".join(problems)


@dataclass(frozen=True)
class Bindings:
    """One TensorRT and one cuda-bindings release, as a child process's environment."""

    tensorrt: Wheel = None
    cuda: Wheel = None

    def environment(self, front: Path, extra_paths=()) -> dict:
        paths, libraries = list(extra_paths), []
        if self.tensorrt is not None:
            major = self.tensorrt.version.split(".")[0]
            paths += [front, self.tensorrt.folder()]
            libraries.append(_stubs(major))
        if self.cuda is not None:
            paths += [self.cuda.folder(), PATHFINDER.folder()]
        paths.append(REPO / "tests")
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(map(str, [*paths, environment.get("PYTHONPATH", "")]))
        environment["LD_LIBRARY_PATH"] = os.pathsep.join(map(str, [*libraries,
                                                                   environment.get("LD_LIBRARY_PATH", "")]))
        return environment


class RealBindings:
    """Runs Python in a child process over the real bindings of chosen releases."""

    def __init__(self, front: Path):
        self.front = front

    def run(self, bindings: Bindings, args: list, timeout: float = 120, extra_paths=()) -> subprocess.CompletedProcess:
        """`python args...` over those releases; `extra_paths` first on its path."""
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                              env=bindings.environment(self.front, extra_paths))

    def start(self, bindings: Bindings, args: list) -> subprocess.Popen:
        """The same, started and not waited for (several releases side by side)."""
        return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=bindings.environment(self.front))


def real_bindings_factory(tmp_path_factory) -> RealBindings:
    """The fixture's body: every wheel in the cache (or a skip saying why not), TensorRT's front."""
    problem = fetch_all()
    if problem:
        pytest.skip(f"the real TensorRT / cuda-bindings wheels could not be had: {problem}")
    front = tmp_path_factory.mktemp("tensorrt-front")
    (front / "tensorrt").mkdir()
    (front / "tensorrt" / "__init__.py").write_text(TENSORRT_FRONT)
    return RealBindings(front)
