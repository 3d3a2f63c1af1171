"""Loaders on the real files, splits, and one-line errors on bad input that leave the input untouched."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellkit import datasets
from cellkit.datasets import DataError


def _snapshot(folder) -> dict:
    """Every file below ``folder`` with its size and modification time, to prove nothing was written."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


# --- the real datasets -----------------------------------------------------------------------------------


def test_pbc28_splits_have_the_documented_shapes(real_data):
    sizes = {}
    for split in ("train", "val", "test"):
        data = datasets.load_pbc28(split)
        assert data.images.dtype == np.uint8 and data.images.shape[1:] == (28, 28, 3)
        assert data.labels.min() == 0 and data.labels.max() == 7
        assert data.class_names[0] == "basophil" and data.class_names[7] == "platelet"
        assert len(data.files) == len(data) and data.files[0].endswith(".jpg")
        sizes[split] = len(data)
    assert sizes == {"train": 11965, "val": 1710, "test": 2417}


def test_pbc28_is_imbalanced_with_neutrophil_largest(real_data):
    counts = datasets.load_pbc28("train").class_counts()
    assert max(counts, key=counts.get) == "neutrophil"
    assert counts["neutrophil"] > 2 * counts["basophil"]


def test_pbc_jpg_centre_crop_resize_at_any_size(real_data):
    for size in (28, 48, 96):
        data = datasets.load_pbc_jpg(size=size, per_class=3, seed=1)
        assert data.images.shape == (24, size, size, 3)
        assert data.class_counts() == dict.fromkeys(data.class_names, 3)
    again = datasets.load_pbc_jpg(size=48, per_class=3, seed=1)
    assert again.files == datasets.load_pbc_jpg(size=48, per_class=3, seed=1).files


def test_pbc_jpg_at_28_matches_the_npz_recipe(real_data):
    """The JPEG loader at 28x28 reproduces the npz's pixels for the same source file (same recipe)."""
    npz = datasets.load_pbc28("train")
    jpg = datasets.load_pbc_jpg(size=28, per_class=2, seed=0)
    position = {name: i for i, name in enumerate(npz.files)}
    shared = [i for i, name in enumerate(jpg.files) if name in position]
    assert shared, "no JPEG of the sample is in the npz train split"
    for i in shared:
        difference = np.abs(jpg.images[i].astype(int) - npz.images[position[jpg.files[i]]].astype(int))
        assert difference.mean() < 1.0


def test_dsb2018_images_and_instance_labels(real_data):
    manifest = datasets.load_dsb2018_manifest()
    ids = manifest["image_id"].tolist()[:6]
    data = datasets.load_dsb2018(ids)
    assert data.ids == ids
    for image, labels, row in zip(data.images, data.labels, manifest.head(6).itertuples(), strict=True):
        assert image.dtype == np.uint8 and image.shape == (row.height, row.width)
        assert labels.dtype == np.uint16 and labels.shape == image.shape
        assert len(np.unique(labels[labels > 0])) == row.n_nuclei
    assert data.groups == manifest["size_group"].tolist()[:6]


def test_dsb2018_split_is_stratified_seeded_and_saved(real_data, tmp_path, monkeypatch):
    monkeypatch.setenv("CELLKIT_CACHE_DIR", str(tmp_path))
    split = datasets.dsb2018_split(seed=7)
    manifest = datasets.load_dsb2018_manifest().set_index("image_id")
    everything = split["train"] + split["val"] + split["test"]
    assert len(everything) == len(set(everything)) == len(manifest)
    assert abs(len(split["test"]) / len(manifest) - 0.2) < 0.02
    assert abs(len(split["val"]) / len(manifest) - 0.1) < 0.02
    share_all = manifest["size_group"].value_counts(normalize=True)["256x256"]
    share_test = Counter(manifest.loc[split["test"], "size_group"])["256x256"] / len(split["test"])
    assert abs(share_all - share_test) < 0.03
    saved = pd.read_csv(datasets.split_file("dsb2018", 7))
    assert len(saved) == len(manifest)
    assert datasets.dsb2018_split(seed=7) == split
    assert datasets.dsb2018_split(seed=8) != split


def test_split_of_the_real_dsb_set_is_the_split_on_file(real_data, tmp_path, monkeypatch):
    monkeypatch.setenv("CELLKIT_CACHE_DIR", str(tmp_path))
    nuclei = datasets.load_dsb2018(datasets.load_dsb2018_manifest()["image_id"].tolist()[:3])
    assert not nuclei.is_synthetic
    assert datasets.split_of(nuclei, seed=7) == datasets.dsb2018_split(seed=7)


def test_split_of_the_synthetic_stand_in_splits_its_own_ids_by_group():
    from cellkit import synthetic

    stand_in = synthetic.nuclei_dataset(n_images=20, seed=0)
    assert stand_in.is_synthetic
    split = datasets.split_of(stand_in, seed=3)
    assert split == datasets.stratified_split(stand_in.ids, stand_in.groups, seed=3)
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(stand_in.ids)


def test_sample_is_seeded_keeps_the_order_and_none_keeps_all():
    data = datasets.SegmentationSet(images=[np.full((2, 2), i, np.uint8) for i in range(10)],
                                    labels=[np.zeros((2, 2), np.uint16)] * 10, ids=[f"i{i}" for i in range(10)])
    picked = datasets.sample(data, 4, seed=5)
    expected = np.sort(np.random.default_rng(5).permutation(10)[:4])  # what the notebooks drew before
    assert picked.ids == [f"i{i}" for i in expected] and picked.ids == sorted(picked.ids)
    assert datasets.sample(data, 4, seed=5).ids == picked.ids and datasets.sample(data, 4, seed=6).ids != picked.ids
    assert datasets.sample(data, None) is data and datasets.sample(data, 50).ids == data.ids


def test_stratified_split_pools_groups_too_small_to_stratify():
    ids = [f"i{k}" for k in range(40)]
    groups = ["big"] * 37 + ["tiny"] * 2 + ["single"]
    split = datasets.stratified_split(ids, groups, seed=0)
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(ids)


# --- any folder of the same shape --------------------------------------------------------------------


def _write_class_folder(root, n_per_class=3, size=(20, 24)):
    rng = np.random.default_rng(0)
    for name in ("alpha", "beta"):
        (root / name).mkdir(parents=True)
        for k in range(n_per_class):
            pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{k}.png")
    return root


def test_class_folder_loads_classes_from_subfolders(tmp_path):
    folder = _write_class_folder(tmp_path / "cells")
    before = _snapshot(folder)
    data = datasets.load_class_folder(folder, size=16)
    assert data.class_names == ["alpha", "beta"]
    assert data.images.shape == (6, 16, 16, 3)
    assert list(data.labels) == [0, 0, 0, 1, 1, 1]
    assert _snapshot(folder) == before


def test_npz_medmnist_style_and_plain(tmp_path):
    images = np.zeros((5, 8, 8, 3), np.uint8)
    labels = np.array([[0], [1], [2], [1], [0]], np.uint8)
    np.savez(tmp_path / "medmnist.npz", test_images=images, test_labels=labels, train_images=images[:2],
             train_labels=labels[:2])
    np.savez(tmp_path / "plain.npz", images=images[..., 0], labels=labels.ravel())
    medmnist = datasets.load_npz(tmp_path / "medmnist.npz")
    assert len(medmnist) == 5 and medmnist.class_names == ["class_0", "class_1", "class_2"]
    assert len(datasets.load_npz(tmp_path / "medmnist.npz", split="train")) == 2
    plain = datasets.load_npz(tmp_path / "plain.npz", class_names=["a", "b", "c"])
    assert plain.images.shape == (5, 8, 8) and plain.class_names == ["a", "b", "c"]


def test_instance_folder_reads_png_and_tiff_masks(tmp_path):
    import tifffile

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    labels = np.zeros((10, 12), np.uint16)
    labels[2:5, 2:5], labels[6:9, 6:10] = 1, 300
    Image.fromarray(np.full((10, 12), 50, np.uint8)).save(tmp_path / "images" / "a.png")
    tifffile.imwrite(tmp_path / "masks" / "a.tif", labels)
    data = datasets.load_instance_folder(tmp_path)
    assert data.ids == ["a"] and data.labels[0].dtype == np.uint16
    np.testing.assert_array_equal(data.labels[0], labels)


# --- bad input: one line naming the file and the fix, input untouched ---------------------------------


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_folder(tmp_path):
    with pytest.raises(DataError) as error:
        datasets.load_class_folder(tmp_path / "absent")
    assert "absent" in _one_line(error) and "subfolder" in _one_line(error)


def test_empty_folder(tmp_path):
    with pytest.raises(DataError) as error:
        datasets.load_class_folder(tmp_path)
    assert "no images" in _one_line(error)


def test_corrupt_image_is_named(tmp_path):
    folder = _write_class_folder(tmp_path / "cells")
    (folder / "beta" / "broken.png").write_bytes(b"this is not a png")
    before = _snapshot(folder)
    with pytest.raises(DataError) as error:
        datasets.load_class_folder(folder, size=16)
    assert "broken.png" in _one_line(error) and "not a readable image" in _one_line(error)
    assert _snapshot(folder) == before


def test_mixed_sizes_without_resize(tmp_path):
    folder = _write_class_folder(tmp_path / "cells")
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(folder / "alpha" / "big.png")
    with pytest.raises(DataError) as error:
        datasets.load_class_folder(folder)
    assert "size=" in _one_line(error)


def test_npz_with_wrong_keys_and_dtypes(tmp_path):
    np.savez(tmp_path / "keys.npz", x=np.zeros((2, 4, 4)))
    with pytest.raises(DataError) as error:
        datasets.load_npz(tmp_path / "keys.npz")
    assert "'test_images'" in _one_line(error)
    np.savez(tmp_path / "dtype.npz", images=np.zeros((2, 4, 4), np.int32), labels=np.zeros(2, int))
    with pytest.raises(DataError) as error:
        datasets.load_npz(tmp_path / "dtype.npz")
    assert "uint8" in _one_line(error)
    np.savez(tmp_path / "labels.npz", images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0.5, 1.0]))
    with pytest.raises(DataError) as error:
        datasets.load_npz(tmp_path / "labels.npz")
    assert "integer" in _one_line(error)


def test_mismatched_image_and_label_sizes(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.zeros((12, 10), np.uint16)).save(tmp_path / "labels" / "a.png")
    before = _snapshot(tmp_path)
    with pytest.raises(DataError) as error:
        datasets.load_instance_folder(tmp_path)
    assert "a.png" in _one_line(error) and "must match" in _one_line(error)
    assert _snapshot(tmp_path) == before


def test_labels_that_are_not_instance_masks(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "labels" / "a.png")
    with pytest.raises(DataError) as error:
        datasets.load_instance_folder(tmp_path)
    assert "single-channel" in _one_line(error)


def test_missing_registered_dataset_says_how_to_get_it(no_real_data):
    with pytest.raises(datasets.DatasetNotFound) as error:
        datasets.load_pbc28("train")
    assert "cellkit data fetch pbc" in _one_line(error)


# --- what one image file may be: the same rule for every command and the app ---------------------------------


def test_unreadable_images_in_a_class_folder_can_be_left_out_and_reported(tmp_path):
    folder = _write_class_folder(tmp_path / "cells")
    (folder / "beta" / "broken.png").write_bytes(b"this is not a png")
    skipped = []
    data = datasets.load_class_folder(folder, size=16, on_error=lambda path, message: skipped.append((path, message)))
    assert len(data) == 6 and data.class_names == ["alpha", "beta"]
    assert [p.name for p, _ in skipped] == ["broken.png"] and "not a readable image" in skipped[0][1]


def test_a_multi_page_tiff_is_refused_with_one_line(tmp_path):
    import tifffile

    path = tmp_path / "stack.tif"
    with tifffile.TiffWriter(path) as writer:
        for _ in range(3):  # three pages, as a microscope writes a time series
            writer.write(np.zeros((16, 16), np.uint16))
    with pytest.raises(DataError, match="3 pages") as error:
        datasets.read_image(path)
    assert "\n" not in str(error.value) and "stack.tif" in str(error.value)
    tifffile.imwrite(tmp_path / "planes.tif", np.zeros((3, 16, 16), np.uint16))  # one page of three planes
    with pytest.raises(DataError, match=r"shape \(3, 16, 16\)"):
        datasets.read_image(tmp_path / "planes.tif")
    tifffile.imwrite(tmp_path / "one.tif", np.zeros((16, 16), np.uint16))
    assert datasets.read_image(tmp_path / "one.tif").shape == (16, 16)


def test_images_of_other_than_one_to_four_channels_are_refused(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "five.tif", np.zeros((16, 16, 5), np.uint8), photometric="minisblack",
                     planarconfig="contig")
    with pytest.raises(DataError, match="5 channels"):
        datasets.read_image(tmp_path / "five.tif")
    Image.fromarray(np.zeros((16, 16, 4), np.uint8)).save(tmp_path / "rgba.png")
    assert datasets.read_image(tmp_path / "rgba.png").shape == (16, 16, 3)  # the alpha channel is dropped


def test_an_image_beyond_the_pixel_limit_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    big = tmp_path / "huge.png"
    Image.new("1", (20_000, 9_000)).save(big)  # 180 megapixels in a few kilobytes
    with pytest.raises(DataError, match="megapixels") as error:
        datasets.read_image(big)
    assert "huge.png" in str(error.value) and "\n" not in str(error.value)
    import tifffile

    tifffile.imwrite(tmp_path / "wide.tif", np.zeros((64, 64), np.uint8))
    monkeypatch.setattr(datasets.loaders, "MAX_IMAGE_PIXELS", 1000)  # the same limit applies to TIFFs
    with pytest.raises(DataError, match="megapixels"):
        datasets.read_image(tmp_path / "wide.tif")


# --- pixel-identical duplicates and disjoint sets ----------------------------------------------------------


def _set(images, files, labels=None) -> datasets.ImageSet:
    images = np.asarray(images, dtype=np.uint8)
    labels = np.zeros(len(images), np.int64) if labels is None else np.asarray(labels)
    return datasets.ImageSet(images, labels, ["a", "b"], list(files), "test")


def _image(value, shape=(4, 4, 3)) -> np.ndarray:
    return np.full(shape, value, np.uint8)


def test_pixel_hash_is_equal_only_for_equal_pixels_shape_and_dtype():
    image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    assert datasets.pixel_hash(image) == datasets.pixel_hash(image.copy())
    assert datasets.pixel_hash(image) != datasets.pixel_hash(image[..., ::-1])
    assert datasets.pixel_hash(image) != datasets.pixel_hash(image.reshape(4, 12))  # same bytes, other shape
    assert datasets.pixel_hash(image) != datasets.pixel_hash(image.astype(np.uint16))


def test_drop_duplicates_keeps_the_first_copy_of_each_group():
    data = _set([_image(1), _image(2), _image(1), _image(3), _image(2), _image(1)], [f"f{i}.jpg" for i in range(6)])
    assert datasets.duplicate_groups(data.images) == [[0, 2, 5], [1, 4]]
    kept, groups = datasets.drop_duplicates(data)
    assert groups == [[0, 2, 5], [1, 4]]
    assert kept.files == ["f0.jpg", "f1.jpg", "f3.jpg"] and len(kept.images) == 3
    unique = _set([_image(1), _image(2)], ["x.jpg", "y.jpg"])
    kept, groups = datasets.drop_duplicates(unique)
    assert kept is unique and groups == []


def test_drop_duplicates_works_on_images_of_different_sizes():
    data = datasets.SegmentationSet([_image(1, (3, 3)), _image(1, (3, 4)), _image(1, (3, 3))],
                                    [np.zeros((3, 3), np.uint16), np.zeros((3, 4), np.uint16),
                                     np.zeros((3, 3), np.uint16)], ["p", "q", "r"])
    kept, groups = datasets.drop_duplicates(data)
    assert groups == [[0, 2]] and kept.ids == ["p", "q"]


def test_overlap_finds_shared_files_by_base_name_and_shared_pixels():
    a = _set([_image(1), _image(2), _image(3)], ["ig/MY_1.jpg", "ig/MY_2.jpg", ""])
    b = _set([_image(9), _image(3), _image(7), _image(8)], ["other/MY_2.jpg", "z.jpg", "", ""])
    found = datasets.overlap(a, b)
    assert found.files == [(1, 0, "MY_2.jpg")]  # an unknown (empty) name is never shared
    assert found.pixels == [(2, 1)]
    assert not found.disjoint and found.positions_in_b() == [0, 1]
    with pytest.raises(DataError, match=r"^source and target are not disjoint: 1 shared file\(s\), 1 pixel"):
        datasets.assert_disjoint(a, b, ("source", "target"))


def test_assert_disjoint_passes_on_disjoint_sets_and_without_removes_the_overlap():
    a = _set([_image(1), _image(2)], ["a.jpg", "b.jpg"])
    b = _set([_image(2), _image(5), _image(6)], ["c.jpg", "b.jpg", "d.jpg"])
    rest = datasets.without(b, a)
    assert rest.files == ["d.jpg"]
    assert datasets.assert_disjoint(a, rest).disjoint
    assert datasets.without(a, a).files == []


def test_disjoint_parts_removes_copies_of_earlier_parts_and_duplicates_within_each_part():
    train = _set([_image(1), _image(2), _image(1), _image(3)], ["t0.jpg", "t1.jpg", "t2.jpg", "t3.jpg"])
    val = _set([_image(2), _image(4), _image(5), _image(4), _image(6)],  # 2: train's t1 under another name
               ["v0.jpg", "v1.jpg", "v2.jpg", "v3.jpg", "v4.jpg"])
    test = _set([_image(3), _image(7), _image(5), _image(8), _image(7), _image(9)],
                ["s0.jpg", "t3.jpg", "s2.jpg", "s3.jpg", "s4.jpg", "s5.jpg"])  # t3.jpg: a file of train, other pixels
    parts, removed = datasets.disjoint_parts({"test": test, "train": train, "val": val})
    assert list(parts) == ["train", "val", "test"]
    assert parts["train"].files == ["t0.jpg", "t1.jpg", "t3.jpg"]  # one copy of 1, the first
    assert parts["val"].files == ["v1.jpg", "v2.jpg", "v4.jpg"]  # copy of train out, one copy of 4 kept
    # s0 has train's pixels, s1 train's file name, s2 val's pixels; of the two 7s (s1, s4) only s4 was left
    assert parts["test"].files == ["s3.jpg", "s4.jpg", "s5.jpg"]
    assert removed == {"train": 1, "val": 2, "test": 3}
    assert [int(image[0, 0, 0]) for image in parts["test"].images] == [8, 7, 9]  # images travel with their files
    assert {name: len(parts[name]) + removed[name] for name in parts} == {"train": 4, "val": 5, "test": 6}


def test_disjoint_parts_compares_with_an_earlier_part_as_given_and_names_clash_across_folders():
    train = _set([_image(1), _image(1)], ["ig/MY_1.jpg", "ig/MY_2.jpg"])  # MY_2 is dropped from train as a copy ...
    test = _set([_image(5), _image(6)], ["neutrophil/MY_2.jpg", "neutrophil/SNE_3.jpg"])  # ... but still its file
    parts, removed = datasets.disjoint_parts({"train": train, "test": test}, order=("train", "test"))
    assert parts["train"].files == ["ig/MY_1.jpg"] and parts["test"].files == ["neutrophil/SNE_3.jpg"]
    assert removed == {"train": 1, "test": 1}


def test_disjoint_parts_returns_the_same_sets_when_nothing_is_shared_and_follows_the_order():
    a = _set([_image(1), _image(2)], ["a.jpg", "b.jpg"], labels=[1, 0])
    b = _set([_image(3)], ["c.jpg"])
    parts, removed = datasets.disjoint_parts({"train": a, "val": b}, order=("train", "val"))
    assert parts["train"] is a and parts["val"] is b and removed == {"train": 0, "val": 0}
    shared = _set([_image(2), _image(4)], ["x.jpg", "y.jpg"])
    parts, removed = datasets.disjoint_parts({"first": shared, "second": a}, order=("first", "second"))
    assert parts["first"] is shared and parts["second"].files == ["a.jpg"] and removed == {"first": 0, "second": 1}
    assert parts["second"].labels.tolist() == [1]
    with pytest.raises(ValueError, match="do not match the order"):
        datasets.disjoint_parts({"train": a, "val": b})  # no test part


def test_disjoint_parts_works_on_segmentation_sets():
    masks = [np.zeros((3, 3), np.uint16)] * 3
    train = datasets.SegmentationSet([_image(1, (3, 3)), _image(2, (3, 3))], masks[:2], ["p", "q"])
    test = datasets.SegmentationSet([_image(2, (3, 3)), _image(3, (3, 3)), _image(3, (3, 3))], masks, ["r", "s", "t"])
    parts, removed = datasets.disjoint_parts({"train": train, "test": test}, order=("train", "test"))
    assert parts["test"].ids == ["s"] and removed == {"train": 0, "test": 2}


def test_pbc28_duplicates_are_found_and_three_groups_straddle_train_and_test(real_data):
    parts = {split: datasets.load_pbc28(split) for split in ("train", "val", "test")}
    images = np.concatenate([part.images for part in parts.values()])
    split_of = np.concatenate([[split] * len(part) for split, part in parts.items()])
    groups = datasets.duplicate_groups(images)
    assert len(groups) == 16 and all(len(group) == 2 for group in groups)
    straddle = Counter(tuple(sorted(set(split_of[group]))) for group in groups)
    assert straddle[("test", "train")] == 3 and straddle[("train", "val")] == 4
    shared = datasets.overlap(parts["train"], parts["test"])
    assert len(shared.pixels) == 3 and not shared.files  # copies under other names, not the same file
    assert datasets.assert_disjoint(parts["train"], datasets.without(parts["test"], parts["train"])).disjoint
    cleaned, removed = datasets.disjoint_parts(parts)  # 8 within train; 4 train/val and 1 within val; 3 train/test
    assert removed == {"train": 8, "val": 5, "test": 3}
    assert {name: len(cleaned[name]) + removed[name] for name in parts} == {n: len(p) for n, p in parts.items()}
    assert not datasets.duplicate_groups(np.concatenate([part.images for part in cleaned.values()]))


# --- PBC sub-types from the file names ---------------------------------------------------------------------


def test_subtype_code_reads_the_prefix_of_the_base_name():
    assert datasets.subtype_code("ig/MMY_123.jpg") == "MMY"
    assert datasets.subtype_code("neutrophil\\sne_9.jpg") == "SNE"
    assert datasets.subtype_code("ig/IG_1.jpg") == "IG"
    assert datasets.subtype_code("nounderscore.jpg") == ""


def test_subtype_set_keeps_the_class_cells_with_a_known_subtype():
    files = ["ig/MY_1.jpg", "ig/IG_2.jpg", "neutrophil/BNE_3.jpg", "ig/PMY_4.jpg", "ig/MMY_5.jpg", "ig/MY_6.jpg"]
    data = datasets.ImageSet(np.stack([_image(i) for i in range(6)]), np.array([0, 0, 1, 0, 0, 0]),
                             ["ig", "neutrophil"], files, "test")
    ig = datasets.subtype_set(data, "ig")
    assert ig.class_names == ["MMY", "MY", "PMY"]
    assert ig.files == ["ig/MY_1.jpg", "ig/PMY_4.jpg", "ig/MMY_5.jpg", "ig/MY_6.jpg"]  # IG_2: sub-type unknown
    assert ig.labels.tolist() == [1, 2, 0, 1]
    assert (ig.images[:, 0, 0, 0] == [0, 3, 4, 5]).all()
    neutrophils = datasets.subtype_set(data, "neutrophil")
    assert neutrophils.class_names == ["BNE", "SNE"] and neutrophils.labels.tolist() == [0]


def test_subtype_set_refuses_unknown_classes_and_sets_without_file_names():
    data = datasets.ImageSet(np.stack([_image(0), _image(1)]), np.array([0, 1]), ["ig", "basophil"])
    with pytest.raises(DataError, match="no sub-types known for class 'basophil'"):
        datasets.subtype_set(data, "basophil")
    with pytest.raises(DataError, match="not in the data"):
        datasets.subtype_set(data, "neutrophil")
    with pytest.raises(DataError, match="has a sub-type in its file name"):
        datasets.subtype_set(data, "ig")


def test_pbc28_test_split_subtypes(real_data):
    test = datasets.load_pbc28("test")
    ig, neutrophils = datasets.subtype_set(test, "ig"), datasets.subtype_set(test, "neutrophil")
    assert ig.class_counts() == {"MMY": 133, "MY": 209, "PMY": 87}
    assert neutrophils.class_counts() == {"BNE": 261, "SNE": 271}
    assert all(f.startswith("ig/") for f in ig.files)
