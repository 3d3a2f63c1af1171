"""Shared fixtures. The suite runs on the real datasets: it fails, not skips, when they are missing."""

from __future__ import annotations

import os
from pathlib import Path

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


@pytest.fixture(scope="session")
def smoke_executed(tmp_path_factory) -> Path:
    """Where the smoke runs of the notebooks leave their executed copies, for the course website's test to render."""
    folder = tmp_path_factory.getbasetemp() / "executed-smoke"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def tiny_models(real_data, tmp_path_factory) -> Path:
    """A folder with ``lenet.keras`` (one epoch on 20 real PBC-28 images per class) and ``unet.keras`` (4 filters,
    6 steps on 6 real DSB images): every code path of a model file in seconds; their predictions are not good.
    Shared by the tests of the app and of export, which only read it."""
    from cellkit import datasets, training, unet

    folder = tmp_path_factory.mktemp("tiny_models")
    train = datasets.per_class(datasets.load_pbc28("train"), 20)
    val = datasets.per_class(datasets.load_pbc28("val"), 5)
    run = training.train_classifier("lenet", train, val, crop=datasets.loaders.PBC_CROP, epochs=1, progress="none",
                                    measure_throughput=False)
    run.save(folder / "lenet.keras")
    manifest = datasets.load_dsb2018_manifest()
    ids = manifest.loc[manifest["size_group"] == "256x256", "image_id"].iloc[:8].tolist()
    segmenter = unet.train_unet(datasets.load_dsb2018(ids[:6]), datasets.load_dsb2018(ids[6:]),
                                config=unet.UNetConfig(epochs=2, steps_per_epoch=3, base_filters=4, crop=64,
                                                       batch_size=4, val_crops=4, val_crop_size=64),
                                progress="none", tune=False, measure_throughput=False)
    segmenter.save(folder / "unet.keras")
    return folder
