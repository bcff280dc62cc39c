"""A wheel built from the repository works where no checkout is: in a fresh virtual environment.

The stages live at the repository's root and install as trufor_trt.* through pyproject's
package-dir; an editable install resolves those through a finder that points into the
checkout, so only a real wheel in a venv of its own shows that the mapping ships every part.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

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


def test_the_installed_command_shows_help_and_passes_selftest(fresh_venv):
    command = fresh_venv / "bin" / "trufor-trt"
    environment = {**os.environ, "TRUFOR_TRT_CACHE": str(fresh_venv / "cache")}
    help_text = _run([str(command), "--help"], cwd=fresh_venv, env=environment).stdout
    for name in ("analyze", "export", "build", "selftest", "bench"):
        assert name in help_text
    # Its backend on a CPU is ONNX Runtime: this is also the suite's selftest on the CPU.
    selftest = _run([str(command), "selftest"], cwd=fresh_venv, env=environment)
    assert "PASS: onnxruntime" in selftest.stdout
    # The export's steps are said while it runs, without the exporter's own notes (issue 41).
    assert "verifying every graph against the float64 network" in selftest.stderr
    assert "Constant folding" not in selftest.stderr, selftest.stderr


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
