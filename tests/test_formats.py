"""Image and label formats (cellkit.formats): OME-TIFF and OME-Zarr in with their pixel size, labels out as OME-Zarr
and OME-TIFF keeping it (checked with ome-zarr's own reader), and ``cellkit segment --output-format``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import zarr

from cellkit import cli, formats, outputs, synthetic
from cellkit.datasets import DataError


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    labels = synthetic.nuclei_field(shape=(300, 420), n_nuclei=40, seed=2).labels.astype(np.uint32)
    labels[labels == 1] = 70_000  # beyond what a 16-bit PNG holds
    return labels


def write_ome_zarr_image(path, image: np.ndarray, pixel_size=(0.4, 0.3)) -> None:
    """An OME-Zarr (NGFF 0.5, two levels, axes c, y, x) written by ome-zarr itself."""
    from ome_zarr.writer import write_image

    group = zarr.open_group(str(path), mode="w")
    write_image(image[None], group, scale_factors=(2,), axes="cyx",
                scale={"c": 1.0, "y": pixel_size[0], "x": pixel_size[1]},
                axes_units={"y": "micrometer", "x": "micrometer"})


def test_ome_tiff_labels_round_trip_keeps_the_pixel_size(labels, tmp_path):
    formats.write_labels_file(labels, tmp_path / "a.ome.tif", "ome-tiff", (0.65, 0.5))
    back, pixel_size = formats.read_labels_file(tmp_path / "a.ome.tif")
    assert back.dtype == np.uint32 and np.array_equal(back, labels)
    assert pixel_size == pytest.approx((0.65, 0.5))
    formats.write_ome_tiff(zarr.array(labels, chunks=(128, 128)), tmp_path / "b.ome.tif", (0.65, 0.5), tile=64)
    with tifffile.TiffFile(tmp_path / "b.ome.tif") as tiff:
        assert tiff.is_ome and tiff.pages[0].is_tiled
    back, pixel_size = formats.read_labels_file(tmp_path / "b.ome.tif")
    assert np.array_equal(back, labels) and pixel_size == pytest.approx((0.65, 0.5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ome.tif", "b.ome.tif"]  # no temporary file left


def test_ome_zarr_labels_round_trip_and_read_in_ome_zarr(labels, tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    path = tmp_path / "a.ome.zarr"
    formats.write_labels_file(labels, path, "ome-zarr", (0.65, 0.5))
    back, pixel_size = formats.read_labels_file(path)
    assert np.array_equal(back, labels) and pixel_size == pytest.approx((0.65, 0.5))
    node = next(iter(Reader(parse_url(str(path)))()))
    assert [axis["name"] for axis in node.metadata["axes"]] == ["y", "x"]
    assert node.metadata["coordinateTransformations"][0][0]["scale"] == [0.65, 0.5]
    assert np.array_equal(np.asarray(node.data[0]), labels)
    formats.write_labels_file(labels[::-1], path, "ome-zarr", None)  # the same output again: replaced whole
    back, pixel_size = formats.read_labels_file(path)
    assert np.array_equal(back, labels[::-1]) and pixel_size is None
    assert [p.name for p in tmp_path.iterdir()] == ["a.ome.zarr"]


def test_an_ome_tiff_image_gives_its_pixel_size_in_micrometres(tmp_path):
    image = synthetic.nuclei_field(shape=(200, 260), seed=3).fluorescence
    tifffile.imwrite(tmp_path / "a.ome.tif", image, ome=True, metadata={
        "axes": "YX", "PhysicalSizeY": 700, "PhysicalSizeYUnit": "nm", "PhysicalSizeX": 650,
        "PhysicalSizeXUnit": "nm"})
    tifffile.imwrite(tmp_path / "plain.tif", image)
    opened = formats.open_image(tmp_path / "a.ome.tif")
    assert not opened.lazy and np.array_equal(opened.data, image)
    assert opened.pixel_size == pytest.approx((0.7, 0.65))
    assert formats.open_image(tmp_path / "plain.tif").pixel_size is None
    lazy = formats.open_image(tmp_path / "a.ome.tif", lazy_pixels=1000)  # a large TIFF: read block by block
    assert lazy.lazy and np.array_equal(np.asarray(lazy.data), image)


def test_an_ome_zarr_image_is_read_lazily_at_level_0(tmp_path):
    image = synthetic.nuclei_field(shape=(200, 300), seed=4).fluorescence
    write_ome_zarr_image(tmp_path / "a.ome.zarr", image)
    opened = formats.open_image(tmp_path / "a.ome.zarr")
    assert opened.lazy and opened.data.shape == (200, 300)
    assert np.array_equal(np.asarray(opened.data), image) and opened.pixel_size == pytest.approx((0.4, 0.3))
    assert formats.image_pixels(tmp_path / "a.ome.zarr") == 200 * 300


def test_a_zarr_without_y_and_x_axes_is_one_line(tmp_path):
    group = zarr.open_group(str(tmp_path / "bad.ome.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=(2, 50, 60), dtype="uint8")
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "t"}, {"name": "c"}, {"name": "z"}],
                                   "datasets": [{"path": "0"}]}]
    with pytest.raises(DataError) as error:
        formats.open_image(tmp_path / "bad.ome.zarr")
    assert "y and x axes" in str(error.value) and "\n" not in str(error.value)
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").create_array("0", shape=(5, 5), dtype="uint8")
    with pytest.raises(DataError, match="without OME-Zarr multiscales"):
        formats.open_image(tmp_path / "plain.zarr")


def test_auto_format_is_png_up_to_the_block_threshold():
    assert formats.label_format("auto", formats.LAZY_PIXELS) == "png"
    assert formats.label_format("auto", formats.LAZY_PIXELS + 1) == "ome-zarr"
    assert formats.label_format("auto", None) == "png"
    assert formats.label_format("ome-tiff", 10) == "ome-tiff"


# --- the command line -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """An untrained 4-filter U-Net saved as a model file: its labels mean nothing, the files around them do."""
    from cellkit import unet

    config = unet.UNetConfig(base_filters=4)
    path = tmp_path_factory.mktemp("model") / "unet.keras"
    unet.save_unet(unet.build_from_config(config), config, path)
    return path


def test_segment_ome_tiff_and_plain_tiff_to_ome_zarr_keeps_pixel_sizes(model_file, tmp_path, capsys):
    source = tmp_path / "in"
    source.mkdir()
    image = synthetic.nuclei_field(shape=(160, 200), seed=5).fluorescence
    tifffile.imwrite(source / "a.ome.tif", image, ome=True, metadata={"axes": "YX", "PhysicalSizeY": 0.65,
                                                                     "PhysicalSizeX": 0.6})
    tifffile.imwrite(source / "b.tif", image)
    argv = ["segment", "--model", str(model_file), "--input", str(source), "--out", str(tmp_path / "out"),
            "--output-format", "ome-zarr", "--quiet"]
    assert cli.main(argv) == 0
    _, pixel_size = formats.read_labels_file(tmp_path / "out" / "a.ome.zarr")
    assert pixel_size == pytest.approx((0.65, 0.6))
    assert formats.read_labels_file(tmp_path / "out" / "b.ome.zarr")[1] is None
    header = json.loads((tmp_path / "out" / outputs.MANIFEST).read_text())
    assert header["finished"] and header["n_done"] == 2 and header["options"]["output_format"] == "ome-zarr"
    entries = outputs.read_entries(tmp_path / "out")
    assert entries["a.ome.tif"]["output"] == "a.ome.zarr" and entries["a.ome.tif"]["pixel_size_um"] == [0.65, 0.6]
    capsys.readouterr()
    assert cli.main(argv) == 0  # the same command again: both are done (the OME-Zarr folders count as outputs)
    assert "0 of 2 images (2 done before" in capsys.readouterr().out


def test_segment_auto_writes_block_wise_ome_zarr_above_the_threshold(model_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(formats, "LAZY_PIXELS", 150 * 150)
    source = tmp_path / "in"
    source.mkdir()
    write_ome_zarr_image(source / "big.ome.zarr", synthetic.nuclei_field(shape=(200, 300), seed=6).fluorescence)
    tifffile.imwrite(source / "small.tif", synthetic.nuclei_field(shape=(100, 120), seed=7).fluorescence)
    assert cli.main(["segment", "--model", str(model_file), "--input", str(source), "--out",
                     str(tmp_path / "out"), "--quiet"]) == 0
    entries = outputs.read_entries(tmp_path / "out")
    assert entries["big.ome.zarr"]["output"] == "big.ome.zarr" and entries["big.ome.zarr"]["blocks"] >= 1
    assert entries["small.tif"]["output"] == "small.png"
    labels, pixel_size = formats.read_labels_file(tmp_path / "out" / "big.ome.zarr")
    assert labels.shape == (200, 300) and pixel_size == pytest.approx((0.4, 0.3))
    assert "OME-Zarr" in capsys.readouterr().out
