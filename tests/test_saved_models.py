"""Models saved before the package was split into one job per file still load, and predict as they did.

``fixtures/before_the_move.json`` was recorded with the code before the move (commit 0a436c8) from models trained
at that commit: the default classifier (``cellkit train classifier``) and the default U-Net recipe cut to 3 epochs
(``cellkit train unet --epochs 3``: the same architecture, metadata and post-processing tuning as the 40-epoch default,
so the same code paths). It holds their metadata, the training record's U-Net configuration, and what they predicted
on a handful of real images (PBC-28 test images, PBC JPEG originals, one DSB test image of each size group).

The file-layout tests run everywhere. The two that compare predictions need those very model files in ``models/``
(checked by sha256); they are not committed, so elsewhere these two skip and say why.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cellkit import classifiers, config, datasets, runtime, unet
from cellkit.datasets import DataError

BEFORE = json.loads((Path(__file__).parent / "fixtures" / "before_the_move.json").read_text())
#: What the U-Net metadata of layout 1 held, all of it read back into the one configuration.
UNET_V1_FIELDS = ("n_classes", "channels", "base_filters", "depth", "dropout", "batch_norm", "normalise",
                  "canny_thresholds", "edge_width", "postprocess", "tile", "overlap", "trained_on", "nucleus_diameter")


def _saved_before_the_move(folder: Path, network, metadata: dict, record: dict | None) -> Path:
    """A model file as the code before the move laid it out: the network, ``cellkit.json`` inside, and (when
    ``record`` is given) ``NAME.json`` beside it with the training record."""
    path = folder / "old.keras"
    network.save(path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("cellkit.json", json.dumps(metadata))
    if record is not None:
        path.with_suffix(".json").write_text(json.dumps({"model_info": metadata, **record}))
    return path


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.fixture(scope="module")
def old_network():
    """A network of the default U-Net's architecture (random weights: only the file layout matters here)."""
    old = BEFORE["unet"]["metadata"]
    runtime.keras_module().utils.set_random_seed(0)
    return unet.build_unet(len(old["channels"]), old["n_classes"], old["base_filters"], old["depth"], old["dropout"],
                           old["batch_norm"])


def test_a_unet_saved_before_the_move_loads_with_every_setting_it_carried(old_network, tmp_path, real_data):
    old, record = BEFORE["unet"]["metadata"], {"unet_config": BEFORE["unet"]["record_unet_config"]}
    assert old["format_version"] == 1 and "augmentation" not in old  # the layout before the move
    loaded = unet.load_unet(_saved_before_the_move(tmp_path, old_network, old, record))
    for name in UNET_V1_FIELDS:
        assert _plain(getattr(loaded.config, name)) == old[name], name
    for name in ("augmentation", "crop", "epochs", "learning_rate", "crop_sampling"):  # from the training record
        assert _plain(getattr(loaded.config, name)) == record["unet_config"][name], name
    image = datasets.load_dsb2018([BEFORE["unet"]["images"][0]["id"]]).images[0]
    expected, _ = unet.TrainedUNet(old_network, loaded.config).segment(image)
    np.testing.assert_array_equal(loaded.segment(image)[0], expected)


def test_older_unet_files_take_the_defaults_their_readers_assumed(old_network, tmp_path):
    old = {k: v for k, v in BEFORE["unet"]["metadata"].items() if k not in ("tile", "nucleus_diameter")}
    training = {k: v for k, v in BEFORE["unet"]["record_unet_config"].items() if k != "crop_sampling"}
    loaded = unet.read_unet_config(_saved_before_the_move(tmp_path, old_network, old, {"unet_config": training}))
    assert loaded.tile == 256 and loaded.nucleus_diameter is None  # the layout-1 reader's defaults
    assert loaded.crop_sampling == "image"  # records older than the option: crops picked images uniformly
    alone = unet.read_unet_config(_saved_before_the_move(tmp_path, old_network, BEFORE["unet"]["metadata"], None))
    assert alone.postprocess == BEFORE["unet"]["metadata"]["postprocess"]
    assert alone.augmentation == unet.UNetConfig().augmentation  # no record: training fields at their defaults


def test_unusable_unet_metadata_is_one_line_that_says_to_retrain(old_network, tmp_path):
    broken = {**BEFORE["unet"]["metadata"], "n_classes": 5}
    with pytest.raises(DataError, match="retrain") as error:
        unet.load_unet(_saved_before_the_move(tmp_path, old_network, broken, None))
    assert "\n" not in str(error.value) and "old.keras" in str(error.value)


def test_the_classifier_metadata_layout_is_unchanged(tmp_path):
    old = BEFORE["classifier"]["metadata"]
    network = classifiers.build(old["model"], len(old["class_names"]), old["input_size"])
    loaded = classifiers.load(_saved_before_the_move(tmp_path, network, old, {}))
    assert loaded.info.to_dict() == old


def _default_model(name: str, sha256: str) -> Path:
    path = config.models_dir() / name
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
        pytest.skip(f"needs models/{name} as trained before the move (sha256 {sha256[:12]}...), which only the "
                    "machine that recorded the fixture has; the file-layout tests above run everywhere")
    return path


def test_the_default_classifier_trained_before_the_move_predicts_as_it_did(real_data):
    before = BEFORE["classifier"]
    trained = classifiers.load(_default_model(before["file"], before["sha256"]))
    test = datasets.load_pbc28("test")
    for row in before["images"]:
        if row["source"] == "pbc28 test":
            image = test.images[row["index"]]
        else:
            image = datasets.read_image(datasets.locate("pbc_jpg") / row["file"])
        proba = trained.predict_proba(trained.prepare([image]))[0]
        np.testing.assert_allclose(proba, row["proba"], atol=1e-6)
        assert int(proba.argmax()) == int(np.argmax(row["proba"]))


def test_the_default_unet_trained_before_the_move_segments_as_it_did(real_data):
    before = BEFORE["unet"]
    trained = unet.load_unet(_default_model(before["file"], before["sha256"]))
    data = datasets.load_dsb2018([row["id"] for row in before["images"]])
    for row, image in zip(before["images"], data.images, strict=True):
        labels, _ = trained.segment(image)
        assert list(labels.shape) == row["shape"] and int(labels.max()) == row["n_nuclei"]
        assert hashlib.sha256(labels.astype(np.int32).tobytes()).hexdigest() == row["labels_sha256"], row["id"]
