"""Shared fixtures. The suite runs on the real datasets: it fails, not skips, when they are missing."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def real_data() -> dict:
    """Folders of the real datasets; fails the test with what to do when one is missing."""
    from cellkit import datasets

    try:
        return {name: datasets.require(name) for name in datasets.REGISTRY}
    except datasets.DatasetNotFound as error:
        pytest.fail(f"the tests need the real data: {error}")


@pytest.fixture
def no_real_data(tmp_path, monkeypatch):
    """Point every data search at empty folders, as on a machine with no data."""
    monkeypatch.setenv("CELLKIT_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("CELLKIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path
