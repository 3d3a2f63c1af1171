"""The U-Net (cellkit.unet): configuration, network, training and trained model, on tiny networks and simulated data."""

from __future__ import annotations

import json
import zipfile
from dataclasses import replace

import numpy as np
import pytest

from cellkit import classifiers, datasets, inference, metrics, runtime, saving, segmentation, synthetic, unet
from cellkit.datasets import DataError

keras = runtime.keras_module()


def test_unet_is_report_003s_configuration():
    net = unet.build_unet(input_channels=1, n_classes=1, base_filters=64)
    convs = [layer for layer in net.layers if type(layer).__name__ == "Conv2D"]
    assert [c.filters for c in convs[:10:2]] == [64, 128, 256, 512, 1024]  # doubling per level, then the bottom
    assert all(c.kernel_size == (3, 3) and c.padding == "same" for c in convs[:-1])
    assert all(type(c.kernel_initializer).__name__ == "HeNormal" for c in convs[:-1])
    assert convs[-1].kernel_size == (1, 1) and convs[-1].activation.__name__ == "sigmoid"
    kinds = [type(layer).__name__ for layer in net.layers]
    assert kinds.count("BatchNormalization") == len(convs) - 1
    assert kinds.count("MaxPooling2D") == 4 and kinds.count("Conv2DTranspose") == 4
    assert {layer.rate for layer in net.layers if type(layer).__name__ == "Dropout"} == {0.05}
    assert 30e6 < net.count_params() < 32e6  # the classic U-Net's 31 million


@pytest.mark.parametrize("n_classes", [1, 3])
def test_unet_shapes_and_width(n_classes):
    net = unet.build_unet(3, n_classes, base_filters=4)
    x = np.random.default_rng(0).random((2, 32, 48, 3), dtype=np.float32)
    y = np.asarray(net(x, training=False))
    assert y.shape == (2, 32, 48, n_classes)
    assert y.min() >= 0 and y.max() <= 1
    if n_classes == 3:
        np.testing.assert_allclose(y.sum(axis=-1), 1.0, atol=1e-5)
    # compute grows with the square of the width: parameters roughly x4 per doubling
    ratio = unet.build_unet(3, n_classes, 8).count_params() / net.count_params()
    assert 3.5 < ratio < 4.1


def test_output_stays_float32_under_mixed_precision():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        net = unet.build_unet(1, 3, 4)
    finally:
        keras.config.set_dtype_policy("float32")
    assert net.layers[-1].compute_dtype == "float32" and net.layers[1].compute_dtype == "bfloat16"


def test_bad_builder_arguments_are_rejected():
    with pytest.raises(ValueError):
        unet.build_unet(1, 1, base_filters=0)
    with pytest.raises(ValueError):
        unet.build_unet(1, 1, dropout=1.0)


def test_focal_loss_on_known_cases():
    loss = unet.binary_focal_loss(gamma=2.0, alpha=0.5)
    y_true = np.array([[[[1.0], [0.0]]]], np.float32)
    y_pred = np.array([[[[0.9], [0.2]]]], np.float32)
    expected = np.mean([0.5 * 0.1**2 * -np.log(0.9), 0.5 * 0.2**2 * -np.log(0.8)])
    assert float(loss(y_true, y_pred)) == pytest.approx(expected, rel=1e-4)
    # confident and right costs almost nothing; gamma 0 and alpha 0.5 is half the cross-entropy
    assert float(loss(y_true, np.array([[[[0.999], [0.001]]]], np.float32))) < 1e-6
    plain = unet.binary_focal_loss(gamma=0.0, alpha=0.5)
    assert float(plain(y_true, y_pred)) == pytest.approx(0.5 * np.mean([-np.log(0.9), -np.log(0.8)]), rel=1e-4)


def test_weighted_cross_entropy_on_known_cases():
    loss = unet.weighted_categorical_crossentropy((1.0, 1.0, 5.0))
    y_true = np.array([[[[0, 0, 1], [1, 0, 0]]]], np.float32)
    y_pred = np.array([[[[0.2, 0.3, 0.5], [0.7, 0.2, 0.1]]]], np.float32)
    expected = np.mean([5 * -np.log(0.5), -np.log(0.7)])
    assert float(keras.ops.mean(loss(y_true, y_pred))) == pytest.approx(expected, rel=1e-5)
    unweighted = unet.weighted_categorical_crossentropy((1.0, 1.0, 1.0))
    reference = keras.losses.categorical_crossentropy(y_true, y_pred)
    np.testing.assert_allclose(np.asarray(unweighted(y_true, y_pred)), np.asarray(reference), rtol=1e-5)


def test_config_rejects_what_cannot_work():
    with pytest.raises(ValueError, match="n_classes"):
        unet.UNetConfig(n_classes=2)
    with pytest.raises(ValueError, match="multiple of 16"):
        unet.UNetConfig(crop=100)
    with pytest.raises(ValueError, match="augmentation"):
        unet.UNetConfig(augmentation="mystery")
    with pytest.raises(ValueError, match="channels"):
        unet.UNetConfig(channels=("sobel",))
    with pytest.raises(ValueError, match="nucleus_diameter"):
        unet.UNetConfig(nucleus_diameter=0)
    with pytest.raises(ValueError, match="crop_sampling"):
        unet.UNetConfig(crop_sampling="pixels")


def test_training_images_are_zoomed_to_the_nucleus_diameter():
    data = synthetic.nuclei_dataset(n_images=2, seed=1)
    images, labels = unet.zoomed_images(data, unet.UNetConfig(nucleus_diameter=10.0))
    for image, label, original in zip(images, labels, data.labels, strict=True):
        assert segmentation.median_diameter(label) == pytest.approx(10.0, rel=0.05)
        assert image.shape == label.shape and image.dtype == np.float32 and 0 <= image.min() < image.max() <= 1
        assert label.shape != original.shape  # the simulated nuclei are not 10 px across
    same, same_labels = unet.zoomed_images(data, unet.UNetConfig(nucleus_diameter=None))
    assert same[0].shape == data.labels[0].shape and same_labels[0] is data.labels[0]


def test_crop_batches_have_the_right_inputs_and_targets():
    data = synthetic.nuclei_dataset(n_images=3, seed=1)
    config = unet.UNetConfig(crop=64, batch_size=4, base_filters=4)
    batches = unet.CropBatches(unzoomed(data), data.labels, config, np.random.default_rng(0))
    x, y = batches[0]
    assert x.shape == (4, 64, 64, 3) and y.shape == (4, 64, 64, 3)
    np.testing.assert_array_equal(y.sum(axis=-1), 1.0)  # one-hot background / cell / edge
    assert y[..., 2].any() and y[..., 1].any()
    assert set(np.unique(x[..., 2])) <= {0.0, 1.0}  # Canny edges stay binary under augmentation
    np.testing.assert_allclose(x[..., 0] + x[..., 1], 1.0, atol=1e-6)  # inverse of the (noisy) original
    binary = replace_config(config, n_classes=1, channels=("original",), augmentation="none")
    x1, y1 = unet.CropBatches(unzoomed(data), data.labels, binary,
                                  np.random.default_rng(0))[0]
    assert x1.shape == (4, 64, 64, 1) and y1.shape == (4, 64, 64, 1) and set(np.unique(y1)) <= {0.0, 1.0}
    by_nuclei = unet.CropBatches(unzoomed(data), data.labels,
                                     replace_config(config, crop_sampling="nuclei"), np.random.default_rng(0))
    np.testing.assert_array_equal(by_nuclei.image_weights, [label.max() for label in data.labels])
    assert by_nuclei[0][0].shape == x.shape


def test_local_channel_of_crops_is_cut_from_the_whole_image():
    field = synthetic.nuclei_field(shape=(96, 96), seed=5)
    image = segmentation.percentile_normalise(field.fluorescence)
    config = unet.UNetConfig(channels=segmentation.INPUT_CHANNELS, crop=96, batch_size=2, steps_per_epoch=1,
                                 augmentation="none", nucleus_diameter=None)
    x, _ = unet.CropBatches([image], [field.labels], config, np.random.default_rng(0)).batch()
    whole = segmentation.input_stack(field.fluorescence, segmentation.INPUT_CHANNELS)
    np.testing.assert_allclose(x[0], whole, atol=1e-6)  # a crop the size of the image is the image
    with pytest.raises(ValueError, match="local"):
        segmentation.stack_channels(image, segmentation.INPUT_CHANNELS)


def unzoomed(data):
    """The images of a SegmentationSet normalised as for training, at their own scale."""
    return unet.zoomed_images(data, unet.UNetConfig(nucleus_diameter=None))[0]


def replace_config(config, **changes):
    from dataclasses import replace

    return replace(config, **changes)


def test_stack_channels_of_a_normalised_image_match_the_prediction_input():
    image = synthetic.nuclei_field(seed=3).fluorescence
    whole = segmentation.input_stack(image, segmentation.CHANNELS)
    rebuilt = segmentation.stack_channels(whole[..., 0], segmentation.CHANNELS)
    np.testing.assert_array_equal(rebuilt, whole)


@pytest.fixture(scope="module")
def tiny_run():
    """A 4-filter U-Net trained for 3 x 6 steps on simulated nuclei (eager: no graph tracing)."""
    train = synthetic.nuclei_dataset(n_images=6, seed=10)
    val = synthetic.nuclei_dataset(n_images=2, seed=11)
    test = synthetic.nuclei_dataset(n_images=2, seed=12)
    config = unet.UNetConfig(base_filters=4, crop=64, batch_size=4, epochs=3, steps_per_epoch=6,
                                 learning_rate=3e-3, val_crops=4, val_crop_size=64, augmentation="report002+rot90",
                                 nucleus_diameter=16.0)
    return unet.train_unet(train, val, test, config=config, seed=0, progress="none", throughput_seconds=0.2,
                               keep_test_predictions=True)


def test_a_tiny_training_run_lowers_the_loss(tiny_run):
    history = tiny_run.fit.history
    assert len(history["loss"]) == 3
    assert history["loss"][-1] < history["loss"][0]
    assert tiny_run.fit.seconds > 0 and tiny_run.fit.peak_rss_mb > 0
    assert tiny_run.fit.precision in ("float32", "bfloat16")


def test_a_run_records_scores_postprocessing_and_speed(tiny_run):
    s = tiny_run.summary()
    for key in ("val_f1", "val_seg", "test_f1", "test_ap", "test_seg", "mpx_per_s", "train_minutes"):
        assert s[key] is not None and np.isfinite(s[key]), key
    assert set(tiny_run.trained.config.postprocess) >= {"seed_threshold", "foreground_threshold", "min_size"}
    assert tiny_run.postprocess_table and tiny_run.throughput["mpx_per_s"] > 0
    assert len(tiny_run.test_labels) == 2 and tiny_run.test_labels[0].dtype == np.uint16
    json.dumps(tiny_run.record())  # JSON-ready


def test_any_image_size_is_padded_and_cropped_back(tiny_run):
    image = synthetic.nuclei_field(shape=(37, 53), n_nuclei=3, seed=5).fluorescence
    labels, probs = tiny_run.trained.segment(image)
    assert labels.shape == (37, 53) and probs.shape == (37, 53, 3)
    rgb = np.dstack([image] * 3)
    labels_rgb, _ = tiny_run.trained.segment(rgb)
    np.testing.assert_array_equal(labels_rgb, labels)  # grey copied to RGB segments the same
    big = synthetic.nuclei_field(shape=(300, 410), seed=6).fluorescence
    tiled, _ = tiny_run.trained.segment(big, tile=128)  # more than one tile
    assert tiled.shape == (300, 410)
    assert tiny_run.trained.config.nucleus_diameter == 16.0  # zoomed by the estimated nucleus size, then back
    factor = tiny_run.trained.scale(big)
    assert factor == segmentation.scale_factor(segmentation.estimate_diameter(big), 16.0) and factor != 1.0
    assert tiny_run.trained.probabilities(big, scale=0.5).shape == (300, 410, 3)


def test_flip_averaging_is_the_mean_of_the_flipped_predictions(tiny_run):
    image = synthetic.nuclei_field(shape=(64, 80), n_nuclei=4, seed=7).fluorescence
    trained = tiny_run.trained
    stack = trained.stack(image)  # the input channels are made once; the flips are of the input stack
    views = []
    for flip in ((1, 1), (-1, 1), (1, -1), (-1, -1)):
        view = np.ascontiguousarray(stack[::flip[0], ::flip[1]])
        pred = segmentation.predict_tiled(view, trained.predict_batch, tile=trained.config.tile,
                                          overlap=trained.config.overlap)
        views.append(pred[::flip[0], ::flip[1]])
    assert not np.allclose(views[0], views[3], atol=1e-3)  # the network does see the flips differently
    averaged = trained.probabilities(image, scale=1.0, flips=True)
    np.testing.assert_allclose(averaged, np.mean(views, axis=0), atol=1e-5)
    np.testing.assert_allclose(averaged.sum(axis=-1), 1.0, atol=1e-5)
    with pytest.raises(DataError, match="too large"):
        tiny_run.trained.probabilities(np.zeros((2100, 2100), np.uint8), tile=None)


def test_segmenting_many_images_overlapped_gives_what_segment_gives(tiny_run):
    trained = tiny_run.trained
    images = [synthetic.nuclei_field(shape=shape, seed=seed).fluorescence
              for seed, shape in enumerate([(64, 80), (100, 90), (37, 53), (64, 80)])]
    many = list(trained.segment_many(images))
    assert len(many) == len(images)
    for image, (labels, probs) in zip(images, many, strict=True):
        one_labels, one_probs = trained.segment(image)
        np.testing.assert_array_equal(labels, one_labels)
        np.testing.assert_allclose(probs, one_probs, atol=1e-6)
    bad = np.zeros((0, 5))
    with pytest.raises(Exception) as alone:
        trained.segment(bad)
    with pytest.raises(alone.type):  # the same error, when the bad image comes up
        list(trained.segment_many([images[0], bad]))


def test_overlapped_keeps_the_order_and_hands_back_each_items_error():
    def prepare(x):
        if x == 3:
            raise ValueError("bad item 3")
        return x * 10

    def run(x):
        if x == 50:
            raise OSError("run failed on 5")
        return x + 1

    outcomes = list(runtime.overlapped(range(7), prepare, run, lambda item, ran: (item, ran)))
    assert [item for item, _ in outcomes] == list(range(7))
    assert isinstance(outcomes[3][1], ValueError) and isinstance(outcomes[5][1], OSError)
    assert [o for i, o in outcomes if i not in (3, 5)] == [(i, i * 10 + 1) for i in (0, 1, 2, 4, 6)]
    assert list(runtime.overlapped([], prepare, run, lambda item, ran: ran)) == []


def test_save_load_round_trip_keeps_metadata_and_predictions(tiny_run, tmp_path):
    path = tiny_run.save(tmp_path / "unet.keras")
    with zipfile.ZipFile(path) as archive:
        inside = json.loads(archive.read(saving.METADATA_ENTRY))
    assert inside["kind"] == "unet" and inside["channels"] == list(segmentation.CHANNELS)
    assert inside["postprocess"] == tiny_run.trained.config.postprocess
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["summary"]["epochs_run"] == 3 and "iou_sweep" in record["test"]
    loaded = unet.load_unet(path)
    assert loaded.config == tiny_run.trained.config
    image = synthetic.nuclei_field(seed=7).fluorescence
    np.testing.assert_allclose(loaded.probabilities(image), tiny_run.trained.probabilities(image), atol=1e-5)
    with pytest.raises(DataError, match="not a classifier"):
        classifiers.load(path)  # the classifier loader says what to use instead
    sets = [synthetic.nuclei_dataset(n_images=1, seed=s) for s in (11, 12)]
    again = unet.evaluate_saved_unet(path, *sets)
    assert again.fit.epochs_run == 3 and 0 <= again.test_scores["f1"] <= 1
    assert again.config == tiny_run.config


def test_a_recipe_ignores_what_training_fills_in():
    recipe = unet.UNetConfig(base_filters=4, epochs=3)
    trained = replace(recipe, postprocess={"seed_threshold": 0.7}, trained_on="somewhere")
    assert recipe.recipe_differences(trained) == []
    assert recipe.recipe_differences(replace(recipe, epochs=4, crop=64)) == ["crop", "epochs"]


def test_a_saved_model_is_evaluated_only_when_it_was_trained_with_the_recipe(tiny_run, tmp_path, monkeypatch):
    path = tiny_run.save(tmp_path / "unet.keras")
    sets = [synthetic.nuclei_dataset(n_images=n, seed=s) for n, s in ((2, 10), (1, 11), (1, 12))]
    trained_here = []
    monkeypatch.setattr("cellkit.unet.train.train_unet",
                        lambda *sets, **options: trained_here.append(options) or tiny_run)
    run, how = unet.saved_or_trained(path, tiny_run.config, *sets, shown_as="models/unet.keras")
    assert how.startswith("evaluated models/unet.keras") and "record: unet.json" in how and not trained_here
    assert run.config == tiny_run.config and run.test_scores is not None  # scored on the given sets
    other = replace(tiny_run.config, epochs=5)
    run, how = unet.saved_or_trained(path, other, *sets, seed=3)
    assert run is tiny_run and trained_here == [{"config": other, "seed": 3}]
    assert "another recipe (epochs differ)" in how
    _, how = unet.saved_or_trained(tmp_path / "missing.keras", other, *sets)
    assert "missing.keras does not exist" in how and len(trained_here) == 2
    _, how = unet.saved_or_trained(None, other, *sets)
    assert "no saved model was given" in how


def test_folded_batch_norm_predicts_as_the_trained_network(tiny_run):
    model, config = tiny_run.trained.model, tiny_run.trained.config
    folded = unet.unet_for_inference(model, config)
    kinds = {type(layer).__name__ for layer in folded.layers}
    assert "BatchNormalization" not in kinds and "Dropout" not in kinds
    norm = model.get_layer("down1_bn1").get_weights()
    assert not np.allclose(norm[2], 0)  # the running mean has moved: there is something to fold
    batch = np.random.default_rng(3).random((2, 64, 48, len(config.channels))).astype(np.float32)
    np.testing.assert_allclose(folded(batch, training=False), model(batch, training=False), atol=1e-5)
    assert tiny_run.trained.network.count_params() < model.count_params()  # what TrainedUNet predicts with


def test_bfloat16_inference_is_close_to_float32(tiny_run):
    if not runtime.cpu_has_bf16():
        pytest.skip("no bfloat16 instructions on this CPU")
    config = tiny_run.trained.config
    fast = unet.TrainedUNet(unet.unet_in_precision(tiny_run.trained.model, config, "bfloat16"), config)
    image = synthetic.nuclei_field(seed=8).fluorescence
    assert np.abs(fast.probabilities(image) - tiny_run.trained.probabilities(image)).mean() < 0.02


def test_loading_something_else_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="no such model file"):
        unet.load_unet(tmp_path / "missing.keras")
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a .keras model file"):
        unet.load_unet(tmp_path / "junk.keras")
    classifier = tmp_path / "lenet.keras"
    info = classifiers.ModelInfo("lenet", [str(i) for i in range(8)], 28)
    classifiers.save(classifiers.build("lenet", 8), info, classifier)
    with pytest.raises(DataError, match="not a U-Net"):
        unet.load_unet(classifier)


def test_postprocessing_search_finds_perfect_instances_on_perfect_probabilities():
    data = synthetic.nuclei_dataset(n_images=2, seed=2)
    probs = [np.eye(3, dtype=np.float32)[segmentation.three_class_target(label)] for label in data.labels]
    best, table = unet.tune_postprocessing(probs, data.labels, 3)
    scores = metrics.segmentation_scores(unet.instances_from(probs, best), data.labels)
    assert scores["f1"] > 0.99 and scores["seg"] > 0.95 and len(table) >= 5


def test_scores_by_group_pools_within_groups():
    data = synthetic.nuclei_dataset(n_images=3, seed=4)
    rows = metrics.scores_by_group(data.labels, data.labels, ["a", "b", "a"])
    assert [r["group"] for r in rows] == ["a", "b", "all"] and [r["images"] for r in rows] == [2, 1, 3]
    assert all(r["f1"] == 1.0 and r["seg"] == 1.0 for r in rows)


def test_segmentation_data_from_a_folder(tmp_path):
    from PIL import Image

    data = synthetic.nuclei_dataset(n_images=5, seed=9)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for name, image, label in zip(data.ids, data.images, data.labels, strict=True):
        Image.fromarray(image).save(tmp_path / "images" / f"{name}.png")
        inference.write_labels(label, tmp_path / "labels" / f"{name}.png")
    found = datasets.load_segmentation_data(str(tmp_path), seed=0)
    assert (len(found.train), len(found.val), len(found.test)) == (3, 1, 1)
    assert sorted(found.train.ids + found.val.ids + found.test.ids) == sorted(data.ids)
    with pytest.raises(DataError, match="no such folder"):
        datasets.load_segmentation_data(str(tmp_path / "nowhere"))


class _StandIn:
    """A stand-in for train_unet: records its calls and returns a new object per call instead of training."""

    def __init__(self):
        self.calls = []

    def __call__(self, train, val, test, config, name, **options):
        self.calls.append({"data": (train, val, test), "config": config, "name": name, **options})
        return object()


def test_variants_train_each_configuration_once_and_share_its_run():
    trainer = _StandIn()
    runs = unet.Variants("train", "val", "test", trainer=trainer, seed=7, progress="none")
    base = unet.UNetConfig(base_filters=4, epochs=1)
    enhanced = runs.train("+ input enhancement", replace_config(base, augmentation="none"))
    two_class = runs.train("2-class", replace_config(base, n_classes=1, channels=("original",)))
    again = runs.train("- augmentation", unet.UNetConfig(base_filters=4, epochs=1, augmentation="none"))  # equal
    assert again is enhanced and two_class is not enhanced
    assert runs.n_trained == 2 and [c["name"] for c in trainer.calls] == ["+ input enhancement", "2-class"]
    assert trainer.calls[0]["data"] == ("train", "val", "test")
    assert trainer.calls[0]["seed"] == 7 and trainer.calls[0]["progress"] == "none"  # options reach every run
    assert list(runs) == ["+ input enhancement", "2-class", "- augmentation"] and len(runs) == 3
    assert runs["- augmentation"] is enhanced and runs.trained_as(base) is None
    assert runs.trained_as(replace_config(base, augmentation="none")) == "+ input enhancement"


def test_variants_any_field_makes_a_new_run_and_a_changed_config_does_not_leak():
    trainer = _StandIn()
    runs = unet.Variants("train", "val", trainer=trainer)
    config = unet.UNetConfig(base_filters=4, epochs=1)
    first = runs.train("a", config)
    assert runs.train("b", replace_config(config, epochs=2)) is not first
    assert runs.train("c", replace_config(config, class_weights=(1.0, 1.0, 1.0))) is not first
    config.epochs = 3  # the caller changes its object after training: the recorded configuration stays
    assert runs.trained_as(unet.UNetConfig(base_filters=4, epochs=1)) == "a"
    assert runs.n_trained == 3 and trainer.calls[0]["data"] == ("train", "val", None)


def test_variants_keep_runs_made_elsewhere_without_reusing_them():
    trainer = _StandIn()
    runs = unet.Variants("train", "val", "test", trainer=trainer)
    saved = object()
    assert runs.add("final", saved) is saved and runs["final"] is saved
    full = runs.train("full", unet.UNetConfig())
    assert full is not saved and runs.n_trained == 1
    runs.add("full", saved)  # a name taken over by a run made elsewhere: its trained run is still the one reused
    assert runs.train("full again", unet.UNetConfig()) is full and runs.n_trained == 1
    assert unet.Variants("train", "val").trainer is unet.train_unet
