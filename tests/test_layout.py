"""The layout's promises, read off the source: which part of the package imports which.

Every `import` and `from ... import` in the installed package's source (module level and inside
functions alike) is resolved to the trufor_trt module it names; the test then checks the
direction of the arrows between the package's parts.
"""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = "trufor_trt"


def _package_folders() -> dict:
    """Installed package name -> its folder, as pyproject.toml maps them."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setuptools.get("package-dir", {})
    return {name: REPO / mapped.get(name, name.replace(".", "/")) for name in setuptools["packages"]}


def _modules() -> dict:
    """Module name -> (package it belongs to, its source file)."""
    modules = {}
    for package, folder in _package_folders().items():
        for source in sorted(folder.glob("*.py")):
            name = package if source.stem == "__init__" else f"{package}.{source.stem}"
            modules[name] = (package, source)
    return modules


def _imported_names(module: str, package: str, source: Path) -> set:
    """The trufor_trt modules (or packages) `module` imports, wherever the import stands."""
    names = set()
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from .x import y` may import the module x.y or a name y defined in x.
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in names if name == PACKAGE or name.startswith(PACKAGE + ".")}


def _part(module: str) -> str:
    """The part of the package a module belongs to: a sub-package, or the top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


@pytest.fixture(scope="module")
def imports() -> dict:
    """Module -> the trufor_trt modules it imports (only names that are modules or packages)."""
    modules = _modules()
    return {name: {imported for imported in _imported_names(name, package, source)
                   if imported in modules}
            for name, (package, source) in modules.items()}


def _imports_of_part(imports: dict, part: str) -> set:
    return {imported for module, targets in imports.items() if _part(module) == part
            for imported in targets}


def test_every_mapped_package_folder_exists_and_the_stages_sit_at_the_root():
    folders = _package_folders()
    for name in ("export", "calibration", "engine", "benchmarks"):
        assert folders[f"{PACKAGE}.{name}"] == REPO / name
    assert all((folder / "__init__.py").is_file() for folder in folders.values())


def test_the_import_resolver_sees_real_imports(imports):
    # Guards the checks below against passing on an empty graph.
    assert "trufor_trt.engine.runner" in imports["trufor_trt.engine.onnxruntime_runner"]
    assert "trufor_trt.precision.fp16" in imports["trufor_trt.engine.onnxruntime_runner"]
    assert "trufor_trt.calibration.int8" in imports["trufor_trt.export.int8_plan"]


def test_engine_imports_nothing_from_export_or_calibration(imports):
    offending = {module for module in _imports_of_part(imports, "engine")
                 if _part(module) in ("export", "calibration")}
    assert not offending


def test_calibration_imports_nothing_from_export(imports):
    # export calls calibration to build the INT8 variant, so the reverse arrow would be a circle.
    assert not {module for module in _imports_of_part(imports, "calibration")
                if _part(module) == "export"}


def test_the_shared_precision_home_imports_no_stage(imports):
    stages = ("export", "calibration", "engine", "benchmarks", "batch")
    assert not {module for module in _imports_of_part(imports, "precision") if _part(module) in stages}


def test_no_circle_between_the_parts_of_the_package(imports):
    """Parts = sub-packages; the top-level modules that only serve others (architecture, bands,
    errors, files, ...) are leaves, the ways in (cli, selftest, validate, __main__) are roots."""
    entry_points = {f"{PACKAGE}.{name}" for name in ("cli", "selftest", "validate", "__main__")}

    def node(module):
        return module if _part(module) == PACKAGE else _part(module)

    edges = {}
    for module, targets in imports.items():
        for target in targets:
            if node(module) != node(target) and target != PACKAGE:
                edges.setdefault(node(module), set()).add(node(target))
    shared_modules = {module for module in imports if _part(module) == PACKAGE} - entry_points
    for module in shared_modules - {PACKAGE}:
        assert not edges.get(module, set()) - shared_modules, f"{module} imports a stage"

    def reaches(start, goal, seen=()):
        return any(step == goal or (step not in seen and reaches(step, goal, (*seen, step)))
                   for step in edges.get(start, ()))

    circles = sorted(part for part in edges if reaches(part, part))
    assert not circles


def _circle_through(imports: dict, start: str) -> list:
    """A chain of imports from `start` back to itself, or []."""
    def walk(module, chain):
        for target in sorted(imports.get(module, ())):
            if target == start:
                return [*chain, target]
            if target not in chain:
                found = walk(target, [*chain, target])
                if found:
                    return found
        return []

    return walk(start, [start])


def test_no_module_imports_itself_through_others(imports):
    """Module by module, counting the imports inside functions: a circle there is a design
    smell even where Python copes (the deferred import hides it)."""
    own = {module: {target for target in targets if target != module and target != PACKAGE}
           for module, targets in imports.items()}
    circles = [" -> ".join(chain) for module in sorted(own) if (chain := _circle_through(own, module))]
    assert not circles


def test_the_circle_finder_finds_a_circle():
    assert _circle_through({"a": {"b"}, "b": {"c"}, "c": {"a"}}, "a") == ["a", "b", "c", "a"]
    assert _circle_through({"a": {"b"}, "b": set()}, "a") == []


PROJECT_IMPORT = re.compile(r'Import "(\.|trufor_trt\b)')


@pytest.mark.slow
def test_pyright_resolves_every_import_of_the_projects_own_modules():
    """What an editor or type checker sees: run from the checkout, pyright must resolve every
    `trufor_trt...` import (the stage folders install as trufor_trt.engine etc.)."""
    pyright = shutil.which("pyright")
    if pyright is None:
        pytest.skip("pyright is not installed (the dev extra installs it)")
    try:
        finished = subprocess.run([pyright, "--outputjson"], cwd=REPO, capture_output=True, text=True,
                                  timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"pyright did not run here: {exc}")
    try:
        report = json.loads(finished.stdout)
    except json.JSONDecodeError:
        pytest.skip(f"pyright did not run here: {finished.stderr.strip()[:200]}")
    assert report["summary"]["filesAnalyzed"] > 100  # it read the project, not an empty folder
    unresolved = [f"{Path(item['file']).relative_to(REPO)}:{item['range']['start']['line'] + 1}: {item['message']}"
                  for item in report["generalDiagnostics"]
                  if item.get("rule") == "reportMissingImports" and PROJECT_IMPORT.search(item["message"])]
    assert not unresolved


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def test_modules_and_functions_stay_small():
    too_long = []
    for _, source in _modules().values():
        text = source.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{source.relative_to(REPO)}: {text.count(chr(10))} lines")
        too_long += [f"{source.relative_to(REPO)}: {node.name}() {node.end_lineno - node.lineno + 1} lines"
                     for node in ast.walk(ast.parse(text))
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                     and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not too_long


def test_the_suite_collects_where_torch_onnx_and_ray_are_not_installed(tmp_path):
    """A `cpu`-extra install (no torch, onnx, Ray): every test module still loads, and the
    tests that need those packages import them where they need them, skipping with a reason."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nfor name in ('torch', 'onnx', 'onnx_graphsurgeon', 'ray', 'tensorrt'):\n"
        "    sys.modules[name] = None  # import fails as if not installed\n")
    environment = {**os.environ, "PYTHONPATH": str(tmp_path)}
    finished = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                               str(REPO / "tests")], cwd=REPO, env=environment, capture_output=True, text=True,
                              timeout=300)
    assert finished.returncode == 0, finished.stdout[-2000:]


EXTRA_NAMED = re.compile(r'trufor-trt\[([a-z0-9,-]+)\]')


def test_every_extra_an_install_hint_names_exists():
    """The extras the code, the README and the install hints name are pyproject's (an old name
    in a hint sends a user to `pip install` something pip refuses)."""
    from trufor_trt.installed import MODULE_EXTRAS, install_command

    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    sources = [path for folder in ("trufor_trt", "export", "calibration", "engine", "benchmarks")
               for path in (REPO / folder).rglob("*.py")] + [REPO / "README.md"]
    texts = [path.read_text() for path in sources] + [install_command(module) for module in MODULE_EXTRAS]
    named = {extra for text in texts for group in EXTRA_NAMED.findall(text) for extra in group.split(",")}
    assert {"cpu", "trt-cu12", "trt-cu13-cuda-python"} <= named
    assert named <= extras, f"extras named that pyproject does not have: {named - extras}"


def test_no_readme_install_line_pulls_the_cuda_build_of_torch_unasked():
    """A bare `pip install torch` from PyPI is the multi-GB CUDA build (issue 41): every README
    line that installs torch takes the CPU index, or says it is the CUDA one."""
    lines = [line for line in (REPO / "README.md").read_text().splitlines()
             if "pip install" in line and re.search(r'"torch[=>]', line)]
    assert lines
    for line in lines:
        assert "download.pytorch.org/whl/cpu" in line or "CUDA" in line, line


def test_the_readme_stays_short_and_every_docs_page_is_linked_from_it():
    """The README keeps what a user needs to start, use and trust the tool; reference material
    lives in docs/, each page one link away (issue 41)."""
    readme = (REPO / "README.md").read_text()
    assert readme.count("\n") < 400
    assert [page.name for page in sorted((REPO / "docs").glob("*.md")) if f"(docs/{page.name})" not in readme] == []
