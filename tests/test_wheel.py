"""A wheel built from the repository works where no checkout is: in a fresh virtual environment.

The stages live at the repository's root and install as trufor_trt.* through pyproject's
package-dir; an editable install resolves those through a finder that points into the
checkout, so only a real wheel in a venv of its own shows that the mapping ships every part.
"""

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import IMAGES_DIR, REPO

pytestmark = pytest.mark.slow

STAGES = ("engine", "export", "calibration", "benchmarks", "precision", "model", "batch")
# What is not source: build leftovers in the checkout would let a stale file into the wheel.
NOT_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".venv", "tests")


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, command))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    """A venv with no site-packages of this machine, holding the wheel and its extras."""
    scratch = tmp_path_factory.mktemp("wheel")
    source, wheels, venv = scratch / "source", scratch / "wheels", scratch / "venv"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    _run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-w", str(wheels)])
    (wheel,) = wheels.glob("trufor_trt-*.whl")
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    # torch pinned to the CPU build this workplace has on disk; a bare range pulls a CUDA build.
    _run([str(python), "-m", "pip", "install", "--quiet", "torch==2.13.0", f"{wheel}[export,cpu]"])
    return venv


def test_the_wheel_imports_every_part_from_the_venv_not_the_checkout(fresh_venv):
    python = fresh_venv / "bin" / "python"
    probe = ("import importlib, sys\n"
             f"for part in {STAGES!r}:\n"
             "    module = importlib.import_module('trufor_trt.' + part)\n"
             "    print(module.__file__)\n")
    printed = _run([str(python), "-c", probe], cwd=fresh_venv).stdout.split()
    assert len(printed) == len(STAGES)
    for path in printed:
        assert Path(path).resolve().is_relative_to(fresh_venv.resolve()), path


def _quick_start_blocks() -> list:
    """The README quick start's bash blocks, each a list of lines."""
    section = (REPO / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip().splitlines() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_the_readme_quick_start_runs_as_written_and_leaves_one_random_model(fresh_venv, tmp_path):
    """The quick start's commands after the install, as written, in the wheel's venv (made as its
    install lines say: a venv, torch 2.13.0 CPU, the `export` extra; the wheel stands in for the
    checkout, this machine's torch wheel for PyTorch's index): the selftest, then the demo on a
    folder of photos. With `bench` after them the cache holds one random model (issue 41)."""
    install, official, demo = _quick_start_blocks()
    assert install[0].startswith("python3 -m venv") and '"torch==2.13.0"' in install[1] and '".[export]"' in install[2]
    assert official == ["trufor-trt weights download", "trufor-trt analyze photos/ --out results --report"]
    photos = tmp_path / "photos"
    photos.mkdir()
    for source in sorted((IMAGES_DIR / "cocoglide_sample" / "fake").glob("*.png"))[:2]:
        shutil.copy(source, photos)
    environment = {**os.environ, "PATH": f"{fresh_venv / 'bin'}:{os.environ['PATH']}",
                   "TRUFOR_TRT_CACHE": str(tmp_path / "cache"), "TRUFOR_TRT_DATA": str(tmp_path / "data")}
    help_text = _run(["trufor-trt", "--help"], cwd=tmp_path, env=environment).stdout
    for name in ("analyze", "export", "build", "selftest", "bench", "weights"):
        assert name in help_text
    # Its backend on a CPU is ONNX Runtime: this is also the suite's selftest on the CPU.
    selftest = _run(["bash", "-e", "-c", "\n".join(install[3:])], cwd=tmp_path, env=environment)
    assert "PASS: onnxruntime" in selftest.stdout
    # The export's steps are said while it runs, without the exporter's own notes (issue 41).
    assert "verifying every graph against the float64 network" in selftest.stderr
    assert "Constant folding" not in selftest.stderr, selftest.stderr
    demo_run = _run(["bash", "-e", "-c", "\n".join(demo)], cwd=tmp_path, env=environment)
    assert "exporting" not in demo_run.stderr  # the selftest's model, from the cache
    with open(tmp_path / "demo" / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["status"] for row in rows] == ["ok", "ok"] and {row["official"] for row in rows} == {"False"}
    assert (tmp_path / "demo" / "report.html").is_file()
    _run(["trufor-trt", "bench", "--sizes", "64x64", "--warmup", "0", "--repeat", "1", "--streams", "0"],
         cwd=tmp_path, env=environment)
    assert [path.name for path in (tmp_path / "cache" / "checkpoints").iterdir()] == ["random-seed0.pth.tar"]
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 1


# JetPack 6 (Ubuntu 22.04, glibc 2.35) on Python 3.10: the wheels its pip takes.
JETPACK6_PLATFORMS = ["manylinux2014_aarch64", *(f"manylinux_2_{minor}_aarch64" for minor in range(17, 36))]


def _resolve_for_jetson(requirements: list, platforms: list, target: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--disable-pip-version-check", "--target", str(target), "--python-version", "3.10",
                           "--only-binary=:all:", *(f"--platform={platform}" for platform in platforms),
                           *requirements], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("extra, platforms", [(None, ["manylinux2014_aarch64"]), ("cpu", JETPACK6_PLATFORMS)],
                         ids=["base-manylinux2014", "cpu-jetpack6"])
def test_a_jetson_install_resolves_to_aarch64_cp310_wheels(extra, platforms, tmp_path):
    """What `pip install trufor-trt` (and `[cpu]`) asks for, resolved as JetPack 6's Python 3.10
    would: every dependency in pyproject has an aarch64 / cp310 wheel. (onnxruntime >= 1.17
    publishes aarch64 wheels for glibc 2.28 only, which JetPack 6's 2.35 runs.)"""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *(project["optional-dependencies"][extra] if extra else [])]
    result = _resolve_for_jetson(requirements, platforms, tmp_path / "target")
    if any(sign in result.stderr for sign in ("(from versions: none)", "NewConnectionError", "Failed to establish")):
        pytest.skip(f"no package index answered: {result.stderr.strip().splitlines()[-1]}")
    missing = [line for line in result.stderr.splitlines() if "No matching distribution found for" in line]
    assert not missing, f"no aarch64 / cp310 wheel: {missing}"
    if result.returncode != 0:
        pytest.skip(f"no package index answered: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
