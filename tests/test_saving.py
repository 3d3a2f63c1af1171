"""The model file: metadata inside, a checksum of the weights, and one line for every damaged file."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from cellkit import classifiers, runtime, saving, synthetic, unet
from cellkit.datasets import DataError


@pytest.fixture
def saved(tmp_path):
    """A small classifier saved by cellkit, and the bytes of the file."""
    runtime.keras_module().utils.set_random_seed(0)
    path = classifiers.save(classifiers.build("lenet", 3), classifiers.ModelInfo("lenet", ["a", "b", "c"], 28),
                            tmp_path / "lenet.keras")
    return path, path.read_bytes()


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_the_weights_checksum_travels_inside_the_model(saved):
    path, _ = saved
    metadata = saving.read_metadata(path)
    with zipfile.ZipFile(path) as archive:
        import hashlib

        assert metadata[saving.WEIGHTS_CHECKSUM] == hashlib.sha256(archive.read(saving.WEIGHTS_ENTRY)).hexdigest()
    assert classifiers.load(path).info.model == "lenet"
    assert saving.model_kind(path) == "classifier"


@pytest.mark.parametrize("where", [0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
def test_a_flipped_bit_anywhere_is_one_line(saved, tmp_path, where):
    path, data = saved
    damaged = bytearray(data)
    damaged[int(where * len(damaged))] ^= 0x04
    copy = tmp_path / "damaged.keras"
    copy.write_bytes(bytes(damaged))
    with pytest.raises(DataError) as error:
        classifiers.load(copy)
    assert "damaged.keras" in _one_line(error)


def test_other_weights_in_a_valid_archive_are_refused(saved, tmp_path):
    path, _ = saved
    other = classifiers.save(classifiers.build("lenet", 3), classifiers.ModelInfo("lenet", ["a", "b", "c"], 28),
                             tmp_path / "other.keras")
    altered = tmp_path / "altered.keras"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(other) as donor, zipfile.ZipFile(altered, "w") as out:
        for name in source.namelist():  # the first model's metadata with the second model's weights
            out.writestr(name, (donor if name == saving.WEIGHTS_ENTRY else source).read(name))
    with pytest.raises(DataError, match="do not match the checksum") as error:
        classifiers.load(altered)
    _one_line(error)


def test_garbage_invalid_metadata_and_missing_files_are_one_line(saved, tmp_path):
    path, _ = saved
    (tmp_path / "garbage.keras").write_bytes(b"\0" * 1000)
    with pytest.raises(DataError, match="not a .keras model file"):
        classifiers.load(tmp_path / "garbage.keras")
    broken = tmp_path / "broken.keras"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(broken, "w") as out:
        for name in source.namelist():
            out.writestr(name, b"{not json" if name == saving.METADATA_ENTRY else source.read(name))
    with pytest.raises(DataError, match="not valid JSON") as error:
        classifiers.load(broken)
    assert "broken.keras" in _one_line(error)
    with pytest.raises(DataError, match="no such model file"):
        unet.load_unet(tmp_path / "nowhere.keras")


def test_models_saved_without_a_checksum_still_load(saved, tmp_path):
    path, _ = saved
    old = tmp_path / "old.keras"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(old, "w") as out:
        for name in source.namelist():
            data = source.read(name)
            if name == saving.METADATA_ENTRY:
                data = json.dumps({k: v for k, v in json.loads(data).items() if k != saving.WEIGHTS_CHECKSUM})
            out.writestr(name, data)
    assert classifiers.load(old).info.class_names == ["a", "b", "c"]


def test_non_finite_network_outputs_stop_with_one_line(tmp_path):
    model = classifiers.build("lenet", 3)
    model.set_weights([np.full_like(w, np.nan) for w in model.get_weights()])
    with pytest.raises(DataError, match="NaN or infinite") as error:
        classifiers.predict_proba(model, np.zeros((2, 28, 28, 3), np.uint8))
    _one_line(error)
    config = unet.UNetConfig(base_filters=4, depth=2, crop=64, val_crop_size=64, tile=64, nucleus_diameter=None)
    network = unet.build_from_config(config)
    network.set_weights([np.full_like(w, np.nan) for w in network.get_weights()])
    with pytest.raises(DataError, match="NaN or infinite"):
        unet.TrainedUNet(network, config, eager=True).segment(synthetic.nuclei_field(shape=(64, 64)).fluorescence)
