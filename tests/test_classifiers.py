"""cellkit.classifiers: the reports' architectures layer by layer, the registry, and saving with metadata."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from cellkit import classifiers, runtime, saving, transforms
from cellkit.datasets import DataError


def conv_rows(model):
    return [row for row in classifiers.layer_table(model) if row["type"] == "Conv2D"]


def dense_rows(model):
    return [row for row in classifiers.layer_table(model) if row["type"] == "Dense"]


def test_original_lenet_is_the_reports():
    model = classifiers.build("lenet-original", n_classes=8, input_size=28)
    convs = conv_rows(model)
    assert [(r["filters_or_units"], r["kernel_size"], r["padding"], r["activation"]) for r in convs] == [
        (6, (5, 5), "valid", "tanh"), (16, (5, 5), "valid", "tanh"),
    ]
    assert [(r["filters_or_units"], r["activation"]) for r in dense_rows(model)] == [
        (120, "tanh"), (84, "tanh"), (8, "softmax"),
    ]
    assert [layer.name for layer in model.layers] == ["C1", "S2", "C3", "S4", "Flatten", "C5", "F6", "Output"]
    # 28 -> 24 -> 12 -> 8 -> 4: 456 + 2416 + (4*4*16*120 + 120) + (120*84 + 84) + (84*8 + 8)
    assert model.count_params() == 456 + 2416 + 30840 + 10164 + 680
    # at the report's 48x48: 48 -> 44 -> 22 -> 18 -> 9
    wide = classifiers.build("lenet-original", 8, 48)
    assert wide.count_params() == 456 + 2416 + (9 * 9 * 16 * 120 + 120) + 10164 + 680


def test_custom_lenet_is_the_reports():
    model = classifiers.build("lenet", n_classes=8, input_size=28)
    rows = classifiers.layer_table(model)
    assert [r["type"] for r in rows] == [
        "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dense", "Dense",
    ]
    assert [(r["filters_or_units"], r["kernel_size"], r["padding"], r["activation"]) for r in conv_rows(model)] == [
        (32, (3, 3), "same", "relu"), (64, (3, 3), "same", "relu"),
    ]
    assert [(r["filters_or_units"], r["activation"]) for r in dense_rows(model)] == [
        (128, "relu"), (84, "tanh"), (8, "softmax"),
    ]
    assert model.count_params() == 896 + 18496 + (7 * 7 * 64 * 128 + 128) + (128 * 84 + 84) + (84 * 8 + 8)


def test_custom_alexnet_is_the_reports_at_48():
    model = classifiers.build("alexnet", n_classes=8)
    assert model.input_shape == (None, 48, 48, 3)
    convs = conv_rows(model)
    assert [r["filters_or_units"] for r in convs] == [96, 256, 384, 384, 256]
    assert {(r["kernel_size"], r["padding"], r["activation"]) for r in convs} == {((3, 3), "same", "relu")}
    types = [r["type"] for r in classifiers.layer_table(model)]
    assert types.count("BatchNormalization") == 2 and types.count("MaxPooling2D") == 3
    assert [(r["filters_or_units"], r["activation"]) for r in dense_rows(model)] == [
        (1024, "relu"), (1024, "relu"), (8, "softmax"),
    ]
    assert [r["rate"] for r in classifiers.layer_table(model) if r["type"] == "Dropout"] == [0.5, 0.5]
    convs_params = 2688 + 221440 + 885120 + 1327488 + 884992
    dense_params = (6 * 6 * 256 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 8 + 8)
    assert model.count_params() == convs_params + 4 * (96 + 256) + dense_params


def test_cellnet_is_small_and_takes_any_size():
    small = classifiers.build("cellnet", 8, 28)
    assert small.count_params() < 400_000
    assert classifiers.build("cellnet", 8, 48).count_params() == small.count_params()  # global pooling
    assert small.layers[-1].compute_dtype == "float32"


def test_registry_is_a_dict_of_builders_with_size_and_scaling():
    for name, entry in classifiers.REGISTRY.items():
        assert entry.name == name and entry.preprocessing in classifiers.PREPROCESSING and entry.input_size >= 8
        assert callable(entry.builder)
    assert classifiers.DEFAULT_MODEL in classifiers.REGISTRY


def test_registry_is_easy_to_extend():
    def tiny(input_shape, n_classes):
        keras = runtime.keras_module()
        return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(),
                                 keras.layers.Dense(n_classes, activation="softmax")])

    try:
        classifiers.register(classifiers.ModelSpec("tiny-test", tiny, input_size=12, preprocessing="01"))
        assert classifiers.build("tiny-test", 3).input_shape == (None, 12, 12, 3)
    finally:
        classifiers.REGISTRY.pop("tiny-test", None)


def test_unknown_model_and_too_small_input_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown model 'lenet5'.*lenet-original"):
        classifiers.spec("lenet5")
    with pytest.raises(ValueError, match="at least 14x14") as info:
        classifiers.build("lenet-original", 8, 10)
    assert "\n" not in str(info.value)


def test_prepare_images_any_mode_and_size():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (363, 360, 3), dtype=np.uint8)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    grey16 = (rgb.mean(axis=2) * 257).astype(np.uint16)
    thumb = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    out = classifiers.prepare_images([rgb, rgba, grey16, thumb], size=28, crop=200)
    assert out.shape == (4, 28, 28, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], out[1])  # alpha dropped
    assert np.all(out[2, ..., 0] == out[2, ..., 1])  # grey copied to 3 channels
    np.testing.assert_array_equal(out[3], thumb)  # already the model's size: unchanged
    with pytest.raises(DataError, match="grey or RGB"):
        classifiers.to_uint8_rgb(np.zeros((4, 4, 5), np.uint8))


def test_test_time_views_are_the_eight_symmetries():
    x = np.arange(2 * 3 * 3 * 1).reshape(2, 3, 3, 1)
    views = {transforms.dihedral_view(x, k, f).tobytes() for k, f in classifiers.TTA_VIEWS["dihedral"]}
    assert len(views) == 8
    assert len(classifiers.TTA_VIEWS["flips"]) == 4


def test_predict_rejects_images_of_the_wrong_shape():
    model = classifiers.build("lenet", 8, 28)
    with pytest.raises(ValueError, match=r"takes images of shape \(28, 28, 3\), got \(32, 32, 3\)"):
        classifiers.predict_proba(model, np.zeros((2, 32, 32, 3), np.uint8))


def test_save_load_round_trip_keeps_metadata_and_predictions(tmp_path):
    keras = runtime.keras_module()
    keras.utils.set_random_seed(0)
    model = classifiers.build("lenet", 3, 28)
    info = classifiers.ModelInfo("lenet", ["a", "b", "c"], 28, "pm1", crop=200, tta="flips", trained_on="test")
    path = classifiers.save(model, info, tmp_path / "m.keras", extra={"summary": {"accuracy": 0.5}})
    with zipfile.ZipFile(path) as archive:
        assert saving.METADATA_ENTRY in archive.namelist()
    beside = json.loads(saving.sidecar_path(path).read_text())
    assert beside["model_info"]["class_names"] == ["a", "b", "c"] and beside["summary"]["accuracy"] == 0.5

    loaded = classifiers.load(path)
    assert loaded.info == info
    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28, 3), dtype=np.uint8)
    np.testing.assert_allclose(loaded.predict_proba(images), classifiers.predict_proba(model, images, "pm1", "flips"),
                               atol=1e-5)


def test_mixed_precision_models_are_saved_as_float32(tmp_path):
    keras = runtime.keras_module()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = classifiers.build("cellnet", 2, 16)
    finally:
        keras.config.set_dtype_policy("float32")
    assert model.layers[1].compute_dtype == "bfloat16"
    path = classifiers.save(model, classifiers.ModelInfo("cellnet", ["x", "y"], 16), tmp_path / "bf16.keras")
    loaded = classifiers.load(path)
    assert {layer.compute_dtype for layer in loaded.model.layers} == {"float32"}


def test_loading_bad_files_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="no such model file"):
        classifiers.load(tmp_path / "missing.keras")
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a .keras model file"):
        classifiers.load(broken)


# --- report 000's models (notebook 05) ----------------------------------------------------------------------


def trainable_params(model):
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def test_report000_models_are_registered_with_their_input_sizes():
    assert {"basic-cnn", "resnet18", "resnet50", "vit"} <= set(classifiers.REGISTRY)
    sizes = {name: classifiers.spec(name).input_size for name in ("basic-cnn", "resnet18", "resnet50", "vit")}
    assert sizes == {"basic-cnn": 28, "resnet18": 28, "resnet50": 32, "vit": 28}
    for name in ("basic-cnn", "resnet18", "resnet50", "vit"):
        model = classifiers.build(name, n_classes=8)
        assert model.output_shape == (None, 8), name
        assert model.layers[-1].compute_dtype == "float32", name


def test_basic_cnn_is_two_conv_relu_maxpool_layers():
    model = classifiers.build("basic-cnn", 8, 28)
    assert [(r["filters_or_units"], r["kernel_size"], r["padding"], r["activation"]) for r in conv_rows(model)] == [
        (32, (3, 3), "same", "relu"), (64, (3, 3), "same", "relu"),
    ]
    # the report's 50x50 -> 12x12 after the two pools; 28 -> 7 here
    assert classifiers.build("basic-cnn", 8, 50).get_layer("pool2").output.shape[1:3] == (12, 12)
    assert model.count_params() == 896 + 18496 + (7 * 7 * 64 * 128 + 128) + (128 * 8 + 8)


def test_resnet18_has_torchvisions_parameter_count():
    model = classifiers.build("resnet18", 8, 28)
    assert len(conv_rows(model)) == 17 + 3  # 17 convolutions on the main path, 3 projection shortcuts
    # torchvision's resnet18: 11,689,512 trainable parameters with a 1000-class head (512 * 1000 + 1000)
    assert trainable_params(model) == 11_689_512 - 513_000 + (512 * 8 + 8)
    assert model.get_layer("stage4_block2_out").output.shape[1:] == (1, 1, 512)


def test_resnet50_is_keras_applications_without_weights():
    model = classifiers.build("resnet50", 8)
    assert model.input_shape == (None, 32, 32, 3)
    assert model.count_params() == 23_587_712 + 2048 * 8 + 8  # ResNet50(include_top=False) + the head
    momenta = {layer.momentum for layer in model.get_layer("resnet50").layers if hasattr(layer, "momentum")}
    assert momenta == {0.9}


def test_vit_tokens_and_size():
    model = classifiers.build("vit", 8, 28)
    assert model.get_layer("tokens").output.shape[1:] == (49, 64)  # 7 x 7 patches of 4 x 4
    assert model.get_layer("position_embedding").weights[0].shape == (49, 64)
    assert 50_000 < model.count_params() < 500_000
    assert classifiers.build("vit", 8, 32).get_layer("tokens").output.shape[1:] == (64, 64)


@pytest.mark.parametrize(("name", "size", "message"), [
    ("vit", 30, "multiple of 4"), ("resnet50", 28, "at least 32x32"), ("resnet18", 4, "at least 8x8"),
])
def test_wrong_input_size_is_a_one_line_error(name, size, message):
    with pytest.raises(ValueError, match=message) as info:
        classifiers.build(name, 8, size)
    assert "\n" not in str(info.value) and repr(name) in str(info.value)


@pytest.mark.parametrize("name", ["vit", "resnet18"])
def test_new_models_save_and_load_in_safe_mode(name, tmp_path):
    model = classifiers.build(name, 3, 28)
    info = classifiers.ModelInfo(model=name, class_names=["a", "b", "c"], input_size=28)
    path = classifiers.save(model, info, tmp_path / f"{name}.keras")
    loaded = classifiers.load(path)
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 3), dtype=np.uint8)
    np.testing.assert_allclose(loaded.predict_proba(images), classifiers.predict_proba(model, images), atol=1e-5)
