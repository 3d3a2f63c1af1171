"""The environment is pinned exactly, pyproject.toml and environment.yml agree, and imports run one way."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib

import yaml

from cellkit import config

PIN = re.compile(r"^([A-Za-z0-9_.\-\[\]]+)==([A-Za-z0-9_.\-+]+)$")


def _pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((config.PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["dev"]
    pins = {}
    for requirement in requirements:
        match = PIN.match(requirement.strip())
        assert match, f"pyproject.toml: {requirement!r} is not pinned exactly (name==version)"
        pins[match.group(1).lower()] = match.group(2)
    return pins


def _environment_pins() -> dict[str, str]:
    environment = yaml.safe_load((config.PROJECT_ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict) and "pip" in d)
    pins = {}
    for requirement in pip_section:
        match = PIN.match(requirement.strip())
        assert match, f"environment.yml: {requirement!r} is not pinned exactly"
        pins[match.group(1).lower()] = match.group(2)
    return pins


def test_pyproject_and_environment_pins_agree():
    assert _pyproject_pins() == _environment_pins()


def test_installed_versions_match_the_pins():
    from importlib import metadata

    for name, version in _pyproject_pins().items():
        assert metadata.version(name) == version, f"{name}: installed {metadata.version(name)}, pinned {version}"


def test_ruff_is_clean():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", str(config.PROJECT_ROOT)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_library_modules_that_must_stay_light_do_not_import_keras():
    # the command line answers --help and rejects a wrong model file before TensorFlow has loaded
    light = ("datasets", "plots", "notebooks", "config", "metrics", "segmentation", "transforms", "features", "cli",
             "runtime", "saving", "classifiers", "unet", "inference", "formats", "blockwise")
    code = (
        f"import sys, {', '.join('cellkit.' + name for name in light)};"
        "heavy = [m for m in ('keras', 'tensorflow') if m in sys.modules]; print(heavy); sys.exit(bool(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"imported {result.stdout.strip()} {result.stderr[-500:]}"


def _package_imports() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports, at module or function level."""
    modules = {}
    for path in (config.PACKAGE_DIR).rglob("*.py"):
        parts = path.relative_to(config.PROJECT_ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {other for other in found if other in modules and other not in (name, "cellkit")}
    return graph


def test_no_two_modules_import_each_other():
    graph = _package_imports()
    circles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in graph.get(b, set())})
    assert not circles, f"import circles: {circles}"


def test_the_library_never_imports_its_faces_or_the_notebook_runner():
    faces = {"cellkit.cli", "cellkit.app", "cellkit.notebooks"}
    wrong = {a: sorted(b & faces) for a, b in _package_imports().items() if a not in faces and b & faces}
    assert not wrong, f"library modules importing the command line, the app or the runner: {wrong}"
