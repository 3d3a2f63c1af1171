"""The environment is pinned exactly, and pyproject.toml and environment.yml agree."""

from __future__ import annotations

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
    code = (
        "import sys, cellkit.datasets, cellkit.plots, cellkit.notebooks, cellkit.config;"
        "heavy = [m for m in ('keras', 'tensorflow') if m in sys.modules]; print(heavy); sys.exit(bool(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, f"imported {result.stdout.strip()} {result.stderr[-500:]}"
