"""cellkit.training: augmentation, recipes, measurements, and a real (tiny) training run on PBC."""

from __future__ import annotations

import numpy as np
import pytest

from cellkit import classifiers, datasets, runtime, study, training, transforms
from cellkit.datasets import DataError, ImageSet


@pytest.fixture(scope="module")
def pbc_small(real_data):
    """A class-balanced slice of PBC-28: 120 training and 30 validation images per class."""
    rng = np.random.default_rng(0)

    def take(split, per_class):
        data = datasets.load_pbc28(split)
        index = np.concatenate([rng.permutation(np.flatnonzero(data.labels == c))[:per_class]
                                for c in range(len(data.class_names))])
        return data.subset(np.sort(index))

    return take("train", 120), take("val", 30)


def test_dihedral_augmentation_only_moves_pixels_and_is_seeded():
    images = np.random.default_rng(0).integers(0, 256, (64, 9, 9, 3), dtype=np.uint8)
    out = transforms.augment_batch(images, np.random.default_rng(1), "dihedral")
    assert out.shape == images.shape and out.dtype == np.uint8
    for before, after in zip(images, out, strict=True):
        views = classifiers.TTA_VIEWS["dihedral"]
        assert any(np.array_equal(transforms.dihedral_view(before[None], k, f)[0], after) for k, f in views)
    again = transforms.augment_batch(images, np.random.default_rng(1), "dihedral")
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(out, images)


def test_shift_and_flips_keep_shape_and_values():
    images = np.random.default_rng(0).integers(0, 256, (16, 12, 12, 3), dtype=np.uint8)
    shifted = transforms.augment_batch(images, np.random.default_rng(2), "dihedral_shift", max_shift=2)
    flipped = transforms.augment_batch(images, np.random.default_rng(2), "flips")
    assert shifted.shape == flipped.shape == images.shape
    assert set(np.unique(shifted)) <= set(np.unique(images))
    np.testing.assert_array_equal(np.sort(flipped.reshape(16, -1), axis=1), np.sort(images.reshape(16, -1), axis=1))
    with pytest.raises(ValueError, match="unknown augmentation"):
        transforms.augment_batch(images, np.random.default_rng(0), "mixup")


def test_recipes_come_from_the_registry_and_are_checked():
    config = training.FitConfig.for_model("lenet-original", epochs=3)
    assert (config.optimizer, config.learning_rate, config.epochs, config.augment) == ("adam", 1e-3, 3, "none")
    assert training.FitConfig.for_model("cellnet").augment == "dihedral_shift"
    with pytest.raises(ValueError, match="unknown optimizer"):
        training.FitConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="monitor must be val_accuracy or val_loss"):
        training.FitConfig(monitor="loss")


def test_precision_follows_the_cpu_unless_forced():
    keras = runtime.keras_module()
    try:
        assert runtime.set_precision("auto") == ("bfloat16" if runtime.cpu_has_bf16() else "float32")
        assert runtime.set_precision("float32") == "float32" and keras.config.dtype_policy().name == "float32"
        with pytest.raises(ValueError, match="unknown precision"):
            runtime.set_precision("float16")
    finally:
        keras.config.set_dtype_policy("float32")


def test_memory_sampler_sees_an_allocation():
    with training.MemorySampler(interval=0.01) as memory:
        block = np.ones(60 * 2**20, np.uint8)  # 60 MiB, touched
        block[::4096] = 2
    assert memory.increase_mb > 40 and memory.peak_mb >= memory.start_mb


def test_balanced_weights_make_classes_count_equally():
    labels = np.array([0, 0, 0, 1])
    weights = training.balanced_weights(labels, 3)
    assert weights[:3].sum() == pytest.approx(weights[3:].sum())


def test_one_epoch_on_real_pbc_beats_chance(pbc_small):
    train, val = pbc_small
    run = training.train_classifier("lenet", train, val, input_size=28, crop=200, epochs=1, batch_size=32,
                                    progress="none", measure_throughput=False)
    assert run.fit.epochs_run == 1 and len(run.fit.history["val_accuracy"]) == 1
    assert run.val_report["accuracy"] > 0.3  # chance is 0.125
    assert run.fit.seconds > 0 and run.fit.peak_rss_mb > 0
    summary = run.summary()
    assert summary["params"] == 432_444 and summary["input_size"] == 28
    assert {"accuracy", "macro_f1", "per_class", "auc_ovr", "confusion_matrix", "n"} <= set(run.val_report)


def test_throughput_and_tta_choice(pbc_small):
    _, val = pbc_small
    model = classifiers.build("lenet", 8, 28)
    assert training.throughput(model, val.images[:64], min_seconds=0.2) > 10
    choice, scores = training.choose_tta(model, val.images[:64], val.labels[:64])
    assert choice in classifiers.TTA_VIEWS and set(scores) == {"none", "flips", "dihedral"}


def test_training_data_from_a_plain_npz_is_split_70_10_20(tmp_path, pbc_small):
    train, _ = pbc_small
    path = tmp_path / "cells.npz"
    np.savez(path, images=train.images, labels=train.labels)
    data = datasets.load_training_data(str(path), size=28)
    assert (len(data.train), len(data.val), len(data.test)) == (672, 96, 192)
    assert data.crop is None and data.train.class_names[0] == "class_0"
    assert datasets.load_training_data("pbc28", 28).crop == 200


def test_evaluation_labels_are_matched_to_the_models_classes(pbc_small):
    train, _ = pbc_small
    info = classifiers.ModelInfo("lenet", list(train.class_names), 28)
    renamed = ImageSet(train.images[:8], np.arange(8) % 2, [train.class_names[3], train.class_names[1]])
    assert datasets.align_classes(renamed, info.class_names).labels.tolist() == [3, 1] * 4
    stranger = ImageSet(train.images[:2], np.array([0, 1]), ["basophil", "macrophage"])
    with pytest.raises(DataError, match="'macrophage' is not one of the model's classes"):
        datasets.align_classes(stranger, info.class_names)
    too_high = ImageSet(train.images[:2], np.array([0, 9]), [f"class_{i}" for i in range(10)])
    with pytest.raises(DataError, match="label 9 is outside the model's 8 classes"):
        datasets.align_classes(too_high, info.class_names)


def test_ensemble_averages_the_members_probabilities(pbc_small):
    _, val = pbc_small
    members = []
    for seed in (0, 1):
        runtime.keras_module().utils.set_random_seed(seed)
        info = classifiers.ModelInfo("lenet", val.class_names, 28)
        trained = classifiers.TrainedModel(classifiers.build("lenet", 8, 28), info)
        members.append(training.TrainingRun(trained, training.FitConfig(), None, {}, None, {}, 0.0, 0))
    report, proba = training.ensemble_report(members, val)
    expected = np.mean([m.trained.predict_proba(val.images) for m in members], axis=0)
    np.testing.assert_allclose(proba, expected, atol=1e-6)
    assert report["n"] == len(val) and 0 <= report["accuracy"] <= 1


class _CountedBatches(training.keras.utils.PyDataset):
    """3 batches of 4 rows (x, y, weight); counts its epochs; x is the row number (+100 per epoch) / 1000."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs_ended = 0

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int):
        rows = np.arange(4 * index, 4 * index + 4, dtype=np.float32) + 100 * self.epochs_ended
        return rows[:, None] / 1000, (rows[:, None] % 2).astype(np.float32), np.ones(4, np.float32)

    def on_epoch_end(self) -> None:
        self.epochs_ended += 1


def test_epoch_arrays_are_the_batches_of_one_epoch_in_order():
    batches = _CountedBatches()
    (x, y, weights), batch_size = training.epoch_arrays(batches)
    assert batch_size == 4 and weights.shape == (12,)
    np.testing.assert_allclose(x[:, 0] * 1000, np.arange(12))
    assert batches.epochs_ended == 1
    (x, _, _), _ = training.epoch_arrays(batches)
    np.testing.assert_allclose(x[:, 0] * 1000, np.arange(12) + 100)


def test_epoch_by_epoch_fit_trains_each_epoch_on_its_own_batches_in_order():
    keras = training.keras
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="binary_crossentropy")
    seen, fit = [], model.fit

    def recording_fit(x, y, **options):
        seen.append(np.round(x[:, 0] * 1000))
        return fit(x, y, **options)

    model.fit = recording_fit
    batches = _CountedBatches()
    training.fit_epoch_by_epoch(model, batches, epochs=3)  # the next epoch is drawn while one trains
    assert len(seen) == 3 and batches.epochs_ended == 3  # no epoch drawn beyond the last
    for epoch, rows in enumerate(seen):
        np.testing.assert_array_equal(rows, np.arange(12) + 100 * epoch)


class _PlantedValLoss(training.keras.callbacks.Callback):
    """Replaces the validation loss by planted values (before early stopping sees them) and keeps the weights and
    the optimizer's step count of every epoch."""

    def __init__(self, losses) -> None:
        super().__init__()
        self.losses, self.weights, self.steps, self.began, self.ended = list(losses), [], [], 0, 0

    def on_train_begin(self, logs=None):
        self.began += 1

    def on_train_end(self, logs=None):
        self.ended += 1

    def on_epoch_end(self, epoch, logs=None):
        logs["val_loss"] = self.losses[epoch]
        self.weights.append(self.model.get_weights())
        self.steps.append(int(self.model.optimizer.iterations))


def test_epoch_by_epoch_fit_is_one_training_with_early_stopping_across_fits():
    keras = training.keras
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="binary_crossentropy")
    planted = _PlantedValLoss([3.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    val = (np.zeros((2, 1), np.float32), np.zeros((2, 1), np.float32))
    run = training.timed_fit(model, _CountedBatches(), epochs=6, callbacks=[planted, stopper], validation_data=val)
    assert planted.began == 1 and planted.ended == 1  # one training, not one per epoch
    assert planted.steps == [3, 6, 9, 12]  # the optimizer carries on; stopped 2 epochs after the best
    assert len(run.history["loss"]) == 4
    for restored, best in zip(model.get_weights(), planted.weights[1], strict=True):
        np.testing.assert_array_equal(restored, best)  # the best epoch's weights, not the last
    assert not np.array_equal(model.get_weights()[0], planted.weights[3][0])
    ends = run.epoch_end_seconds  # one per epoch run, rising, within the whole fit
    assert len(ends) == 4 and ends[0] > 0 and np.all(np.diff(ends) > 0) and ends[-1] <= run.seconds


def test_seconds_to_reach_is_the_end_of_the_first_epoch_at_the_target():
    fit = training.FitResult(history={"val_accuracy": [0.90, 0.985, 0.97, 0.99]}, seconds=40.0, epochs_run=4,
                             best_epoch=4, best_val_accuracy=0.99, peak_rss_mb=0.0, rss_increase_mb=0.0,
                             precision="float32", epoch_end_seconds=[10.0, 21.0, 30.5, 40.0])
    assert fit.seconds_to_reach(0.98) == 21.0  # epoch 2, though epoch 3 fell below again
    assert fit.seconds_to_reach(0.99) == 40.0
    assert fit.seconds_to_reach(0.995) is None
    assert fit.seconds_to_reach(0.5, metric="val_loss") is None  # not in the history


def test_early_stopping_waits_for_batch_norm_statistics():
    # momentum 0.99 needs 299 steps before the running statistics forget their start values
    assert training.batch_norm_warmup_epochs(classifiers.build("alexnet", 8, 28), steps_per_epoch=94) == 4
    assert training.batch_norm_warmup_epochs(classifiers.build("cellnet", 8, 28), steps_per_epoch=10) == 3  # 0.9: 29
    assert training.batch_norm_warmup_epochs(classifiers.build("lenet", 8, 28), steps_per_epoch=10) == 0


# --- report 000's study (notebook 05) ------------------------------------------------------------------------


def test_kfold_is_stratified_seeded_and_covers_every_image_once():
    labels = np.repeat(np.arange(3), [8, 12, 4])
    splits = study.kfold_indices(labels, 4, seed=1)
    held = np.concatenate([h for _, h in splits])
    assert sorted(held.tolist()) == list(range(len(labels)))
    for train, h in splits:
        assert not set(train) & set(h) and len(train) + len(h) == len(labels)
        assert np.bincount(labels[h], minlength=3).tolist() == [2, 3, 1]
    again = study.kfold_indices(labels, 4, seed=1)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, again, strict=True))
    with pytest.raises(DataError, match="smallest class has 4"):
        study.kfold_indices(labels, 5)
    with pytest.raises(ValueError, match="at least 2 folds"):
        study.kfold_indices(labels, 1)


def test_report000_augmentation_rotates_and_flips():
    images = np.zeros((32, 15, 15, 3), np.uint8)
    images[:, 7, :] = 255  # a horizontal bar: any rotation other than 0/180 degrees moves it
    out = transforms.augment_batch(images, np.random.default_rng(0), "flip_rotate50")
    assert out.shape == images.shape and out.dtype == np.uint8
    assert not np.array_equal(out, images)
    np.testing.assert_array_equal(out, transforms.augment_batch(images, np.random.default_rng(0), "flip_rotate50"))


@pytest.mark.parametrize("name", list(study.STUDY_INPUTS))
def test_study_inputs_keep_shape_and_dtype(name, real_data):
    images = datasets.load_pbc28("test").images[:6]
    for size in (28, 32):
        out = study.study_images(images, name, size)
        assert out.shape == (6, size, size, 3) and out.dtype == np.uint8
    entry = study.study_input(name)
    assert entry.preprocessing in classifiers.PREPROCESSING and entry.augment in transforms.AUGMENTATIONS
    if name == "canny":
        assert set(np.unique(out)) <= {0, 255} and np.array_equal(out[..., 0], out[..., 2])
    with pytest.raises(ValueError, match="unknown input 'blur'"):
        study.study_input("blur")


def test_study_table_averages_folds():
    rows = [{"model": "m", "input": "a", "optimizer": "adam", "fold": f, "cv_accuracy": acc, "train_seconds": 2.0}
            for f, acc in ((1, 0.6), (2, 0.8))] + [{"model": "m", "input": "b", "optimizer": "adam", "fold": 1,
                                                     "cv_accuracy": 0.3, "train_seconds": 1.0}]
    table = study.study_table(rows)
    assert table.loc[("m", "a", "adam"), "cv_accuracy"] == pytest.approx(0.7)
    assert table.loc[("m", "a", "adam"), "cv_accuracy_sd"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert table.loc[("m", "b", "adam"), "cv_accuracy_sd"] == 0 and table.loc[("m", "b", "adam"), "folds"] == 1
    assert study.study_table(rows, by=["model"]).loc["m", "train_seconds"] == pytest.approx(5 / 3)


def test_cross_validation_of_the_basic_cnn_on_real_pbc(pbc_small):
    train, val = pbc_small
    pool = datasets.per_class(train, 30)
    config = training.FitConfig(epochs=3, batch_size=32, monitor="val_loss", patience=2)
    run = study.cross_validate(study.Cell("basic-cnn", "normalised"), pool, folds=2, config=config,
                               precision="float32", throughput_seconds=0.1)
    assert [r["fold"] for r in run.rows] == [1, 2] and len(run.weights) == 2
    for row in run.rows:
        assert row["n_held_out"] == 120 and row["n_fit"] + row["n_inner_val"] == 120
        assert row["cv_accuracy"] > 0.3  # chance is 0.125
        val_loss = row["history"]["val_loss"]
        assert row["best_epoch"] == 1 + int(np.argmin(val_loss))  # early stopping kept the lowest validation loss
        assert row["params"] == 421_960 and row["images_per_second"] > 0 and row["peak_rss_mb"] > 0
    predicted = study.read_test_once([run], val)[run.cell]  # the mean of the two fold models' probabilities
    assert predicted.shape == val.labels.shape and np.mean(predicted == val.labels) > 0.3
